"""Random 96³ patch reads: livercube's ShardReader vs zarr-python, local and over slow S3.

    python benchmarks/bench_patches.py [--n 40] [--latency-ms 50]

1. Local store: median ms per random 96³ patch (image + label), ShardReader vs naive
   ``zarr.Array[box]``.
2. Object store: a moto S3 server behind a loopback asyncio proxy that delays every request by
   ``--latency-ms``; patches/s per process, GETs per patch, bytes fetched ÷ compressed bytes of
   the chunks the patch needs, for naive zarr-python and for PatchSampler (prefetching).

The volume is a generated "small" PLC-CECT volume tiled to 160×256×256 and written with the
store's own chunking (32×64×64 inner chunks, 64-slice shards) and codecs.  Not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import zarr

PATCH = (96, 96, 96)
SHAPE = (160, 256, 256)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_volume(tmp: Path) -> str:
    """A store-like group ``vol`` with image + label written like the converter writes them."""
    from livercube.convert import convert
    from livercube.store.chunking import chunk_and_shard
    from livercube.store.writer import COMPRESSOR, LABEL_COMPRESSOR
    from livercube.synth.plc_cect import write_plc_cect

    write_plc_cect(tmp / "PLC", n_subjects=1, size="small", seed=0)
    convert(str(tmp / "PLC"), str(tmp / "src.zarr"), "plc-cect", progress=False)
    src = zarr.open_group(str(tmp / "src.zarr"), mode="r", zarr_format=3, use_consolidated=False)
    path = "plc-cect/P0001/CECT/C2"
    image, label = src[path]["0/image"][...], src[path]["0/label"][...]
    reps = [int(np.ceil(t / s)) for t, s in zip(SHAPE, image.shape, strict=True)]
    crop = tuple(slice(0, t) for t in SHAPE)
    out = str(tmp / "bench.zarr")
    root = zarr.open_group(out, mode="w", zarr_format=3)
    g = root.create_group("vol")
    for name, data, comp in (("image", image, COMPRESSOR), ("label", label, LABEL_COMPRESSOR)):
        big = np.tile(data, reps)[crop]
        chunks, shards = chunk_and_shard(big.shape)
        arr = g.create_array(
            name,
            shape=big.shape,
            dtype=big.dtype,
            chunks=chunks,
            shards=shards,
            compressors=[comp],
            fill_value=0,
        )
        arr[...] = big
    return out


def random_starts(n: int, seed: int = 0) -> list[tuple[int, int, int]]:
    rng = np.random.default_rng(seed)
    return [
        tuple(int(rng.integers(0, s - p + 1)) for s, p in zip(SHAPE, PATCH, strict=True))
        for _ in range(n)
    ]


def box(start):
    return tuple(slice(s, s + p) for s, p in zip(start, PATCH, strict=True))


def bench_local(url: str, n: int) -> dict[str, float]:
    from livercube.sampling import ArrayInfo, Box, ShardReader

    g = zarr.open_group(url, mode="r", zarr_format=3)["vol"]
    img, lab = g["image"], g["label"]
    starts = random_starts(n)
    naive = []
    for s in starts:
        t = time.perf_counter()
        img[box(s)], lab[box(s)]
        naive.append(time.perf_counter() - t)
    reader = ShardReader(url)
    infos = [
        ArrayInfo.from_metadata(f"vol/{k}", g[k].metadata.to_dict()) for k in ("image", "label")
    ]
    fast = []
    reader.read_boxes([Box(i, starts[0], PATCH) for i in infos])  # index warm-up
    for s in starts:
        t = time.perf_counter()
        a, b = reader.read_boxes([Box(i, s, PATCH) for i in infos])
        fast.append(time.perf_counter() - t)
    a, b = reader.read_boxes([Box(i, starts[-1], PATCH) for i in infos])
    assert np.array_equal(a, img[box(starts[-1])]) and np.array_equal(b, lab[box(starts[-1])])
    store_bytes = sum(
        f.stat().st_size
        for k in ("image", "label")
        for f in Path(url, "vol", k).rglob("*")
        if f.is_file()
    )
    return {
        "zarr_ms": 1000 * statistics.median(naive),
        "fast_ms": 1000 * statistics.median(fast),
        "store_mb": store_bytes / 1e6,
    }


def bench_blosc2(url: str, tmp: Path, n: int) -> dict[str, float] | None:
    """nnU-Net v2's on-disk form, written and opened by nnU-Net's own code.

    ``comp_blosc2_params`` (nnU-Net's chunk/block heuristic for the patch size) and
    ``nnUNetDatasetBlosc2.save_case``/``load_case`` exactly as nnU-Net's preprocessor and data
    loader call them; a patch is ``data[:, box]`` and ``seg[:, box]`` as in its data loader.
    Two forms: nnU-Net's real one (float32 normalised image, int16 seg) and the same voxels as
    int16/uint8 (what livercube stores), so the format and the dtype effect can be told apart.
    Skipped when ``nnunetv2``/``blosc2`` are not installed (``pip install -e '.[bench]'``).
    """
    try:
        from nnunetv2.training.dataloading.nnunet_dataset import (
            comp_blosc2_params,
            nnUNetDatasetBlosc2,
        )
    except ImportError:
        return None
    g = zarr.open_group(url, mode="r", zarr_format=3)["vol"]
    image, label = g["image"][...], g["label"][...]
    norm = ((image.astype(np.float32) - image.mean()) / image.std())[None]
    forms = {
        "nnunet": (norm, label[None].astype(np.int16)),
        "nnunet_int16": (image[None], label[None]),
    }
    out: dict[str, float] = {}
    starts = random_starts(n)
    for name, (data, seg) in forms.items():
        blocks, chunks = comp_blosc2_params(data.shape, PATCH, data.itemsize)
        blocks_seg, chunks_seg = comp_blosc2_params(seg.shape, PATCH, seg.itemsize)
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
        ds = nnUNetDatasetBlosc2(str(tmp), identifiers=[name])
        d, sg, _, _ = ds.load_case(name)
        times = []
        for st in starts:
            sel = (slice(None), *box(st))
            t = time.perf_counter()
            np.asarray(d[sel]), np.asarray(sg[sel])
            times.append(time.perf_counter() - t)
        sel = (slice(None), *box(starts[-1]))
        assert np.array_equal(np.asarray(d[sel]), data[sel])
        assert np.array_equal(np.asarray(sg[sel]), seg[sel])
        out[f"{name}_ms"] = 1000 * statistics.median(times)
        out[f"{name}_mb"] = (
            sum((tmp / f).stat().st_size for f in (f"{name}.b2nd", f"{name}_seg.b2nd")) / 1e6
        )
        out[f"{name}_chunks"] = str(chunks)  # type: ignore[assignment]
        out[f"{name}_blocks"] = str(blocks)  # type: ignore[assignment]
    return out


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


def start_proxy(upstream: str, latency: float) -> tuple[str, dict]:
    port, counter = free_port(), {"requests": 0, "bytes": 0}
    threading.Thread(
        target=lambda: asyncio.run(_proxy(port, upstream, latency, counter)), daemon=True
    ).start()
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.05)
    return f"http://127.0.0.1:{port}", counter


def bench_s3(local_url: str, n: int, latency_ms: float) -> dict[str, float]:
    import s3fs
    from zarr.storage import FsspecStore

    from livercube.sampling import ArrayInfo, Box, ShardReader

    port = free_port()
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
    moto = subprocess.Popen(
        [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    try:
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.05)
        direct = {"key": "testing", "secret": "testing", "endpoint_url": f"http://127.0.0.1:{port}"}
        fs = s3fs.S3FileSystem(**direct, skip_instance_cache=True)
        fs.mkdir("bench")
        fs.put(f"{local_url}/", "bench/store/", recursive=True)
        proxy, counter = start_proxy(f"http://127.0.0.1:{port}", latency_ms / 1000)
        opts = {**direct, "endpoint_url": proxy}
        url = "s3://bench/store"
        starts = random_starts(n, seed=1)
        res: dict[str, float] = {}

        # naive zarr-python through s3fs
        zs = FsspecStore.from_url(url, storage_options=opts, read_only=True)
        g = zarr.open_group(zs, mode="r", zarr_format=3, use_consolidated=False)["vol"]
        img, lab = g["image"], g["label"]
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
            ArrayInfo.from_metadata(f"vol/{a}", g[a].metadata.to_dict()) for a in ("image", "label")
        ]
        for s in random_starts(8, seed=99):  # warm the shard-index cache
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
        # no decoding — no reader can fetch faster than this from this moto server
        shard = next(p for p in fs.find("bench/store/vol/image") if "/c/" in p)
        size = fs.size(shard)
        m = 200
        begin = [(i * 7919) % max(1, size - 65_536) for i in range(m)]
        raw = s3fs.S3FileSystem(**opts, skip_instance_cache=True)
        t, c0 = time.perf_counter(), time.process_time()
        raw.cat_ranges([shard] * m, begin, [b + 65_536 for b in begin], batch_size=64)
        res["server_gets_s"] = m / (time.perf_counter() - t)
        res["client_cpu_ms_per_get"] = 1000 * (time.process_time() - c0) / m

        # many patches in flight (what PatchSampler(prefetch=16) does)
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(16) as pool:
            t = time.perf_counter()
            list(pool.map(lambda s: reader.read_boxes([Box(i, s, PATCH) for i in infos]), starts))
            res["fast_prefetch16_patches_s"] = n / (time.perf_counter() - t)
        return res
    finally:
        moto.terminate()
        moto.wait(timeout=10)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=40, help="patches per measurement")
    ap.add_argument("--latency-ms", type=float, default=50.0)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        url = build_volume(tmp)
        loc = bench_local(url, args.n)
        b2 = bench_blosc2(url, tmp, args.n)
        print(f"volume {SHAPE}, patch {PATCH} (image int16 + label uint8)")
        print("\nlocal store, median ms per patch")
        print(f"  zarr-python arr[box]   {loc['zarr_ms']:8.1f} ms   1.00x")
        print(
            f"  livercube ShardReader  {loc['fast_ms']:8.1f} ms   "
            f"{loc['fast_ms'] / loc['zarr_ms']:.2f}x"
        )
        if b2:
            for name, what in (
                ("nnunet", "float32 image + int16 seg, as nnU-Net stores them"),
                ("nnunet_int16", "int16 image + uint8 label, livercube's dtypes"),
            ):
                ms = b2[f"{name}_ms"]
                print(
                    f"  nnU-Net v2 blosc2      {ms:8.1f} ms   {ms / loc['zarr_ms']:.2f}x  "
                    f"ShardReader ÷ this = {loc['fast_ms'] / ms:.2f}x  ({what}; "
                    f"{b2[f'{name}_mb']:.1f} MB on disk, chunks {b2[f'{name}_chunks']}, "
                    f"blocks {b2[f'{name}_blocks']})"
                )
            print(f"  livercube store on disk: {loc['store_mb']:.1f} MB (image + label)")
        else:
            print("  nnU-Net v2 blosc2       not installed (pip install -e '.[bench]') — skipped")
        s3 = bench_s3(url, args.n, args.latency_ms)
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
        ceiling = s3["server_gets_s"] / s3["fast_gets_per_patch"]
        print(
            f"  server ceiling: {s3['server_gets_s']:.0f} ranged GETs/s (64 concurrent, no "
            f"decoding; s3fs client CPU {s3['client_cpu_ms_per_get']:.1f} ms/GET) -> at most "
            f"{ceiling:.1f} patches/s at {s3['fast_gets_per_patch']:.1f} GETs/patch; "
            f"ShardReader reaches {s3['fast_prefetch16_patches_s'] / ceiling:.0%} of it"
        )
        print("\nMONAI / TorchIO: benchmarks/bench_loaders.py")


if __name__ == "__main__":
    main()
