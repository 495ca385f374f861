"""Sampler start-up as the catalog grows: 20, 200 and 2,000 small volumes, local and over HTTP.

    python benchmarks/bench_startup.py [--keep DIR] [--sizes 20,200,2000] [--latency-ms 50]
                                       [--repeats 3] [--workers 2]

Stores of N tiny annotated phantom volumes (8×32×32 voxels, written by the store's own writer,
catalog and consolidated root by ``write_catalog``) — tiny so that everything but the number of
volumes is negligible.  The 2,000-volume store is written once (``--workers`` processes, a
minute or two; ``--keep`` reuses it), the smaller ones are copies of its first N volume
trees with their own catalog.  Then, each measurement in a fresh Python process (imports done
before the clock starts):

* ``PatchSampler(url, mode="foreground")`` construction ("start-up") and its first patch;
* the same on the 2,000-volume store with ``where=`` selecting the first N volumes (selection
  cost apart from catalog size);
* ``livercube.open(url)`` and its ``.catalog``; ``xarray.open_zarr(url, group="catalog")`` and
  ``xarray.open_zarr(url + "/catalog")`` (the catalog group's own consolidated document).

``import dask.array`` — which xarray does the first time it decodes a variable, ~1 s once per
process whatever the store — is timed apart, before the clock.  Locally and through the slow
HTTP server of ``bench_remote.py`` (``--latency-ms`` before every answer), whose counters give
the requests and bytes of each step.  Memory: the process's peak
RSS growth over the step and, in a separate run, tracemalloc's peak.  Wall times are medians of
``--repeats`` processes; the 1-minute load is printed beside them (the machine is shared).
Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

from bench_remote import server_stats, start_server  # noqa: E402

#: the tiny volume: small enough that only the number of volumes matters
SHAPE = (8, 32, 32)
SPACING = (4.0, 8.0, 8.0)
PATCH = (4, 16, 16)
COLLECTION = "crlm"


def patient(i: int) -> str:
    return f"BENCH-{i:05d}"


# -- stores ---------------------------------------------------------------------------------------
def _write_range(url: str, lo: int, hi: int) -> int:
    from volume_factory import phantom_volume

    from livercube.store.writer import write_volume

    for i in range(lo, hi):
        vol = phantom_volume(COLLECTION, patient(i), shape=SHAPE, spacing=SPACING, seed=i)
        write_volume(url, vol)
    return hi - lo


def _complete(url: Path, n: int) -> bool:
    """Whether a kept store already has its catalog of ``n`` volumes."""
    try:
        attrs = json.loads((url / "catalog" / "zarr.json").read_text())["attributes"]
    except (OSError, KeyError, ValueError):
        return False
    return attrs.get("n_volumes") == n


def build_big(url: Path, n: int, workers: int) -> None:
    """``n`` volumes written by the store writer in ``workers`` processes, then the catalog."""
    import zarr

    from livercube.store.catalog import write_catalog

    if _complete(url, n):
        return
    shutil.rmtree(url, ignore_errors=True)
    zarr.open_group(str(url), mode="w", zarr_format=3)
    t = time.perf_counter()
    step = max(1, n // (workers * 8))
    with ProcessPoolExecutor(workers) as pool:
        lows = list(range(0, n, step))
        highs = [min(n, a + step) for a in lows]
        done = sum(pool.map(_write_range, [str(url)] * len(lows), lows, highs))
    t_cat = time.perf_counter()
    write_catalog(str(url))
    print(
        f"wrote {done} volumes in {t_cat - t:.0f} s, catalog in "
        f"{time.perf_counter() - t_cat:.1f} s (1-min load {os.getloadavg()[0]:.1f})",
        flush=True,
    )


def build_subset(big: Path, url: Path, n: int) -> None:
    """A store holding the first ``n`` volumes of ``big`` (copied trees) and its own catalog."""
    from livercube.store.catalog import write_catalog

    if _complete(url, n):
        return
    shutil.rmtree(url, ignore_errors=True)
    (url / COLLECTION).mkdir(parents=True)
    root = json.loads((big / "zarr.json").read_text())
    root.pop("consolidated_metadata", None)
    (url / "zarr.json").write_text(json.dumps(root))
    shutil.copy(big / COLLECTION / "zarr.json", url / COLLECTION / "zarr.json")
    for i in range(n):
        shutil.copytree(big / COLLECTION / patient(i), url / COLLECTION / patient(i))
    write_catalog(str(url))


# -- one measurement (runs in a fresh process) ----------------------------------------------------
def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _reset_peak_rss() -> None:
    """Linux: start a new peak-RSS (VmHWM) window, so a step's peak is its own, not import's."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


