"""Small sharded arrays as the store writes them, and the reference a box read is compared with."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec

from livercube.sampling import ArrayInfo


def write_sharded_array(
    path: str | Path, data: np.ndarray, *, chunks: tuple[int, ...], shards: tuple[int, ...]
) -> ArrayInfo:
    """``data`` as a sharded, CRC-checked Blosc/zstd array at ``path`` (index at the shard end,
    like the store's images); returns its :class:`ArrayInfo` under the name ``path.name``."""
    z = zarr.create_array(
        str(path),
        shape=data.shape,
        dtype=data.dtype,
        chunks=chunks,
        shards=shards,
        compressors=[BloscCodec(cname="zstd", clevel=3), Crc32cCodec()],
        fill_value=0,
    )
    z[...] = data
    return ArrayInfo.from_metadata(Path(path).name, z.metadata.to_dict())


def expected_box(arr, start, size, fill) -> np.ndarray:
    """``size`` voxels of ``arr`` from ``start`` (may reach past the border), ``fill`` outside."""
    out = np.full(size, fill, dtype=arr.dtype)
    src = tuple(
        slice(max(0, s), min(n, s + k)) for s, k, n in zip(start, size, arr.shape, strict=True)
    )
    if all(s.stop > s.start for s in src):
        dst = tuple(slice(s.start - a, s.stop - a) for s, a in zip(src, start, strict=True))
        out[dst] = arr[src]
    return out
