"""Planning benchmarks: DICOM header scanning on 1 and 2 Dask workers, and a scaling model.

Not part of the test suite.  Run from the repository root::

    python benchmarks/bench_plan.py                 # 10,240 files, local disk and moto S3
    python benchmarks/bench_plan.py --no-s3 --files 4096 --rounds 2   # smoke run
    python benchmarks/bench_plan.py --ct            # also: one CT volume read from moto S3

The collection is synthetic and small on disk but has realistic headers: 16×16 slices whose
headers carry ~100 elements (~3 KB, as a scanner writes them: acquisition, contrast,
reconstruction and private vendor tags), 64 patients × 4 series × 40 slices.  Competitors run
interleaved, ``--rounds`` times each, and the median is printed with the 1-minute load:

* ``client threads``: ``scan()`` in this process (the ``--scheduler threads`` path; one
  thread per chunk on local disk, where parsing is CPU-bound, 16 on object storage);
* ``dask 1 worker`` / ``dask 2 workers``: the same chunks as tasks on a process
  ``LocalCluster`` (one thread per worker), the client only lists and groups;
* the machine's own 2-process control: one CPU-bound loop alone, then two at once.

The model for the real collections (~85,000 files) takes the measured per-file cost on one
worker and the client's measured costs, each where it falls: listing before any task and
finishing the plan after the last chunk are serial; unpickling and grouping each chunk as it
arrives overlap the workers' reads (a pipeline runs at its slower stage).  It predicts wall
time for N = 1…32 workers; the tail after the last chunk is also measured on the clusters
themselves.  Goals are printed, never asserted.
"""

from __future__ import annotations

import argparse
import io
import multiprocessing as mp
import os
import pickle
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_patches import free_port, wait_for_port

#: the real DICOM collections (HCC-TACE-Seg + CRLM, TCIA listings, rounded)
REAL_FILES = 85_000
#: tasks per worker the model assumes for balance (chunks are HEADER_CHUNK_FILES long)
MODEL_WORKERS = (1, 2, 4, 8, 16, 32)


# --------------------------------------------------------------------------- the collection


