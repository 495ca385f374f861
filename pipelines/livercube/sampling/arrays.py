"""What the reader knows about one stored array, and how its chunks decode (pure).

:class:`ArrayInfo` is built once per array from its ``zarr.json``; :class:`ChunkCodec` turns
the array's codec chain (``transpose`` → ``bytes`` → ``blosc``/``zstd``/``gzip``/``crc32c``)
into a fixed plan once, so decoding a chunk — done ~50 times per patch — is a couple of C
calls rather than a walk over the metadata.  Anything outside that chain raises
:class:`NotImplementedError` rather than returning wrong data.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import google_crc32c
import numcodecs
import numpy as np
from imagecodecs import blosc_decode as _blosc_decode

from livercube.errors import ChecksumMismatchError, StoreIntegrityError

_BYTES_TO_BYTES = {"blosc", "zstd", "gzip", "crc32c"}


@dataclass(frozen=True, eq=False)
class ArrayInfo:
    """What the reader needs to know about one stored array (from its ``zarr.json``)."""

    path: str  # array path relative to the store root
    shape: tuple[int, ...]
    dtype: np.dtype
    fill_value: Any
    object_shape: tuple[int, ...]  # shard shape (sharded) or chunk shape (not sharded)
    inner_shape: tuple[int, ...]  # inner chunk shape (== object_shape when not sharded)
    codecs: tuple[dict, ...]  # inner chunk codecs
    sharded: bool
    index_location: str = "end"
    index_crc32c: bool = True
    key_prefix: str = "c"
    key_separator: str = "/"
    #: shard (or chunk, not sharded) grid coordinates recorded as all fill and never written;
    #: ``None`` when the writer recorded nothing (stores before schema 2.0): then a missing
    #: object cannot be told from a lost one and reads as fill, as zarr-python reads it.
    fill_shards: frozenset[tuple[int, ...]] | None = None

    @classmethod
    def from_metadata(cls, path: str, meta: dict[str, Any]) -> ArrayInfo:
        """Build from ``zarr.Array.metadata.to_dict()`` of a Zarr v3 array."""
        if meta.get("zarr_format") != 3:
            raise NotImplementedError("ShardReader reads Zarr v3 arrays only")
        grid = meta["chunk_grid"]
        if grid["name"] != "regular":
            raise NotImplementedError(f"chunk grid {grid['name']!r}")
        object_shape = tuple(int(c) for c in grid["configuration"]["chunk_shape"])
        enc = meta["chunk_key_encoding"]
        sep = enc.get("configuration", {}).get(
            "separator", "/" if enc["name"] == "default" else "."
        )
        prefix = "c" if enc["name"] == "default" else ""
        record = ((meta.get("attributes") or {}).get("livercube") or {}).get("fill_shards")
        codecs = [dict(c) for c in meta["codecs"]]
        sharded = len(codecs) == 1 and codecs[0]["name"] == "sharding_indexed"
        common = {
            "path": path.strip("/"),
            "shape": tuple(int(s) for s in meta["shape"]),
            "dtype": np.dtype(meta["data_type"]),
            "fill_value": meta.get("fill_value", 0),
            "object_shape": object_shape,
            "key_prefix": prefix,
            "key_separator": sep,
            "fill_shards": None
            if record is None
            else frozenset(tuple(int(c) for c in coords) for coords in record),
        }
        if sharded:
            conf = codecs[0]["configuration"]
            index_codecs = [c["name"] for c in conf.get("index_codecs", [])]
            if not set(index_codecs) <= {"bytes", "crc32c"}:
                raise NotImplementedError(f"shard index codecs {index_codecs}")
            info = cls(
                **common,
                inner_shape=tuple(int(c) for c in conf["chunk_shape"]),
                codecs=tuple(dict(c) for c in conf["codecs"]),
                sharded=True,
                index_location=conf.get("index_location", "end"),
                index_crc32c="crc32c" in index_codecs,
            )
        else:
            info = cls(**common, inner_shape=object_shape, codecs=tuple(codecs), sharded=False)
        _check_codecs(info.codecs)
        return info

    @cached_property
    def grid(self) -> tuple[int, ...]:
        """Inner chunks per shard, per axis (cached: asked for every chunk of every patch)."""
        return tuple(o // i for o, i in zip(self.object_shape, self.inner_shape, strict=True))

    @property
    def index_nbytes(self) -> int:
        return math.prod(self.grid) * 16 + (4 if self.index_crc32c else 0)

    @cached_property
    def chunk_crc32c(self) -> bool:
        """Whether every stored chunk ends with a CRC-32C of its bytes."""
        return any(c["name"] == "crc32c" for c in self.codecs)

    def missing_is_fill(self, coords: Sequence[int]) -> bool:
        """Whether an absent object at ``coords`` legitimately means "all fill value"."""
        return self.fill_shards is None or tuple(coords) in self.fill_shards

    @cached_property
    def codec(self) -> ChunkCodec:
        """How this array's inner chunks decode (built once)."""
        return ChunkCodec.of(self)

    def object_key(self, coords: Sequence[int]) -> str:
        parts = [str(int(c)) for c in coords]
        if self.key_prefix:
            parts.insert(0, self.key_prefix)
        return f"{self.path}/{self.key_separator.join(parts)}"


