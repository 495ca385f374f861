"""Conversion benchmarks: throughput, scaling, store size, codecs, peak memory.

Not part of the test suite.  Run from the repository root::

    python benchmarks/bench_convert.py            # full-size series, ~5-10 minutes on 2 cores
    python benchmarks/bench_convert.py --quick    # small series, ~1 minute smoke run

Everything runs on example data written by :func:`livercube.synth.dicom_collections.write_crlm`
(512×512 GE CT series, ~100 slices, one 200-slice series, DICOM-SEG with overlapping tumours).
External tools are run as child processes and timed with ``os.wait4``, which returns the
child's own resource usage (user + system CPU of it and its reaped descendants, peak RSS), so
"per core" figures divide by CPU seconds actually spent, not by wall time.

Goals are reported, never asserted (see benchmarks/README.md, section "Conversion").
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

BIN = Path(sys.executable).parent
LIVERCUBE = str(BIN / "livercube")
DCM2NIIX = shutil.which("dcm2niix", path=str(BIN)) or shutil.which("dcm2niix") or "dcm2niix"
MB = 1e6  # decimal megabytes throughout (MB/s as storage vendors and dcm2niix users quote it)

#: real collections, source DICOM/NIfTI bytes (TCIA listings, rounded): HCC-TACE-Seg ~28 GB,
#: CRLM ~12 GB, PLC-CECT ~5 GB  -> ~45 GB.  Used only by the scaling model.
REAL_SOURCE_GB = 45.0
#: largest single volume we expect in the real collections (a 1 mm thin-slice 3-phase
#: acquisition, ~600 slices of 512², ~315 MB of DICOM): the straggler in the model.
REAL_LARGEST_MB = 315.0
#: object-store read+write bandwidth one worker can sustain (assumption, S3-class store).
OBJECT_STORE_MB_S_PER_WORKER = 100.0
#: aggregate bandwidth cap of the bucket/network (assumption).
OBJECT_STORE_MB_S_TOTAL = 5000.0
#: scheduler + worker start, planning overhead per run (assumption, seconds).
CLUSTER_OVERHEAD_S = 60.0
#: client-side cost of planning per file once the header reads run on the workers (listing,
#: unpickling the compact outcomes, grouping), measured by ``bench_plan.py`` (CPU time).
CLIENT_PLAN_S_PER_FILE = 190e-6


# --------------------------------------------------------------------------- helpers


@dataclass
class Run:
    label: str
    wall_s: float
    cpu_s: float
    maxrss_mb: float
    returncode: int

    @property
    def cores_used(self) -> float:
        return self.cpu_s / self.wall_s if self.wall_s else 0.0


#: A tiny launcher: spawns the command and reports the child's rusage from wait4.  Measuring
#: from a slim process matters for peak RSS: Linux carries the pre-exec high-water mark of a
#: forked child into ru_maxrss, so a child forked straight from this (large) process would
#: report at least this process's RSS.
_LAUNCHER = """
import json, os, sys, time
t0 = time.perf_counter()
pid = os.posix_spawn(sys.argv[2], sys.argv[2:], os.environ)
_, status, ru = os.wait4(pid, 0)
wall = time.perf_counter() - t0
with open(sys.argv[1], "w") as f:
    json.dump({"wall": wall, "cpu": ru.ru_utime + ru.ru_stime, "maxrss_kib": ru.ru_maxrss,
               "rc": os.waitstatus_to_exitcode(status)}, f)