class Probe:
    """Wall time, peak RSS growth, tracemalloc peak and server counters of successive steps."""

    def __init__(self, base: str | None, traced: bool) -> None:
        self.base, self.traced, self.out = base, traced, {}
        if base:
            server_stats(base, reset=True)

    def step(self, name: str, fn) -> Any:
        _reset_peak_rss()
        rss0 = _status_kib("VmRSS")
        if self.traced:
            tracemalloc.start()
        t = time.perf_counter()
        error = None
        try:
            value = fn()
        except Exception as exc:  # reported, not fatal: e.g. no listing over plain HTTP
            value, error = None, f"{type(exc).__name__}: {str(exc)[:120]}"
        wall = time.perf_counter() - t
        rec: dict[str, Any] = {"s": wall}
        if error:
            rec["error"] = error
        if self.traced:
            rec["traced_mb"] = tracemalloc.get_traced_memory()[1] / 2**20
            tracemalloc.stop()
        rec["rss_mb"] = max(0, _status_kib("VmHWM") - rss0) / 1024
        if self.base:
            stats = server_stats(self.base, reset=True)
            rec.update(requests=stats["requests"], kb=stats["bytes"] / 1024)
        self.out[name] = rec
        return value


def child(url: str, base: str | None, what: str, where: str | None, traced: bool) -> dict:
    import fsspec.implementations.http  # noqa: F401  (imports are not start-up)
    import xarray as xr

    import livercube
    from livercube.sampling import PatchSampler

    # xarray imports dask.array (when installed) the first time it decodes a variable: ~1 s
    # once per process, whatever the store; timed apart so the steps show what grows with N
    t = time.perf_counter()
    import dask.array  # noqa: F401

    import_dask_s = time.perf_counter() - t
    target = base or url
    probe = Probe(base, traced)
    probe.out["import_dask_s"] = import_dask_s
    if what == "sampler":
        sampler = probe.step(
            "startup",
            lambda: PatchSampler(target, where=where, patch_size=PATCH, mode="foreground", seed=0),
        )
        probe.step("first_patch", lambda: sampler.patch(0))
        probe.out["volumes"] = len(sampler.volumes)
    else:
        store = probe.step("open", lambda: livercube.open(target))
        probe.step("catalog", lambda: store.catalog)
        # xarray opens the root (consolidated) even for a group; pointing it at the catalog
        # group itself reads the catalog's own consolidated document instead
        probe.step("open_zarr_group", lambda: xr.open_zarr(target, group="catalog").load())
        probe.step("open_zarr_catalog_url", lambda: xr.open_zarr(f"{target}/catalog").load())
    return probe.out


