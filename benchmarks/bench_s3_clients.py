"""Client CPU per signed S3 GET: s3fs vs obstore vs botocore's SigV4 signer, against moto.

    python benchmarks/bench_s3_clients.py [--gets 400] [--inflight 64] [--server both]

Why: over S3 every ranged GET of a patch is signed (SigV4) and parsed by the client; the
reader uses s3fs (aiobotocore), whose per-request CPU limits patches/s per process long
before the network does.  Each client fetches the same ``--gets`` 64 KiB ranges of one object
from a moto server on loopback, ``--inflight`` at a time; printed: GETs/s (bounded by moto on
this machine, so read the CPU column) and client-process CPU per GET.

* s3fs ``cat_ranges`` (what ``ShardReader`` did before, and still does where it must);
* obstore (Rust ``object_store``, SigV4 in Rust): one ``get_range_async`` per range, gathered
  (its ``get_ranges`` coalesces ranges itself, shown apart: it makes fewer requests);
* livercube's :class:`~livercube.sampling.http_ranges.RangeClient` (what ``ShardReader`` uses
  for ``s3://`` now: botocore's SigV4 signer over per-thread keep-alive ``http.client``
  connections), with a patch's worth of ranges per read and several reads in flight, and one
  GET at a time (the client's own cost without thread hand-offs);
* botocore's ``SigV4Auth`` on a pooled urllib3 client in threads, and signing alone.

Two servers: moto's application behind waitress (persistent connections, as S3 has) and
moto's own server, which closes every connection after one response (so every GET also pays
a TCP connect there).

Not a test; goals are printed, not asserted (goal: ≤ 1 ms client CPU per signed GET).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_patches import moto_endpoint

GOAL_CPU_MS = 1.0
SIZE = 65_536


def measure(starts: list[int], endpoint: str, inflight: int) -> dict[str, tuple[float, float]]:
    """name → (wall s, client CPU s) for the same ranged GETs."""
    import s3fs

    res: dict[str, tuple[float, float]] = {}
    fs = s3fs.S3FileSystem(
        key="testing", secret="testing", endpoint_url=endpoint, skip_instance_cache=True
    )
    ends = [s + SIZE for s in starts]

    def timed(name: str, fn) -> object:
        t, c = time.perf_counter(), time.process_time()
        out = fn()
        res[name] = (time.perf_counter() - t, time.process_time() - c)
        return out

    want = timed(
        "s3fs cat_ranges",
        lambda: fs.cat_ranges(["bench/obj"] * len(starts), starts, ends, batch_size=inflight),
    )
    try:
        import obstore
        from obstore.store import S3Store
    except ImportError:
        obstore = None
    if obstore is not None:
        store = S3Store(
            "bench",
            endpoint=endpoint,
            access_key_id="testing",
            secret_access_key="testing",
            region="us-east-1",
            client_options={"allow_http": True},
        )

        async def each() -> list:
            sem = asyncio.Semaphore(inflight)

            async def one(s: int):
                async with sem:
                    return await obstore.get_range_async(store, "obj", start=s, end=s + SIZE)

            return await asyncio.gather(*(one(s) for s in starts))

        got = timed("obstore get_range_async, one per range", lambda: asyncio.run(each()))
        assert [bytes(g) for g in got] == list(want)  # type: ignore[union-attr, arg-type]
        timed(
            "obstore get_ranges (coalesces itself)",
            lambda: obstore.get_ranges(store, "obj", starts=starts, ends=ends),
        )
    from livercube.sampling.http_ranges import client_for
    from livercube.sampling.ranges import ByteRange
    from livercube.store.location import StoreLocation

    client = client_for(
        StoreLocation.of(
            "s3://bench", {"key": "testing", "secret": "testing", "endpoint_url": endpoint}
        ),
        max_inflight=inflight,
    )
    assert client is not None
    wanted = [ByteRange("obj", s, s + SIZE) for s in starts]
    per_read = 8  # a patch's ranges go out together; several patches are in flight

    def reads() -> list:
        with ThreadPoolExecutor(max(1, inflight // per_read)) as ex:
            parts = ex.map(
                client.fetch, [wanted[i : i + per_read] for i in range(0, len(wanted), per_read)]
            )
            return [b for part in parts for b in part]

    got = timed("livercube RangeClient, 8 reads of 8 ranges in flight", reads)
    assert got == list(want)
    timed("livercube RangeClient, one GET at a time", lambda: [client.fetch([w]) for w in wanted])
    import urllib3
    from botocore.auth import SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    auth = SigV4Auth(Credentials("testing", "testing"), "s3", "us-east-1")
    pool = urllib3.PoolManager(maxsize=inflight)

    def signed(s: int) -> AWSRequest:
        req = AWSRequest(
            method="GET",
            url=f"{endpoint}/bench/obj",
            headers={"Range": f"bytes={s}-{s + SIZE - 1}"},
        )
        auth.add_auth(req)
        return req

    def get(s: int) -> bytes:
        req = signed(s)
        return pool.request("GET", req.url, headers=dict(req.headers.items())).data

    with ThreadPoolExecutor(inflight) as ex:
        timed("botocore SigV4 + urllib3 pool, threads", lambda: list(ex.map(get, starts)))
    timed("botocore SigV4 signing alone", lambda: [signed(s) for s in starts])
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gets", type=int, default=400)
    ap.add_argument("--inflight", type=int, default=64)
    ap.add_argument(
        "--server",
        choices=("keep-alive", "close", "both"),
        default="both",
        help="moto behind waitress (persistent connections, as S3) and/or moto's own server",
    )
    args = ap.parse_args()
    servers = ("keep-alive", "close") if args.server == "both" else (args.server,)
    for server in servers:
        with moto_endpoint(keep_alive=server == "keep-alive") as endpoint:
            import s3fs

            fs = s3fs.S3FileSystem(
                key="testing", secret="testing", endpoint_url=endpoint, skip_instance_cache=True
            )
            fs.mkdir("bench")
            fs.pipe("bench/obj", os.urandom(4_000_000))
            starts = [(i * 7919) % (4_000_000 - SIZE) for i in range(args.gets)]
            res = measure(starts, endpoint, args.inflight)
        kind = (
            "moto behind waitress, persistent connections"
            if server == "keep-alive"
            else "moto's own server, a new connection per GET"
        )
        print(
            f"{args.gets} signed 64 KiB GETs, {args.inflight} in flight, {kind}; "
            f"1-min load {os.getloadavg()[0]:.1f}"
        )
        base = res["s3fs cat_ranges"][1]
        for name, (wall, cpu) in res.items():
            rate = f"{args.gets / wall:8.0f} GETs/s" if "alone" not in name else " " * 15
            print(
                f"  {name:54s} {rate}  client CPU {1000 * cpu / args.gets:6.2f} ms/GET  "
                f"s3fs / this {base / max(cpu, 1e-9):6.1f}x"
            )
    print(f"goal: <= {GOAL_CPU_MS:.1f} ms client CPU per signed GET")


if __name__ == "__main__":
    main()
