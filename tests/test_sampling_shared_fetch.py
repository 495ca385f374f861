"""Concurrent reads share in-flight chunk fetches: each chunk fetched once, errors shared too.

Two reads of overlapping boxes are forced to overlap in time (the first read's fetch is held
until the second has claimed its chunks), so the outcome does not depend on thread timing.
The store is local but read through fsspec's local filesystem, which takes the path remote
stores take (plain local paths are read by ``pread`` in the decode tasks, unshared).
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
from array_factory import write_sharded_array
from fsspec.implementations.local import LocalFileSystem

from livercube.errors import MissingShardError, StoreIntegrityError
from livercube.sampling import ArrayInfo, ShardReader
from livercube.sampling.plan import Box
from livercube.sampling.reader import DECODE_TASKS, decode_shares


@pytest.fixture()
def array(tmp_path) -> tuple[str, ArrayInfo, np.ndarray]:
    data = np.random.default_rng(0).integers(-1000, 1000, (16, 24, 20)).astype(np.int16)
    info = write_sharded_array(
        tmp_path / "s.zarr" / "img", data, chunks=(4, 8, 10), shards=(8, 24, 20)
    )
    return str(tmp_path / "s.zarr"), info, data


def _note_second_claim(reader: ShardReader, claimed: threading.Event) -> None:
    """Set ``claimed`` once the thread named "second" has claimed its chunks."""
    claim = reader._claim

    def noting_claim(located):
        out = claim(located)
        if threading.current_thread().name == "second":
            claimed.set()
        return out

    reader._claim = noting_claim  # type: ignore[method-assign]


def _overlapping_reads(reader: ShardReader, boxes: list[Box]) -> list:
    # callers read once beforehand, so the shard indexes are cached and only chunk data is
    # fetched (and shared) here
    """Read ``boxes[0]`` and ``boxes[1]`` in two threads, the second claiming its chunks while
    the first is still fetching; returns each thread's result or exception."""
    first_fetching, second_claimed = threading.Event(), threading.Event()
    fetch = reader._fetch
    data_fetches: list[list] = []

    def held_fetch(ranges):
        if ranges and ranges[0].start is not None and ranges[0].start >= 0:  # chunk data
            data_fetches.append(list(ranges))
            if threading.current_thread().name == "first":
                first_fetching.set()
                assert second_claimed.wait(10)
        return fetch(ranges)

    reader._fetch = held_fetch  # type: ignore[method-assign]
    _note_second_claim(reader, second_claimed)
    results: list = [None, None]

    def run(i: int) -> None:
        try:
            results[i] = reader.read_boxes([boxes[i]])[0]
        except Exception as exc:  # handed back to the test
            results[i] = exc

    first = threading.Thread(target=run, args=(0,), name="first")
    first.start()
    assert first_fetching.wait(10)
    second = threading.Thread(target=run, args=(1,), name="second")
    second.start()
    first.join(10)
    second.join(10)
    results.append(data_fetches)
    return results


def test_overlapping_reads_fetch_each_chunk_once_and_both_are_right(array):
    url, info, data = array
    reader = ShardReader(url, fs=LocalFileSystem())
    a, b = Box(info, (2, 3, 1), (9, 15, 12)), Box(info, (2, 3, 1), (9, 15, 12))
    reader.read_boxes([a])
    got_a, got_b, fetches = _overlapping_reads(reader, [a, b])
    want = data[2:11, 3:18, 1:13]
    np.testing.assert_array_equal(got_a, want)
    np.testing.assert_array_equal(got_b, want)
    assert len(fetches) == 1  # the second read fetched nothing itself
    fetched = sum(r.end - r.start for r in fetches[0])
    reader.stats.reset()
    reader.read_boxes([a])
    assert fetched == reader.stats.bytes_fetched  # one box's worth, not two
    assert not reader._inflight


def test_a_failed_shared_fetch_fails_every_read_waiting_for_it(array, tmp_path):
    url, info, _ = array
    reader = ShardReader(url, fs=LocalFileSystem())
    box = Box(info, (0, 0, 0), (6, 10, 10))
    reader.read_boxes([box])  # cache the shard index, then lose the shard
    (tmp_path / "s.zarr" / "img" / "c" / "0" / "0" / "0").unlink()
    got_a, got_b, _ = _overlapping_reads(reader, [box, box])
    assert isinstance(got_a, MissingShardError)
    assert isinstance(got_b, MissingShardError)
    assert not reader._inflight  # nothing left claimed: a later read tries again


