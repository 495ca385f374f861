"""Chunk and shard shapes for volume arrays (the reasoning is in ``schemas/store-contract.md``).

Inner chunks of 32×64×64 voxels (256 KiB of int16) are the unit a patch read decodes: a
96³ patch touches at most 4×3×3 of them and wastes little.  Shards of 64 slices × the whole
slice plane (≈ 32 MiB raw, ~8–15 MiB compressed for a 512² CT) keep a 100-slice volume in
two objects, which is what object storage wants (few, large PUTs; ranged GETs for reads).

The shapes are a value (:class:`Chunking`) handed to the writer, not module state: tests and
experiments write stores with small chunks by passing ``Chunking((4, 16, 16), 8)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Chunking:
    """Inner chunk shape (z, y, x) and slices per shard; a shard spans the whole slice plane.

    Volumes smaller than a chunk get one chunk per axis extent; shards are a whole number of
    inner chunks (the sharding codec requires it).
    """

    inner: tuple[int, int, int] = (32, 64, 64)
    shard_slices: int = 64

    def __post_init__(self) -> None:
        if len(self.inner) != 3 or min(self.inner) < 1 or self.shard_slices < 1:
            raise ValueError(f"chunk shape {self.inner} / {self.shard_slices} shard slices")

    def chunk_and_shard(self, shape: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(inner chunk shape, shard shape) for a (z, y, x) volume array of ``shape``."""
        chunks = tuple(max(1, min(c, n)) for c, n in zip(self.inner, shape, strict=True))
        nz = max(1, shape[0])
        shard_z = min(self.shard_slices, math.ceil(nz / chunks[0]) * chunks[0])
        shard_z = max(chunks[0], (shard_z // chunks[0]) * chunks[0])
        shard_yx = tuple(
            math.ceil(max(1, n) / c) * c for n, c in zip(shape[1:], chunks[1:], strict=True)
        )
        return chunks, (shard_z, *shard_yx)


#: The contract's shapes (``schemas/store-contract.md``, "Chunks, shards, codecs").
DEFAULT_CHUNKING = Chunking()


def chunk_and_shard(
    shape: tuple[int, ...], chunking: Chunking = DEFAULT_CHUNKING
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(inner chunk shape, shard shape) for a (z, y, x) volume array of ``shape``."""
    return chunking.chunk_and_shard(shape)


def shard_grid(shape: tuple[int, ...], shard_shape: tuple[int, ...]) -> tuple[int, ...]:
    """Number of shard objects per axis of an array of ``shape``."""
    return tuple(math.ceil(n / s) for n, s in zip(shape, shard_shape, strict=True))


def fill_shards(data: np.ndarray, shard_shape: tuple[int, ...], fill: Any) -> list[list[int]]:
    """Grid coordinates of the shards of ``data`` that hold only ``fill``.

    zarr-python does not write such shards (nor empty inner chunks inside a shard), so a
    complete volume legitimately lacks these objects and only these: recording them lets a
    reader tell "all background, never written" from "lost" without listing the bucket.
    """
    out = []
    for coords in np.ndindex(*shard_grid(data.shape, shard_shape)):
        region = tuple(slice(c * s, (c + 1) * s) for c, s in zip(coords, shard_shape, strict=True))
        if not np.any(data[region] != fill):
            out.append([int(c) for c in coords])
    return out