def _template():
    """A CT slice header as scanners write them (~100 elements), 16×16 pixels."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.SOPClassUID = CTImageStorage
    ds.Modality = "CT"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    for kw, v in {
        "Manufacturer": "GE MEDICAL SYSTEMS",
        "ManufacturerModelName": "LightSpeed VCT",
        "SoftwareVersions": "LightSpeedverrel",
        "InstitutionName": "Somewhere",
        "StationName": "CT01",
        "BodyPartExamined": "ABDOMEN",
        "ScanOptions": "HELICAL MODE",
        "ProtocolName": "3 PHASE LIVER",
        "ConvolutionKernel": "STANDARD",
        "PatientPosition": "FFS",
        "ContrastBolusAgent": "OMNIPAQUE 350",
        "ContrastBolusRoute": "IV",
        "FilterType": "BODY FILTER",
        "RescaleType": "HU",
        "PhotometricInterpretation": "MONOCHROME2",
        "FrameOfReferenceUID": "1.2.826.0.1.3680043.8.498.1",
        "PositionReferenceIndicator": "XY",
        "AcquisitionDate": "20010203",
        "ContentDate": "20010203",
        "SeriesDate": "20010203",
        "StudyTime": "101000",
        "SeriesTime": "101200",
        "ContentTime": "101300",
    }.items():
        setattr(ds, kw, v)
    for kw, v in {
        "SliceThickness": "2.5", "KVP": "120", "DataCollectionDiameter": "500",
        "ReconstructionDiameter": "360", "DistanceSourceToDetector": "949.075",
        "DistanceSourceToPatient": "541", "GantryDetectorTilt": "0", "TableHeight": "157.5",
        "ExposureTime": "600", "XRayTubeCurrent": "300", "Exposure": "8",
        "FocalSpots": "1.2", "RescaleIntercept": "-1024",
        "RescaleSlope": "1", "WindowCenter": "40", "WindowWidth": "400",
        "PixelSpacing": ["0.703125", "0.703125"], "SliceLocation": "0",
    }.items():  # fmt: skip
        setattr(ds, kw, v)
    ds.SpiralPitchFactor = 0.984375
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.Rows, ds.Columns = 16, 16
    ds.SamplesPerPixel, ds.BitsAllocated, ds.BitsStored, ds.HighBit = 1, 16, 16, 15
    ds.PixelRepresentation = 1
    block = ds.private_block(0x0043, "GEMS_PARM_01", create=True)
    for i in range(40):  # vendor parameters, as GE/Siemens files carry dozens of them
        block.add_new(0x10 + i, "SH" if i % 3 else "DS", f"{i * 1.25:.2f}")
    return ds


def write_collection(root: Path, n_patients: int, n_series: int, n_slices: int) -> int:
    """Write the synthetic collection; returns the number of files."""
    import pydicom
    from pydicom.uid import generate_uid

    ds = _template()
    rng = np.random.default_rng(0)
    n = 0
    for p in range(n_patients):
        ds.PatientID = f"BENCH-{p:04d}"
        ds.PatientName = f"Doe^{p}"
        ds.StudyInstanceUID = generate_uid()
        ds.StudyDate = f"2001{1 + p % 12:02d}{1 + p % 28:02d}"
        ds.StudyDescription = "CT ABDOMEN 3 PHASE"
        for s in range(n_series):
            ds.SeriesInstanceUID = generate_uid()
            ds.SeriesNumber = s + 2
            ds.SeriesDescription = ("PRE", "ART", "PV", "DELAY")[s % 4] + " LIVER"
            ds.AcquisitionNumber = 1
            ds.AcquisitionTime = f"10{15 + s:02d}00"
            folder = root / ds.PatientID / f"{s + 2}.000000-{ds.SeriesDescription}"
            folder.mkdir(parents=True, exist_ok=True)
            # every series starts elsewhere (table position), as in real collections: no
            # two series share their slice positions, so no work is shared between them
            z0 = -round(0.37 * (p * n_series + s), 2)
            for k in range(n_slices):
                ds.SOPInstanceUID = generate_uid()
                ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
                ds.InstanceNumber = k + 1
                ds.ImagePositionPatient = [-180, -180, round(z0 - 2.5 * k, 2)]
                ds.SliceLocation = round(z0 - 2.5 * k, 2)
                ds.PixelData = (rng.integers(-100, 100, (16, 16)) * 2).astype("<i2").tobytes()
                pydicom.dcmwrite(folder / f"1-{k + 1:03d}.dcm", ds, enforce_file_format=True)
                n += 1
    return n


# --------------------------------------------------------------------------- helpers


def _load() -> float:
    return os.getloadavg()[0]


def _spin(n: int) -> float:
    t = time.perf_counter()
    x = 0
    for i in range(n):
        x += i * i % 7
    return time.perf_counter() - t


def two_process_control(n: int = 6_000_000) -> dict[str, float]:
    """One CPU-bound loop alone, then two at once in separate processes: the speed-up two
    workers could get on this machine right now if they shared nothing."""
    ctx = mp.get_context("spawn")
    with ctx.Pool(2) as pool:
        pool.map(_spin, [1000, 1000])  # start both processes first
        t = time.perf_counter()
        pool.apply(_spin, (n,))
        one = time.perf_counter() - t
        t = time.perf_counter()
        pool.map(_spin, [n, n], chunksize=1)
        two = time.perf_counter() - t
    return {"one_s": one, "two_s": two, "speedup": 2 * one / two}


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


class Clusters:
    """Process LocalClusters of 1 and 2 single-threaded workers, started once."""

    def __init__(self, sizes: tuple[int, ...]) -> None:
        import logging

        from distributed import Client, LocalCluster

        logging.getLogger("distributed").setLevel(logging.ERROR)
        self.clients: dict[int, Any] = {}
        self._clusters = []
        for n in sizes:
            cluster = LocalCluster(
                n_workers=n, threads_per_worker=1, processes=True, dashboard_address=":0"
            )
            self._clusters.append(cluster)
            self.clients[n] = Client(cluster)
            self.clients[n].wait_for_workers(n)

    def close(self) -> None:
        for c in self.clients.values():
            c.close()
        for c in self._clusters:
            c.close()


# --------------------------------------------------------------------------- planning


def client_parts(url: str, opts: dict | None) -> dict[str, float]:
    """Seconds the client spends itself per run, by when it spends them: listing (before
    any task), unpickling and folding in each chunk's result (while the workers read the
    next chunks) and finishing the plan (after the last chunk)."""
    import fsspec

    from livercube.fanout import chunks, local_map
    from livercube.sources.dicom_headers import list_files
    from livercube.sources.dicom_scan import (
        HEADER_CHUNK_FILES,
        Grouping,
        ScanResult,
        read_header_chunk,
    )

    fs, root = fsspec.core.url_to_fs(url, **(opts or {}))
    t, c = time.perf_counter(), time.process_time()
    files = list_files(fs, root)
    listing, list_cpu = time.perf_counter() - t, time.process_time() - c
    parts = chunks(files, HEADER_CHUNK_FILES)
    # locally one thread: its CPU time is the per-file work a worker does (load barely
    # changes it); object storage keeps its concurrent fetches (latency, not CPU, rules there)
    threads = 1 if fs.protocol in ("file", ("file", "local")) else None
    c = time.process_time()
    outcomes = local_map(
        lambda p: read_header_chunk(p, source=url, storage_options=opts, max_workers=threads),
        parts,
    )
    worker_cpu = time.process_time() - c
    blobs = [pickle.dumps(o) for o in outcomes]
    del outcomes
    grouping = Grouping(ScanResult(source=url, n_files=len(files)))
    unpickle = unpickle_cpu = add = add_cpu = 0.0
    for part, blob in zip(parts, blobs, strict=True):
        t, c = time.perf_counter(), time.process_time()
        got = pickle.loads(blob)  # as a Dask client does: collector enabled
        t2, c2 = time.perf_counter(), time.process_time()
        grouping.add(part, got)
        unpickle += t2 - t
        unpickle_cpu += c2 - c
        add += time.perf_counter() - t2
        add_cpu += time.process_time() - c2
    t, c = time.perf_counter(), time.process_time()
    result = grouping.finish()
    finish, finish_cpu = time.perf_counter() - t, time.process_time() - c
    assert result.acquisitions
    return {
        "n": len(files),
        "chunk_files": HEADER_CHUNK_FILES,
        "list_s": listing,
        "unpickle_s": unpickle,
        "add_s": add,
        "finish_s": finish,
        "list_cpu_s": list_cpu,
        "unpickle_cpu_s": unpickle_cpu,
        "add_cpu_s": add_cpu,
        "finish_cpu_s": finish_cpu,
        "worker_cpu_s": worker_cpu,
        "shipped_bytes": sum(len(b) for b in blobs),
        "acquisitions": len(result.acquisitions),
    }


class _Timed:
    """A streaming mapper around ``inner`` that notes when it handed over its last result,
    so the client's serial tail (planning after the last chunk) is measured in place."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.last = inner, 0.0

    def slots(self) -> int:
        return self.inner.slots()

    def __call__(self, fn, items):
        return list(self.imap(fn, items))

    def imap(self, fn, items):
        for got in self.inner.imap(fn, items):
            yield got
            self.last = time.perf_counter()


