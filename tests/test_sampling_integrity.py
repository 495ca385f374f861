"""The sampler never serves lost or corrupt bytes as voxels: checksums, missing shards, records.

A store is written through the real writer with small chunks and shards (several shards per
array, all-background label shards at both ends of z), then damaged on disk the way disks and
interrupted uploads damage it: a flipped byte in a chunk, in a shard index, a truncated shard,
a deleted shard, a catalog entry whose group never completed.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr
from volume_factory import phantom_volume

import livercube
from livercube.errors import (
    ChecksumMismatchError,
    MissingShardError,
    StoreIntegrityError,
    VolumeIncompleteError,
)
from livercube.sampling import ArrayInfo, PatchSampler, ShardReader
from livercube.sampling.plan import Box
from livercube.store import chunking
from livercube.store.catalog import write_catalog
from livercube.store.chunking import Chunking
from livercube.store.layout import data_path
from livercube.store.writer import FILL_SHARDS_ATTR, write_volume

# 24 slices of 8 mm centred on the liver: the liver (z 20 ± 65 mm) misses the first and last
# few slices, so with 4-slice shards the label has all-background shards at both ends
SHAPE, SPACING = (24, 96, 84), (8.0, 4.0, 4.0)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    dest = tmp_path_factory.mktemp("integrity") / "s.zarr"
    zarr.open_group(str(dest), mode="w", zarr_format=3)
    for i, series in enumerate(("100", "200")):
        vol = phantom_volume(series=series, shape=SHAPE, spacing=SPACING, seed=i)
        write_volume(str(dest), vol, chunking=Chunking((2, 32, 32), 4))
    write_catalog(str(dest))
    return dest


@pytest.fixture()
def store(pristine, tmp_path) -> Path:
    """A private copy to damage."""
    dst = tmp_path / "s.zarr"
    shutil.copytree(pristine, dst)
    return dst


def _array(store: Path, name: str = "image", volume: int = 0) -> tuple[str, zarr.Array]:
    st = livercube.open(str(store))
    path = st.paths()[volume]
    return path, st.root[data_path(path)][name]


def _info(path: str, arr: zarr.Array, name: str) -> ArrayInfo:
    return ArrayInfo.from_metadata(f"{data_path(path)}/{name}", arr.metadata.to_dict())


def _inner_chunk_range(shard: Path, info: ArrayInfo, k: int) -> tuple[int, int]:
    """(offset, nbytes) of the ``k``-th stored inner chunk of a shard, from its index."""
    raw = shard.read_bytes()[-info.index_nbytes : -4]
    idx = np.frombuffer(raw, "<u8").reshape(-1, 2)
    stored = idx[idx[:, 0] != 2**64 - 1]
    off, nb = stored[k]
    return int(off), int(nb)


def test_writer_records_exactly_the_shards_it_skips(store):
    for name in ("image", "label", "segments"):
        path, arr = _array(store, name)
        info = _info(path, arr, name)
        grid = chunking.shard_grid(arr.shape, info.object_shape)
        present = {c for c in np.ndindex(*grid) if (store / info.object_key(c)).is_file()}
        recorded = {tuple(c) for c in arr.attrs["livercube"][FILL_SHARDS_ATTR]}
        assert info.fill_shards == recorded
        assert recorded.isdisjoint(present) and recorded | present == set(np.ndindex(*grid))
        if name == "label":
            assert recorded, "fixture should have all-background label shards"
    # and those never-written shards read as background through the sampler's reader
    path, label = _array(store, "label")
    info = _info(path, label, "label")
    got = ShardReader(str(store)).read(info, (0, 0, 0), label.shape, fill=9)
    np.testing.assert_array_equal(got, label[...])
    assert not got[:4].any()


def test_every_chunk_and_shard_index_carries_crc32c(store):
    path, arr = _array(store, "image")
    codecs = arr.metadata.to_dict()["codecs"][0]["configuration"]
    assert [c["name"] for c in codecs["codecs"]][-1] == "crc32c"
    assert [c["name"] for c in codecs["index_codecs"]][-1] == "crc32c"
    info = _info(path, arr, "image")
    assert info.chunk_crc32c and info.index_crc32c
    _, loc = _array(store, "class_locations")
    assert loc.metadata.to_dict()["codecs"][-1]["name"] == "crc32c"


def test_missing_shard_of_complete_volume_is_an_error_naming_it(store):
    path, arr = _array(store, "image")
    info = _info(path, arr, "image")
    key = info.object_key((2, 0, 0))
    (store / key).unlink()
    reader = ShardReader(str(store))
    with pytest.raises(MissingShardError) as err:
        reader.read(info, (0, 0, 0), arr.shape)
    assert err.value.object == key and key in str(err.value)
    # the sampler, asked for patches covering that shard, raises too (before: zeros)
    sampler = PatchSampler(str(store), where=f"path == '{path}'", patch_size=SHAPE, seed=0)
    with pytest.raises(MissingShardError, match="lost"):
        sampler.patch(0)
    # boxes that avoid the lost shard still read
    np.testing.assert_array_equal(reader.read(info, (0, 0, 0), (4, *arr.shape[1:])), arr[:4])


def test_missing_label_shard_that_is_not_background_is_an_error(store):
    path, label = _array(store, "label")
    info = _info(path, label, "label")
    written = [
        c
        for c in np.ndindex(*chunking.shard_grid(label.shape, info.object_shape))
        if c not in info.fill_shards
    ]
    (store / info.object_key(written[0])).unlink()
    with pytest.raises(MissingShardError):
        ShardReader(str(store)).read(info, (0, 0, 0), label.shape)


def test_flipped_byte_in_a_chunk_is_caught_by_livercube_and_zarr(store):
    path, arr = _array(store, "image")
    info = _info(path, arr, "image")
    key = info.object_key((1, 0, 0))
    shard = store / key
    off, nb = _inner_chunk_range(shard, info, 3)
    data = bytearray(shard.read_bytes())
    data[off + nb // 2] ^= 0x01
    shard.write_bytes(bytes(data))

    with pytest.raises(ChecksumMismatchError) as err:
        ShardReader(str(store)).read(info, (0, 0, 0), arr.shape)
    assert key in str(err.value) and "CRC-32C" in str(err.value)
    sampler = PatchSampler(str(store), where=f"path == '{path}'", patch_size=SHAPE, seed=0)
    with pytest.raises(ChecksumMismatchError):
        sampler.patch(0)
    with pytest.raises(ValueError, match="checksum"):
        zarr.open_array(str(store), path=f"{data_path(path)}/image", mode="r")[...]


def test_flipped_byte_in_shard_index_is_caught(store):
    path, arr = _array(store, "image")
    info = _info(path, arr, "image")
    shard = store / info.object_key((0, 0, 0))
    data = bytearray(shard.read_bytes())
    data[-info.index_nbytes + 5] ^= 0x10  # an offset inside the index, not its checksum
    shard.write_bytes(bytes(data))
    with pytest.raises(ChecksumMismatchError, match="index"):
        ShardReader(str(store)).read(info, (0, 0, 0), (2, 8, 8))


def test_truncated_shard_is_an_integrity_error(store):
    path, arr = _array(store, "image")
    info = _info(path, arr, "image")
    shard = store / info.object_key((0, 0, 0))
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])  # upload cut short: index gone with the tail
    with pytest.raises(StoreIntegrityError, match=re.escape(info.object_key((0, 0, 0)))):
        ShardReader(str(store)).read(info, (0, 0, 0), (2, 8, 8))


def test_tensorstore_also_rejects_a_corrupt_chunk(store):
    import tensorstore as ts

    path, arr = _array(store, "image")
    info = _info(path, arr, "image")
    kvstore = {"driver": "file", "path": str(store / data_path(path) / "image")}
    spec = {"driver": "zarr3", "kvstore": kvstore}
    np.testing.assert_array_equal(ts.open(spec).result().read().result(), arr[...])
    shard = store / info.object_key((0, 0, 0))
    off, nb = _inner_chunk_range(shard, info, 0)
    data = bytearray(shard.read_bytes())
    data[off + nb // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"(?i)checksum|crc|digest"):
        ts.open(spec).result().read().result()


def _edit_consolidated(store: Path, edit) -> None:
    doc = json.loads((store / "zarr.json").read_text())
    edit(doc["consolidated_metadata"]["metadata"])
    (store / "zarr.json").write_text(json.dumps(doc))


def test_catalog_listing_a_group_without_completion_record_is_refused(store):
    path = livercube.open(str(store)).paths()[1]

    def unfinished(meta):
        meta["attributes"]["livercube"]["status"] = "writing"
        del meta["attributes"]["livercube"]["complete"]

    group = store / path / "zarr.json"
    doc = json.loads(group.read_text())
    unfinished(doc)
    group.write_text(json.dumps(doc))
    _edit_consolidated(store, lambda meta: unfinished(meta[path]))
    # volume metadata is read when a patch first needs the volume, not at start-up
    sampler = PatchSampler(str(store), seed=0, where=f"path == '{path}'")
    with pytest.raises(VolumeIncompleteError, match=re.escape(path)):
        sampler.patch(0)


def test_catalog_listing_a_vanished_group_is_refused(store):
    path = livercube.open(str(store)).paths()[0]

    def vanished(meta):
        for k in [k for k in meta if k == path or k.startswith(path + "/")]:
            del meta[k]

    shutil.rmtree(store / path)
    _edit_consolidated(store, vanished)
    sampler = PatchSampler(str(store), seed=0, where=f"path == '{path}'")
    with pytest.raises(VolumeIncompleteError, match="rebuild the catalog"):
        sampler.patch(0)


@pytest.mark.slow
def test_missing_and_corrupt_shards_are_caught_on_s3(store, s3_bucket):
    """Same guarantees through ranged GETs on object storage (moto on loopback)."""
    import s3fs

    bucket, opts = s3_bucket
    path, arr = _array(store, "image")
    info = _info(path, arr, "image")
    fs = s3fs.S3FileSystem(**opts, skip_instance_cache=True)
    fs.put(f"{store}/", f"{bucket}/s/", recursive=True)
    url = f"s3://{bucket}/s"
    lost, hit = info.object_key((2, 0, 0)), info.object_key((1, 0, 0))
    fs.rm(f"{bucket}/s/{lost}")
    shard = store / hit
    off, nb = _inner_chunk_range(shard, info, 2)
    data = bytearray(shard.read_bytes())
    data[off + nb // 2] ^= 0x01
    fs.pipe(f"{bucket}/s/{hit}", bytes(data))

    reader = ShardReader(url, opts)
    np.testing.assert_array_equal(reader.read(info, (0, 0, 0), (4, 40, 40)), arr[:4, :40, :40])
    with pytest.raises(MissingShardError, match=re.escape(lost)):
        reader.read(info, (8, 0, 0), (4, 40, 40))
    with pytest.raises(ChecksumMismatchError, match=re.escape(hit)):
        reader.read(info, (4, 0, 0), (4, *arr.shape[1:]))
    sampler = PatchSampler(
        url, storage_options=opts, where=f"path == '{path}'", patch_size=SHAPE, seed=0
    )
    with pytest.raises((MissingShardError, ChecksumMismatchError)):
        sampler.patch(0)


def test_tensorstore_engine_reads_the_same_and_keeps_the_guarantees(store):
    import tensorstore  # noqa: F401  (an independent reader: a test dependency)

    rng = np.random.default_rng(5)
    own, ts_engine = ShardReader(str(store)), ShardReader(str(store), engine="tensorstore")
    for name, fill in (("image", -1024), ("label", 0)):
        path, arr = _array(store, name)
        info = _info(path, arr, name)
        for _ in range(12):  # boxes partly or wholly outside, over all-fill label shards too
            start = tuple(int(rng.integers(-8, n)) for n in arr.shape)
            size = tuple(int(rng.integers(1, n + 8)) for n in arr.shape)
            want = own.read(info, start, size, fill)
            np.testing.assert_array_equal(ts_engine.read(info, start, size, fill), want)
            slot = np.full(size, np.nan, np.float32)  # straight into a caller's slot
            ts_engine.read_boxes([Box(info, start, size, fill, slot)])
            np.testing.assert_array_equal(slot, want.astype(np.float32))
    path, arr = _array(store, "image")
    info = _info(path, arr, "image")
    lost, hit = info.object_key((2, 0, 0)), info.object_key((1, 0, 0))
    (store / lost).unlink()
    shard = store / hit
    off, nb = _inner_chunk_range(shard, info, 0)
    data = bytearray(shard.read_bytes())
    data[off + nb // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    fresh = ShardReader(str(store), engine="tensorstore")
    with pytest.raises(MissingShardError, match=re.escape(lost)):
        fresh.read(info, (8, 0, 0), (4, 8, 8))
    with pytest.raises(ChecksumMismatchError, match=re.escape(hit)):
        fresh.read(info, (4, 0, 0), (4, *arr.shape[1:]))
    with pytest.raises(ValueError, match="local stores only"):
        ShardReader("s3://bucket/store", engine="tensorstore")


def test_sampler_on_tensorstore_engine_equals_default_also_after_pickle(pristine):
    import pickle

    import tensorstore  # noqa: F401  (an independent reader: a test dependency)

    own = PatchSampler(str(pristine), patch_size=(8, 40, 40), mode="foreground", seed=2)
    fast = PatchSampler(
        str(pristine), patch_size=(8, 40, 40), mode="foreground", seed=2, engine="tensorstore"
    )
    for pos in range(12):
        a, b = own.patch(pos), fast.patch(pos)
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])
    clone = pickle.loads(pickle.dumps(fast))  # what a spawned DataLoader worker receives
    np.testing.assert_array_equal(clone.patch(3)["image"], own.patch(3)["image"])
