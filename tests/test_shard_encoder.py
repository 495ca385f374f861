"""The shard encoder writes what zarr-python writes, and every reader agrees on the voxels."""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from volume_factory import phantom_volume
from zarr.storage import MemoryStore

from livercube.store.chunking import Chunking, chunk_and_shard
from livercube.store.shards import (
    ChunkScratch,
    ShardLayout,
    encode_chunk,
    encoder_pool,
    iter_shards,
    numcodecs_blosc,
    shard_key,
)
from livercube.store.writer import CHECKSUM, COMPRESSOR, LABEL_COMPRESSOR, write_volume

SMALL = Chunking((4, 16, 16), 8)


def _awkward(dtype, seed=0) -> np.ndarray:
    """Edge chunks in every axis, an all-fill shard, all-fill chunks inside written shards."""
    rng = np.random.default_rng(seed)
    a = rng.integers(-50, 50, size=(27, 40, 37)).astype(dtype)
    a[8:16] = 0  # shard 1 holds only fill: never written
    a[:4, :16, :16] = 0  # one all-fill inner chunk inside shard 0
    return a


@pytest.mark.parametrize(("dtype", "codec"), [(np.int16, COMPRESSOR), (np.uint8, LABEL_COMPRESSOR)])
@pytest.mark.parametrize("threads", [1, 3])
def test_shards_are_byte_identical_to_zarr_python(dtype, codec, threads):
    data = _awkward(dtype)
    if dtype == np.uint8:
        data = np.abs(data).astype(np.uint8)
    chunks, shards = SMALL.chunk_and_shard(data.shape)
    objects: dict = {}
    arr = zarr.create_group(MemoryStore(objects), zarr_format=3).create_array(
        "a",
        shape=data.shape,
        dtype=data.dtype,
        chunks=chunks,
        shards=shards,
        compressors=[codec, CHECKSUM],
        fill_value=0,
    )
    arr[...] = data
    theirs = {k[2:]: bytes(v.to_bytes()) for k, v in objects.items() if k.startswith("a/c/")}
    layout = ShardLayout(data.shape, chunks, shards)
    with encoder_pool(threads) as pool:
        ours = {
            shard_key(c): obj
            for c, obj in iter_shards(data, layout, numcodecs_blosc(codec, data.dtype), 0, pool)
            if obj is not None
        }
    assert "c/1/0/0" not in ours  # the all-fill shard
    assert ours == theirs


def test_strided_views_encode_like_their_copies():
    data = _awkward(np.int16, seed=1)
    view = data[::2, ::3, ::2]
    chunks, shards = SMALL.chunk_and_shard(view.shape)
    layout = ShardLayout(view.shape, chunks, shards)
    blosc = numcodecs_blosc(COMPRESSOR, view.dtype)
    with encoder_pool(2) as pool:
        a = dict(iter_shards(view, layout, blosc, 0, pool))
        b = dict(iter_shards(np.ascontiguousarray(view), layout, blosc, 0, pool))
    assert a == b and any(v is not None for v in a.values())


def test_chunking_is_a_value_with_the_contracts_default():
    assert chunk_and_shard((100, 512, 512)) == ((32, 64, 64), (64, 512, 512))
    assert SMALL.chunk_and_shard((100, 512, 512)) == ((4, 16, 16), (8, 512, 512))
    with pytest.raises(ValueError):
        Chunking((0, 16, 16), 8)


def test_zarr_xarray_and_tensorstore_read_the_written_volume_voxel_identically(tmp_path):
    xr = pytest.importorskip("xarray")
    import tensorstore as ts

    vol = phantom_volume(shape=(11, 150, 140), seed=4)  # large enough for a browse level
    url = str(tmp_path / "s.zarr")
    zarr.open_group(url, mode="w", zarr_format=3)
    rec = write_volume(url, vol, fingerprint="x", chunking=SMALL)
    level0 = f"{url}/{rec['path']}/0"
    expected = {"image": vol.image, "label": vol.label(), "segments": vol.segments.bits}
    ds = xr.open_zarr(level0, zarr_format=3)
    for name, want in expected.items():
        np.testing.assert_array_equal(zarr.open_array(f"{level0}/{name}", mode="r")[...], want)
        np.testing.assert_array_equal(ds[name].values, want)
        t = ts.open({"driver": "zarr3", "kvstore": f"file://{level0}/{name}"}).result()
        np.testing.assert_array_equal(t.read().result(), want)
    # a browse level through TensorStore too (strided view at write time)
    t = ts.open({"driver": "zarr3", "kvstore": f"file://{url}/{rec['path']}/1/image"}).result()
    np.testing.assert_array_equal(t.read().result(), vol.image[::2, ::2, ::2])


def test_a_failed_shard_upload_raises_itself_and_leaves_no_volume(tmp_path, monkeypatch):
    """A full disk mid-volume surfaces as the OSError (convert reports ENOSPC by its errno),
    not as an ExceptionGroup, and the group stays without its document (invisible)."""
    import errno
    from pathlib import Path

    url = str(tmp_path / "s.zarr")
    zarr.open_group(url, mode="w", zarr_format=3)
    original = zarr.storage.LocalStore.set
    calls = {"shards": 0}

    async def failing_set(self, key, value):
        if "/c/" in key:
            calls["shards"] += 1
            if calls["shards"] == 2:
                raise OSError(errno.ENOSPC, "No space left on device")
        return await original(self, key, value)

    monkeypatch.setattr(zarr.storage.LocalStore, "set", failing_set)
    vol = phantom_volume(shape=(17, 40, 40), seed=2)
    with pytest.raises(OSError) as info:
        write_volume(url, vol, chunking=Chunking((4, 16, 16), 4))
    assert info.value.errno == errno.ENOSPC
    assert calls["shards"] >= 2
    group = Path(url, "crlm", "CRLM-CT-1001", "S1", "100")
    assert not (group / "zarr.json").exists()


def test_a_reused_chunk_buffer_never_leaks_into_the_next_chunk():
    """Chunks of other shapes, byte orders and fills in a row through one scratch buffer:
    each stored chunk decodes to its own block, edge padding is its own fill."""
    blosc = numcodecs_blosc(COMPRESSOR, np.dtype(np.int16))
    scratch = ChunkScratch()
    rng = np.random.default_rng(2)
    full = rng.integers(-900, 900, size=(4, 16, 16)).astype(np.int16)
    cases = [
        (full, 0),
        (full[:3, :10, :5], 7),  # edge chunk padded with fill 7, after a full one
        (full.astype(">i2"), 0),  # big-endian source: stored little-endian all the same
        (np.full((2, 16, 16), 7, np.int16), 7),  # all fill once padded: not stored
    ]
    for block, fill in cases:
        stored = encode_chunk(block, (4, 16, 16), fill, blosc, scratch)
        if block.size and np.all(block == fill):
            assert stored is None
            continue
        got = np.frombuffer(blosc.decode(stored[:-4]), dtype="<i2").reshape(4, 16, 16)
        expect = np.full((4, 16, 16), fill, np.int16)
        expect[: block.shape[0], : block.shape[1], : block.shape[2]] = block
        assert np.array_equal(got, expect)
