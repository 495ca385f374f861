"""Chunk and shard shapes for volume arrays (the reasoning is in ``schemas/store-contract.md``).

Inner chunks of 32×64×64 voxels (256 KiB of int16) are the unit a patch read decodes: a
96³ patch touches at most 4×3×3 of them and wastes little.  Shards of 64 slices × the whole
slice plane (≈ 32 MiB raw, ~8–15 MiB compressed for a 512² CT) keep a 100-slice volume in
two objects, which is what object storage wants (few, large PUTs; ranged GETs for reads).
"""

from __future__ import annotations

import math

INNER_CHUNK = (32, 64, 64)
SHARD_SLICES = 64


def chunk_and_shard(shape: tuple[int, int, int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(inner chunk shape, shard shape) for a (z, y, x) volume array of ``shape``."""
    chunks = tuple(max(1, min(c, n)) for c, n in zip(INNER_CHUNK, shape, strict=True))
    nz = max(1, shape[0])
    shard_z = min(SHARD_SLICES, math.ceil(nz / chunks[0]) * chunks[0])
    shard_z = max(chunks[0], (shard_z // chunks[0]) * chunks[0])
    shard_yx = tuple(
        math.ceil(max(1, n) / c) * c for n, c in zip(shape[1:], chunks[1:], strict=True)
    )
    return chunks, (shard_z, *shard_yx)
