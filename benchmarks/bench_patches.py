"""Random 96³ patch reads: livercube vs TensorStore, zarr-python and nnU-Net v2, local and S3.

    python benchmarks/bench_patches.py [--n 40] [--latency-ms 50] [--slices 100,160,130]
                                       [--keep DIR] [--no-s3]

1. Local store: median ms per random 96³ patch (image + label) from full-size (512²) noisy
   CRLM-style volumes, on the same patches: livercube's ``ShardReader`` (with its CRC-32C
   checks on, and with them skipped, to price them), ``PatchSampler.patch``, TensorStore's
   ``zarr3`` driver on the same store (cache off), zarr-python ``arr[box]``, and nnU-Net v2's
   blosc2 form written and opened by nnU-Net's own code.
2. Object store: a moto S3 server (behind waitress: persistent connections) behind a loopback
   asyncio proxy that delays every request by ``--latency-ms``; patches/s per process, GETs
   per patch, bytes fetched ÷ compressed bytes of the chunks the patch needs, client CPU per
   patch, for naive zarr-python and for ``ShardReader`` (its own client, and s3fs as before),
   beside the server's own ceiling.

Volumes: the example phantom with scanner-like noise (σ 15 HU, in-plane correlated,
``livercube.synth.phantom``), anatomy rendered at 256² and repeated ×2 in-plane (rendering is
the slow part), noise added at 512², written by the store's own writer (chunking, codecs,
checksums).  The compression ratio is printed so it can be compared with patient CT (~3×).
Not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from livercube.store.layout import data_path

PATCH = (96, 96, 96)
PLANE = 512


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, tries: int = 200) -> None:
    """Until a server listens on loopback ``port`` (at most ``tries`` × ~0.05 s)."""
    for _ in range(tries):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)


#: moto's own S3 application served by waitress, which keeps connections alive (Werkzeug's
#: development server, moto's default, closes every connection after one response)
MOTO_KEEP_ALIVE = (
    "import sys, os; from moto.moto_server.werkzeug_app import "
    "DomainDispatcherApplication, create_backend_app; import waitress; "
    "os.environ.setdefault('MOTO_PORT', sys.argv[4]); "
    "waitress.serve(DomainDispatcherApplication(create_backend_app), host=sys.argv[2], "
    "port=int(sys.argv[4]), threads=16, connection_limit=1000, _quiet=True)"
)


@contextlib.contextmanager
def moto_endpoint(*, keep_alive: bool = False) -> Iterator[str]:
    """A real moto S3 server on a free loopback port for the block; yields its URL.

    ``keep_alive``: moto's S3 application behind waitress, with persistent connections as S3
    has; moto's own server closes the connection after every response, so each GET also pays
    a TCP connect and slow start, which is moto's cost, not the client's.
    """
    port = free_port()
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
    if keep_alive:
        argv = [sys.executable, "-c", MOTO_KEEP_ALIVE, "-H", "127.0.0.1", "-p", str(port)]
    else:
        argv = [
            str(Path(sys.executable).parent / "moto_server"),
            "-H",
            "127.0.0.1",
            "-p",
            str(port),
        ]
    moto = subprocess.Popen(
        argv,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    try:
        wait_for_port(port)
        yield f"http://127.0.0.1:{port}"
    finally:
        moto.terminate()
        moto.wait(timeout=10)


def noisy_volume(seed: int, slices: int):
    """A full-size CRLM-style volume (512², ``slices`` slices) with scanner-like noise."""
    from livercube.synth.phantom import (
        abdomen_grid,
        correlated_noise,
        make_anatomy,
        reconstruction_circle,
        render,
    )
    from livercube.volumes.volume import SegmentField, Volume

    spacing = (2.5, 0.78, 0.78)
    coarse = abdomen_grid((slices, PLANE // 2, PLANE // 2), (spacing[0], 1.56, 1.56))
    r = render(
        make_anatomy(seed, tumour_kind="tumor_met"),
        coarse,
        "portal_venous",
        seed=seed,
        scanner_noise=False,
        noise_hu=0.0,
    )

    def up(a: np.ndarray) -> np.ndarray:
        return np.repeat(np.repeat(a, 2, axis=1), 2, axis=2)

    rng = np.random.default_rng([seed, 15])
    image = up(r.image).astype(np.float32)
    fov = reconstruction_circle(PLANE, PLANE)
    for z0 in range(0, slices, 16):  # in slabs: bounded memory
        image[z0 : z0 + 16] += correlated_noise(rng, image[z0 : z0 + 16].shape) * fov
    image = np.clip(np.rint(image), -1024, 3071).astype(np.int16)
    grid = abdomen_grid((slices, PLANE, PLANE), spacing)
    n_tumours = len(r.masks) - 6  # body, liver, remnant, 3 vessels, then tumor_1 …
    field = SegmentField(grid.shape, 1 + n_tumours)
    field.add(up(r.masks["liver"]), label="Liver", number=1, unified=1)
    for i in range(n_tumours):
        field.add(up(r.masks[f"tumor_{i + 1}"]), label=f"Tumor_{i + 1}", number=2 + i, unified=2)
    return Volume(
        "crlm",
        f"CRLM-CT-{1001 + seed}",
        "S1",
        "100",
        image,
        grid,
        "portal_venous",
        segments=field,
        meta={"intensity": {"exact": True}, "geometry_flags": {}, "source": {}},
    )


def build_store(tmp: Path, slices: list[int]) -> tuple[str, list[str], dict[str, float]]:
    """Write the noisy volumes with the store's writer; (url, level-0 paths, sizes)."""
    from livercube.store.catalog import write_catalog
    from livercube.store.writer import write_volume

    url = str(tmp / "bench.zarr")
    marker = Path(url, ".bench-volumes")
    if marker.exists() and marker.read_text() == repr(slices):
        paths = sorted(str(p.parent.relative_to(url)) for p in Path(url).glob("crlm/*/*/*/0/image"))
    else:
        zarr.open_group(url, mode="w", zarr_format=3)
        paths = []
        for i, n in enumerate(slices):
            # the full-resolution level of each volume: where its training arrays are
            paths.append(data_path(write_volume(url, noisy_volume(i, n))["path"]))
        write_catalog(url)
        marker.write_text(repr(slices))
    sizes = {"raw": 0.0, "stored": 0.0, "image_raw": 0.0, "image_stored": 0.0}
    for p in paths:
        for name in ("image", "label"):
            arr = zarr.open_array(url, path=f"{p}/{name}", mode="r")
            raw = arr.nbytes
            stored = sum(f.stat().st_size for f in Path(url, p, name).rglob("*") if f.is_file())
            sizes["raw"] += raw
            sizes["stored"] += stored
            if name == "image":
                sizes["image_raw"] += raw
                sizes["image_stored"] += stored
    return url, paths, sizes


