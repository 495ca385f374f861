"""Random 96³ patches over HTTP with a slow server: livercube vs TensorStore, same store.

    python benchmarks/bench_remote.py [--keep DIR] [--n 192] [--latency-ms 50] [--inflight 64]

The store of ``bench_patches.py`` (three noisy 512² CRLM-style volumes; ``--keep`` reuses it)
served by a small range-honouring HTTP server in its own process that waits ``--latency-ms``
before answering every request (a far-away bucket or CDN).  Per engine, patches (image int16 +
label uint8) are read with ``--inflight`` in flight from one client process, the server's
request and byte counters giving GETs and bytes per patch:

* livercube ``ShardReader`` over ``http://`` (fsspec's HTTP, the default there; also through
  its own keep-alive client, ``transport="client"``), with its default coalescing rule
  (``overfetch`` 0: exact ranges, adjacent chunks merged) and with ``overfetch`` 0.25 (the
  default before 2026-12-03) and unlimited (one GET per shard object, the oldest rule);
* TensorStore's ``zarr3`` driver with its ``http`` kvstore (cache pool 0);
* ``PatchSampler`` over the same URL (catalog + lazily read volume metadata), whose start-up
  requests are counted too.

The server's own ceiling — a trivial loop of concurrent 64 KiB ranged GETs, nothing decoded —
is printed beside it.  Shard indexes are warm for every engine (each reads every index once
before timing).  Ratios are what to read: the machine is shared.  Not a test.

With many patches in flight over three volumes, concurrent patches overlap and both engines
share those chunk fetches, so bytes and GETs per patch there measure the sharing as much as
the reader.  A second table therefore reads patches **one at a time**, where every byte a
patch costs is its own, beside the minimum it can cost: the compressed size of the non-empty
chunks it touches, from the shard indexes.  The server's CPU per patch is printed too: on a
2-core machine client and server share the cores, which caps patches/s for every engine.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_patches import PATCH, box, build_store, free_port, random_patches, wait_for_port


# -- the slow server (runs in its own process) ----------------------------------------------------
def serve(root: str, port: int, latency: float) -> None:
    from aiohttp import web

    stats = {"requests": 0, "bytes": 0}

    async def handle(request: web.Request) -> web.StreamResponse:
        if request.path == "/__stats":
            out = dict(stats)
            if request.query.get("reset"):
                stats.update(requests=0, bytes=0)
            return web.json_response(out)
        stats["requests"] += 1
        await asyncio.sleep(latency)
        path = os.path.join(root, request.path.lstrip("/"))
        if ".." in request.path or not os.path.isfile(path):
            return web.Response(status=404)
        size = os.path.getsize(path)
        rng = request.headers.get("Range", "")
        start, end = 0, size
        if rng.startswith("bytes="):
            a, _, b = rng[6:].partition("-")
            if a == "":
                start = max(0, size - int(b))
            else:
                start, end = int(a), min(size, int(b) + 1) if b else size
        with open(path, "rb") as f:
            f.seek(start)
            body = f.read(end - start)
        stats["bytes"] += len(body)
        headers = {"Accept-Ranges": "bytes", "Content-Length": str(len(body))}
        if rng:
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
        if request.method == "HEAD":
            headers["Content-Length"] = str(size)
            return web.Response(status=200, headers=headers)
        return web.Response(status=206 if rng else 200, body=body, headers=headers)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


def start_server(root: str, latency_ms: float) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, __file__, "--serve", root, str(port), str(latency_ms / 1000)]
    )
    wait_for_port(port)
    return proc, f"http://127.0.0.1:{port}"


def server_stats(base: str, reset: bool = False) -> dict[str, int]:
    import urllib.request

    with urllib.request.urlopen(f"{base}/__stats{'?reset=1' if reset else ''}") as r:
        return json.loads(r.read())


def ceiling(base: str, key: str, inflight: int, m: int = 512) -> float:
    """GETs/s of the server itself: ``m`` 64 KiB ranged GETs, ``inflight`` at a time."""
    import aiohttp

    async def run() -> float:
        sem = asyncio.Semaphore(inflight)
        async with aiohttp.ClientSession() as s:

            async def one(i: int) -> None:
                async with sem:
                    a = (i * 7919) % 1_000_000
                    hdr = {"Range": f"bytes={a}-{a + 65535}"}
                    async with s.get(f"{base}/{key}", headers=hdr) as r:
                        await r.read()

            t = time.perf_counter()
            await asyncio.gather(*(one(i) for i in range(m)))
            return m / (time.perf_counter() - t)

    return asyncio.run(run())


# -- engines -------------------------------------------------------------------------------------
def livercube_engine(base: str, metas: dict, overfetch: float | None, transport: str = "auto"):
    from livercube.sampling import ArrayInfo, Box, ShardReader

    reader = ShardReader(base, overfetch=overfetch, workers=8, transport=transport)
    infos = {
        p: [ArrayInfo.from_metadata(f"{p}/{k}", metas[p][k]) for k in ("image", "label")]
        for p in metas
    }
    return lambda p, s: reader.read_boxes([Box(i, s, PATCH) for i in infos[p]])


def tensorstore_engine(base: str, metas: dict):
    import tensorstore as ts

    ctx = ts.Context({"cache_pool": {"total_bytes_limit": 0}})
    arrays = {
        p: [
            ts.open(
                {
                    "driver": "zarr3",
                    "kvstore": {"driver": "http", "base_url": base, "path": f"/{p}/{k}/"},
                },
                context=ctx,
                open=True,
                read=True,
            ).result()
            for k in ("image", "label")
        ]
        for p in metas
    }

    def read(p, s):
        futs = [a[box(s)].read() for a in arrays[p]]
        return [f.result() for f in futs]

    return read


def process_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) used so far by process ``pid`` (Linux ``/proc``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def minimum_bytes(url: str, metas: dict, patches) -> tuple[float, float]:
    """(bytes, objects) per patch that reading image and label can at least cost: the stored
    size of every non-empty chunk the patch touches, from the shard indexes on disk (parsed
    and checked by the reader's own :class:`ShardIndex`)."""
    import itertools

    from livercube.sampling import ArrayInfo
    from livercube.sampling.shard_index import ShardIndex

    total = objects = 0
    for path, start in patches:
        for key in ("image", "label"):
            info = ArrayInfo.from_metadata(f"{path}/{key}", metas[path][key])
            spans = [
                range(s // c, (min(s + q, d) - 1) // c + 1)
                for s, q, c, d in zip(start, PATCH, info.inner_shape, info.shape, strict=True)
            ]
            seen: dict[tuple[int, ...], ShardIndex | None] = {}
            for idx in itertools.product(*spans):
                where = tuple(i // k for i, k in zip(idx, info.grid, strict=True))
                if where not in seen:
                    f = Path(url, info.object_key(where))
                    seen[where] = None
                    if f.exists():
                        with f.open("rb") as fh:
                            fh.seek(-info.index_nbytes, 2)
                            raw = fh.read()
                        seen[where] = ShardIndex.parse(raw, info, url=url, key=str(f))
                index = seen[where]
                if index is None:
                    continue
                local = tuple(i % k for i, k in zip(idx, info.grid, strict=True))
                span = index.locate(int(np.ravel_multi_index(local, info.grid)))
                if span is not None:
                    total += span[1] - span[0]
            objects += sum(v is not None for v in seen.values())
    return total / len(patches), objects / len(patches)


def run_engine(
    base: str, read, patches, inflight: int, server_pid: int | None = None
) -> dict[str, float]:
    with ThreadPoolExecutor(inflight) as pool:
        # warm: the same patches once untimed, so every shard index they need is cached (as
        # after the first patches of a run; TensorStore reads indexes through its own cache)
        list(pool.map(lambda ps: read(*ps), patches))
        server_stats(base, reset=True)
        served = process_cpu_s(server_pid) if server_pid else 0.0
        t, cpu = time.perf_counter(), time.process_time()
        list(pool.map(lambda ps: read(*ps), patches))
        dt, cpu = time.perf_counter() - t, time.process_time() - cpu
        served = (process_cpu_s(server_pid) - served) if server_pid else float("nan")
    st = server_stats(base)
    n = len(patches)
    return {
        "patches_s": n / dt,
        "gets": st["requests"] / n,
        "mb": st["bytes"] / n / 1e6,
        "cpu_ms": 1000 * cpu / n,  # client process CPU (fetch + decode), server excluded
        "server_ms": 1000 * served / n,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keep", default=None, help="directory of bench_patches.py's store")
    ap.add_argument("--slices", default="100,160,130")
    ap.add_argument("--n", type=int, default=192)
    ap.add_argument("--latency-ms", type=float, default=50.0)
    ap.add_argument("--inflight", type=int, default=64)
    ap.add_argument("--single", type=int, default=48, help="patches read one at a time")
    ap.add_argument("--serve", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve(args.serve[0], int(args.serve[1]), float(args.serve[2]))
        return
    import tempfile

    import zarr

    from livercube.synth.phantom import use_scanner_noise

    use_scanner_noise(True)
    base_dir = Path(args.keep or tempfile.mkdtemp())
    base_dir.mkdir(parents=True, exist_ok=True)
    url, paths, _ = build_store(base_dir, [int(v) for v in args.slices.split(",")])
    metas = {
        p: {
            k: zarr.open_array(url, path=f"{p}/{k}", mode="r").metadata.to_dict()
            for k in ("image", "label")
        }
        for p in paths
    }
    proc, base = start_server(url, args.latency_ms)
    try:
        patches = random_patches(url, paths, args.n, seed=3)
        engines = {
            "livercube ShardReader (default: exact ranges)": livercube_engine(base, metas, None),
            "livercube ShardReader, own client (transport='client')": livercube_engine(
                base, metas, None, "client"
            ),
            "livercube ShardReader, overfetch 0.25": livercube_engine(base, metas, 0.25),
            "livercube ShardReader, overfetch unlimited": livercube_engine(
                base, metas, float("inf")
            ),
        }
        with contextlib.suppress(ImportError):
            engines["TensorStore zarr3 + http kvstore"] = tensorstore_engine(base, metas)
        # the sampler's start-up over HTTP: requests before the first patch
        from livercube.sampling import PatchSampler

        server_stats(base, reset=True)
        t = time.perf_counter()
        sampler = PatchSampler(base, patch_size=PATCH, seed=0, prefetch=args.inflight)
        startup_s = time.perf_counter() - t
        startup_gets = server_stats(base)["requests"]
        sampler_read = sampler.patch  # position -> patch

        order = list(engines)
        results: dict[str, list[dict[str, float]]] = {k: [] for k in [*order, "sampler"]}
        rng = np.random.default_rng(5)
        rounds = 2
        for r in range(rounds):  # interleaved: each engine once per round, fresh order
            for name in rng.permutation([*order, "sampler"]):
                if name == "sampler":
                    positions = [(r * 10_000 + i,) for i in range(args.n)]
                    res = run_engine(base, sampler_read, positions, args.inflight, proc.pid)
                else:
                    res = run_engine(base, engines[name], patches, args.inflight, proc.pid)
                results[name].append(res)
        # one patch at a time: no overlap to share, every byte is the patch's own
        alone = patches[: args.single]
        single_names = [
            "livercube ShardReader (default: exact ranges)",
            "livercube ShardReader, overfetch 0.25",
            "TensorStore zarr3 + http kvstore",
        ]
        single = {
            name: run_engine(base, engines[name], alone, 1, proc.pid)
            for name in single_names
            if name in engines
        }
        least_bytes, least_objects = minimum_bytes(url, metas, alone)
        shard = next(Path(url, paths[0], "image", "c").rglob("*"))
        while shard.is_dir():
            shard = next(shard.iterdir())
        key = str(shard.relative_to(url))
        gets_s = ceiling(base, key, args.inflight)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    ts_name = "TensorStore zarr3 + http kvstore"
    print(
        f"HTTP server +{args.latency_ms:.0f} ms/request, {args.inflight} patches in flight, "
        f"{args.n} patches x {rounds} rounds, 1-min load {os.getloadavg()[0]:.1f}"
    )
    print(
        f"{'engine':52s} patches/s  GETs/patch  MB/patch  MB / TensorStore's  "
        "client CPU ms/patch  server CPU ms/patch"
    )
    ts_mb = min(r["mb"] for r in results[ts_name]) if ts_name in results else float("nan")
    for name in [*order, "sampler"]:
        best = max(results[name], key=lambda r: r["patches_s"])
        label = "livercube PatchSampler(prefetch) over http://" if name == "sampler" else name
        print(
            f"  {label:50s} {best['patches_s']:8.1f}  {best['gets']:10.2f}  {best['mb']:8.2f}  "
            f"{best['mb'] / ts_mb:8.2f}x  {best['cpu_ms']:10.1f}  {best['server_ms']:10.1f}"
        )
    print(f"server ceiling: {gets_s:.0f} GETs/s with {args.inflight} in flight, nothing decoded")
    print(
        f"\none patch at a time, {len(alone)} patches: at least {least_bytes / 1e6:.2f} MB "
        f"and {least_objects:.2f} objects (one GET each) per patch (non-empty chunks touched)"
    )
    print(f"{'engine':52s} patches/s  GETs/patch  MB/patch  MB / minimum  MB / TensorStore's")
    ts_alone = single.get(ts_name, {}).get("mb", float("nan"))
    for name, res in single.items():
        print(
            f"  {name:50s} {res['patches_s']:8.1f}  {res['gets']:10.2f}  {res['mb']:8.2f}  "
            f"{res['mb'] * 1e6 / least_bytes:10.3f}x  {res['mb'] / ts_alone:10.3f}x"
        )
    print(
        f"PatchSampler start-up over HTTP: {startup_gets} requests, {startup_s:.2f} s "
        f"({len(paths)} volumes in the catalog)"
    )


if __name__ == "__main__":
    main()