def test_a_read_arriving_before_another_has_decoded_takes_its_decoded_chunks(array):
    """A fetched chunk stays shared until the read that fetched it has decoded it (with many
    patches in flight a patch waits for a core far longer than for the network), and what
    is shared is the decoded chunk: the later read neither fetches nor decodes it."""
    url, info, data = array
    reader = ShardReader(url, fs=LocalFileSystem())
    box = Box(info, (1, 2, 3), (10, 12, 9))
    reader.read_boxes([box])  # shard indexes cached: only chunk data below
    first_fetched, second_claimed = threading.Event(), threading.Event()
    fetch, decode = reader._fetch, reader._decode
    data_fetches: list[str] = []
    decoded: list[tuple[str, int]] = []

    def noting_fetch(ranges):
        if ranges:  # a read whose chunks are all someone else's fetches nothing
            data_fetches.append(threading.current_thread().name)
        return fetch(ranges)

    def held_decode(plan, chunks, cids, publish):
        name = threading.current_thread().name
        decoded.append((name, len(cids)))
        if name == "first":  # fetched, not decoded yet: the second read arrives now
            first_fetched.set()
            assert second_claimed.wait(10)
        return decode(plan, chunks, cids, publish)

    reader._fetch, reader._decode = noting_fetch, held_decode  # type: ignore[method-assign]
    _note_second_claim(reader, second_claimed)
    results: dict[str, np.ndarray] = {}

    def run(name: str) -> None:
        results[name] = reader.read_boxes([box])[0]

    first = threading.Thread(target=run, args=("first",), name="first")
    first.start()
    assert first_fetched.wait(10)
    second = threading.Thread(target=run, args=("second",), name="second")
    second.start()
    second.join(10)
    first.join(10)
    want = data[1:11, 2:14, 3:12]
    np.testing.assert_array_equal(results["first"], want)
    np.testing.assert_array_equal(results["second"], want)
    assert data_fetches == ["first"]  # the second read fetched nothing
    assert dict(decoded)["second"] == 0  # nor decoded anything
    assert not reader._inflight  # and nothing stays claimed once both are done


def test_a_chunk_that_fails_to_decode_fails_the_reads_sharing_it(array, tmp_path):
    """A corrupt chunk one read fetched is an error for every read that waited for it,
    never a hang or zeros; afterwards nothing stays claimed."""
    url, info, _ = array
    reader = ShardReader(url, fs=LocalFileSystem())
    box = Box(info, (0, 0, 0), (4, 8, 10))  # exactly the first inner chunk
    reader.read_boxes([box])
    shard = tmp_path / "s.zarr" / "img" / "c" / "0" / "0" / "0"
    idx = reader._index[(info.path, (0, 0, 0))]
    start, end = idx.locate(0)
    raw = bytearray(shard.read_bytes())
    raw[start + (end - start) // 2] ^= 0xFF
    shard.write_bytes(bytes(raw))
    got_a, got_b, _ = _overlapping_reads(reader, [box, box])
    assert isinstance(got_a, StoreIntegrityError)
    assert isinstance(got_b, StoreIntegrityError)
    assert not reader._inflight


def test_one_read_alone_spreads_its_decode_over_the_cores_many_do_not():
    assert decode_shares(1, 50) == DECODE_TASKS
    assert decode_shares(1, 1) == 1  # never more shares than chunks
    assert decode_shares(64, 50) == 1  # the other reads keep the cores busy
    assert decode_shares(0, 50) == DECODE_TASKS  # a count that raced below one is one


def test_reads_in_flight_are_counted_back_down_after_failures_too(array, tmp_path):
    """A read that fails must not stay counted: the reader would split no read again."""
    url, info, data = array
    reader = ShardReader(url, fs=LocalFileSystem())
    box = Box(info, (0, 0, 0), (16, 24, 20))
    np.testing.assert_array_equal(reader.read_boxes([box])[0], data)
    for shard in (tmp_path / "s.zarr" / "img" / "c").rglob("*"):
        if shard.is_file():
            shard.write_bytes(shard.read_bytes()[:-7])  # torn index: every read fails
    reader = ShardReader(url, fs=LocalFileSystem())
    with pytest.raises(StoreIntegrityError):
        reader.read_boxes([box])
    assert reader._reading == 0
