"""Patch sampling: the fast reader, the sampler, multi-phase geometry, streaming."""

from __future__ import annotations

import pickle
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import zarr
from array_factory import expected_box
from fsspec.implementations.local import LocalFileSystem

import livercube
from livercube.convert import convert
from livercube.sampling import ArrayInfo, PatchSampler, ShardReader
from livercube.sampling.plan import Box
from livercube.store.chunking import Chunking
from livercube.store.layout import data_path
from livercube.synth.plc_cect import write_plc_cect

PATCH = (6, 20, 20)


@pytest.fixture(scope="module")
def small_chunk_store(tmp_path_factory) -> str:
    """The tiny PLC release converted with small inner chunks and shards (4×16×16 in 8-slice
    shards), so patches cross many chunks and shards as 96³ patches do in real stores."""
    tmp = tmp_path_factory.mktemp("sampling")
    write_plc_cect(tmp / "PLC", n_subjects=3, size="tiny", seed=3)
    dest = str(tmp / "s.zarr")
    small = Chunking((4, 16, 16), 8)
    report = convert(str(tmp / "PLC"), dest, "plc-cect", progress=False, chunking=small)
    assert report.exit_code == 0, report.summary()
    return dest


@pytest.fixture(scope="module")
def store(small_chunk_store) -> livercube.Store:
    """One opened store for the module (opening the catalog is the slow part)."""
    return livercube.open(small_chunk_store)


def random_boxes(rng, shape, n):
    for _ in range(n):
        size = tuple(int(rng.integers(1, s + 12)) for s in shape)
        start = tuple(int(rng.integers(-10, s + 2)) for s in shape)
        yield start, size


# ---------------------------------------------------------------------------------- reader
@pytest.mark.parametrize("index_location", ["end", "start"])
@pytest.mark.parametrize("path", ["pread", "fsspec"])
def test_reader_equals_zarr_on_synthetic_arrays(tmp_path, index_location, path):
    """Both read paths: local ``pread`` in the decode tasks, and fsspec's (what remote
    stores take: one fetch round, in-flight chunks shared), on the same local files."""
    root = zarr.open_group(str(tmp_path / "a.zarr"), mode="w", zarr_format=3)
    rng = np.random.default_rng(0)
    shape = (37, 50, 45)
    for name, dtype, fill in (("i16", "int16", -5), ("u8", "uint8", 0), ("f4", "float32", 1.5)):
        arr = root.create_array(
            name,
            shape=shape,
            dtype=dtype,
            chunks=(5, 16, 16),
            shards=(10, 32, 48),
            compressors=[zarr.codecs.BloscCodec(cname="zstd", clevel=3, shuffle="shuffle")],
            fill_value=fill,
            config={"write_empty_chunks": False},
        )
        data = (rng.normal(size=shape) * 100).astype(dtype)
        data[:10] = fill  # a whole shard of fill: never written
        data[20:25, :16, :16] = fill  # an empty inner chunk inside a written shard
        arr[...] = data
    # index_location is a sharding option: rewrite one array with the index at the start
    arr = root.create_array(
        "start",
        shape=shape,
        dtype="int16",
        chunks=(10, 32, 48),
        serializer=zarr.codecs.ShardingCodec(
            chunk_shape=(5, 16, 16),
            codecs=[zarr.codecs.BytesCodec(), zarr.codecs.ZstdCodec(level=1)],
            index_location=index_location,
        ),
        compressors=None,
        fill_value=0,
    )
    arr[...] = (rng.normal(size=shape) * 100).astype("int16")
    fs = LocalFileSystem() if path == "fsspec" else None
    reader = ShardReader(str(tmp_path / "a.zarr"), fs=fs)
    for name in ("i16", "u8", "f4", "start"):
        arr = root[name]
        info = ArrayInfo.from_metadata(name, arr.metadata.to_dict())
        full = arr[...]
        # boxes wholly inside the array over the never-written shard and the empty chunk
        # (outputs start uninitialised there: every voxel must come from a decode or fill)
        inside = [((0, 0, 0), (10, 50, 45)), ((20, 0, 0), (5, 16, 16)), ((18, 3, 2), (9, 20, 30))]
        for start, size in [*inside, *random_boxes(rng, shape, 25)]:
            got = reader.read(info, start, size, fill=7)
            exp = expected_box(full, start, size, 7)
            np.testing.assert_array_equal(got, exp)
            # straight into a caller's float32 slot: every voxel written, values cast
            slot = np.full(size, np.nan, np.float32)
            (into,) = reader.read_boxes([Box(info, start, size, 7, slot)])
            assert into is slot
            np.testing.assert_array_equal(slot, exp.astype(np.float32))


