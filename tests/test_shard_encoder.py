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


def _tight_volume():
    """A phantom whose segments were added through their bounding boxes (as SEG placement
    adds them), so its occupied box is a strict part of the grid in every axis."""
    from livercube.volumes.volume import SegmentField

    vol = phantom_volume(shape=(60, 150, 140), seed=5)
    assert vol.segments is not None
    masks = [vol.segments.mask(s.bit) for s in vol.segments.segments]
    masks[0][:9] = masks[0][41:] = False  # a liver of slices 9-40: whole shards of background
    tight = SegmentField(vol.image.shape, len(masks))
    for s, m in zip(vol.segments.segments, masks, strict=True):
        nz = np.nonzero(m)
        assert nz[0].size, f"the phantom's {s.label} is empty"
        box = tuple(slice(int(a.min()), int(a.max()) + 1) for a in nz)
        tight.add(m, label=s.label, number=s.number, unified=s.unified, within=box)
    vol.segments = tight
    return vol


def test_the_occupied_box_changes_no_stored_byte(tmp_path, monkeypatch):
    """Label and segment chunks outside the segments' occupied box are skipped unseen; the
    store is byte for byte the one written by looking at every chunk."""
    import json
    from pathlib import Path

    from livercube.volumes.volume import SegmentField

    vol = _tight_volume()
    occupied = vol.segments.occupied
    assert all(s.stop - s.start < n for s, n in zip(occupied, vol.image.shape, strict=True))
    fast = tmp_path / "fast.zarr"
    zarr.open_group(str(fast), mode="w", zarr_format=3)
    rec = write_volume(str(fast), vol, fingerprint="x", chunking=SMALL)
    monkeypatch.setattr(SegmentField, "occupied", property(lambda self: None))
    slow = tmp_path / "slow.zarr"
    zarr.open_group(str(slow), mode="w", zarr_format=3)
    write_volume(str(slow), vol, fingerprint="x", chunking=SMALL)

    def files(root: Path) -> dict[str, bytes]:
        return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}

    a, b = files(fast / rec["path"]), files(slow / rec["path"])
    assert a.keys() == b.keys()
    assert any(k.startswith("0/label/c/") for k in a)
    for key in a:
        if key.endswith("zarr.json"):
            doc_a, doc_b = json.loads(a[key]), json.loads(b[key])
            if doc_a.get("node_type") == "array":
                assert doc_a == doc_b, key  # fill_shards and all
        else:
            assert a[key] == b[key], key
    # some label shard holds only background: not written either way
    label_shards = SMALL.chunk_and_shard(vol.image.shape)[1][0]
    n_z = -(-vol.image.shape[0] // label_shards)
    assert sum(k.startswith("0/label/c/") for k in a) < n_z


@pytest.mark.parametrize("strided", [False, True])
def test_occupied_boxes_skip_exactly_the_empty_chunks(strided):
    """Random boxes and boxes whose first or last voxel is a chunk's first or last voxel:
    skipping the chunks outside the box gives every shard encoding all chunks gives."""
    rng = np.random.default_rng(11)
    shape = (27, 40, 37) if not strided else (54, 80, 74)
    step = (1, 1, 1) if not strided else (2, 2, 2)
    view_shape = (27, 40, 37)
    chunks, shards = SMALL.chunk_and_shard(view_shape)
    edges = [(slice(4, 9), slice(16, 33), slice(0, 17)), (slice(3, 8), slice(15, 32), slice(1, 16))]
    boxes = edges + [
        tuple(
            slice(a, int(rng.integers(a + 1, n + 1))) for a, n in zip(lo, view_shape, strict=True)
        )
        for lo in ([int(rng.integers(0, n)) for n in view_shape] for _ in range(12))
    ]
    layout = ShardLayout(view_shape, chunks, shards)
    blosc = numcodecs_blosc(LABEL_COMPRESSOR, np.dtype(np.uint8))
    with encoder_pool(2) as pool:
        for box in boxes:
            data = np.zeros(shape, np.uint8)
            view = data[:: step[0], :: step[1], :: step[2]]
            view[box] = rng.integers(1, 4, view[box].shape, dtype=np.uint8)
            ours = dict(iter_shards(view, layout, blosc, 0, pool, box))
            every = dict(iter_shards(view, layout, blosc, 0, pool))
            assert ours == every, box


def test_small_arrays_hold_the_chunks_zarr_writes():
    """Coordinates and class locations, whose one chunk the writer encodes itself: every such
    chunk is byte for byte what zarr-python writes for the same array and values."""
    import json

    from zarr.core.buffer import default_buffer_prototype

    from livercube.store.writer import metadata_objects, sharded_arrays

    vol = _tight_volume()
    arrays = {"image": vol.image, "label": vol.label(), "segments": vol.segments.bits}
    sharded = sharded_arrays(vol, arrays)
    objects = metadata_objects(vol, {}, arrays, sharded, {a.path: [] for a in sharded}, SMALL)
    proto = default_buffer_prototype()
    checked = []
    for key, doc in objects.items():
        if not key.endswith("zarr.json") or key == "zarr.json":
            continue
        meta = json.loads(doc.to_bytes())
        if meta.get("node_type") != "array":
            continue
        path = key[: -len("/zarr.json")]
        values = zarr.open_array(MemoryStore(objects), path=path, mode="r")[...]
        theirs: dict = {"a/zarr.json": proto.buffer.from_bytes(doc.to_bytes())}
        zarr.open_array(MemoryStore(theirs), path="a", mode="r+")[...] = values
        ours = {
            k[len(path) + 1 :]: v.to_bytes()
            for k, v in objects.items()
            if k.startswith(f"{path}/c")
        }
        assert ours == {k[2:]: v.to_bytes() for k, v in theirs.items() if k.startswith("a/c")}, path
        checked.append(path.rsplit("/", 1)[-1])
    assert {"class_locations", "x", "y", "z"} <= set(checked)
    assert len(checked) >= 7  # level 0 and at least one browse level
