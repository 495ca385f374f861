"""Encode sharded Zarr v3 arrays shard by shard, in threads, byte-for-byte as zarr-python would.

Why not ``arr[...] = data``: zarr-python 3 runs every inner chunk through its asyncio codec
pipeline (a coroutine, a ``to_thread`` hop and several buffer copies per 256 KiB chunk) and
keeps the whole encoded volume in memory before one object is uploaded.  Here one shard (a
z-slab of the volume) is encoded at a time: its inner chunks are compressed by numcodecs'
Blosc — the library zarr-python itself calls, so the compressed bytes are the same — in a
thread pool (Blosc releases the GIL), checksummed with CRC-32C, and assembled with the
sharding codec's index; the caller uploads the shard and forgets it.  Peak memory is then
the source arrays plus a few shards, whatever the volume's length.

The layout written is exactly ``sharding_indexed`` with inner codecs ``bytes`` (little
endian) → ``blosc`` → ``crc32c`` and index codecs ``bytes`` → ``crc32c``, index at the end,
chunk key encoding ``default`` (``c/z/y/x``); chunks holding only the fill value are left out
of their shard (index entry ``2**64 - 1``) and shards holding only fill are not produced, as
zarr-python does with ``write_empty_chunks=False``.  Readers (zarr-python, TensorStore,
livercube's ``ShardReader``) see no difference: tests compare voxels and bytes.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Iterator
from concurrent.futures import Executor, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import google_crc32c
import numpy as np
from numcodecs import Blosc, Zstd
from zarr.codecs import BloscCodec, ZstdCodec
from zarr.core.indexing import morton_order_iter

#: Index entry of a chunk absent from its shard (the sharding codec's "empty" marker).
EMPTY = np.uint64(2**64 - 1)

#: Inner chunks one encode task compresses in a row (a shard of 512² CT holds 128).
CHUNKS_PER_TASK = 16

_SHUFFLE = {"noshuffle": Blosc.NOSHUFFLE, "shuffle": Blosc.SHUFFLE, "bitshuffle": Blosc.BITSHUFFLE}


def numcodecs_blosc(codec: BloscCodec, dtype: np.dtype) -> Blosc:
    """The numcodecs compressor zarr-python builds from ``codec`` for arrays of ``dtype``.

    Derived from the zarr codec object so the writer's codec constants stay the one home of
    the compression settings.
    """
    return Blosc(
        cname=codec.cname.value,
        clevel=codec.clevel,
        shuffle=_SHUFFLE[codec.shuffle.value],
        blocksize=codec.blocksize,
        typesize=np.dtype(dtype).itemsize,
    )


def numcodecs_zstd(codec: ZstdCodec) -> Zstd:
    """The numcodecs compressor zarr-python's ``ZstdCodec`` encodes with (same bytes)."""
    return Zstd(level=codec.level, checksum=codec.checksum)


def _crc32c(data: bytes | memoryview) -> bytes:
    return int(google_crc32c.value(data)).to_bytes(4, "little")