def _check_codecs(codecs: Sequence[dict]) -> None:
    for c in codecs:
        name = c["name"]
        if name not in _BYTES_TO_BYTES | {"bytes", "transpose"}:
            raise NotImplementedError(f"codec {name!r} is not supported by ShardReader")


def crc32c_ok(data: Any) -> bool:
    """Whether ``data`` ends with the little-endian CRC-32C of the bytes before it (zarr v3)."""
    view = np.frombuffer(data, dtype=np.uint8)  # zero-copy; google_crc32c refuses memoryviews
    if view.size < 4:
        return False
    return google_crc32c.value(view[:-4]) == int.from_bytes(view[-4:].tobytes(), "little")


_DECOMPRESSORS = {"blosc": numcodecs.Blosc, "zstd": numcodecs.Zstd, "gzip": numcodecs.GZip}


@dataclass(frozen=True, eq=False)
class ChunkCodec:
    """The decode plan of one array's inner chunks, fixed at construction.

    ``steps``: the bytes-to-bytes codecs to undo, outermost first (``crc32c`` checks and
    strips the checksum; the others decompress).  ``stored_shape`` / ``axes``: the chunk as
    the ``bytes`` codec laid it out, and the permutation back to the array's axis order when
    ``transpose`` codecs were applied.
    """

    steps: tuple[str, ...]
    dtype: np.dtype  # the array's dtype
    stored_dtype: np.dtype  # with the byte order the ``bytes`` codec wrote
    stored_shape: tuple[int, ...]
    axes: tuple[int, ...] | None  # None: stored in array order

    @classmethod
    def of(cls, info: ArrayInfo) -> ChunkCodec:
        codecs = list(info.codecs)
        ab = next(i for i, c in enumerate(codecs) if c["name"] == "bytes")
        endian = codecs[ab].get("configuration", {}).get("endian", "little")
        stored = info.dtype.newbyteorder("<" if endian == "little" else ">")
        order = list(range(len(info.inner_shape)))
        for c in codecs[:ab]:  # transpose codecs: stored shape is the permuted shape
            perm = list(c["configuration"]["order"])
            order = [order[p] for p in perm]
        return cls(
            steps=tuple(c["name"] for c in reversed(codecs[ab + 1 :])),
            dtype=info.dtype,
            stored_dtype=stored,
            stored_shape=tuple(info.inner_shape[o] for o in order),
            axes=None if order == sorted(order) else tuple(int(i) for i in np.argsort(order)),
        )

    @cached_property
    def nbytes(self) -> int:
        return math.prod(self.stored_shape) * self.stored_dtype.itemsize

    def decode(self, data: Any, *, url: str = "", where: str = "", out: Any = None) -> np.ndarray:
        """One stored chunk as an array of the inner chunk shape.

        ``out``: a writable buffer of :attr:`nbytes` to decompress into (reused across chunks
        by the reader; the result is then a view of it).  ``url``/``where`` only name the
        chunk in errors: :class:`ChecksumMismatchError` when a CRC-32C fails,
        :class:`StoreIntegrityError` when the bytes do not decode to a whole chunk.
        """
        buf: Any = data
        try:
            for i, name in enumerate(self.steps):
                if name == "crc32c":
                    if not crc32c_ok(buf):
                        raise ChecksumMismatchError(
                            url,
                            where,
                            "chunk checksum (CRC-32C) mismatch: stored bytes are corrupt",
                        )
                    buf = memoryview(buf)[:-4]
                elif name == "blosc" and i == len(self.steps) - 1:
                    # the last step, straight into the destination: no intermediate bytes;
                    # imagecodecs' Blosc (one thread, GIL released) decodes ~8 % faster per
                    # chunk than numcodecs' here and never touches Blosc's global threads
                    blosc_out = out if out is not None else np.empty(self.nbytes, np.uint8)
                    _check_blosc_header(buf, self.nbytes, url=url, where=where)
                    _blosc_decode(buf, numthreads=1, out=blosc_out)
                    buf = blosc_out
                else:
                    buf = _decompressor(name).decode(buf)
        except StoreIntegrityError:
            raise
        except Exception as exc:  # a codec's own error on damaged bytes (stores without CRC)
            raise StoreIntegrityError(url, where, f"chunk does not decode ({exc})") from exc
        if memoryview(buf).nbytes != self.nbytes:
            raise StoreIntegrityError(url, where, "chunk decodes to the wrong number of voxels")
        arr = np.frombuffer(buf, dtype=self.stored_dtype).reshape(self.stored_shape)
        if self.axes is not None:
            arr = arr.transpose(self.axes)
        if self.stored_dtype != self.dtype:
            arr = arr.astype(self.dtype)
        return arr


