"""The index of one shard: where each inner chunk's bytes are (pure parsing and lookup).

A Zarr v3 ``sharding_indexed`` shard ends (or starts) with ``(offset, nbytes)`` little-endian
uint64 pairs, one per inner chunk in C order, optionally followed by their CRC-32C; both
``2**64 - 1`` marks a chunk that was never written (all fill value).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from livercube.errors import ChecksumMismatchError, StoreIntegrityError
from livercube.sampling.arrays import ArrayInfo, crc32c_ok

EMPTY = 2**64 - 1


@dataclass(frozen=True, eq=False)
class ShardIndex:
    """``(offset, nbytes)`` per inner chunk, as Python ints (looked up per chunk per patch)."""

    entries: tuple[tuple[int, int], ...]

    @classmethod
    def parse(cls, data: bytes, array: ArrayInfo, *, url: str, key: str) -> ShardIndex:
        """Check length and checksum of an index read from ``key`` and decode it."""
        if len(data) != array.index_nbytes:
            raise StoreIntegrityError(url, key, "shard is shorter than its index")
        if array.index_crc32c and not crc32c_ok(data):
            raise ChecksumMismatchError(
                url, key, "shard index checksum (CRC-32C) mismatch: the shard is corrupt"
            )
        raw = data[:-4] if array.index_crc32c else data
        pairs = np.frombuffer(raw, dtype="<u8").reshape(-1, 2).tolist()
        return cls(tuple((int(o), int(n)) for o, n in pairs))

    def locate(self, flat: int) -> tuple[int, int] | None:
        """``(start, end)`` of inner chunk ``flat`` (C order) in the shard, ``None`` if empty."""
        off, nb = self.entries[flat]
        if off == EMPTY and nb == EMPTY:
            return None
        return off, off + nb


__all__ = ["EMPTY", "ShardIndex"]