"""


def run_child(label: str, argv: list[str], log: Path, ok: tuple[int, ...] = (0,)) -> Run:
    """Run ``argv``; wall time, CPU (user+sys incl. reaped descendants) and peak RSS via wait4."""
    exe = shutil.which(argv[0]) or argv[0]
    result = log.with_suffix(".last.json")
    with open(log, "ab") as out:
        out.write(f"\n$ {' '.join(argv)}\n".encode())
        out.flush()
        subprocess.run(
            [sys.executable, "-c", _LAUNCHER, str(result), exe, *argv[1:]],
            stdout=out,
            stderr=subprocess.STDOUT,
            check=True,
        )
    r = json.loads(result.read_text())
    if r["rc"] not in ok:
        raise SystemExit(f"{label} failed with exit {r['rc']}; see {log}")
    # ru_maxrss is KiB on Linux
    return Run(label, r["wall"], r["cpu"], r["maxrss_kib"] / 1024, r["rc"])


def best(runs: list[Run]) -> Run:
    """The fastest of repeated runs (least disturbed by the machine); CPU from the same run."""
    return min(runs, key=lambda r: r.wall_s)


def tree_bytes(path: Path, suffix: str | None = None) -> int:
    return sum(
        p.stat().st_size
        for p in Path(path).rglob("*")
        if p.is_file() and (suffix is None or p.name.endswith(suffix))
    )


def link_subset(src_root: Path, dst_root: Path, patient_dirs: list[Path]) -> Path:
    """A collection root holding only some patients (hard links, no copies) + the clinical file."""
    dst_root.mkdir(parents=True)
    for p in patient_dirs:
        rel = p.relative_to(src_root)
        shutil.copytree(p, dst_root / rel, copy_function=os.link)
    for f in src_root.glob("*.xlsx"):
        os.link(f, dst_root / f.name)
    return dst_root


def fmt(v: float, nd: int = 1) -> str:
    if v != v:  # NaN
        return "–"
    return f"{v:,.{nd}f}"


def machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{os.cpu_count()} cores ({model}), Python {platform.python_version()}, {platform.system()}"
    )


def versions() -> str:
    from importlib.metadata import version

    out = []
    for pkg in ("livercube", "dask", "zarr", "numcodecs", "pydicom", "dcm2niix"):
        with contextlib.suppress(Exception):
            out.append(f"{pkg} {version(pkg)}")
    return ", ".join(out)


# --------------------------------------------------------------------------- parts


#: What a ``convert --scheduler threads`` run imports before it converts anything: the
#: interpreter + library floor its CPU and memory are compared against.
CLI_IMPORTS = (
    "import livercube.cli, livercube.convert, livercube.local_graph, dask.threaded, zarr, pydicom"
)


def convert_cli(src: Path, dest: Path, *, scheduler: str, workers: int) -> list[str]:
    return [
        LIVERCUBE,
        "convert",
        str(src),
        str(dest),
        "--collection",
        "crlm",
        "--scheduler",
        scheduler,
        "--workers",
        str(workers),
        "--quiet",
    ]


def bench_throughput(one: Path, series_dir: Path, work: Path, repeats: int, log: Path) -> dict:
    src_mb = tree_bytes(series_dir) / MB
    runs: dict[str, list[Run]] = {"livercube": [], "dcm2niix -z y": [], "dcm2niix -z n": []}
    for i in range(repeats):
        dest = work / f"tp-store-{i}.zarr"
        runs["livercube"].append(
            run_child(
                "livercube",
                convert_cli(one, dest, scheduler="threads", workers=1),
                log,
                ok=(0, 3),
            )
        )
        for z in ("y", "n"):
            out = work / f"tp-dcm2niix-{z}-{i}"
            out.mkdir()
            runs[f"dcm2niix -z {z}"].append(
                run_child(
                    f"dcm2niix -z {z}",
                    [DCM2NIIX, "-z", z, "-f", "%p_%s", "-o", str(out), str(series_dir)],
                    log,
                )
            )
    # the livercube CLI run includes interpreter + library import; measure that floor too
    floor = best(
        [
            run_child(
                "import floor",
                [
                    sys.executable,
                    "-c",
                    CLI_IMPORTS,
                ],
                log,
            )
            for _ in range(repeats)
        ]
    )
    out: dict[str, Any] = {"source_ct_mb": src_mb, "import_floor": asdict(floor)}
    for name, rs in runs.items():
        b = best(rs)
        out[name] = {
            **asdict(b),
            "mb_s_wall": src_mb / b.wall_s,
            "mb_per_cpu_s": src_mb / b.cpu_s,
            "walls": [r.wall_s for r in rs],
        }
    lc = best(runs["livercube"])
    steady_wall = max(lc.wall_s - floor.wall_s, 1e-9)
    steady_cpu = max(lc.cpu_s - floor.cpu_s, 1e-9)
    out["livercube minus import floor"] = {
        "wall_s": steady_wall,
        "cpu_s": steady_cpu,
        "mb_s_wall": src_mb / steady_wall,
        "mb_per_cpu_s": src_mb / steady_cpu,
    }
    out["store_bytes"] = tree_bytes(work / "tp-store-0.zarr")
    out["niigz_bytes"] = tree_bytes(work / "tp-dcm2niix-y-0", ".nii.gz")
    out["nii_bytes"] = tree_bytes(work / "tp-dcm2niix-n-0", ".nii")
    return out


def bench_task_times(src: Path, work: Path) -> dict:
    """Per-volume task time in-process (plan once, then each task alone on this thread)."""
    import zarr

    from livercube.convert import _volume_task
    from livercube.sources import dicom_collection
    from livercube.store.writer import write_volume

    zarr.open_group(str(work / "task-split.zarr"), mode="w", zarr_format=3)

    t0 = time.perf_counter()
    plan = dicom_collection.plan(str(src), "crlm")
    plan_s = time.perf_counter() - t0
    n_files = sum(len(t.acquisition.slices) for t in plan.tasks)
    from livercube.convert import _prepare_root
    from livercube.store.location import StoreLocation

    dest = StoreLocation.of(work / "task-store.zarr")
    _prepare_root(dest, "crlm", plan.clinical_columns)
    # a worker pays its first-use costs (lazy imports, codec set-up) once, not per volume:
    # one untimed task into a scratch store first, its CPU reported on its own
    scratch = StoreLocation.of(work / "task-warmup.zarr")
    _prepare_root(scratch, "crlm", plan.clinical_columns)
    c0 = time.process_time()
    _volume_task(plan.tasks[0], scratch, None)
    warmup_cpu_s = time.process_time() - c0
    rows = []
    for task in plan.tasks:
        mb = task.acquisition.file_bytes / MB
        w0, c0 = time.perf_counter(), time.process_time()
        rec = _volume_task(task, dest, None)
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
        # the same task again in its two halves: decode (CT + SEG) and write (encode+upload)
        c1 = time.process_time()
        volume, _ = task.read(None)
        c2 = time.process_time()
        write_volume(str(work / "task-split.zarr"), volume, fingerprint=task.fingerprint)
        c3 = time.process_time()
        del volume
        rows.append(
            {
                "key": task.key,
                "status": rec["status"],
                "shape": rec.get("shape"),
                "source_mb": mb,
                "wall_s": wall,
                "cpu_s": cpu,
                "read_cpu_s": c2 - c1,
                "write_cpu_s": c3 - c2,
            }
        )
    return {
        "plan_s": plan_s,
        "plan_files": n_files,
        "tasks": rows,
        "warmup_cpu_s": warmup_cpu_s,
        "warmup_key": plan.tasks[0].key,
    }


#: The control's work: Blosc zstd 5 of a noisy int16 CT-like buffer, one thread, no I/O —
#: the same kind of CPU and memory traffic as a conversion task's encode.
_CONTROL = """
import numpy as np
from numcodecs import Blosc
rng = np.random.default_rng(0)
a = (rng.normal(40, 20, size=(32, 64, 64)).astype(np.int16))
c = Blosc("zstd", 5, Blosc.SHUFFLE)
for _ in range({n}):
    c.encode(a)