def measure(url: str, base: str | None, what: str, where: str | None, traced: bool) -> dict:
    cmd = [sys.executable, __file__, "--child", json.dumps([url, base, what, where, traced])]
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if res.returncode:
        raise RuntimeError(f"child failed: {' '.join(cmd)}\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def run(url: str, base: str | None, what: str, where: str | None, repeats: int) -> dict:
    """Medians of ``repeats`` untraced runs (times, RSS, requests) plus one traced run."""
    runs = [measure(url, base, what, where, False) for _ in range(repeats)]
    traced = measure(url, base, what, where, True)
    out: dict[str, Any] = {"load": os.getloadavg()[0]}
    for step, rec in runs[0].items():
        if not isinstance(rec, dict):
            out[step] = rec
            continue
        out[step] = {
            k: statistics.median(r[step][k] for r in runs) if k != "error" else v
            for k, v in rec.items()
        }
        out[step]["traced_mb"] = traced[step]["traced_mb"]
    return out


# -- report ---------------------------------------------------------------------------------------
def _cell(rec: dict, remote: bool) -> str:
    if "error" in rec:
        return f"failed: {rec['error']}"
    text = f"{rec['s'] * 1000:7.0f} ms  {rec['rss_mb']:6.1f} / {rec['traced_mb']:6.1f} MB"
    if remote:
        text += f"  {rec['requests']:4.0f} req  {rec['kb']:8.0f} KiB"
    return text


def report(results: dict, sizes: list[int], latency_ms: float) -> None:
    dask_s = [r["import_dask_s"] for r in results.values()]
    print()
    once = statistics.median(dask_s)
    print(f"import dask.array (once per process, before the clock): {once:.2f} s")
    print("time, peak RSS growth / tracemalloc peak, and (HTTP) requests and bytes at the server")
    for where_kind in ("local", f"http +{latency_ms:.0f} ms"):
        remote = where_kind != "local"
        for label, what, steps in (
            ("PatchSampler, catalog of N", "sampler", ("startup", "first_patch")),
            ("PatchSampler, 2000 in catalog, N selected", "sampler_where", ("startup",)),
            (
                "livercube.open + .catalog / xr.open_zarr",
                "open",
                ("open", "catalog", "open_zarr_group", "open_zarr_catalog_url"),
            ),
        ):
            for step in steps:
                print(f"{where_kind:12s} {label} — {step}")
                row = {n: results.get((where_kind, what, n)) for n in sizes}
                for n, r in row.items():
                    if r is not None:
                        print(f"    N={n:5d}  {_cell(r[step], remote)}  (load {r['load']:.1f})")
                lo, hi = row.get(sizes[0]), row.get(sizes[-1])
                if lo and hi:
                    ratio = hi[step]["s"] / max(lo[step]["s"], 1e-9)
                    extra = ""
                    if remote:
                        more = hi[step]["requests"] / max(lo[step]["requests"], 1)
                        extra = f", requests ×{more:.2f}"
                    print(f"    {sizes[-1]} vs {sizes[0]}: time ×{ratio:.2f}{extra}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keep", default=None, help="directory for the stores (reused when complete)")
    ap.add_argument("--sizes", default="20,200,2000")
    ap.add_argument("--latency-ms", type=float, default=50.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(*json.loads(args.child))))
        return
    sizes = sorted(int(s) for s in args.sizes.split(","))
    top = sizes[-1]
    base_dir = Path(args.keep or tempfile.mkdtemp(prefix="bench-startup-"))
    base_dir.mkdir(parents=True, exist_ok=True)
    big = base_dir / f"s{top}.zarr"
    build_big(big, top, args.workers)
    stores = {top: big}
    for n in sizes[:-1]:
        stores[n] = base_dir / f"s{n}.zarr"
        build_subset(big, stores[n], n)
    results: dict[tuple[str, str, int], dict] = {}
    for where_kind in ("local", f"http +{args.latency_ms:.0f} ms"):
        servers = {}
        try:
            if where_kind != "local":
                for n, path in stores.items():
                    servers[n] = start_server(str(path), args.latency_ms)
            for n, path in stores.items():
                base = servers[n][1] if servers else None
                results[(where_kind, "sampler", n)] = run(
                    str(path), base, "sampler", None, args.repeats
                )
                where = f"patient_id < {patient(n)!r}"
                big_base = servers[top][1] if servers else None
                results[(where_kind, "sampler_where", n)] = run(
                    str(big), big_base, "sampler", where, args.repeats
                )
                results[(where_kind, "open", n)] = run(str(path), base, "open", None, args.repeats)
                print(f"{where_kind} N={n} done (1-min load {os.getloadavg()[0]:.1f})", flush=True)
        finally:
            for proc, _ in servers.values():
                proc.terminate()
                proc.wait(timeout=10)
    report(results, sizes, args.latency_ms)


if __name__ == "__main__":
    main()