def test_a_box_output_of_the_wrong_shape_is_refused(small_chunk_store):
    store = livercube.open(small_chunk_store)
    path = store.paths()[0]
    arr = store.root[data_path(path)]["image"]
    info = ArrayInfo.from_metadata(f"{data_path(path)}/image", arr.metadata.to_dict())
    with pytest.raises(ValueError, match="shape"):
        ShardReader(small_chunk_store).read_boxes(
            [Box(info, (0, 0, 0), (2, 3, 4), None, np.empty((2, 3, 5)))]
        )


def test_local_reads_happen_in_the_decode_tasks_once_per_request(small_chunk_store, monkeypatch):
    """On local disk every merged request is ``pread`` once, by the task that decodes it
    (none serially before decoding starts), and the patch is still exact."""
    from livercube.sampling import reader as reader_mod

    calls: list[tuple[str, tuple]] = []
    real = reader_mod.read_local

    def recording(root, rng):
        calls.append((threading.current_thread().name, tuple(rng)))
        return real(root, rng)

    store = livercube.open(small_chunk_store)
    path = store.paths()[0]
    arr = store.root[data_path(path)]["image"]
    info = ArrayInfo.from_metadata(f"{data_path(path)}/image", arr.metadata.to_dict())
    reader = ShardReader(small_chunk_store)
    start, size = (1, 2, 3), tuple(max(1, n - 4) for n in arr.shape)
    reader.read(info, start, size)  # shard indexes cached: only chunk data below
    reader.stats.reset()
    monkeypatch.setattr(reader_mod, "read_local", recording)
    got = reader.read(info, start, size)
    np.testing.assert_array_equal(got, expected_box(arr[...], start, size, 0))
    assert calls and len(calls) == reader.stats.requests
    assert len(set(r for _, r in calls)) == len(calls)  # no range read twice
    me = threading.current_thread().name  # the caller takes one share, the pool the rest
    assert all(name == me or name.startswith("lc-read") for name, _ in calls)


def test_reader_equals_zarr_on_store_arrays(small_chunk_store):
    store = livercube.open(small_chunk_store)
    reader = ShardReader(small_chunk_store)
    rng = np.random.default_rng(1)
    for path in store.paths()[:4]:
        for name in ("image", "label", "segments", "class_locations", "z"):
            arr = store.root[data_path(path)][name]
            info = ArrayInfo.from_metadata(f"{data_path(path)}/{name}", arr.metadata.to_dict())
            assert info.sharded == (name in ("image", "label", "segments"))
            full = arr[...]
            for start, size in random_boxes(rng, arr.shape, 5):
                np.testing.assert_array_equal(
                    reader.read(info, start, size, fill=3), expected_box(full, start, size, 3)
                )


def test_reader_caches_shard_index_and_chunks(small_chunk_store, tmp_path):
    store = livercube.open(small_chunk_store)
    path = store.paths()[0]
    arr = store.root[data_path(path)]["image"]
    info = ArrayInfo.from_metadata(f"{data_path(path)}/image", arr.metadata.to_dict())
    reader = ShardReader(small_chunk_store, cache_dir=str(tmp_path / "cache"), cache_bytes=2**20)
    first = reader.read(info, (0, 0, 0), arr.shape)
    n_index = reader.stats.index_requests
    assert n_index >= 1
    again = reader.read(info, (0, 0, 0), arr.shape)
    assert reader.stats.index_requests == n_index  # index read once per shard
    assert reader.stats.cache_hits > 0
    np.testing.assert_array_equal(first, again)
    # a new process-like reader (pickled) finds the chunks in the disk cache
    clone = pickle.loads(pickle.dumps(reader))
    np.testing.assert_array_equal(clone.read(info, (0, 0, 0), arr.shape), arr[...])
    assert clone.stats.requests == 0 and clone.stats.cache_hits > 0


# ---------------------------------------------------------------------------------- sampler
def test_patches_equal_direct_reads_with_border_padding(store):
    sampler = PatchSampler(store, patch_size=(16, 40, 40), seed=3, prefetch=4)
    assert sampler.image_dtype == np.int16
    borders = 0
    full = {}
    for sample in sampler.take(30):
        if sample["volume"] not in full:
            group = store.root[data_path(sample["volume"])]
            full[sample["volume"]] = group["image"][...], group["label"][...]
        image, label = full[sample["volume"]]
        start, size = tuple(sample["start"]), (16, 40, 40)
        img = expected_box(image, start, size, -1024)
        lab = expected_box(label, start, size, 0)
        np.testing.assert_array_equal(sample["image"][0], img)
        np.testing.assert_array_equal(sample["label"][0], lab)
        borders += any(s < 0 or s + k > n for s, k, n in zip(start, size, image.shape, strict=True))
    assert borders > 0  # volumes are smaller than the patch in z: padding was exercised