@dataclass(frozen=True)
class ShardLayout:
    """Shapes of one sharded array: its ``shape``, inner ``chunks`` and ``shard`` shape."""

    shape: tuple[int, ...]
    chunks: tuple[int, ...]
    shard: tuple[int, ...]

    @property
    def grid(self) -> tuple[int, ...]:
        """Shards per axis."""
        return tuple(math.ceil(n / s) for n, s in zip(self.shape, self.shard, strict=True))

    @property
    def per_shard(self) -> tuple[int, ...]:
        """Inner chunks per shard, per axis."""
        return tuple(s // c for s, c in zip(self.shard, self.chunks, strict=True))


class ChunkScratch(threading.local):
    """One reusable inner-chunk buffer per encoding thread.

    A fresh 256 KiB array per chunk is served by ``mmap`` and page-faulted in on every copy:
    that made the copy out of the volume 3× slower than the copy itself.
    """

    def buffer(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        buf = getattr(self, "buf", None)
        if buf is None or buf.shape != shape or buf.dtype != dtype:
            buf = self.buf = np.empty(shape, dtype)
        return buf


def encode_chunk(
    block: np.ndarray,
    chunk_shape: tuple[int, ...],
    fill: Any,
    blosc: Blosc,
    scratch: ChunkScratch | None = None,
):
    """One inner chunk's stored bytes (Blosc frame + CRC-32C), or None if it is all ``fill``.

    ``block`` is the part of the chunk inside the array; an edge chunk is padded with
    ``fill`` to the full chunk shape, as the zarr spec requires.
    """
    # little-endian C order is the ``bytes`` codec's serialization
    dtype = block.dtype.newbyteorder("<")
    shape = tuple(chunk_shape)
    raw = (scratch or ChunkScratch()).buffer(shape, dtype)
    if block.shape != shape:
        raw.fill(fill)
        raw[tuple(slice(0, n) for n in block.shape)] = block
    else:
        np.copyto(raw, block)
    # the padding is fill too, so the padded chunk is all fill exactly when the block is
    if not (raw.any() if fill == 0 else np.any(raw != fill)):
        return None
    frame = blosc.encode(raw)
    return bytes(frame) + _crc32c(frame)


def _disjoint(region: tuple[slice, ...], box: tuple[slice, ...]) -> bool:
    """Whether two boxes share no voxel."""
    return any(
        r.start >= b.stop or b.start >= r.stop or b.start >= b.stop
        for r, b in zip(region, box, strict=True)
    )


def encode_shard(
    data: np.ndarray,
    layout: ShardLayout,
    coords: tuple[int, ...],
    blosc: Blosc,
    fill: Any,
    pool: Executor,
    scratch: ChunkScratch | None = None,
    occupied: tuple[slice, ...] | None = None,
) -> bytes | None:
    """The object of shard ``coords`` of ``data``, or None when it holds only ``fill``.

    ``occupied``: a box of ``data`` outside which every voxel is ``fill``; chunks outside it
    are left out without being copied or looked at (most of a label volume is background).
    """
    scratch = scratch or ChunkScratch()
    # chunks are stored in zarr-python's order (Morton / Z-order: same bytes as zarr, and a
    # patch's chunks tend to share one byte range); the index itself is in C order
    order = list(morton_order_iter(layout.per_shard))

    def one(idx: tuple[int, ...]):
        region = tuple(
            slice(o, min(o + c, n))
            for o, c, n in (
                (s * sh + i * c, c, n)
                for s, sh, i, c, n in zip(
                    coords, layout.shard, idx, layout.chunks, layout.shape, strict=True
                )
            )
        )
        if any(r.start >= r.stop for r in region):
            return None  # chunk wholly outside the array (edge shard)
        if occupied is not None and _disjoint(region, occupied):
            return None  # all fill: nothing of the occupied box is in it
        return encode_chunk(data[region], layout.chunks, fill, blosc, scratch)

    # a pool hop costs ~0.1 ms of CPU here, more than lz4 spends on a label chunk: hand the
    # threads runs of chunks, not single chunks
    runs = [order[i : i + CHUNKS_PER_TASK] for i in range(0, len(order), CHUNKS_PER_TASK)]
    parts = [p for run in pool.map(lambda run: [one(i) for i in run], runs) for p in run]
    if all(p is None for p in parts):
        return None
    index = np.full((*layout.per_shard, 2), EMPTY, dtype="<u8")
    offset = 0
    for idx, p in zip(order, parts, strict=True):
        if p is not None:
            index[idx] = (offset, len(p))
            offset += len(p)
    ind = index.tobytes()
    return b"".join(p for p in parts if p is not None) + ind + _crc32c(ind)


def iter_shards(
    data: np.ndarray,
    layout: ShardLayout,
    blosc: Blosc,
    fill: Any,
    pool: Executor,
    occupied: tuple[slice, ...] | None = None,
) -> Iterator[tuple[tuple[int, ...], bytes | None]]:
    """(shard coords, object or None) for every shard of ``data``, in C order (z-slabs first).

    ``data`` may be a strided view (browse levels): it is copied one slab of shards at a
    time, never whole.  Copying chunks straight out of a view gathers every other voxel,
    which cost more than encoding a label level; one contiguous copy of the slab first
    makes each chunk's copy a plain one.  ``occupied``: see :func:`encode_shard`; a slab
    outside it is not copied at all.
    """
    scratch = ChunkScratch()
    if data.flags.c_contiguous:
        for coords in np.ndindex(*layout.grid):
            yield coords, encode_shard(data, layout, coords, blosc, fill, pool, scratch, occupied)
        return
    depth = layout.shard[0]
    for z in range(layout.grid[0]):
        z0, z1 = z * depth, min((z + 1) * depth, layout.shape[0])
        local_box = None
        if occupied is not None:
            zs = occupied[0]
            local_box = (slice(zs.start - z0, zs.stop - z0), *occupied[1:])
            if _disjoint((slice(z0, z1), *(slice(0, n) for n in layout.shape[1:])), occupied):
                for rest in np.ndindex(*layout.grid[1:]):
                    yield (z, *rest), None
                continue
        slab = np.ascontiguousarray(data[z0:z1])
        local = ShardLayout(slab.shape, layout.chunks, layout.shard)
        for rest in np.ndindex(*layout.grid[1:]):
            coords = (z, *rest)
            yield (
                coords,
                encode_shard(slab, local, (0, *rest), blosc, fill, pool, scratch, local_box),
            )
        del slab


def shard_key(coords: tuple[int, ...]) -> str:
    """Key of a shard below its array (zarr v3 ``default`` chunk key encoding)."""
    return "c/" + "/".join(str(c) for c in coords)


def encode_threads(budget: int | None) -> int:
    """Encoding threads for one volume: the worker's budget, else the machine's cores."""
    return max(1, int(budget) if budget else (os.cpu_count() or 1))


@contextmanager
def encoder_pool(threads: int) -> Iterator[Executor]:
    """Threads that compress inner chunks (Blosc and the numpy copies release the GIL)."""
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="livercube-encode") as pool:
        yield pool
