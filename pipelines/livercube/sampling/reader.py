"""Fast box reads from sharded Zarr v3 arrays on local disk or object storage.

zarr-python reads a sharded array with one request per inner chunk, one after another, and
reads the shard index again on every access.  :class:`ShardReader` instead

* reads each shard's index once (one ranged GET, a suffix range for ``index_location=end``)
  and caches it for the life of the process;
* plans a whole batch of boxes at once (image + label + other phases of one patch:
  :mod:`~livercube.sampling.plan`), looks up every inner chunk's byte range
  (:mod:`~livercube.sampling.shard_index`), merges ranges of one object only while the
  unwanted bytes between them stay a small fraction of the wanted ones
  (:mod:`~livercube.sampling.ranges`) and fetches all of them in one concurrent round
  (on local disk each decode task ``pread``s its own share and decodes it as it arrives, so
  reading overlaps decoding; for ``s3://`` a fork-aware keep-alive client with botocore's
  SigV4 signer, :mod:`~livercube.sampling.http_ranges`, at a fraction of s3fs's CPU per GET;
  fsspec's ``cat_ranges`` for ``http(s)://`` and every other URL or option,
  :mod:`~livercube.sampling.fetch`) — after the index is cached a patch costs one round trip;
* shares chunks between concurrent remote reads (patches in flight overlap), from the moment
  one read claims a chunk until it has decoded it: a chunk several prefetched patches need is
  fetched and decoded once;
* decodes inner chunks in a thread pool (Blosc/Zstd release the GIL) with a decode plan built
  once per array (:mod:`~livercube.sampling.arrays`), straight into a reused buffer and from
  there into the output, with the padding value outside the array;
* optionally keeps compressed chunks in a bounded in-memory LRU (``cache_bytes``) and/or a
  local directory (``cache_dir``) so later epochs do not go back to the bucket.

The decode chain is read from the array's own ``codecs`` metadata (``transpose`` → ``bytes``
→ ``blosc``/``zstd``/``gzip``/``crc32c``), decoded with numcodecs; anything else raises
:class:`NotImplementedError` rather than returning wrong data.

Integrity is checked on every read, cached or not: a ``crc32c`` codec's checksum of every
chunk and of every shard index, the length of every fetched range, and — for arrays whose
metadata records the all-fill shards the writer skipped (``attrs.livercube.fill_shards``) —
the presence of every other shard.  Damage raises
:class:`~livercube.errors.ChecksumMismatchError` or :class:`~livercube.errors.MissingShardError`
naming the object; it never turns into zeros.  Non-sharded arrays are read
whole-chunk per object.  The reader holds no open sockets or threads across ``pickle`` or
``fork``: they are recreated lazily in the new process (DataLoader workers).
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np

from livercube.errors import ChecksumMismatchError, MissingShardError, StoreIntegrityError
from livercube.sampling.arrays import ArrayInfo, crc32c_ok, decode_chunk
from livercube.sampling.fetch import fetch_ranges, read_local
from livercube.sampling.http_ranges import RangeClient, client_for
from livercube.sampling.plan import (
    Box,
    ChunkId,
    ReadPlan,
    chunk_name,
    given_output,
    plan_boxes,
)
from livercube.sampling.ranges import ByteRange, Request, merge_ranges
from livercube.sampling.shard_index import EMPTY, ShardIndex
from livercube.store.location import StoreLocation

#: How remote bytes are fetched.  ``"auto"``: livercube's own client for ``s3://`` (4–6× less
#: CPU per signed GET than s3fs, ``benchmarks/bench_s3_clients.py``) and fsspec for the rest —
#: over plain HTTP fsspec's aiohttp costs no more CPU per GET and, with many patches in flight,
#: more of their overlapping chunk fetches are shared (``benchmarks/bench_remote.py``).
#: ``"client"``: the own client for ``http(s)://`` too; ``"fsspec"``: fsspec everywhere.
TRANSPORTS = ("auto", "client", "fsspec")

#: Concurrent decode tasks per read: Blosc releases the GIL, so one per core pays off.
DECODE_TASKS = max(1, min(8, os.cpu_count() or 1))


#: What ``_init_runtime`` rebuilds in each process: never pickled.
_RUNTIME_STATE = frozenset(
    {"_pool", "_lru", "_lru_size", "_lock", "_inflight", "_reading", "fs", "stats", "_ts"}
)


def decode_shares(reads_in_flight: int, chunks: int) -> int:
    """Decode tasks for one read while ``reads_in_flight`` reads (this one included) run.

    One read alone spreads its chunks over the cores.  Many concurrent reads already keep
    every core busy, and splitting each of them further only adds hand-offs: with 64 patches
    in flight over HTTP, one share per read gave ~6 % more patches/s for ~5 % less client CPU
    than one share per core (``benchmarks/README.md``).
    """
    return max(1, min(chunks, DECODE_TASKS // max(1, reads_in_flight)))


@dataclass
class ReaderStats:
    requests: int = 0  # data GETs / preads (after coalescing)
    index_requests: int = 0  # shard index GETs
    bytes_fetched: int = 0
    chunk_bytes: int = 0  # compressed bytes of the chunks the boxes needed
    chunks: int = 0
    cache_hits: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **kw: int) -> None:
        with self._lock:
            for k, v in kw.items():
                setattr(self, k, getattr(self, k) + v)

    def as_dict(self) -> dict[str, int]:
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}

    def reset(self) -> None:
        with self._lock:
            for k in self.as_dict():
                setattr(self, k, 0)


class ShardReader:
    """Concurrent, index-caching box reader for one store (local path or fsspec URL).

    Coalescing (see :func:`~livercube.sampling.ranges.merge_ranges`): byte ranges of one
    object are fetched as one request when the gap between them is ≤ ``coalesce_gap`` and the
    request's unwanted bytes stay ≤ ``overfetch`` × its wanted bytes (defaults: remote 1 MiB
    and 0, i.e. exact ranges, adjacent chunks still one request — a patch's GETs are all in
    flight at once, so one more costs no latency, and measured over HTTP exact ranges were
    as fast as ``overfetch`` 0.25 while fetching exactly the chunks a patch needs; local
    64 KiB and 1.0 — fewer syscalls).  ``workers``:
    threads for local reads and for decoding.  ``cache_bytes``: LRU of compressed chunks kept
    in memory.  ``cache_dir``: compressed chunks kept on local disk.  ``storage_options``:
    fsspec's (``anon``, ``endpoint_url``, ``key``/``secret``, ``profile``…), with livercube's
    S3 retry policy added (or pass a :class:`~livercube.store.location.StoreLocation` as
    ``url``).  ``engine="tensorstore"``: local stores only, reads through
    TensorStore's ``zarr3`` driver with the same integrity guarantees (no caches or stats,
    and DataLoader workers must be spawned, not forked — see ``benchmarks/README.md``).
    ``transport``: see :data:`TRANSPORTS` (default ``"auto"``); the own client declines URLs
    and options it does not understand, which then go through fsspec; passing ``fs`` implies
    ``"fsspec"``.
    """

    def __init__(
        self,
        url: str | StoreLocation,
        storage_options: dict[str, Any] | None = None,
        *,
        coalesce_gap: int | None = None,
        overfetch: float | None = None,
        max_request: int = 64 * 2**20,
        workers: int = 8,
        cache_bytes: int = 0,
        cache_dir: str | None = None,
        fs: Any = None,
        engine: str = "livercube",
        transport: str = "auto",
    ) -> None:
        self.location = StoreLocation.of(url, storage_options)
        self.url = self.location.url
        self.storage_options = self.location.options  # retry policy included (S3)
        self.remote = self.location.is_remote
        self.coalesce_gap = (
            (2**20 if self.remote else 2**16) if coalesce_gap is None else coalesce_gap
        )
        self.overfetch = (0.0 if self.remote else 1.0) if overfetch is None else overfetch
        self.max_request = max_request
        self.workers = workers
        self.cache_bytes = cache_bytes
        self.cache_dir = cache_dir
        self.stats = ReaderStats()
        self._index: dict[tuple[str, tuple[int, ...]], ShardIndex | None] = {}
        self._user_fs = fs
        if engine not in ("livercube", "tensorstore"):
            raise ValueError(f"engine must be 'livercube' or 'tensorstore', not {engine!r}")
        if engine == "tensorstore" and (self.remote or fs is not None):
            raise ValueError("engine='tensorstore' reads local stores only")
        self.engine = engine
        if transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {TRANSPORTS}, not {transport!r}")
        self.transport = transport
        self._client: RangeClient | None = None
        wants_client = transport == "client" or (transport == "auto" and self.location.is_s3)
        if self.remote and fs is None and wants_client:
            self._client = client_for(self.location)
        self._pid: int | None = None
        self._init_runtime()

    # -- process-local runtime (threads, filesystem) ------------------------------------------
    def _init_runtime(self) -> None:
        self._pid = os.getpid()
        self._pool: ThreadPoolExecutor | None = None
        self._lru: OrderedDict[tuple, bytes] = OrderedDict()
        self._lru_size = 0
        self._lock = threading.Lock()
        self._inflight: dict[tuple[str, tuple[int, ...]], Future] = {}
        self._reading = 0  # read_boxes calls running now (decode_shares)
        self._ts: _TensorStoreEngine | None = None
        if self._user_fs is not None:
            self.fs, self.root = self._user_fs, fsspec.core.url_to_fs(self.url)[1]
        elif self._client is not None:
            self.fs, self.root = None, self.url  # ranged GETs through the client
        elif self.remote:
            self.fs, self.root = self.location.filesystem()
        else:
            self.fs, self.root = None, os.path.abspath(self.url.removeprefix("file://"))

    def __getstate__(self) -> dict[str, Any]:
        state = {k: v for k, v in self.__dict__.items() if k not in _RUNTIME_STATE}
        state["_index"] = dict(self._index)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.stats = ReaderStats()
        self._init_runtime()

    def _check_pid(self) -> None:
        if self._pid != os.getpid():  # forked: threads and event loops do not survive fork
            self._user_fs = None if self.remote else self._user_fs
            self._init_runtime()

    @property
    def pool(self) -> ThreadPoolExecutor:
        self._check_pid()
        if self._pool is None:
            with self._lock:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="lc-read")
        return self._pool

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None

    def _fetch(self, ranges: Sequence[ByteRange]) -> list[bytes | None]:
        self._check_pid()
        if self._client is not None:
            return self._client.fetch(ranges)
        return fetch_ranges(ranges, root=self.root, fs=self.fs, pool=self.pool)

    def fetch_objects(self, keys: Sequence[str]) -> list[bytes | None]:
        """Whole small objects (metadata documents) under the store root, concurrently;
        ``None`` for each one that does not exist."""
        return [None if b is None else bytes(b) for b in self._fetch([ByteRange(k) for k in keys])]

    # -- shard index ----------------------------------------------------------------------------
    def _load_indexes(self, wanted: dict[tuple[str, tuple[int, ...]], ArrayInfo]) -> None:
        missing = [(a, s) for (p, s), a in wanted.items() if (p, s) not in self._index]
        if not missing:
            return
        ranges = []
        for a, s in missing:
            n = a.index_nbytes
            if a.index_location == "end":
                ranges.append(ByteRange(a.object_key(s), -n, None))
            else:
                ranges.append(ByteRange(a.object_key(s), 0, n))
        data = self._fetch(ranges)
        self.stats.add(index_requests=len(ranges), bytes_fetched=sum(len(d or b"") for d in data))
        for (a, s), d in zip(missing, data, strict=True):
            key = a.object_key(s)
            if d is None:
                if not a.missing_is_fill(s):
                    raise MissingShardError(
                        self.url,
                        key,
                        "shard object is missing, but the volume was recorded complete and "
                        "this shard is not one of its all-background shards: data was lost",
                    )
                self._index[(a.path, s)] = None  # shard never written: all fill value
                continue
            self._index[(a.path, s)] = ShardIndex.parse(d, a, url=self.url, key=key)

    def shard_index(self, array: ArrayInfo, shard: tuple[int, ...]) -> np.ndarray | None:
        """The cached ``(n_inner, 2)`` uint64 (offset, nbytes) index of one shard."""
        self._load_indexes({(array.path, tuple(shard)): array})
        idx = self._index[(array.path, tuple(shard))]
        return None if idx is None else np.array(idx.entries, dtype=np.uint64)

    # -- chunk cache ----------------------------------------------------------------------------
    def _cache_path(self, key: tuple) -> str:
        tag = hashlib.sha1(self.url.encode()).hexdigest()[:16]
        name = hashlib.sha1(repr(key).encode()).hexdigest()
        return os.path.join(str(self.cache_dir), tag, name[:2], name)

    def _cache_get(self, key: tuple) -> bytes | None:
        if self.cache_bytes:
            with self._lock:
                hit = self._lru.get(key)
                if hit is not None:
                    self._lru.move_to_end(key)
                    return hit
        if self.cache_dir:
            try:
                with open(self._cache_path(key), "rb") as f:
                    return f.read()
            except FileNotFoundError:
                return None
        return None

    def _cache_put(self, key: tuple, data: bytes) -> None:
        if self.cache_bytes and len(data) <= self.cache_bytes:
            with self._lock:
                if key not in self._lru:
                    self._lru[key] = data
                    self._lru_size += len(data)
                    while self._lru_size > self.cache_bytes:
                        _, old = self._lru.popitem(last=False)
                        self._lru_size -= len(old)
        if self.cache_dir:
            path = self._cache_path(key)
            if not os.path.exists(path):
                os.makedirs(os.path.dirname(path), exist_ok=True)
                tmp = f"{path}.{os.getpid()}.{threading.get_ident()}"
                with open(tmp, "wb") as f:
                    f.write(data)
                os.replace(tmp, path)

    # -- box reads ------------------------------------------------------------------------------
    def read(self, array: ArrayInfo, start: Sequence[int], size: Sequence[int], fill=None):
        """One box (see :meth:`read_boxes`)."""
        return self.read_boxes([Box(array, tuple(start), tuple(size), fill)])[0]

    def read_boxes(self, boxes: Sequence[Box]) -> list[np.ndarray]:
        """Read several boxes in one concurrent round; voxels outside an array get ``fill``.

        Plan (which chunks, where they go) → locate (shard indexes, cached) → fetch (merged
        ranges, one concurrent round) → decode into the outputs (threads).
        """
        if self.engine == "tensorstore":
            self._check_pid()
            if self._ts is None:
                self._ts = _TensorStoreEngine(self.url, self.root)
            return self._ts.read_boxes(boxes)
        plan = plan_boxes(boxes)
        if not plan.uses:
            return plan.outputs
        self._check_pid()
        with self._lock:
            self._reading += 1
        try:
            if (
                self.fs is None
                and self._client is None
                and not (self.cache_bytes or self.cache_dir)
            ):
                self._read_streamed(plan)
            else:
                self._read_shared(plan)
        finally:
            with self._lock:
                self._reading -= 1
        return plan.outputs

    def _read_shared(self, plan: ReadPlan) -> None:
        """Remote (or cached) reads: fetch the chunks no concurrent read is fetching, decode
        them and hand the decoded chunks to the reads that want them too; then copy in the
        chunks those reads decoded.

        A chunk stays shared from the moment one read claims it until that read has decoded
        it: with many patches in flight a patch spends most of its life waiting for a core,
        not for the network, and the patches started meanwhile overlap it (TensorStore keeps
        a chunk shared while any read holds it, too).  Each read decodes its own chunks
        before it waits for anyone else's, so two reads needing each other's chunks cannot
        wait for each other; every claimed chunk is resolved (decoded, or failed with the
        error that stopped it) before the read returns.
        """
        data, mine, theirs = self._chunk_bytes(plan)
        error: BaseException | None = None
        try:
            self._decode(plan, data, [c for c in plan.uses if c not in theirs], mine)
        except BaseException as exc:
            error = exc
            raise
        finally:
            self._unclaim(mine, error)
        for cid, fut in theirs.items():
            _place(plan, cid, fut.result())  # the error of the read that claimed it, if any

    def _requests(self, located: dict[ChunkId, ByteRange]) -> tuple[list[ChunkId], list[Request]]:
        """The chunks (in the order the requests' parts index) and their merged requests."""
        cids = list(located)
        requests = merge_ranges(
            [located[c] for c in cids],
            max_gap=self.coalesce_gap,
            overfetch=self.overfetch,
            max_request=self.max_request,
        )
        return cids, requests

    def _read_streamed(self, plan: ReadPlan) -> None:
        """Local disk: each decode task ``pread``s its own share of the requests and decodes
        them as they arrive, so reading overlaps decoding and nothing is read serially first.

        A ``pread`` from the page cache costs microseconds, less than coordinating two reads of
        one chunk, so concurrent reads do not share in-flight chunks here (they do remotely).
        """
        located, fill = self._locate(plan)
        cids, requests = self._requests(located)
        self.stats.add(
            chunks=len(plan.uses),
            chunk_bytes=sum(r.nbytes or 0 for r in located.values()),
            requests=len(requests),
            bytes_fetched=sum(r.range.nbytes or 0 for r in requests),
        )
        shares = _shares(requests, cids, plan, decode_shares(self._reading, len(requests)))

        def run(reqs: list[Request], extra: list[ChunkId]) -> None:
            data: dict[ChunkId, Any] = dict.fromkeys(extra)  # all-fill chunks: None
            for req in reqs:
                self._split(req, read_local(self.root, req.range), cids, plan, data)
            self._decode_chunks(plan, data, list(data))

        # the all-fill chunks go with the first share (the calling thread's)
        jobs = [(reqs, list(fill) if i == 0 else []) for i, reqs in enumerate(shares or [[]])]
        self._run_shares(lambda job: run(*job), jobs)

    def _locate(self, plan: ReadPlan) -> tuple[dict[ChunkId, ByteRange], dict[ChunkId, None]]:
        """Byte range of every chunk the plan needs; chunks known to be all fill apart."""
        sharded = {
            (cid.path, cid.shard): plan.arrays[cid.path]
            for cid in plan.uses
            if plan.arrays[cid.path].sharded
        }
        self._load_indexes(sharded)
        located: dict[ChunkId, ByteRange] = {}
        fill: dict[ChunkId, None] = {}
        keys: dict[tuple[str, tuple[int, ...]], str] = {}  # one object key per shard
        for cid in plan.uses:
            a = plan.arrays[cid.path]
            if not a.sharded:
                located[cid] = ByteRange(a.object_key(cid.chunk))
                continue
            where = (cid.path, cid.shard)
            idx = self._index[where]
            span = None if idx is None else idx.locate(cid.flat)
            if span is None:
                fill[cid] = None
                continue
            key = keys.get(where)
            if key is None:
                key = keys[where] = a.object_key(cid.shard)
            located[cid] = ByteRange(key, *span)
        return located, fill

    def _chunk_bytes(
        self, plan: ReadPlan
    ) -> tuple[dict[ChunkId, Any], dict[ChunkId, Future], dict[ChunkId, Future]]:
        """Stored bytes of the plan's chunks this read decodes (``None``: all fill value),
        the futures through which it shares the ones it claimed, and the futures of the
        chunks concurrent reads claimed first (they resolve to decoded chunks)."""
        located, data = self._locate(plan)
        caching = bool(self.cache_bytes or self.cache_dir)
        if caching:
            for cid, loc in list(located.items()):
                hit = self._cache_get((tuple(cid[:2]), loc.start, loc.end))
                if hit is not None:
                    data[cid] = hit
                    del located[cid]
                    self.stats.add(cache_hits=1)
        self.stats.add(
            chunks=len(plan.uses), chunk_bytes=sum(r.nbytes or 0 for r in located.values())
        )
        mine, claimed, theirs = self._claim(located)
        try:
            cids, requests = self._requests(mine)
            blobs = self._fetch([r.range for r in requests])
            self.stats.add(requests=len(requests), bytes_fetched=sum(len(b or b"") for b in blobs))
            for req, blob in zip(requests, blobs, strict=True):
                self._split(req, blob, cids, plan, data)
            if caching:
                for cid in cids:
                    if data[cid] is not None:
                        loc = located[cid]
                        self._cache_put((tuple(cid[:2]), loc.start, loc.end), bytes(data[cid]))
        except BaseException as exc:
            self._unclaim(claimed, exc)
            raise
        return data, claimed, theirs

    def _claim(
        self, located: dict[ChunkId, ByteRange]
    ) -> tuple[dict[ChunkId, ByteRange], dict[ChunkId, Future], dict[ChunkId, Future]]:
        """Split the chunks into those this read fetches (their ranges, and the futures it
        shares their decoded arrays through) and those another concurrent read (patches in
        flight often overlap) claimed first: each chunk is fetched and decoded once."""
        mine: dict[ChunkId, ByteRange] = {}
        claimed: dict[ChunkId, Future] = {}
        theirs: dict[ChunkId, Future] = {}
        with self._lock:
            for cid, loc in located.items():
                fut = self._inflight.get(cid[:2])
                if fut is None:
                    fut = self._inflight[cid[:2]] = Future()
                    mine[cid], claimed[cid] = loc, fut
                else:
                    theirs[cid] = fut
        return mine, claimed, theirs

    def _unclaim(self, claimed: dict[ChunkId, Future], exc: BaseException | None) -> None:
        """Stop sharing the chunks this read claimed (it has decoded them, or failed), and hand
        ``exc`` to the reads waiting for any of them not resolved yet (``None``: a generic
        "not decoded" error).  Unshared first, so a read arriving later fetches afresh."""
        with self._lock:
            for cid, fut in claimed.items():
                if self._inflight.get(cid[:2]) is fut:
                    del self._inflight[cid[:2]]
        for cid, fut in claimed.items():
            if not fut.done():
                fut.set_exception(
                    exc or StoreIntegrityError(self.url, cid.path, "chunk was not decoded")
                )

    def _split(
        self, req: Request, blob: bytes | None, cids: list[ChunkId], plan: ReadPlan, data: dict
    ) -> None:
        """Cut one fetched body into the chunks it serves, checking every length."""
        key = req.range.key
        view = None if blob is None else memoryview(blob)
        for part in req.parts:
            cid = cids[part.index]
            if view is None:
                a = plan.arrays[cid.path]
                if a.sharded or not a.missing_is_fill(cid.chunk):
                    # a shard whose index we just read, or a recorded non-fill chunk
                    raise MissingShardError(
                        self.url, key, "object vanished or was never written: data was lost"
                    )
                data[cid] = None
                continue
            if part.nbytes == -1:
                data[cid] = view
                continue
            piece = view[part.offset : part.offset + part.nbytes]
            if len(piece) != part.nbytes:
                raise StoreIntegrityError(
                    self.url, key, "object is shorter than its shard index says: truncated"
                )
            data[cid] = piece

    def _decode_chunks(
        self,
        plan: ReadPlan,
        data: dict[ChunkId, Any],
        cids: list[ChunkId],
        publish: dict[ChunkId, Future] | None = None,
    ) -> None:
        """Decode ``cids`` (stored bytes in ``data``; ``None``: all fill) into the outputs;
        a chunk in ``publish`` is decoded into its own array and handed to its future."""
        url = self.url
        buffers: dict[int, np.ndarray] = {}  # one decode buffer per chunk size per call
        for cid in cids:
            raw = data[cid]
            a = plan.arrays[cid.path]
            shared = None if publish is None else publish.get(cid)
            if raw is None:
                _place(plan, cid, None)
                if shared is not None:
                    shared.set_result(None)
                continue
            codec = a.codec
            buf = None
            if shared is None:
                buf = buffers.get(codec.nbytes)
                if buf is None:
                    buf = buffers[codec.nbytes] = np.empty(codec.nbytes, np.uint8)
            try:
                chunk = codec.decode(raw, url=url, out=buf)
            except StoreIntegrityError as exc:  # named here: building names costs per chunk
                err = type(exc)(url, chunk_name(a, cid), exc.reason)
                if shared is not None:
                    shared.set_exception(err)
                raise err from exc
            if shared is not None:
                shared.set_result(chunk)
            _place(plan, cid, chunk)

    def _decode(
        self,
        plan: ReadPlan,
        data: dict[ChunkId, Any],
        cids: list[ChunkId],
        publish: dict[ChunkId, Future],
    ) -> None:
        """Decode ``cids`` into the outputs (disjoint regions), in a few shares."""
        # at most one share per core, not a task per chunk: a 96³ patch touches ~50 chunks
        # and a future per chunk costs more in scheduling than the decode itself (profiled
        # in benchmarks/README.md)
        if not cids:
            return
        k = decode_shares(self._reading, len(cids))
        self._run_shares(
            lambda part: self._decode_chunks(plan, data, part, publish),
            [cids[i::k] for i in range(k)],
        )

    def _run_shares(self, fn: Callable[[Any], None], shares: Sequence[Any]) -> None:
        """``fn(share)`` for every share, the first in the calling thread (one hand-off fewer
        per read) and the rest in the pool.  Every share is waited for before any error is
        raised, so no task is still writing into a caller's ``Box.out`` afterwards."""
        futures = [self.pool.submit(fn, share) for share in shares[1:]]
        error: BaseException | None = None
        try:
            fn(shares[0])
        except BaseException as exc:
            error = exc
        for f in futures:
            try:
                f.result()
            except BaseException as exc:
                error = error or exc
        if error is not None:
            raise error


def _place(plan: ReadPlan, cid: ChunkId, chunk: np.ndarray | None) -> None:
    """Copy a decoded chunk (``None``: all fill value) into every output region it serves."""
    outs = plan.outputs
    if chunk is None:
        fill = plan.arrays[cid.path].fill_value
        for use in plan.uses[cid]:
            outs[use.out][use.dst] = fill
        return
    for use in plan.uses[cid]:
        outs[use.out][use.dst] = chunk[use.src]


def _shares(
    requests: list[Request], cids: list[ChunkId], plan: ReadPlan, k: int
) -> list[list[Request]]:
    """Split ``requests`` into ``k`` shares of about equal decode work (decoded bytes of the
    chunks each serves), largest first onto the lightest share."""
    if k <= 1:
        return [requests] if requests else []

    def work(req: Request) -> int:
        return sum(plan.arrays[cids[p.index].path].codec.nbytes for p in req.parts)

    shares: list[list[Request]] = [[] for _ in range(k)]
    load = [0] * k
    for req in sorted(requests, key=work, reverse=True):
        i = load.index(min(load))
        shares[i].append(req)
        load[i] += work(req)
    return shares


class _TensorStoreEngine:
    """Local box reads through TensorStore's ``zarr3`` driver (``engine="tensorstore"``).

    An experiment behind the same API (see ``benchmarks/README.md``): TensorStore verifies the
    CRC-32C checksums itself (mapped to :class:`ChecksumMismatchError`), but reads a missing
    shard as fill, so shard presence is checked here against the array's ``fill_shards``
    record (one ``stat`` per shard, remembered).  No cache (cache pool 0), no ``stats``.
    TensorStore aborts a process forked after it started its threads, so DataLoader workers
    must be spawned (``multiprocessing_context="spawn"`` or ``"forkserver"``) — one reason
    this is not the default engine.
    """

    def __init__(self, url: str, root: str) -> None:
        import tensorstore as ts

        self.ts, self.url, self.root = ts, url, root
        self.context = ts.Context({"cache_pool": {"total_bytes_limit": 0}})
        self.handles: dict[str, Any] = {}
        self.present: set[str] = set()

    def handle(self, a: ArrayInfo):
        h = self.handles.get(a.path)
        if h is None:
            spec = {
                "driver": "zarr3",
                "kvstore": {"driver": "file", "path": os.path.join(self.root, a.path) + "/"},
            }
            h = self.ts.open(spec, context=self.context, open=True, read=True).result()
            self.handles[a.path] = h
        return h

    def check_present(self, a: ArrayInfo, lo: Sequence[int], hi: Sequence[int]) -> None:
        if a.fill_shards is None:
            return
        first = [q // o for q, o in zip(lo, a.object_shape, strict=True)]
        last = [(h - 1) // o for h, o in zip(hi, a.object_shape, strict=True)]
        for offs in np.ndindex(*[b - e + 1 for e, b in zip(first, last, strict=True)]):
            coords = tuple(e + i for e, i in zip(first, offs, strict=True))
            key = a.object_key(coords)
            if key in self.present or coords in a.fill_shards:
                continue
            if not os.path.exists(os.path.join(self.root, key)):
                raise MissingShardError(
                    self.url, key, "object is missing but not recorded as all fill: data was lost"
                )
            self.present.add(key)

    def read_boxes(self, boxes: Sequence[Box]) -> list[np.ndarray]:
        outs: list[np.ndarray | None] = []
        pending = []
        for b, box in enumerate(boxes):
            a = box.array
            fill = a.fill_value if box.fill is None else box.fill
            lo = [max(0, s) for s in box.start]
            hi = [min(n, s + k) for s, k, n in zip(box.start, box.size, a.shape, strict=True)]
            ends = [s + k for s, k in zip(box.start, box.size, strict=True)]
            inside = lo == list(box.start) and hi == ends and min(box.size) > 0
            # wholly inside: TensorStore's own result is the output (no fill, no copy)
            out = given_output(box, inside, fill)
            if out is None and not inside:
                out = np.full(box.size, fill, a.dtype)
            outs.append(out)
            if any(h <= q for q, h in zip(lo, hi, strict=True)):
                continue
            self.check_present(a, lo, hi)
            src = tuple(slice(q, h) for q, h in zip(lo, hi, strict=True))
            dst = tuple(slice(q - s, h - s) for q, h, s in zip(lo, hi, box.start, strict=True))
            pending.append((b, dst, self.handle(a)[src].read()))
        for b, dst, fut in pending:
            try:
                if outs[b] is None:
                    outs[b] = fut.result()
                else:
                    outs[b][dst] = fut.result()  # type: ignore[index]
            except ValueError as exc:
                text = str(exc)
                found = re.search(r'file "([^"]+)"', text)
                key = os.path.relpath(found.group(1), self.root) if found else "?"
                if "DATA_LOSS" in text or "igest" in text:
                    raise ChecksumMismatchError(self.url, key, text) from exc
                raise StoreIntegrityError(self.url, key, text) from exc
        return outs  # type: ignore[return-value]


__all__ = [
    "EMPTY",
    "ArrayInfo",
    "Box",
    "ReaderStats",
    "ShardReader",
    "crc32c_ok",
    "decode_chunk",
]