def test_where_selects_volumes(store):
    s = PatchSampler(store, where="phase == 'portal_venous' and annotated", seed=0)
    assert {v.phase for v in s.volumes} == {"portal_venous"}
    assert len(s.volumes) == 3
    with pytest.raises(ValueError):
        PatchSampler(store, where="phase == 'nope'")


def test_foreground_fraction_and_anchor_labels(store):
    sampler = PatchSampler(
        store,
        patch_size=PATCH,
        mode="foreground",
        foreground_fraction=0.4,
        seed=0,
    )
    n, fg = 600, 0
    for p in range(n):
        spec = sampler.spec(p)
        if spec.cls > 0:
            fg += 1
    assert abs(fg / n - 0.4) < 0.07
    for sample in sampler.take(40):
        if sample["cls"] > 0:
            at = tuple(np.asarray(sample["anchor"]) - sample["start"])
            assert sample["label"][0][at] == sample["cls"]


def test_class_weighted_balance(store):
    sampler = PatchSampler(
        store,
        where="patient_id != 'P0003'",  # these two patients have tumour (class 2)
        patch_size=PATCH,
        mode="class_weighted",
        class_weights={0: 1, 1: 1, 2: 2},
        seed=5,
    )
    counts = {-1: 0, 1: 0, 2: 0}
    n = 800
    for p in range(n):
        counts[sampler.spec(p).cls] += 1
    assert abs(counts[-1] / n - 0.25) < 0.06
    assert abs(counts[1] / n - 0.25) < 0.06
    assert abs(counts[2] / n - 0.5) < 0.06
    for sample in sampler.take(30):
        if sample["cls"] > 0:
            at = tuple(np.asarray(sample["anchor"]) - sample["start"])
            assert sample["label"][0][at] == sample["cls"]


def _same(a: list[dict], b: list[dict]) -> bool:
    return all(
        x["index"] == y["index"]
        and np.array_equal(x["image"], y["image"])
        and np.array_equal(x["label"], y["label"])
        for x, y in zip(a, b, strict=True)
    )


def test_determinism_ranks_and_resume(store):
    kw = {"patch_size": PATCH, "mode": "foreground", "prefetch": 3}
    a = PatchSampler(store, seed=11, **kw).take(12)
    b = PatchSampler(store, seed=11, **kw).take(12)
    c = PatchSampler(store, seed=12, **kw).take(12)
    assert _same(a, b)
    assert not any(np.array_equal(x["image"], y["image"]) for x, y in zip(a, c, strict=True))

    # ranks: disjoint global indices, rank r position p == single-process position p·W + r
    r0 = PatchSampler(store, seed=11, rank=0, world_size=2, **kw).take(6)
    r1 = PatchSampler(store, seed=11, rank=1, world_size=2, **kw).take(6)
    assert {s["index"] for s in r0}.isdisjoint({s["index"] for s in r1})
    assert _same(r0, a[0::2]) and _same(r1, a[1::2])

    # resume mid-stream: state = seed + position
    s = PatchSampler(store, seed=11, **kw)
    s.take(5)
    state = s.state_dict()
    assert state["position"] == 5
    resumed = PatchSampler(store, seed=0, **kw)
    resumed.load_state_dict(state)
    assert _same(resumed.take(7), a[5:12])

    # workers split positions in blocks, disjoint and covering
    seen = []
    for w in range(3):
        seen += list(s.positions(0, 20, worker=w, num_workers=3, block=4))
    assert sorted(seen) == list(range(20))

    # a sampler survives pickling (spawned DataLoader workers)
    clone = pickle.loads(pickle.dumps(s))
    assert _same([clone.patch(3)], [a[3]])


def test_numpy_batches(store):
    s = PatchSampler(store, patch_size=PATCH, seed=2)
    batch = next(s.batches(4))
    assert batch["image"].shape == (4, 1, *PATCH)
    assert batch["label"].shape == (4, 1, *PATCH)
    assert list(batch["position"]) == [0, 1, 2, 3]
    assert len(batch["volume"]) == 4