"""


def parallel_control(iterations: int = 1500) -> float:
    """Speed-up the machine gives right now to 2 vs 1 identical CPU-bound processes (numpy +
    Blosc, no I/O): the ceiling for any 1 → 2 worker measurement on a shared machine."""
    code = _CONTROL.format(n=iterations)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True)
    one = time.perf_counter() - t0
    t0 = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, "-c", code]) for _ in range(2)]
    for p in procs:
        p.wait()
    two = time.perf_counter() - t0
    return 2 * one / two


def bench_scaling(four: Path, one: Path, work: Path, log: Path) -> dict:
    res: dict[Any, Any] = {"control_before": parallel_control()}
    for n in (1, 2):
        r = run_child(
            f"local x{n}",
            convert_cli(four, work / f"scale-{n}.zarr", scheduler="local", workers=n),
            log,
            ok=(0, 3),
        )
        res[n] = asdict(r)
    res["speedup"] = res[1]["wall_s"] / res[2]["wall_s"]
    res.update(bench_scaling_warm(four, one, work))
    res["control_after"] = parallel_control()
    res["source_mb"] = tree_bytes(four / "Colorectal-Liver-Metastases") / MB
    return res


def bench_scaling_warm(four: Path, one: Path, work: Path) -> dict:
    """1 vs 2 workers on an already running LocalCluster (``--scheduler tcp://…`` path)
    that has converted a volume before (``one``, into a scratch store): excludes worker
    start-up, imports and first-use costs, which the CLI runs pay every time."""
    import logging

    from distributed import Client, LocalCluster

    from livercube.convert import convert

    logging.getLogger("distributed").setLevel(logging.WARNING)
    out = {}
    for n in (1, 2):
        with (
            LocalCluster(
                n_workers=n, threads_per_worker=1, processes=True, dashboard_address=":0"
            ) as cluster,
            Client(cluster) as client,
        ):
            # warm as a cluster that has converted before: every worker plans and converts
            convert(
                str(one),
                str(work / f"warmup-{n}.zarr"),
                "crlm",
                scheduler=cluster.scheduler_address,
                progress=False,
            )
            client.run(lambda: __import__("livercube.sources.dicom_collection"))
            t0 = time.perf_counter()
            rep = convert(
                str(four),
                str(work / f"warm-{n}.zarr"),
                "crlm",
                scheduler=cluster.scheduler_address,
                progress=False,
            )
            out[f"warm_{n}_s"] = time.perf_counter() - t0
            out[f"warm_{n}_converted"] = len(rep.converted)
    out["warm_speedup"] = out["warm_1_s"] / out["warm_2_s"]
    return out


def scaling_model(mb_s_per_worker: float, plan_files_s: float, mean_file_mb: float) -> list[dict]:
    """Wall time for ~45 GB on N workers from the measured per-worker rate.

    Assumptions (printed with the table): embarrassingly parallel per-volume tasks; each
    worker converts at the measured CPU-bound rate unless the object store gives it less
    (``OBJECT_STORE_MB_S_PER_WORKER``) or the bucket saturates (``OBJECT_STORE_MB_S_TOTAL``);
    greedy list scheduling finishes within ``S/(N·r) + t_largest`` (the straggler is the
    largest volume, started last in the worst case); the client plans from headers before
    the first task: header reads spread over the workers (measured files/s of one process),
    grouping on the client (``CLIENT_PLAN_S_PER_FILE``); fixed cluster start.
    """
    total_mb = REAL_SOURCE_GB * 1000
    files = total_mb / mean_file_mb
    rows = []
    for n in (1, 8, 32, 128):
        plan_s = files / plan_files_s / n + files * CLIENT_PLAN_S_PER_FILE
        r = min(mb_s_per_worker, OBJECT_STORE_MB_S_PER_WORKER, OBJECT_STORE_MB_S_TOTAL / n)
        ideal = total_mb / (n * r)
        straggler = REAL_LARGEST_MB / r
        fixed = CLUSTER_OVERHEAD_S + plan_s
        rows.append(
            {
                "workers": n,
                "rate_mb_s_per_worker": r,
                "plan_min": plan_s / 60,
                "convert_lower_h": max(ideal, straggler) / 3600,
                "lower_bound_h": (fixed + max(ideal, straggler)) / 3600,
                "upper_bound_h": (fixed + ideal + straggler) / 3600,
                "straggler_min": straggler / 60,
                "speedup_vs_1": 0.0,
            }
        )
    for row in rows:
        row["speedup_vs_1"] = rows[0]["lower_bound_h"] / row["lower_bound_h"]
    return rows


def bench_rss(largest: Path, work: Path, raw_mb: float, log: Path) -> dict:
    r = run_child(
        "rss",
        convert_cli(largest, work / "rss.zarr", scheduler="threads", workers=1),
        log,
        ok=(0, 3),
    )
    floor = run_child(
        "rss floor",
        [
            sys.executable,
            "-c",
            CLI_IMPORTS,
        ],
        log,
    )
    return {
        "peak_rss_mb": r.maxrss_mb,
        "import_floor_rss_mb": floor.maxrss_mb,
        "largest_raw_mb": raw_mb,
        "ratio": r.maxrss_mb / raw_mb,
        "ratio_above_floor": (r.maxrss_mb - floor.maxrss_mb) / raw_mb,
    }


def store_volume(store: Path, report_path: Path | None = None) -> tuple[Path, dict]:
    rep = json.loads((report_path or store / "livercube-report.json").read_text())
    rec = rep["converted"][0]
    return store / rec["path"], rec


def bench_size(store: Path, work: Path, niigz_dcm2niix: int) -> tuple[dict, np.ndarray, np.ndarray]:
    """Store bytes of one volume vs the same arrays as .nii.gz (SimpleITK) and dcm2niix -z y."""
    import SimpleITK as sitk
    import zarr

    vol_dir, _ = store_volume(store)
    g = zarr.open_group(str(vol_dir / "0"), mode="r")  # level 0: the full-resolution arrays
    image = np.asarray(g["image"][:])
    label = np.asarray(g["label"][:])
    out = {}
    for name, arr in (("image", image), ("label", label)):
        path = work / f"size-{name}.nii.gz"
        sitk.WriteImage(sitk.GetImageFromArray(arr), str(path), True)
        out[f"{name}_niigz"] = path.stat().st_size
        out[f"{name}_store"] = tree_bytes(vol_dir / "0" / name)
    out["store_volume_total"] = tree_bytes(vol_dir)
    out["segments_store"] = (
        tree_bytes(vol_dir / "0" / "segments") if (vol_dir / "0" / "segments").exists() else 0
    )
    out["dcm2niix_niigz"] = niigz_dcm2niix
    out["raw_image"] = image.nbytes
    out["image_ratio_vs_sitk"] = out["image_store"] / out["image_niigz"]
    out["image_ratio_vs_dcm2niix"] = out["image_store"] / niigz_dcm2niix
    out["total_ratio_vs_sitk"] = out["store_volume_total"] / (
        out["image_niigz"] + out["label_niigz"]
    )
    return out, image, label


def bench_codecs(image: np.ndarray, label: np.ndarray, repeats: int) -> list[dict]:
    """Chunk-wise (32×64×64, as in the store) ratio, encode and decode speed, one thread."""
    import numcodecs
    from numcodecs import GZip, Zstd
    from numcodecs.blosc import BITSHUFFLE, SHUFFLE, Blosc

    from livercube.store.chunking import chunk_and_shard

    numcodecs.blosc.set_nthreads(1)
    from livercube.store.shards import numcodecs_blosc
    from livercube.store.writer import BLOSC_BLOCK_BYTES, COMPRESSOR, LABEL_COMPRESSOR

    block = BLOSC_BLOCK_BYTES
    codecs = [
        (
            "blosc zstd 1 shuffle, 256 KiB blocks (store)",
            "image",
            numcodecs_blosc(COMPRESSOR, image.dtype),
        ),
        ("blosc zstd 1 shuffle, automatic blocks", "image", Blosc("zstd", 1, SHUFFLE)),
        (
            "blosc zstd 2 shuffle, 256 KiB blocks",
            "image",
            Blosc("zstd", 2, SHUFFLE, blocksize=block),
        ),
        ("blosc zstd 3 shuffle", "image", Blosc("zstd", 3, SHUFFLE)),
        ("blosc zstd 5 shuffle (store 2.0)", "image", Blosc("zstd", 5, SHUFFLE)),
        (
            "blosc zstd 1 bitshuffle, 256 KiB blocks",
            "image",
            Blosc("zstd", 1, BITSHUFFLE, blocksize=block),
        ),
        ("blosc zstd 5 bitshuffle", "image", Blosc("zstd", 5, BITSHUFFLE)),
        ("blosc lz4 shuffle, 256 KiB blocks", "image", Blosc("lz4", 1, SHUFFLE, blocksize=block)),
        ("zstd 5 (no shuffle)", "image", Zstd(5)),
        ("gzip 6", "image", GZip(6)),
        (
            "blosc lz4 no shuffle, 256 KiB blocks (store)",
            "label",
            numcodecs_blosc(LABEL_COMPRESSOR, label.dtype),
        ),
        ("blosc zstd 1 no shuffle, 256 KiB blocks", "label", Blosc("zstd", 1, 0, blocksize=block)),
        ("blosc zstd 5 bitshuffle (store 2.0)", "label", Blosc("zstd", 5, BITSHUFFLE)),
        ("gzip 6", "label", GZip(6)),
    ]
    rows = []
    for arr_name, arr in (("image", image), ("label", label)):
        cz, cy, cx = chunk_and_shard(arr.shape)[0]
        chunks = [
            np.ascontiguousarray(arr[z : z + cz, y : y + cy, x : x + cx])
            for z in range(0, arr.shape[0], cz)
            for y in range(0, arr.shape[1], cy)
            for x in range(0, arr.shape[2], cx)
        ]
        raw = sum(c.nbytes for c in chunks)
        for name, which, codec in codecs:
            if which != arr_name:
                continue
            enc_t, dec_t = [], []
            for _ in range(repeats):
                t0 = time.perf_counter()
                encoded = [codec.encode(c) for c in chunks]
                enc_t.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                for e, c in zip(encoded, chunks, strict=True):
                    codec.decode(e, out=np.empty_like(c))
                dec_t.append(time.perf_counter() - t0)
            size = sum(len(e) for e in encoded)
            rows.append(
                {
                    "array": arr_name,
                    "codec": name,
                    "ratio": raw / size,
                    "encode_mb_s": raw / MB / min(enc_t),
                    "decode_mb_s": raw / MB / min(dec_t),
                }
            )
    return rows


def _engine_candidates(image: np.ndarray, root: Path, threads: int) -> dict[str, Any]:
    """Ways to write ``image`` as the store's sharded ``0/image`` array under ``root``:
    ``{name: fn() -> directory of the array}``; libraries that are not installed are left out.
    """
    import zarr

    from livercube.store.chunking import chunk_and_shard
    from livercube.store.shards import (
        ShardLayout,
        encoder_pool,
        iter_shards,
        numcodecs_blosc,
        shard_key,
    )
    from livercube.store.writer import CHECKSUM, COMPRESSOR

    chunks, shards = chunk_and_shard(image.shape)

    def zarr_array(path: Path):
        return zarr.create_array(
            zarr.storage.LocalStore(path),
            shape=image.shape,
            dtype=image.dtype,
            chunks=chunks,
            shards=shards,
            compressors=[COMPRESSOR, CHECKSUM],
            fill_value=0,
            zarr_format=3,
            overwrite=True,
        )

    def zarr_python() -> Path:
        path = root / "zarr-python"
        with zarr.config.set({"threading.max_workers": threads}):
            zarr_array(path)[...] = image
        return path

    def livercube_encoder() -> Path:
        path = root / "livercube"
        zarr_array(path)  # metadata only
        layout = ShardLayout(image.shape, chunks, shards)
        with encoder_pool(threads) as pool:
            for coords, obj in iter_shards(
                image, layout, numcodecs_blosc(COMPRESSOR, image.dtype), 0, pool
            ):
                if obj is not None:
                    out = path / shard_key(coords)
                    out.parent.mkdir(parents=True, exist_ok=True)
                    out.write_bytes(obj)
        return path

    out: dict[str, Any] = {
        "zarr-python 3 (`arr[...] = data`, the previous writer)": zarr_python,
        "livercube shard encoder (numcodecs Blosc in threads + crc32c)": livercube_encoder,
    }
    with contextlib.suppress(ImportError):
        import zarrs  # noqa: F401

        def zarrs_pipeline() -> Path:
            path = root / "zarrs"
            cfg = {
                "codec_pipeline.path": "zarrs.ZarrsCodecPipeline",
                "threading.max_workers": threads,
                "codec_pipeline.concurrent_target": threads,
            }
            with zarr.config.set(cfg):
                zarr_array(path)[...] = image
            return path

        out["zarr-python + zarrs codec pipeline"] = zarrs_pipeline
    with contextlib.suppress(ImportError):
        import tensorstore as ts

        def tensorstore() -> Path:
            path = root / "tensorstore"
            zarr_array(path)  # the same zarr.json, then TensorStore opens it and writes
            ctx = ts.Context(
                {"data_copy_concurrency": {"limit": threads}, "file_io_concurrency": {"limit": 4}}
            )
            arr = ts.open({"driver": "zarr3", "kvstore": f"file://{path}"}, context=ctx).result()
            arr.write(image).result()
            return path

        out["TensorStore zarr3 driver"] = tensorstore
    return out


def bench_engines(image: np.ndarray, work: Path, repeats: int) -> list[dict]:
    """CPU and wall time of each engine writing the same noisy image, interleaved, at 1 and 2
    threads; every result is read back with zarr-python and compared voxel for voxel."""
    import zarr

    rows: dict[tuple[str, int], dict] = {}
    for _ in range(repeats):
        for threads in (1, 2):
            root = work / f"engines-{threads}"
            for name, fn in _engine_candidates(image, root, threads).items():
                shutil.rmtree(root, ignore_errors=True)
                c0, w0 = time.process_time(), time.perf_counter()
                path = fn()
                cpu, wall = time.process_time() - c0, time.perf_counter() - w0
                stored = tree_bytes(path / "c")
                same = bool(np.array_equal(zarr.open_array(str(path), mode="r")[...], image))
                row = rows.setdefault(
                    (name, threads),
                    {"engine": name, "threads": threads, "cpu": [], "wall": [], "same": True},
                )
                row["cpu"].append(cpu)
                row["wall"].append(wall)
                row["same"] &= same
                row["ratio"] = image.nbytes / stored
    shutil.rmtree(work / "engines-1", ignore_errors=True)
    shutil.rmtree(work / "engines-2", ignore_errors=True)
    out = []
    for row in rows.values():
        row["cpu_s"], row["wall_s"] = min(row["cpu"]), min(row["wall"])
        row["mb_per_cpu_s"] = image.nbytes / MB / row["cpu_s"]
        out.append(row)
    return out


def prepare_data(data: Path, size: str) -> dict:
    """Five CRLM patients and sub-roots (hard links): one series, four equal, the largest."""
    from livercube.synth.dicom_collections import write_crlm

    src = data / "src"
    truth = write_crlm(src, n_patients=5, size=size, keep_arrays=False)
    by_pid = {v.patient_id: v for v in truth.volumes}

    def pdir(pid: str) -> Path:
        rel = by_pid[pid].series_dir.relative_to(src)
        return src / rel.parts[0] / rel.parts[1]

    first = "CRLM-CT-1001"
    equal = [p for p in truth.patient_ids if by_pid[p].grid.shape == by_pid[first].grid.shape]
    largest = max(truth.patient_ids, key=lambda p: int(np.prod(by_pid[p].grid.shape)))
    link_subset(src, data / "src-one", [pdir(first)])
    link_subset(src, data / "src-four", [pdir(p) for p in equal[:4]])
    link_subset(src, data / "src-largest", [pdir(largest)])
    return {
        "size": size,
        "equal": equal[:4],
        "largest": largest,
        "series_dir": {p: str(v.series_dir) for p, v in by_pid.items()},
        "shape": {p: list(v.grid.shape) for p, v in by_pid.items()},
    }


# --------------------------------------------------------------------------- report


def goal(met: bool) -> str:
    return "met" if met else "NOT met"


def render(res: dict) -> str:
    tp, sc, sz, rss = res["throughput"], res["scaling"], res["size"], res["rss"]
    lc, zy, zn = tp["livercube"], tp["dcm2niix -z y"], tp["dcm2niix -z n"]
    steady = tp["livercube minus import floor"]
    L: list[str] = []
    L.append(f"date: {res['date']}   machine: {res['machine']}")
    L.append(f"versions: {res['versions']}   mode: {res['mode']}")
    L.append(
        "1-min load average at the start of each part (2 = both cores busy): "
        + ", ".join(f"{k} {v:.1f}" for k, v in res["loads"].items())
    )
    L.append("")
    L.append(
        f"### Throughput — one CT series, {tp['source_ct_mb']:.1f} MB of DICOM "
        f"({res['series_shape']}), best of {res['repeats']}"
    )
    L.append("")
    L.append(
        "| tool | wall s | CPU s | cores used | MB/s wall | MB per CPU-s "
        "| livercube ÷ tool (per CPU-s) |"
    )
    L.append("|---|---:|---:|---:|---:|---:|---:|")
    for name, r in (
        ("livercube convert (threads, 1 worker; CLI incl. start-up)", lc),
        ("livercube, start-up subtracted", steady),
        ("dcm2niix -z y", zy),
        ("dcm2niix -z n", zn),
    ):
        cores = r["cpu_s"] / r["wall_s"]
        L.append(
            f"| {name} | {fmt(r['wall_s'], 2)} | {fmt(r['cpu_s'], 2)} | {fmt(cores, 2)} | "
            f"{fmt(r['mb_s_wall'])} | {fmt(r['mb_per_cpu_s'])} | "
            f"{fmt(lc['mb_per_cpu_s'] / r['mb_per_cpu_s'], 2)}× |"
        )
    L.append("")
    L.append(
        f"Python + library import floor: {fmt(tp['import_floor']['wall_s'], 2)} s wall, "
        f"{fmt(tp['import_floor']['cpu_s'], 2)} s CPU."
    )
    tt = res["task_times"]
    conv = [t for t in tt["tasks"] if t["status"] == "converted"]
    L.append("")
    L.append(
        "Per-volume task, in-process (read CT + SEG, write image/label/segments): "
        + ", ".join(
            f"{t['key'].split('/')[0]} {t['shape'][0]} sl {fmt(t['source_mb'])} MB "
            f"{fmt(t['wall_s'], 2)} s ({fmt(t['source_mb'] / t['cpu_s'])} MB/CPU-s)"
            for t in conv
        )
        + f"; planning (headers of {tt['plan_files']} files): {fmt(tt['plan_s'], 2)} s.  "
        f"Measured after one untimed warm-up task (first-use costs, paid once per worker: "
        f"{fmt(tt.get('warmup_cpu_s', float('nan')), 2)} CPU s for "
        f"{tt.get('warmup_key', '-').split('/')[0]})."
    )
    L.append("")
    L.append("Per-volume task split into its halves (CPU s, in-process, same volumes again):")
    L.append("")
    L.append("| volume | slices | decode CT + SEG | write (encode + upload) | decode share |")
    L.append("|---|---:|---:|---:|---:|")
    for t in conv:
        r, w = t["read_cpu_s"], t["write_cpu_s"]
        L.append(
            f"| {t['key'].split('/')[0]} | {t['shape'][0]} | {fmt(r, 2)} | {fmt(w, 2)} | "
            f"{fmt(100 * r / (r + w), 0)} % |"
        )
    L.append("")
    L.append(
        f"### Scaling — {len(res['scaling_volumes'])} volumes, {fmt(sc['source_mb'])} MB, "
        "`--scheduler local`"
    )
    L.append("")
    L.append("| workers | wall s | CPU s | speed-up |")
    L.append("|---:|---:|---:|---:|")
    L.append(f"| 1 | {fmt(sc[1]['wall_s'], 2)} | {fmt(sc[1]['cpu_s'], 2)} | 1.00× |")
    L.append(
        f"| 2 | {fmt(sc[2]['wall_s'], 2)} | {fmt(sc[2]['cpu_s'], 2)} | {fmt(sc['speedup'], 2)}× |"
    )
    L.append("")
    L.append(
        f"Same volumes on an already running LocalCluster (the `tcp://` path) that converted "
        f"one volume before (worker start-up, imports and first-use costs excluded): "
        f"1 worker {fmt(sc['warm_1_s'], 2)} s, 2 workers {fmt(sc['warm_2_s'], 2)} s "
        f"→ {fmt(sc['warm_speedup'], 2)}×."
    )
    L.append("")
    L.append(
        "Control — two identical CPU-bound processes (numpy + Blosc zstd 5) vs one, on this "
        "machine at "
        f"that moment: {fmt(sc['control_before'], 2)}× before, {fmt(sc['control_after'], 2)}× "
        "after (2.00× on an idle 2-core machine). A worker speed-up cannot exceed it."
    )
    L.append("")
    L.append(
        f"Model, {REAL_SOURCE_GB:.0f} GB of source on N workers at "
        f"{fmt(res['model_rate'])} MB/s per worker (measured, per CPU-s, one task per core):"
    )
    L.append("")
    L.append(
        "| N workers | MB/s per worker used | planning min | straggler min "
        "| convert h | total h (lower – upper) | speed-up vs 1 |"
    )
    L.append("|---:|---:|---:|---:|---:|---:|---:|")
    for m in res["model"]:
        L.append(
            f"| {m['workers']} | {fmt(m['rate_mb_s_per_worker'])} | {fmt(m['plan_min'])} | "
            f"{fmt(m['straggler_min'])} | {fmt(m['convert_lower_h'], 2)} | "
            f"{fmt(m['lower_bound_h'], 2)} – {fmt(m['upper_bound_h'], 2)} | "
            f"{fmt(m['speedup_vs_1'], 1)}× |"
        )
    L.append("")
    L.append(
        f"Assumptions: per-worker rate = min(measured, {OBJECT_STORE_MB_S_PER_WORKER:.0f} MB/s "
        f"object-store per worker, {OBJECT_STORE_MB_S_TOTAL:.0f} MB/s bucket total / N); "
        f"straggler = largest real volume ≈ {REAL_LARGEST_MB:.0f} MB; "
        f"lower = max(ideal, straggler), upper = ideal + straggler (greedy scheduling); "
        f"planning = header reads spread over the N workers at the rate measured here "
        f"({fmt(tt['plan_files'] / tt['plan_s'])} files/s per process, local disk) plus "
        f"{CLIENT_PLAN_S_PER_FILE * 1e6:.0f} µs per file of grouping on the client "
        f"(bench_plan.py); +{CLUSTER_OVERHEAD_S:.0f} s cluster start."
    )
    L.append("")
    L.append("### Size — one volume")
    L.append("")
    L.append(
        f"Compression (raw ÷ stored image): {sz['raw_image'] / sz['image_store']:.2f}× "
        "(example data with scanner-like noise; patient CT ~3×)."
    )
    L.append("")
    L.append("| what | bytes | ratio |")
    L.append("|---|---:|---:|")
    L.append(f"| raw int16 image | {sz['raw_image']:,} | |")
    L.append(
        f"| store `image` (store codec, sharded) | {sz['image_store']:,} | "
        f"{fmt(sz['image_ratio_vs_sitk'], 2)}× SimpleITK .nii.gz, "
        f"{fmt(sz['image_ratio_vs_dcm2niix'], 2)}× dcm2niix .nii.gz |"
    )
    L.append(f"| image .nii.gz (SimpleITK, from the store's array) | {sz['image_niigz']:,} | |")
    L.append(f"| image .nii.gz (dcm2niix -z y) | {sz['dcm2niix_niigz']:,} | |")
    L.append(f"| store `label` | {sz['label_store']:,} | |")
    L.append(f"| label .nii.gz (SimpleITK) | {sz['label_niigz']:,} | |")
    L.append(f"| store `segments` | {sz['segments_store']:,} | |")
    L.append(
        f"| store volume group total (image+label+segments+coords+metadata) | "
        f"{sz['store_volume_total']:,} | {fmt(sz['total_ratio_vs_sitk'], 2)}× image+label .nii.gz |"
    )
    L.append("")
    L.append(
        "### Encode engines — the store's `0/image` array (same codecs, shards, crc32c) "
        "written to local disk, best of the repeats, interleaved"
    )
    L.append("")
    L.append("| engine | threads | CPU s | wall s | MB per CPU-s | ratio | voxels equal |")
    L.append("|---|---:|---:|---:|---:|---:|---|")
    for e in res["engines"]:
        L.append(
            f"| {e['engine']} | {e['threads']} | {fmt(e['cpu_s'], 2)} | {fmt(e['wall_s'], 2)} | "
            f"{fmt(e['mb_per_cpu_s'], 0)} | {fmt(e['ratio'], 2)} | {'yes' if e['same'] else 'NO'} |"
        )
    L.append("")
    L.append(
        "(zarr-python's codec thread pool is sized once per process, at first use: its "
        "2-thread row runs with the pool of the 1-thread row.)"
    )
    L.append("")
    L.append("### Codecs — 32×64×64 chunks of one volume, one thread")
    L.append("")
    L.append("| array | codec | ratio | encode MB/s | decode MB/s |")
    L.append("|---|---|---:|---:|---:|")
    for c in res["codecs"]:
        L.append(
            f"| {c['array']} | {c['codec']} | {fmt(c['ratio'], 2)} | {fmt(c['encode_mb_s'], 0)} | "
            f"{fmt(c['decode_mb_s'], 0)} |"
        )
    L.append("")
    L.append(
        "### Peak memory — largest volume, one worker (threads scheduler: client + worker "
        "in one process)"
    )
    L.append("")
    L.append(
        f"peak RSS {fmt(rss['peak_rss_mb'])} MB; "
        f"import floor {fmt(rss['import_floor_rss_mb'])} MB; "
        f"largest volume raw {fmt(rss['largest_raw_mb'])} MB → {fmt(rss['ratio'], 2)}× "
        f"({fmt(rss['ratio_above_floor'], 2)}× above the import floor)"
    )
    L.append("")
    L.append("### Goals")
    L.append("")
    L.append("| goal | measured | |")
    L.append("|---|---:|---|")
    cli_ratio = lc["cpu_s"] / zy["cpu_s"]
    L.append(
        f"| CLI CPU s ≤ 1.0× dcm2niix -z y (same series, incl. start-up) | {fmt(cli_ratio, 2)}× "
        f"| {goal(cli_ratio <= 1.0)} |"
    )
    r_task = res["model_rate"] / zy["mb_per_cpu_s"]
    L.append(
        f"| per-volume task ≥ 1.5× faster than dcm2niix -z y (MB per CPU-s) | "
        f"{fmt(r_task, 2)}× | {goal(r_task >= 1.5)} |"
    )
    L.append(
        f"| peak RSS ≤ 3× largest volume above the import floor | "
        f"{fmt(rss['ratio_above_floor'], 2)}× | {goal(rss['ratio_above_floor'] <= 3)} |"
    )
    ceiling = min(sc["control_before"], sc["control_after"])
    for label, key in (("CLI, cold", "speedup"), ("warm cluster", "warm_speedup")):
        verdict = goal(sc[key] >= 1.8) if ceiling >= 1.9 else "control < 1.9×: not judged"
        L.append(
            f"| 1 → 2 workers ≥ 1.8× ({label}; control {fmt(ceiling, 2)}×) | "
            f"{fmt(sc[key], 2)}× | {verdict} |"
        )
    L.append(
        "| store ≤ 1.0× .nii.gz (image vs SimpleITK .nii.gz) | "
        f"{fmt(sz['image_ratio_vs_sitk'], 2)}× | "
        f"{goal(sz['image_ratio_vs_sitk'] <= 1.0)} |"
    )
    return "\n".join(L)


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small series (~1 min smoke run)")
    ap.add_argument("--workdir", help="keep inputs and outputs here (default: a temp dir)")
    ap.add_argument("--repeats", type=int, default=None, help="repeats per timing (best kept)")
    ap.add_argument("--json", help="also write the raw results as JSON here")
    ap.add_argument(
        "--data",
        help="cache the generated example collections here and reuse them on later runs "
        "(default: generated inside the work dir, ~2 minutes for full size)",
    )
    a = ap.parse_args(argv)
    from livercube.synth.phantom import use_scanner_noise

    use_scanner_noise(True)  # CT-like example data: codecs and sizes as on patient CT

    size = "small" if a.quick else "full"
    repeats = a.repeats or (1 if a.quick else 2)
    tmp = None
    if a.workdir:
        work = Path(a.workdir)
        if work.exists():
            shutil.rmtree(work)
        work.mkdir(parents=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="bench_convert_")
        work = Path(tmp.name)
    log = work / "bench.log"
    started = time.perf_counter()

    def step(msg: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f} s] {msg}", file=sys.stderr, flush=True)

    try:
        data = Path(a.data) / f"{size}-noisy" if a.data else work / "data"
        meta_path = data / "bench-data.json"
        if not meta_path.exists():
            step(f"writing 5 CRLM patients, size={size} (CRLM-CT-1003 has the 2× slice count)")
            if data.exists():
                shutil.rmtree(data)
            meta = prepare_data(data, size)
            meta_path.write_text(json.dumps(meta, indent=2))
        else:
            step(f"reusing example data in {data}")
        meta = json.loads(meta_path.read_text())
        src, one, four, largest = (data / k for k in ("src", "src-one", "src-four", "src-largest"))
        equal, largest_pid = meta["equal"], meta["largest"]
        series_dir = Path(meta["series_dir"]["CRLM-CT-1001"])
        shape = meta["shape"]["CRLM-CT-1001"]
        loads: dict[str, float] = {}

        def section(name: str, msg: str) -> None:
            loads[name] = os.getloadavg()[0]
            step(f"{msg}  (1-min load average {loads[name]:.1f})")

        res: dict[str, Any] = {
            "date": dt.datetime.now().astimezone().isoformat(timespec="minutes"),
            "machine": machine(),
            "versions": versions(),
            "mode": "quick (small 128² series)" if a.quick else "full (512² series)",
            "repeats": repeats,
            "series_shape": "×".join(map(str, shape)),
            "scaling_volumes": equal,
            "loads": loads,
        }
        section("throughput", "throughput: livercube vs dcm2niix -z y / -z n")
        res["throughput"] = bench_throughput(one, series_dir, work, repeats, log)
        section("task_times", "per-volume task times (in-process)")
        res["task_times"] = bench_task_times(src, work)
        section("scaling", "scaling: --scheduler local, 1 vs 2 workers")
        res["scaling"] = bench_scaling(four, one, work, log)
        conv = [t for t in res["task_times"]["tasks"] if t["status"] == "converted"]
        rate = sum(t["source_mb"] for t in conv) / sum(t["cpu_s"] for t in conv)
        res["model_rate"] = rate
        tt = res["task_times"]
        res["model"] = scaling_model(
            rate,
            tt["plan_files"] / tt["plan_s"],
            sum(t["source_mb"] for t in conv) / tt["plan_files"],
        )
        section("size", "size: store vs .nii.gz")
        size_res, image, label = bench_size(
            work / "tp-store-0.zarr", work, res["throughput"]["niigz_bytes"]
        )
        res["size"] = size_res
        section("engines", "encode engines: zarr-python, zarrs, TensorStore, livercube")
        res["engines"] = bench_engines(image, work, repeats)
        section("codecs", "codecs")
        res["codecs"] = bench_codecs(image, label, repeats)
        section("rss", f"peak RSS: {largest_pid} alone, threads scheduler, 1 worker")
        raw_mb = int(np.prod(meta["shape"][largest_pid])) * 2 / MB
        res["rss"] = bench_rss(largest, work, raw_mb, log)
        step("done")
        print(render(res))
        if a.json:
            Path(a.json).write_text(json.dumps(res, indent=2, default=str))
    finally:
        if tmp is not None:
            tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