def plan_rounds(
    url: str, opts: dict | None, clusters: Clusters, rounds: int
) -> tuple[dict[str, list[float]], int, dict[str, list[float]]]:
    """Wall seconds of ``scan`` per competitor, interleaved, rotating who goes first, and
    for the clusters the seconds from the last chunk's arrival to the finished plan."""
    from livercube.fanout import dask_map
    from livercube.sources.dicom_scan import scan

    competitors: dict[str, Callable[[], Any]] = {"client threads": lambda: scan(url, opts)}
    timed: dict[str, _Timed] = {}
    for n, client in clusters.clients.items():
        label = f"dask {n} worker" + ("s" if n > 1 else "")
        timed[label] = _Timed(dask_map(client, name="headers", retries=0))
        competitors[label] = lambda m=timed[label]: scan(url, opts, mapper=m)
    reference = None
    times: dict[str, list[float]] = {k: [] for k in competitors}
    tails: dict[str, list[float]] = {k: [] for k in timed}
    names = list(competitors)
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            t = time.perf_counter()
            res = competitors[name]()
            done = time.perf_counter()
            times[name].append(done - t)
            if name in timed:
                tails[name].append(done - timed[name].last)
            seen = (res.acquisitions, res.notes, res.left_out)
            if reference is None:
                reference = seen
            elif seen != reference:
                raise SystemExit(f"{name}: plan differs from the first run")
    return times, res.n_files, tails