@pytest.fixture()
def shifted_store(small_chunk_store, tmp_path) -> tuple[str, tuple[int, int, int]]:
    """A copy where P0001's arterial image is its portal-venous image moved by a known shift
    (voxel k of arterial shows voxel k + shift of portal venous; origin moved to match)."""
    dest = tmp_path / "shift.zarr"
    shutil.copytree(small_chunk_store, dest)
    shift = (2, -3, 5)
    root = zarr.open_group(str(dest), mode="r+", zarr_format=3, use_consolidated=False)
    pv = root["plc-cect/P0001/CECT/C2/0/image"][...]
    art = root["plc-cect/P0001/CECT/C1/0/image"]
    moved = np.full(art.shape, 500, dtype=np.int16)  # 500: visibly wrong where not covered
    for k in np.ndindex(*art.shape):
        j = tuple(a + s for a, s in zip(k, shift, strict=True))
        if all(0 <= q < n for q, n in zip(j, pv.shape, strict=True)):
            moved[k] = pv[j]
    art[...] = moved
    paths = [str(p) for p in root["catalog/path"][...]]
    i_art, i_pv = paths.index("plc-cect/P0001/CECT/C1"), paths.index("plc-cect/P0001/CECT/C2")
    origin = root["catalog/origin"][...]
    spacing = root["catalog/spacing"][...]
    origin[i_art] = origin[i_pv] + np.array(shift) * spacing[i_pv]
    root["catalog/origin"][...] = origin
    return str(dest), shift


@pytest.mark.parametrize("interpolation", ["nearest", "linear"])
def test_multiphase_channels_are_geometrically_consistent(shifted_store, interpolation):
    url, shift = shifted_store
    sampler = PatchSampler(
        url,
        where="patient_id == 'P0001' and phase == 'portal_venous'",
        patch_size=PATCH,
        phases=["portal_venous", "arterial"],
        interpolation=interpolation,
        seed=4,
    )
    store = livercube.open(url)
    pv_full = store.volume("plc-cect/P0001/CECT/C2")["image"].values
    n = pv_full.shape
    n_art = store.root["plc-cect/P0001/CECT/C1/0/image"].shape
    compared = 0
    for sample in sampler.take(10):
        img = sample["image"]
        assert img.shape == (2, *PATCH)
        start = sample["start"]
        np.testing.assert_array_equal(img[0], expected_box(pv_full, tuple(start), PATCH, -1024))
        # the arterial channel shows the same anatomy where both volumes cover the voxel
        idx = np.indices(PATCH) + start.reshape(3, 1, 1, 1)
        inside = np.all([(idx[d] >= 0) & (idx[d] < n[d]) for d in range(3)], axis=0)
        art_idx = idx - np.array(shift).reshape(3, 1, 1, 1)
        covered = np.all([(art_idx[d] >= 0) & (art_idx[d] < n_art[d]) for d in range(3)], axis=0)
        both = inside & covered
        np.testing.assert_array_equal(img[1][both], img[0][both])
        assert np.all(img[1][~covered] == -1024)
        compared += int(both.sum())
    assert compared > 0


def test_target_spacing_resamples_on_the_fly(store):
    sampler = PatchSampler(
        store,
        patch_size=(4, 10, 10),
        spacing=(2.0, 2.0, 2.0),
        interpolation="nearest",
        seed=1,
    )
    for sample in sampler.take(6):
        vol = next(v for v in sampler.volumes if v.path == sample["volume"])
        group = store.root[data_path(vol.path)]
        lab, img = group["label"][...], group["image"][...]
        spec = sampler.spec(int(sample["position"]))
        assert spec.size == (8, 20, 20)  # 4×10×10 voxels of 2 mm cover 8×20×20 of 1 mm
        grid = sampler._grid_mm(spec)
        idx = [
            np.floor((g - o) / s + 0.5).astype(int)
            for g, o, s in zip(grid, vol.origin, vol.spacing, strict=True)
        ]
        ii = np.meshgrid(*idx, indexing="ij")
        ok = np.all([(ii[d] >= 0) & (ii[d] < lab.shape[d]) for d in range(3)], axis=0)
        clipped = tuple(np.clip(ii[d], 0, lab.shape[d] - 1) for d in range(3))
        np.testing.assert_array_equal(sample["label"][0], np.where(ok, lab[clipped], 0))
        np.testing.assert_array_equal(sample["image"][0], np.where(ok, img[clipped], -1024))


def test_core_imports_without_torch():
    code = (
        "import sys, livercube.sampling as s; "
        "assert 'torch' not in sys.modules; print(s.PatchSampler.__name__)"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert Path(sys.executable).exists()
