"""Which inner chunks a batch of boxes needs, and where each lands in the outputs (pure).

A box is cut per axis first (3–4 chunk intervals per axis for a 96³ patch), so the slices,
shard coordinates and in-shard positions are computed once per axis and chunk interval; the
chunks are then the Cartesian product of the axes, with no per-chunk arithmetic beyond one
dot product for the chunk's position in its shard index.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from livercube.sampling.arrays import ArrayInfo


@dataclass(frozen=True, eq=False)
class Box:
    """A read request: ``size`` voxels from ``start`` (may lie partly or wholly outside)."""

    array: ArrayInfo
    start: tuple[int, ...]
    size: tuple[int, ...]
    fill: Any = None  # value outside the array; None → the array's fill_value
    #: where to put the voxels (shape ``size``; any dtype they cast to, e.g. a float32 slot of
    #: a training batch): decoded chunks are cast straight into it, with no intermediate copy
    out: np.ndarray | None = None


class ChunkId(NamedTuple):
    """One inner chunk of one array: its grid coordinates, its shard's and its position
    (C order) inside that shard's index.  Unsharded arrays: ``shard == chunk``, ``flat == 0``."""

    path: str
    chunk: tuple[int, ...]
    shard: tuple[int, ...]
    flat: int


class Use(NamedTuple):
    """Copy ``chunk[src]`` into ``outputs[out][dst]``."""

    out: int
    dst: tuple[slice, ...]
    src: tuple[slice, ...]


@dataclass
class ReadPlan:
    """Outputs (allocated, fill value already outside the arrays) and the chunks to decode."""

    outputs: list[np.ndarray] = field(default_factory=list)
    arrays: dict[str, ArrayInfo] = field(default_factory=dict)
    uses: dict[ChunkId, list[Use]] = field(default_factory=dict)


def _axis_pieces(lo: int, hi: int, start: int, n: int, g: int, stride: int):
    """Per chunk interval along one axis: (chunk, shard, this axis's share of the chunk's
    position in its shard index, dst slice, src slice)."""
    pieces = []
    for c in range(lo // n, (hi - 1) // n + 1):
        c0 = c * n
        a, b = max(lo, c0), min(hi, c0 + n)
        pieces.append(
            (c, c // g, (c % g) * stride, slice(a - start, b - start), slice(a - c0, b - c0))
        )
    return pieces


def given_output(box: Box, inside: bool, fill: Any) -> np.ndarray | None:
    """The caller's ``box.out`` (checked, with ``fill`` outside the array unless the box lies
    ``inside`` it), or ``None`` when the reader allocates the output itself."""
    if box.out is None:
        return None
    if box.out.shape != tuple(box.size):
        raise ValueError(f"out has shape {box.out.shape}, the box {tuple(box.size)}")
    if not inside:
        box.out[...] = fill
    return box.out


def plan_boxes(boxes: Sequence[Box]) -> ReadPlan:
    """Allocate one output per box and list, per inner chunk, the regions it fills."""
    plan = ReadPlan()
    for b, box in enumerate(boxes):
        a = box.array
        fill = a.fill_value if box.fill is None else box.fill
        lo = [max(0, s) for s in box.start]
        hi = [min(n, s + k) for s, k, n in zip(box.start, box.size, a.shape, strict=True)]
        inside = all(
            q == s and h == s + k for q, h, s, k in zip(lo, hi, box.start, box.size, strict=True)
        )
        # inside the array every voxel is written by its chunk's decode (fill included)
        out = given_output(box, inside, fill)
        if out is None:
            out = np.empty(box.size, a.dtype) if inside else np.full(box.size, fill, a.dtype)
        plan.outputs.append(out)
        if any(h <= q for q, h in zip(lo, hi, strict=True)):
            continue
        plan.arrays[a.path] = a
        grid = a.grid  # all ones when not sharded: shard == chunk, flat == 0
        strides = [math.prod(grid[d + 1 :]) for d in range(len(grid))]
        axes = [
            _axis_pieces(lo[d], hi[d], box.start[d], a.inner_shape[d], grid[d], strides[d])
            for d in range(len(lo))
        ]
        uses, path = plan.uses, a.path
        for combo in itertools.product(*axes):
            chunk, shard, flat, dst, src = zip(*combo, strict=True)  # per field, across axes
            cid = ChunkId(path, chunk, shard, sum(flat))
            use = Use(b, dst, src)
            got = uses.get(cid)
            if got is None:
                uses[cid] = [use]
            else:
                got.append(use)
    return plan


def chunk_name(a: ArrayInfo, cid: ChunkId) -> str:
    """Object key of a chunk, with its position inside the shard when sharded (for errors)."""
    if not a.sharded:
        return a.object_key(cid.chunk)
    inner = ",".join(str(c % g) for c, g in zip(cid.chunk, a.grid, strict=True))
    return f"{a.object_key(cid.shard)} (inner chunk {inner})"


__all__ = ["Box", "ChunkId", "ReadPlan", "Use", "chunk_name", "given_output", "plan_boxes"]