def _check_blosc_header(buf: Any, nbytes: int, *, url: str, where: str) -> None:
    """Refuse a Blosc buffer whose header does not promise exactly one whole chunk.

    The 16-byte Blosc header holds the decompressed size (bytes 4–8) and the compressed size
    (bytes 12–16), little-endian: checked before decompressing into a fixed-size buffer.
    """
    head = bytes(memoryview(buf)[:16])
    if len(head) < 16:
        raise StoreIntegrityError(url, where, "chunk is shorter than a Blosc header")
    if int.from_bytes(head[4:8], "little") != nbytes:
        raise StoreIntegrityError(url, where, "chunk decodes to the wrong number of voxels")
    if int.from_bytes(head[12:16], "little") != memoryview(buf).nbytes:
        raise StoreIntegrityError(url, where, "chunk is truncated (Blosc size mismatch)")


_LOCAL = threading.local()


def _decompressor(name: str):
    """One codec object per thread and name (numcodecs codecs are cheap but not free)."""
    cache = getattr(_LOCAL, "codecs", None)
    if cache is None:
        cache = _LOCAL.codecs = {}
    codec = cache.get(name)
    if codec is None:
        codec = cache[name] = _DECOMPRESSORS[name]()
    return codec


def decode_chunk(data: bytes, info: ArrayInfo, *, url: str = "", where: str = "") -> np.ndarray:
    """Decode one stored (inner) chunk with the array's codec chain; returns inner_shape."""
    return info.codec.decode(data, url=url, where=where or info.path)


__all__ = ["ArrayInfo", "ChunkCodec", "crc32c_ok", "decode_chunk"]