def report_plan(
    where: str,
    times: dict[str, list[float]],
    n: int,
    parts: dict,
    load: float,
    tails: dict[str, list[float]],
) -> None:
    print(f"\n{where}: {n} files, median of {len(next(iter(times.values())))} interleaved "
          f"rounds, 1-min load {load:.1f}")  # fmt: skip
    base = _median(times["client threads"])
    print("| competitor | wall s | files/s | ÷ client threads | client after the last chunk |")
    print("|---|---:|---:|---:|---:|")
    for name, ts in times.items():
        m = _median(ts)
        tail = f"{_median(tails[name]) * 1e3:.0f} ms" if name in tails else "–"
        print(f"| {name} | {m:.2f} | {n / m:,.0f} | {base / m:.2f}× | {tail} |")
    per = {k: parts[f"{k}_s"] / n * 1e6 for k in ("list", "unpickle", "add", "finish")}
    print(
        f"client wall per file: list {per['list']:.1f} µs (before any task); unpickle "
        f"{per['unpickle']:.1f} + group {per['add']:.1f} µs (as chunks arrive, overlapping "
        f"the reads); finish {per['finish']:.1f} µs (after the last chunk); shipped "
        f"{parts['shipped_bytes'] / n:.0f} B/file ({parts['shipped_bytes'] / 1e6:.1f} MB)"
    )
    cpu = {k: parts[f"{k}_cpu_s"] / n * 1e6 for k in ("list", "unpickle", "add", "finish")}
    print(
        "client CPU per file: "
        + ", ".join(f"{k} {v:.1f} µs" for k, v in cpu.items())
        + f" = {sum(cpu.values()):.1f} µs"
    )


def _predict(worker: float, serial: float, stream: float, chunk_files: int, w: int) -> float:
    """Seconds for :data:`REAL_FILES` on ``w`` workers: the client's serial share (listing
    before any task, finishing after the last) plus the slower of the two pipelined stages,
    the workers' reads and the client folding in each chunk; plus one chunk's folding, which
    follows the last read."""
    return REAL_FILES * (serial + max(worker / w, stream)) + chunk_files * stream


def _model_table(worker: float, serial: float, stream: float, chunk_files: int) -> None:
    print("| workers | predicted wall s | files/s | speed-up vs 1 | efficiency |")
    print("|---:|---:|---:|---:|---:|")
    t1 = _predict(worker, serial, stream, chunk_files, 1)
    effs = {}
    for w in MODEL_WORKERS:
        t = _predict(worker, serial, stream, chunk_files, w)
        effs[w] = t1 / t / w
        print(f"| {w} | {t:,.0f} | {REAL_FILES / t:,.0f} | {t1 / t:.1f}× | {effs[w]:.0%} |")
    linear = all(e >= 0.9 for w, e in effs.items() if w <= 8)
    print(f"goal (linear to >= 8 workers, efficiency >= 90 %): {'met' if linear else 'NOT met'}")


def model(
    where: str, times: dict[str, list[float]], n: int, parts: dict, tails: dict[str, list[float]]
) -> None:
    """Predicted wall time for the real collections on N workers, from wall times: the
    worker's per-file time from the 1-worker run (its measured serial tail and the listing
    taken out), the client's per-chunk work as measured in :func:`client_parts`."""
    one = _median(times["dask 1 worker"])
    tail = _median(tails["dask 1 worker"]) / n
    serial = parts["list_s"] / n + tail
    stream = (parts["unpickle_s"] + parts["add_s"]) / n
    worker = max(one / n - serial, 1e-9)
    today = _median(times["client threads"]) / n
    print(
        f"\nmodel, {where}, {REAL_FILES:,} files: worker {worker * 1e3:.2f} ms/file "
        f"(measured on 1 worker); client serial {serial * 1e6:.1f} µs/file (listing + the "
        f"tail measured on 1 worker), pipelined {stream * 1e6:.1f} µs/file (unpickle + "
        f"group); today's client-only scan {today * 1e3:.2f} ms/file = {REAL_FILES * today:,.0f} s"
    )
    _model_table(worker, serial, stream, parts["chunk_files"])
    if len(times) > 2:
        two = _median(times["dask 2 workers"])
        print(f"measured 2 workers ÷ 1 worker: {one / two:.2f}×")