def random_patches(url: str, paths: list[str], n: int, seed: int = 0):
    """``n`` (volume path, start) pairs, volumes and positions uniform at random."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        p = paths[int(rng.integers(len(paths)))]
        shape = zarr.open_array(url, path=f"{p}/image", mode="r").shape
        out.append((p, random_starts(shape, 1, int(rng.integers(2**31)))[0]))
    return out


def box(start):
    return tuple(slice(s, s + p) for s, p in zip(start, PATCH, strict=True))


def _median_ms(times: list[float]) -> float:
    return 1000 * statistics.median(times)


def engines_local(url: str, paths: list[str], tmp: Path) -> dict[str, Any]:
    """name → ``read(path, start)`` returning (image, label) patches, for every local engine."""
    from livercube.sampling import ArrayInfo, Box, PatchSampler, PatchSpec, ShardReader
    from livercube.sampling import arrays as reader_mod  # where chunk checksums are checked

    arrays = {
        p: {k: zarr.open_array(url, path=f"{p}/{k}", mode="r") for k in ("image", "label")}
        for p in paths
    }
    infos = {
        p: [
            ArrayInfo.from_metadata(f"{p}/{k}", arrays[p][k].metadata.to_dict())
            for k in ("image", "label")
        ]
        for p in paths
    }
    reader = ShardReader(url)
    checked = reader_mod.crc32c_ok

    def fast(p, s):
        return reader.read_boxes([Box(i, s, PATCH) for i in infos[p]])

    def nocrc(p, s):  # the same read with the CRC-32C comparisons skipped: prices them
        reader_mod.crc32c_ok = lambda data: True
        try:
            return fast(p, s)
        finally:
            reader_mod.crc32c_ok = checked

    sampler = PatchSampler(url, patch_size=PATCH, seed=0, prefetch=1)
    vol_index = {data_path(v.path): k for k, v in enumerate(sampler.volumes)}

    def sampler_read(p, s):
        spec = PatchSpec(0, 0, vol_index[p], s, PATCH, -1, s)
        out = sampler.read(spec)
        return out["image"][0], out["label"][0]

    def zarr_read(p, s):
        return arrays[p]["image"][box(s)], arrays[p]["label"][box(s)]

    engines: dict[str, Any] = {"fast": fast, "zarr": zarr_read, "nocrc": nocrc}
    try:
        import tensorstore as ts
    except ImportError:
        ts = None
    if ts is not None:
        ctx = ts.Context({"cache_pool": {"total_bytes_limit": 0}})
        tsa = {
            p: [
                ts.open(
                    {"driver": "zarr3", "kvstore": {"driver": "file", "path": f"{url}/{p}/{k}/"}},
                    context=ctx,
                    open=True,
                    read=True,
                ).result()
                for k in ("image", "label")
            ]
            for p in paths
        }

        def ts_read(p, s):
            futs = [a[box(s)].read() for a in tsa[p]]
            return [f.result() for f in futs]

        engines["ts"] = ts_read
        ts_reader = ShardReader(url, engine="tensorstore")

        def ts_inside(p, s):  # the same engine behind livercube's API and integrity checks
            return ts_reader.read_boxes([Box(i, s, PATCH) for i in infos[p]])

        engines["ts_reader"] = ts_inside
    engines["sampler"] = sampler_read
    engines.update(blosc2_engines(url, paths, tmp))
    for p in paths:  # shard indexes cached, as after the first patches of a run
        fast(p, (0, 0, 0))
        if "ts_reader" in engines:
            engines["ts_reader"](p, (0, 0, 0))
        sampler_read(p, (0, 0, 0))
    return engines


def blosc2_engines(url: str, paths: list[str], tmp: Path) -> dict[str, Any]:
    """nnU-Net v2's on-disk form, written and opened by nnU-Net's own code.

    ``comp_blosc2_params`` (nnU-Net's chunk/block heuristic for the patch size) and
    ``nnUNetDatasetBlosc2.save_case``/``load_case`` exactly as nnU-Net's preprocessor and data
    loader call them; a patch is ``data[:, box]`` and ``seg[:, box]`` as in its data loader.
    Two forms: nnU-Net's real one (float32 normalised image, int16 seg) and the same voxels as
    int16/uint8 (what livercube stores), so the format and the dtype effect can be told apart.
    Empty without ``nnunetv2``/``blosc2`` (``pip install -e '.[bench]'``).
    """
    try:
        from nnunetv2.training.dataloading.nnunet_dataset import (
            comp_blosc2_params,
            nnUNetDatasetBlosc2,
        )
    except ImportError:
        return {}
    engines: dict[str, Any] = {}
    for form in ("nnunet", "nnunet_int16"):
        cases, size = {}, 0
        for i, p in enumerate(paths):
            image = zarr.open_array(url, path=f"{p}/image", mode="r")[...]
            label = zarr.open_array(url, path=f"{p}/label", mode="r")[...]
            if form == "nnunet":
                data = ((image.astype(np.float32) - image.mean()) / image.std())[None]
                seg = label[None].astype(np.int16)
            else:
                data, seg = image[None], label[None]
            del image, label
            blocks, chunks = comp_blosc2_params(data.shape, PATCH, data.itemsize)
            blocks_seg, chunks_seg = comp_blosc2_params(seg.shape, PATCH, seg.itemsize)
            name = f"{form}_{i}"
            nnUNetDatasetBlosc2.save_case(
                data,
                seg,
                {},
                str(tmp / name),
                chunks=chunks,
                blocks=blocks,
                chunks_seg=chunks_seg,
                blocks_seg=blocks_seg,
            )
            del data, seg
            size += sum((tmp / f).stat().st_size for f in (f"{name}.b2nd", f"{name}_seg.b2nd"))
            ds = nnUNetDatasetBlosc2(str(tmp), identifiers=[name])
            cases[p] = ds.load_case(name)[:2]

        def read(p, s, cases=cases):
            d, sg = cases[p]
            sel = (slice(None), *box(s))
            return np.asarray(d[sel])[0], np.asarray(sg[sel])[0]

        read.mb = size / 1e6  # type: ignore[attr-defined]
        read.layout = f"chunks {chunks}, blocks {blocks}"  # type: ignore[attr-defined]
        engines[form] = read
    return engines


# -- alternative layouts (a recommendation for the writer, measured here, not applied) ---------
#: (inner chunk, shard) shapes tried on one volume; the first is the store's own layout
LAYOUTS = [
    ((32, 64, 64), (64, 512, 512)),
    ((32, 32, 32), (64, 512, 512)),
    ((16, 64, 64), (64, 512, 512)),
    ((16, 32, 32), (64, 512, 512)),
    ((32, 32, 64), (64, 512, 512)),
    ((64, 32, 32), (64, 512, 512)),
    ((32, 64, 64), (128, 512, 512)),
]


def bench_layouts(url: str, path: str, tmp: Path, n: int) -> list[dict[str, Any]]:
    """The same volume rewritten with other inner-chunk / shard shapes (zarr-python, the
    writer's own codecs and checksum), read by ShardReader and TensorStore, interleaved."""
    import tensorstore as ts

    from livercube.sampling import ArrayInfo, Box, ShardReader
    from livercube.store.writer import CHECKSUM, COMPRESSOR, LABEL_COMPRESSOR

    data = {k: zarr.open_array(url, path=f"{path}/{k}", mode="r")[...] for k in ("image", "label")}
    rows: list[dict[str, Any]] = []
    readers = []
    ctx = ts.Context({"cache_pool": {"total_bytes_limit": 0}})
    for inner, shard in LAYOUTS:
        name = "x".join(map(str, inner)) + "_" + "x".join(map(str, shard))
        dest = tmp / "layouts" / name
        infos, handles, stored = [], [], 0
        for k, arr in data.items():
            comp = COMPRESSOR if k == "image" else LABEL_COMPRESSOR
            z = zarr.create_array(
                str(dest / k),
                shape=arr.shape,
                dtype=arr.dtype,
                chunks=tuple(min(c, s) for c, s in zip(inner, arr.shape, strict=True)),
                shards=tuple(min(c, s) for c, s in zip(shard, arr.shape, strict=True)),
                compressors=[comp, CHECKSUM],
                fill_value=0,
                overwrite=True,
            )
            z[...] = arr
            stored += sum(f.stat().st_size for f in (dest / k).rglob("*") if f.is_file())
            infos.append(ArrayInfo.from_metadata(k, z.metadata.to_dict()))
            spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": f"{dest / k}/"}}
            handles.append(ts.open(spec, context=ctx, open=True, read=True).result())
        reader = ShardReader(str(dest))
        readers.append((reader, infos, handles))
        rows.append({"inner": inner, "shard": shard, "mb": stored / 1e6, "ms": [], "ts_ms": []})
    starts = random_starts(data["image"].shape, n, seed=11)
    for reader, infos, _ in readers:  # warm the shard indexes
        for s in starts:
            reader.read_boxes([Box(i, s, PATCH) for i in infos])
    shuffle = np.random.default_rng(3)
    for s in starts:
        for j in shuffle.permutation(2 * len(readers)):
            reader, infos, handles = readers[j // 2]
            t = time.perf_counter()
            if j % 2 == 0:
                reader.read_boxes([Box(i, s, PATCH) for i in infos])
            else:
                [f.result() for f in [h[box(s)].read() for h in handles]]
            rows[j // 2]["ts_ms" if j % 2 else "ms"].append(time.perf_counter() - t)
    for row, (reader, infos, _) in zip(rows, readers, strict=True):
        reader.stats.reset()
        for s in starts:
            got = reader.read_boxes([Box(i, s, PATCH) for i in infos])
        want = [data[k][box(starts[-1])] for k in ("image", "label")]
        assert all(np.array_equal(g, w) for g, w in zip(got, want, strict=True))
        st = reader.stats
        row["chunks"] = st.chunks / n
        row["requests"] = st.requests / n
        row["chunk_mb"] = st.chunk_bytes / n / 1e6
        row["ms"], row["ts_ms"] = _median_ms(row["ms"]), _median_ms(row["ts_ms"])
    return rows


def bench_local(url: str, paths: list[str], tmp: Path, n: int) -> dict[str, Any]:
    """Median ms per patch of every engine on the same patches, interleaved.

    Each patch is read by every engine in turn, in a fresh random order per patch, so changes
    in machine load hit every engine alike and no engine always follows the same one (an
    engine right after blosc2, whose threads keep spinning for a while, or right after a read
    of the same chunks, would be measured unfairly); ratios are what to read.
    """
    import google_crc32c

    engines = engines_local(url, paths, tmp)
    names = list(engines)
    times: dict[str, list[float]] = {k: [] for k in names}
    paired: list[float] = []
    patches = random_patches(url, paths, n)
    shuffle = np.random.default_rng(7)
    for p, s in patches:
        for name in shuffle.permutation(names):
            t = time.perf_counter()
            engines[name](p, s)
            times[name].append(time.perf_counter() - t)
        paired.append(times["fast"][-1] - times["nocrc"][-1])
    p, s = patches[-1]
    want = engines["zarr"](p, s)
    for name in names:
        got = engines[name](p, s)
        if name != "nnunet":  # float32-normalised image: compared by nnU-Net's own loader
            assert np.array_equal(np.asarray(got[0]), want[0]), name
        assert np.array_equal(np.asarray(got[1]), want[1]), name
    res: dict[str, Any] = {f"{k}_ms": _median_ms(v) for k, v in times.items()}
    res.update({f"{k}_min_ms": 1000 * min(v) for k, v in times.items()})
    res["crc_paired_ms"] = 1000 * statistics.median(paired)
    for name in ("nnunet", "nnunet_int16"):
        if name in engines:
            res[f"{name}_mb"] = engines[name].mb
            res[f"{name}_layout"] = engines[name].layout
    # the checksum alone: CRC-32C over one patch's compressed chunks (sizes as stored), best
    # of 100 rounds — the CPU it costs when the machine is not busy with anything else
    from livercube.sampling import ArrayInfo, Box, ShardReader

    reader = ShardReader(url)
    q, st = patches[0]
    boxes = [
        Box(
            ArrayInfo.from_metadata(
                f"{q}/{a}", zarr.open_array(url, path=f"{q}/{a}").metadata.to_dict()
            ),
            st,
            PATCH,
        )
        for a in ("image", "label")
    ]
    reader.read_boxes(boxes)
    res["chunk_mb"] = reader.stats.chunk_bytes / 1e6
    n_chunks = reader.stats.chunks
    piece = np.frombuffer(
        os.urandom(max(1, reader.stats.chunk_bytes // max(1, n_chunks))), np.uint8
    )
    best = float("inf")
    for _ in range(100):
        t = time.perf_counter()
        for _ in range(n_chunks):
            google_crc32c.value(piece)
        best = min(best, time.perf_counter() - t)
    res["crc_only_ms"] = 1000 * best
    return res


# -- slow object store ---------------------------------------------------------------------------
async def _proxy(listen: int, upstream: str, latency: float, counter: dict) -> None:
    import aiohttp
    from aiohttp import web

    session = aiohttp.ClientSession(auto_decompress=False)
    hop = {"host", "content-length", "transfer-encoding", "connection"}

    async def handle(request: web.Request) -> web.StreamResponse:
        counter["requests"] += 1
        await asyncio.sleep(latency)
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in hop}
        headers["Host"] = request.headers.get("Host", "")
        async with session.request(
            request.method,
            upstream + request.rel_url.raw_path_qs,
            headers=headers,
            data=body,
            allow_redirects=False,
        ) as resp:
            data = await resp.read()
            counter["bytes"] += len(data)
            out = {k: v for k, v in resp.headers.items() if k.lower() not in hop}
            if request.method == "HEAD":  # keep the object size a HEAD reports
                out["Content-Length"] = resp.headers.get("Content-Length", "0")
                return web.Response(status=resp.status, headers=out)
            return web.Response(status=resp.status, body=data, headers=out)

    app = web.Application(client_max_size=2**30)
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", listen).start()
    while True:
        await asyncio.sleep(3600)


class SharedCounter:
    """``requests``/``bytes`` counters in shared memory, read and reset from the client."""

    FIELDS = ("requests", "bytes")

    def __init__(self) -> None:
        import multiprocessing as mp

        self.values = mp.get_context("spawn").Array("q", len(self.FIELDS))

    def __getitem__(self, name: str) -> int:
        return self.values[self.FIELDS.index(name)]

    def __setitem__(self, name: str, value: int) -> None:
        self.values[self.FIELDS.index(name)] = value


def _run_proxy(listen: int, upstream: str, latency: float, counter: SharedCounter) -> None:
    asyncio.run(_proxy(listen, upstream, latency, counter))


def start_proxy(upstream: str, latency: float) -> tuple[str, SharedCounter]:
    """The latency proxy in its own process, so the client's CPU figures are the client's."""
    import multiprocessing as mp

    port, counter = free_port(), SharedCounter()
    mp.get_context("spawn").Process(
        target=_run_proxy, args=(port, upstream, latency, counter), daemon=True
    ).start()
    wait_for_port(port)
    return f"http://127.0.0.1:{port}", counter


def random_starts(shape, n: int, seed: int = 0) -> list[tuple[int, ...]]:
    rng = np.random.default_rng(seed)
    return [
        tuple(int(rng.integers(0, s - p + 1)) for s, p in zip(shape, PATCH, strict=True))
        for _ in range(n)
    ]


def bench_s3(local_url: str, path: str, n: int, latency_ms: float) -> dict[str, float]:
    """S3 figures for one volume (``path``): only its image and label are uploaded."""
    import s3fs
    from zarr.storage import FsspecStore

    from livercube.sampling import ArrayInfo, Box, ShardReader

    with moto_endpoint(keep_alive=True) as endpoint:
        direct = {"key": "testing", "secret": "testing", "endpoint_url": endpoint}
        fs = s3fs.S3FileSystem(**direct, skip_instance_cache=True)
        fs.mkdir("bench")
        for name in ("image", "label"):
            fs.put(f"{local_url}/{path}/{name}/", f"bench/store/{path}/{name}/", recursive=True)
        proxy, counter = start_proxy(endpoint, latency_ms / 1000)
        opts = {**direct, "endpoint_url": proxy}
        url = "s3://bench/store"
        res: dict[str, float] = {}

        # naive zarr-python through s3fs
        zs = FsspecStore.from_url(url, storage_options=opts, read_only=True)
        g = {k: zarr.open_array(zs, path=f"{path}/{k}", mode="r") for k in ("image", "label")}
        img, lab = g["image"], g["label"]
        starts = random_starts(img.shape, n, seed=1)
        k = max(3, n // 8)
        counter["requests"] = 0
        t = time.perf_counter()
        for s in starts[:k]:
            img[box(s)], lab[box(s)]
        dt = time.perf_counter() - t
        res["zarr_patches_s"] = k / dt
        res["zarr_gets_per_patch"] = counter["requests"] / k

        # ShardReader, one patch at a time (latency of one patch)
        reader = ShardReader(url, opts, workers=16)
        infos = [
            ArrayInfo.from_metadata(f"{path}/{a}", g[a].metadata.to_dict())
            for a in ("image", "label")
        ]
        for s in random_starts(img.shape, 8, seed=99):  # warm the shard-index cache
            reader.read_boxes([Box(i, s, PATCH) for i in infos])
        reader.stats.reset()
        counter["requests"] = counter["bytes"] = 0
        t = time.perf_counter()
        for s in starts:
            reader.read_boxes([Box(i, s, PATCH) for i in infos])
        dt = time.perf_counter() - t
        st = reader.stats
        res["fast_serial_patches_s"] = n / dt
        res["fast_gets_per_patch"] = counter["requests"] / n
        res["fast_bytes_ratio"] = st.bytes_fetched / max(1, st.chunk_bytes)

        # the test server's own ceiling: plain concurrent ranged GETs through the same proxy,
        # no decoding, by the reader's own client — no reader can fetch faster than this from
        # this moto server
        from livercube.sampling.http_ranges import client_for
        from livercube.sampling.ranges import ByteRange
        from livercube.store.location import StoreLocation

        shard = next(p for p in fs.find(f"bench/store/{path}/image") if "/c/" in p)
        size = fs.size(shard)
        m = 200
        begin = [(i * 7919) % max(1, size - 65_536) for i in range(m)]
        key = shard.removeprefix("bench/store/")
        raw = client_for(StoreLocation.of(url, opts))
        t, c0 = time.perf_counter(), time.process_time()
        raw.fetch([ByteRange(key, b, b + 65_536) for b in begin])
        res["server_gets_s"] = m / (time.perf_counter() - t)
        res["client_cpu_ms_per_get"] = 1000 * (time.process_time() - c0) / m

        # many patches in flight (what PatchSampler(prefetch=16) does), the reader's client and
        # s3fs (the reader before) side by side
        from concurrent.futures import ThreadPoolExecutor

        for name, r in (
            ("fast", reader),
            ("fsspec", ShardReader(url, opts, workers=16, transport="fsspec")),
        ):
            for s in random_starts(img.shape, 8, seed=99):  # warm the shard-index cache
                r.read_boxes([Box(i, s, PATCH) for i in infos])
            counter["requests"] = 0
            with ThreadPoolExecutor(16) as pool:
                t, c0 = time.perf_counter(), time.process_time()
                list(
                    pool.map(lambda s, r=r: r.read_boxes([Box(i, s, PATCH) for i in infos]), starts)
                )
                res[f"{name}_prefetch16_patches_s"] = n / (time.perf_counter() - t)
                res[f"{name}_cpu_ms_per_patch"] = 1000 * (time.process_time() - c0) / n
                res[f"{name}_gets_per_patch_16"] = counter["requests"] / n
        return res


def main() -> None:
    from livercube.synth.phantom import use_scanner_noise

    use_scanner_noise(True)  # every phantom rendered here is CT-like
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=40, help="patches per measurement")
    ap.add_argument("--latency-ms", type=float, default=50.0)
    ap.add_argument("--slices", default="100,160,130", help="slices of each 512² volume")
    ap.add_argument("--keep", help="build (or reuse) the volumes in this directory")
    ap.add_argument("--no-s3", action="store_true", help="local measurements only")
    ap.add_argument(
        "--layouts", action="store_true", help="also time other inner-chunk/shard shapes"
    )
    args = ap.parse_args()
    slices = [int(v) for v in args.slices.split(",")]
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        base = Path(args.keep) if args.keep else tmp
        base.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        url, paths, sizes = build_store(base, slices)
        built = time.perf_counter() - t0
        loc = bench_local(url, paths, tmp, args.n)
        print(
            f"{len(paths)} noisy CRLM-style volumes, {PLANE}² x {slices} slices (built in "
            f"{built:.0f} s); patch {PATCH} (image int16 + label uint8), {args.n} patches, "
            f"every engine on every patch, interleaved; 1-min load {os.getloadavg()[0]:.1f}"
        )
        print(
            f"compression: image {sizes['image_raw'] / sizes['image_stored']:.2f}x "
            f"(patient CT ~3x), image + label {sizes['raw'] / sizes['stored']:.2f}x; "
            f"{sizes['stored'] / 1e6:.0f} MB stored"
        )
        rows = [
            ("fast", "livercube ShardReader (CRC-32C checked)"),
            ("nocrc", "livercube ShardReader, CRC checks skipped"),
            ("sampler", "livercube PatchSampler.read"),
            ("ts", "TensorStore zarr3, same store, cache off"),
            ("ts_reader", "ShardReader(engine='tensorstore')"),
            ("zarr", "zarr-python arr[box]"),
            ("nnunet", "nnU-Net v2 blosc2 (float32 image, int16 seg)"),
            ("nnunet_int16", "nnU-Net v2 blosc2, int16 image + uint8 label"),
        ]
        print("\nlocal store, ms per patch                  median   ShardReader / this   fastest")
        for key, name in rows:
            ms = loc.get(f"{key}_ms")
            if ms is None:
                print(f"  {name:46s}   not installed (pip install -e '.[bench]')")
                continue
            print(
                f"  {name:46s} {ms:7.2f}  {loc['fast_ms'] / ms:6.2f}x  {loc[f'{key}_min_ms']:12.2f}"
            )
        if "nnunet_mb" in loc:
            print(
                f"  (blosc2 on disk: {loc['nnunet_mb']:.0f} MB float32 form, "
                f"{loc['nnunet_int16_mb']:.0f} MB int16 form; {loc['nnunet_int16_layout']})"
            )
        print(
            f"checksum cost per patch: median paired difference {loc['crc_paired_ms']:+.2f} ms "
            f"({loc['crc_paired_ms'] / loc['nocrc_ms']:+.1%}); CRC-32C alone over a patch's "
            f"{loc['chunk_mb']:.2f} MB of compressed chunks: {loc['crc_only_ms']:.2f} ms "
            f"({loc['crc_only_ms'] / loc['fast_ms']:.1%} of the read)"
        )
        if args.layouts:
            rows = bench_layouts(url, paths[1], tmp, args.n)
            base = rows[0]["ms"]
            print(
                f"\nlayouts (volume {paths[1]}; load {os.getloadavg()[0]:.1f}): inner chunk, "
                "shard -> ShardReader ms, TensorStore ms, base / this, chunks decoded, "
                "local requests and compressed MB per patch, MB stored"
            )
            for r in rows:
                print(
                    f"  {r['inner']!s:14s} {r['shard']!s:16s} {r['ms']:6.2f} "
                    f"{r['ts_ms']:6.2f}  {base / r['ms']:5.2f}x  {r['chunks']:5.1f} "
                    f"{r['requests']:5.1f} {r['chunk_mb']:5.2f}  {r['mb']:6.1f}"
                )
        if args.no_s3:
            return
        s3 = bench_s3(url, paths[0], args.n, args.latency_ms)
        print(f"\nmoto S3 behind a {args.latency_ms:.0f} ms/request proxy, one process")
        print(
            f"  zarr-python arr[box]        {s3['zarr_patches_s']:7.2f} patches/s  "
            f"{s3['zarr_gets_per_patch']:5.1f} GETs/patch"
        )
        print(
            f"  ShardReader, 1 in flight    {s3['fast_serial_patches_s']:7.2f} patches/s  "
            f"{s3['fast_gets_per_patch']:5.1f} GETs/patch  "
            f"bytes fetched / compressed patch bytes {s3['fast_bytes_ratio']:.2f}"
        )
        print(
            f"  ShardReader, 16 in flight   {s3['fast_prefetch16_patches_s']:7.2f} patches/s  "
            f"({s3['fast_prefetch16_patches_s'] / s3['zarr_patches_s']:.1f}x zarr-python)"
        )
        print(
            f"  ShardReader via s3fs, 16    {s3['fsspec_prefetch16_patches_s']:7.2f} patches/s  "
            f"client CPU {s3['fsspec_cpu_ms_per_patch']:.1f} ms/patch "
            f"(own client: {s3['fast_cpu_ms_per_patch']:.1f} ms/patch, "
            f"{s3['fast_prefetch16_patches_s'] / s3['fsspec_prefetch16_patches_s']:.2f}x "
            "the patches/s)"
        )
        rate = s3["fast_gets_per_patch_16"] * s3["fast_prefetch16_patches_s"]
        print(
            f"  server: {s3['server_gets_s']:.0f} ranged GETs/s with 64 in flight, nothing "
            f"decoded (client CPU {s3['client_cpu_ms_per_get']:.2f} ms/GET); ShardReader with "
            f"16 patches in flight: {rate:.0f} GETs/s ({s3['fast_gets_per_patch_16']:.1f} "
            f"GETs/patch; via s3fs {s3['fsspec_gets_per_patch_16']:.1f}) = "
            f"{rate / s3['server_gets_s']:.0%} of the server's rate"
        )
        print("\nMONAI / TorchIO: benchmarks/bench_loaders.py")


if __name__ == "__main__":
    main()
