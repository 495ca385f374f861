"""The range-merging rule and box planning of the reader, as pure functions (no store)."""

from __future__ import annotations

import itertools

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from livercube.sampling.arrays import ArrayInfo
from livercube.sampling.plan import Box, plan_boxes
from livercube.sampling.ranges import ByteRange, merge_ranges


@st.composite
def disjoint_ranges(draw) -> list[ByteRange]:
    """Chunk-like ranges: disjoint within each object (as a shard index lays them out)."""
    out = []
    for key in draw(st.lists(st.sampled_from("abc"), min_size=1, max_size=3, unique=True)):
        pos = 0
        for _ in range(draw(st.integers(1, 12))):
            pos += draw(st.integers(0, 3000))  # gap before the next chunk
            size = draw(st.integers(1, 2000))
            out.append(ByteRange(key, pos, pos + size))
            pos += size
    return draw(st.permutations(out))


rules = st.fixed_dictionaries(
    {
        "max_gap": st.integers(0, 4000),
        "overfetch": st.sampled_from([0.0, 0.1, 0.5, 1.0, float("inf")]),
        "max_request": st.integers(1, 20_000),
    }
)


@settings(max_examples=300, deadline=None)
@given(disjoint_ranges(), rules)
def test_every_range_is_served_once_with_its_own_bytes(ranges, rule):
    objects = {
        k: bytes(np.random.default_rng(ord(k)).integers(0, 256, 60_000, np.uint8)) for k in "abc"
    }
    requests = merge_ranges(ranges, **rule)
    served = sorted(p.index for r in requests for p in r.parts)
    assert served == list(range(len(ranges)))
    for req in requests:
        body = objects[req.range.key][req.range.start : req.range.end]
        for part in req.parts:
            want = ranges[part.index]
            assert want.key == req.range.key
            assert (
                body[part.offset : part.offset + part.nbytes]
                == objects[want.key][want.start : want.end]
            )


@settings(max_examples=300, deadline=None)
@given(disjoint_ranges(), rules)
def test_merging_obeys_gap_overfetch_and_size_limits(ranges, rule):
    for req in merge_ranges(ranges, **rule):
        members = sorted(ranges[p.index] for p in req.parts)
        wanted = sum(r.nbytes for r in members)
        length = req.range.end - req.range.start
        assert length - wanted <= rule["overfetch"] * wanted  # never fetched for nothing
        if len(members) > 1:
            assert length <= rule["max_request"]
            for a, b in itertools.pairwise(members):
                assert b.start - a.end <= rule["max_gap"]


@settings(max_examples=200, deadline=None)
@given(disjoint_ranges())
def test_adjacent_ranges_always_merge_and_nothing_else_at_zero_overfetch(ranges):
    requests = merge_ranges(ranges, max_gap=10**9, overfetch=0.0, max_request=10**9)
    by_key: dict[str, list[ByteRange]] = {}
    for r in ranges:
        by_key.setdefault(r.key, []).append(r)
    runs = 0  # maximal runs of back-to-back ranges
    for items in by_key.values():
        items.sort()
        runs += 1 + sum(b.start != a.end for a, b in itertools.pairwise(items))
    assert len(requests) == runs


def test_unlimited_overfetch_makes_one_request_per_object():
    ranges = [ByteRange("a", 0, 10), ByteRange("b", 5, 6), ByteRange("a", 500, 510)]
    requests = merge_ranges(ranges, max_gap=10**6, overfetch=float("inf"), max_request=10**6)
    assert sorted(r.range for r in requests) == [ByteRange("a", 0, 510), ByteRange("b", 5, 6)]


def test_whole_object_and_suffix_ranges_are_never_merged():
    ranges = [ByteRange("a"), ByteRange("a", -16, None), ByteRange("a", 0, 4)]
    requests = merge_ranges(ranges, max_gap=10**6, overfetch=float("inf"), max_request=10**6)
    assert len(requests) == 3


def _array(shape, inner, shard) -> ArrayInfo:
    meta = {
        "zarr_format": 3,
        "shape": list(shape),
        "data_type": "int16",
        "fill_value": 0,
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(shard)}},
        "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
        "codecs": [
            {
                "name": "sharding_indexed",
                "configuration": {
                    "chunk_shape": list(inner),
                    "codecs": [{"name": "bytes", "configuration": {"endian": "little"}}],
                    "index_codecs": [{"name": "bytes"}, {"name": "crc32c"}],
                },
            }
        ],
    }
    return ArrayInfo.from_metadata("v/image", meta)


@settings(max_examples=200, deadline=None)
@given(
    st.tuples(*[st.integers(-8, 30)] * 3),
    st.tuples(*[st.integers(1, 20)] * 3),
)
def test_plan_covers_each_inside_voxel_exactly_once_from_the_right_chunk(start, size):
    shape, inner, shard = (23, 17, 30), (4, 5, 6), (8, 10, 30)
    a = _array(shape, inner, shard)
    plan = plan_boxes([Box(a, start, size)])
    hits = np.zeros(size, int)
    grid = a.grid
    for cid, uses in plan.uses.items():
        assert cid.shard == tuple(c // g for c, g in zip(cid.chunk, grid, strict=True))
        local = tuple(c % g for c, g in zip(cid.chunk, grid, strict=True))
        assert cid.flat == np.ravel_multi_index(local, grid)
        for use in uses:
            hits[use.dst] += 1
            # the source slice is the same voxels, in chunk coordinates
            for d in range(3):
                first = start[d] + use.dst[d].start
                assert first - cid.chunk[d] * inner[d] == use.src[d].start
                assert use.dst[d].stop - use.dst[d].start == use.src[d].stop - use.src[d].start
    inside = np.zeros(size, int)
    lo = [max(0, s) for s in start]
    hi = [min(n, s + k) for s, k, n in zip(start, size, shape, strict=True)]
    if all(h > q for q, h in zip(lo, hi, strict=True)):
        inside[tuple(slice(q - s, h - s) for q, h, s in zip(lo, hi, start, strict=True))] = 1
    np.testing.assert_array_equal(hits, inside)