def model_cpu(where: str, parts: dict) -> None:
    """The same model from CPU seconds (one thread, so load hardly moves them): worker CPU
    per header read; the client's listing (wall) and finish CPU serial, its unpickling and
    grouping CPU pipelined with the reads."""
    n = parts["n"]
    worker = parts["worker_cpu_s"] / n
    serial = parts["list_s"] / n + parts["finish_cpu_s"] / n
    stream = (parts["unpickle_cpu_s"] + parts["add_cpu_s"]) / n
    print(
        f"\nmodel from CPU time, {where}, {REAL_FILES:,} files: worker {worker * 1e3:.2f} "
        f"ms CPU/file, client serial {serial * 1e6:.1f} µs/file (listing wall + finish CPU), "
        f"pipelined {stream * 1e6:.1f} µs/file (unpickle + group CPU)"
    )
    _model_table(worker, serial, stream, parts["chunk_files"])


# --------------------------------------------------------------------------- S3


class Moto:
    def __init__(self) -> None:
        self.port = free_port()
        env = {**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
        self.proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1",
             "-p", str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
        )  # fmt: skip
        wait_for_port(self.port, tries=300)
        self.opts = {
            "key": "testing",
            "secret": "testing",
            "endpoint_url": f"http://127.0.0.1:{self.port}",
        }

    def upload(self, local: Path, bucket: str) -> str:
        import s3fs

        fs = s3fs.S3FileSystem(**self.opts, skip_instance_cache=True)
        fs.mkdir(bucket)
        fs.put(str(local) + "/", f"{bucket}/src/", recursive=True)
        return f"s3://{bucket}/src"

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


# --------------------------------------------------------------------------- CT volume


def write_ct_volume(root: Path, n_slices: int) -> None:
    """One 512² series with scanner-like noise (uncompressed, as TCIA serves most CT)."""
    import pydicom
    from pydicom.uid import generate_uid

    ds = _template()
    ds.Rows = ds.Columns = 512
    ds.PatientID, ds.StudyInstanceUID, ds.SeriesInstanceUID = "CT-1", generate_uid(), generate_uid()
    ds.SeriesNumber, ds.AcquisitionNumber, ds.AcquisitionTime = 2, 1, "101500"
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[:512, :512]
    body = ((yy - 256) ** 2 / 200**2 + (xx - 256) ** 2 / 240**2) < 1
    root.mkdir(parents=True, exist_ok=True)
    for k in range(n_slices):
        hu = np.where(body, 40 + rng.normal(0, 15, (512, 512)), -1000).astype(np.int16)
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber, ds.ImagePositionPatient = k + 1, [-180, -180, -2.5 * k]
        ds.PixelData = (hu + 1024).astype("<i2").tobytes()
        pydicom.dcmwrite(root / f"1-{k + 1:03d}.dcm", ds, enforce_file_format=True)


def previous_reader(acq, opts: dict) -> np.ndarray:
    """Fetch and decode only, the way the reader used to fetch: open+read per file (s3fs asks
    the size first), 8 threads, then every file decoded one after the other.  No HU, checks
    or placement: a lower bound for any reader with that I/O pattern, not the old reader."""
    from concurrent.futures import ThreadPoolExecutor

    import fsspec
    import pydicom

    fs, _ = fsspec.core.url_to_fs(acq.source, **opts)

    def fetch(path: str) -> bytes:
        with fs.open(path, "rb") as f:
            return f.read()

    paths = [s.path for s in acq.slices]
    with ThreadPoolExecutor(8) as pool:
        blobs = list(pool.map(fetch, paths))
    return np.stack([pydicom.dcmread(io.BytesIO(b)).pixel_array for b in blobs])


def bench_ct(moto: Moto, tmp: Path, n_slices: int, rounds: int, latency_ms: float) -> None:
    from benchmarks.bench_patches import start_proxy
    from livercube.sources.dicom_ct import read_acquisition
    from livercube.sources.dicom_scan import scan

    write_ct_volume(tmp / "ct", n_slices)
    url = moto.upload(tmp / "ct", "ct-volume")
    mb = n_slices * 512 * 512 * 2 / 1e6
    for label, opts in (
        ("moto S3, loopback", moto.opts),
        (f"moto S3 + {latency_ms:.0f} ms/request proxy", None),
    ):
        if opts is None:
            proxy, _counter = start_proxy(moto.opts["endpoint_url"], latency_ms / 1000)
            opts = {**moto.opts, "endpoint_url": proxy}
        opts = {**opts, "skip_instance_cache": True}
        (acq,) = scan(url, opts).acquisitions
        new = read_acquisition(acq, opts)
        old = previous_reader(acq, opts)
        # the same voxels: the stored values the old pattern decoded, rescaled as the reader does
        assert np.array_equal(np.sort((old.astype(np.int32) - 1024).ravel()),
                              np.sort(new.image.astype(np.int32).ravel()))  # fmt: skip
        times: dict[str, list[float]] = {"fetch+decode only, old pattern": [],
                                         "read_acquisition": []}  # fmt: skip
        for r in range(rounds):
            for name in list(times)[:: 1 if r % 2 == 0 else -1]:
                t = time.perf_counter()
                if name == "read_acquisition":
                    read_acquisition(acq, opts)
                else:
                    previous_reader(acq, opts)
                times[name].append(time.perf_counter() - t)
        base = _median(times["fetch+decode only, old pattern"])
        print(f"\nCT volume {n_slices}×512², {mb:.0f} MB, {label}; median of {rounds}, "
              f"1-min load {_load():.1f}")  # fmt: skip
        print("| reader | s per volume | MB/s | speed-up |")
        print("|---|---:|---:|---:|")
        for name, ts in times.items():
            m = _median(ts)
            print(f"| {name} | {m:.2f} | {mb / m:.0f} | {base / m:.2f}× |")


# --------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--files", type=int, default=10_240, help="about this many (64 series/…)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--s3-rounds", type=int, default=1, help="moto serves ~100 requests/s")
    ap.add_argument("--no-s3", action="store_true")
    ap.add_argument("--ct", action="store_true", help="also time one CT volume read from S3")
    ap.add_argument("--ct-slices", type=int, default=100)
    ap.add_argument("--latency-ms", type=float, default=20.0)
    ap.add_argument("--keep", type=Path, default=None, help="write the collection here")
    args = ap.parse_args()

    import dask
    import distributed
    import pydicom
    import s3fs

    print(
        f"python {platform.python_version()}, pydicom {pydicom.__version__}, dask "
        f"{dask.__version__}, distributed {distributed.__version__}, s3fs {s3fs.__version__}; "
        f"{os.cpu_count()} CPUs, 1-min load {_load():.1f}"
    )
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = args.keep or Path(tmpdir)
        src = tmp / "collection"
        n_series, n_slices = 4, 40
        n_patients = max(1, round(args.files / (n_series * n_slices)))
        t = time.perf_counter()
        if not src.exists():
            n = write_collection(src, n_patients, n_series, n_slices)
            size = sum(p.stat().st_size for p in src.rglob("*.dcm")) / n
            print(f"wrote {n} files in {time.perf_counter() - t:.1f} s ({size:.0f} B/file)")
        control = two_process_control()
        print(f"2-process control: one CPU loop {control['one_s']:.2f} s, two at once "
              f"{control['two_s']:.2f} s -> {control['speedup']:.2f}× of 2 possible "
              f"(load {_load():.1f})")  # fmt: skip
        clusters = Clusters((1, 2))
        try:
            parts = client_parts(str(src), None)
            times, n, tails = plan_rounds(str(src), None, clusters, args.rounds)
            report_plan("local disk", times, n, parts, _load(), tails)
            model("local disk", times, n, parts, tails)
            model_cpu("local disk", parts)
            if not args.no_s3:
                moto = Moto()
                try:
                    t = time.perf_counter()
                    url = moto.upload(src, "plan")
                    print(f"\nuploaded to moto in {time.perf_counter() - t:.0f} s")
                    opts = {**moto.opts, "skip_instance_cache": True}
                    parts = client_parts(url, opts)
                    times, n, tails = plan_rounds(url, opts, clusters, args.s3_rounds)
                    report_plan("moto S3 on loopback", times, n, parts, _load(), tails)
                    model("moto S3 on loopback", times, n, parts, tails)
                    if args.ct:
                        bench_ct(moto, tmp, args.ct_slices, args.s3_rounds + 2, args.latency_ms)
                finally:
                    moto.close()
            control = two_process_control()
            print(f"\n2-process control after: {control['speedup']:.2f}× of 2 possible "
                  f"(load {_load():.1f})")  # fmt: skip
        finally:
            clusters.close()


if __name__ == "__main__":
    main()
