"""The store contract (schemas/store-contract.md), checked on a converted store."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr
from volume_factory import phantom_volume

import livercube
from livercube.errors import StoreError, VolumeNotFoundError
from livercube.schema import PHASES, unified_labels
from livercube.store.catalog import write_catalog
from livercube.store.chunking import chunk_and_shard
from livercube.store.layout import data_path, sanitize, volume_path
from livercube.volumes.volume import SegmentField, content_checksum, unified_label_map

PLAIN_XARRAY = r"""
import sys, json, numpy as np, xarray as xr
url = sys.argv[1]
cat = xr.open_zarr(url, group="catalog", zarr_format=3)
path = str(cat["path"].values[0])
ds = xr.open_zarr(url, group=path + "/0", zarr_format=3)
# the same groups opened by their own paths, as the README shows: no root document read, and
# no fallback warning (each group consolidates its own metadata)
import warnings
with warnings.catch_warnings():
    warnings.simplefilter("error", RuntimeWarning)
    assert xr.open_zarr(url + "/catalog", zarr_format=3).identical(cat)
    assert xr.open_zarr(url + "/" + path + "/0", zarr_format=3).identical(ds)
tree = xr.open_datatree(url, engine="zarr")
print(json.dumps({
    "livercube_imported": "livercube" in sys.modules,
    "catalog_vars": sorted(cat.data_vars),
    "catalog_dims": dict(cat.sizes),
    "image_dims": list(ds.image.dims), "image_dtype": str(ds.image.dtype),
    "label_dtype": str(ds.label.dtype),
    "z_units": ds.z.attrs.get("units"),
    "z0": float(ds.z.values[0]), "origin_z": float(cat.origin.values[0][0]),
    "spacing_z": float(cat.spacing.values[0][0]), "dz": float(ds.z.values[1] - ds.z.values[0]),
    "tree_has_volume": path in [n.path.strip("/") for n in tree.subtree],
}))
"""


def test_plain_xarray_opens_everything_without_livercube(plc_store, tmp_path):
    url, _ = plc_store
    script = tmp_path / "plain.py"
    script.write_text(PLAIN_XARRAY)
    out = subprocess.run(
        [sys.executable, "-I", str(script), url],
        capture_output=True,
        text=True,
        check=True,
        cwd=tmp_path,
    )
    info = json.loads(out.stdout.strip().splitlines()[-1])
    assert info["livercube_imported"] is False
    required = {
        "collection",
        "patient_id",
        "study_date",
        "series_number",
        "phase",
        "spacing",
        "origin",
        "extent",
        "annotated",
        "path",
        "checksum",
    }
    assert required <= set(info["catalog_vars"])
    assert info["catalog_dims"] == {"volume": 12, "axis": 3}
    assert info["image_dims"] == ["z", "y", "x"] and info["image_dtype"] == "int16"
    assert info["label_dtype"] == "uint8" and info["z_units"] == "mm"
    assert info["z0"] == pytest.approx(info["origin_z"])
    assert info["dz"] == pytest.approx(info["spacing_z"])
    assert info["tree_has_volume"]


def test_volume_groups_are_valid_ome_zarr_05(plc_store):
    from ome_zarr_models.v05.image import Image

    url, _ = plc_store
    store = livercube.open(url)
    for path in store.paths()[:3]:
        group = zarr.open_group(url, path=path, mode="r", zarr_format=3)
        image = Image.from_zarr(group)  # raises on any contract violation
        ms = group.attrs["ome"]["multiscales"][0]
        assert [a["name"] for a in ms["axes"]] == ["z", "y", "x"]
        assert all(a["unit"] == "millimeter" for a in ms["axes"])
        scale, translation = ms["datasets"][0]["coordinateTransformations"]
        i = store.paths().index(path)
        np.testing.assert_allclose(scale["scale"], store.catalog.spacing.values[i])
        np.testing.assert_allclose(translation["translation"], store.catalog.origin.values[i])
        assert image is not None


def test_arrays_are_sharded_and_chunked_for_patches(plc_store):
    url, _ = plc_store
    path = livercube.open(url).paths()[0]
    arr = zarr.open_array(url, path=f"{data_path(path)}/image", mode="r", zarr_format=3)
    assert arr.shards is not None
    assert arr.metadata.dimension_names == ("z", "y", "x")
    chunks, shards = chunk_and_shard((100, 512, 512))
    assert chunks == (32, 64, 64) and shards == (64, 512, 512)
    chunks, shards = chunk_and_shard((7, 20, 30))
    assert chunks == (7, 20, 30) and shards == (7, 20, 30)
    for shape in [(1, 1, 1), (33, 65, 129), (240, 512, 512), (18, 512, 512)]:
        c, s = chunk_and_shard(shape)
        assert all(si % ci == 0 for si, ci in zip(s, c, strict=True))


def test_catalog_fields_and_phase_vocabulary(plc_store):
    url, _ = plc_store
    cat = livercube.open(url).catalog
    assert set(cat.phase.values.astype(str)) <= set(PHASES)
    assert list(cat.axis.values) == ["z", "y", "x"]
    assert cat.extent.dtype == np.int64 and cat.spacing.dtype == np.float64
    assert all(str(c).startswith("blake3:") for c in cat.checksum.values)
    assert set(cat.collection.values.astype(str)) == {"plc-cect"}


def test_checksums_match_content(plc_store):
    url, _ = plc_store
    store = livercube.open(url)
    for i in range(3):
        ds = store.volume(i)
        arrays = {n: ds[n].values for n in ("image", "label", "segments") if n in ds}
        assert content_checksum(arrays) == str(store.catalog.checksum.values[i])


def test_checksum_is_blake3_of_the_bytes_the_contract_names(plc_store):
    """The stored checksum recomputed by hand from the contract's words, with the blake3
    package directly: names in order, ``name:dtype.str:shape;``, then the C-order bytes."""
    import blake3

    url, _ = plc_store
    store = livercube.open(url)
    ds = store.volume(0)
    h = blake3.blake3()
    for name in ("image", "label", "segments"):
        a = np.ascontiguousarray(ds[name].values)
        h.update(f"{name}:{a.dtype.str}:{a.shape};".encode() + a.tobytes())
    assert str(store.catalog.checksum.values[0]) == "blake3:" + h.hexdigest()


def test_segments_recover_overlaps_and_instances():
    """Two overlapping tumour instances inside a liver stay separable; label follows precedence."""
    shape = (4, 6, 6)
    liver = np.zeros(shape, bool)
    liver[:, 1:5, 1:5] = True
    t1 = np.zeros(shape, bool)
    t1[1:3, 2:4, 2:4] = True
    t2 = np.zeros(shape, bool)
    t2[2:4, 3:5, 3:5] = True  # overlaps t1 and pokes outside the liver
    aorta = np.zeros(shape, bool)
    aorta[:, 0, 0] = True
    f = SegmentField(shape, 4)
    for m, lab, u in (
        (liver, "Liver", 1),
        (t1, "Tumor_1", 2),
        (t2, "Tumor_2", 2),
        (aorta, "Abdominal aorta", 5),
    ):
        f.add(m, label=lab, number=1, unified=u)
    np.testing.assert_array_equal(f.mask(1), t1)
    np.testing.assert_array_equal(f.mask(2), t2)
    label = unified_label_map(f.bits, f.segments)
    assert (label[t1 | t2] == 2).all() and (label[aorta] == 5).all()
    assert (label[liver & ~(t1 | t2)] == 1).all() and (label[~(liver | t1 | t2 | aorta)] == 0).all()
    assert unified_labels()[2] == "tumor"


def test_segment_added_within_its_box_equals_adding_the_whole_mask():
    """A segment OR-ed in through its bounding box sets exactly the bits (and counts exactly
    the voxels) the whole-volume pass does, and leaves other segments' bits alone."""
    rng = np.random.default_rng(3)
    shape = (9, 7, 5)
    liver = rng.random(shape) < 0.5
    tumour = np.zeros(shape, bool)
    box = (slice(2, 5), slice(1, 6), slice(0, 3))
    tumour[box] = rng.random((3, 5, 3)) < 0.4
    whole, boxed = SegmentField(shape, 3), SegmentField(shape, 3)
    for f, within in ((whole, None), (boxed, box)):
        f.add(liver, label="Liver", number=1, unified=1)
        f.add(tumour, label="Tumor", number=2, unified=2, within=within)
        f.add(np.zeros(shape, bool), label="Empty", number=3, unified=3, within=(slice(0, 0),) * 3)
    np.testing.assert_array_equal(boxed.bits, whole.bits)
    assert [s.voxels for s in boxed.segments] == [s.voxels for s in whole.segments]
    assert boxed.segments[1].voxels == int(tumour.sum()) > 0 and boxed.segments[2].voxels == 0
    np.testing.assert_array_equal(boxed.mask(0), liver)


@pytest.mark.parametrize("n_segments", [3, 12, 40])
def test_every_segment_reads_back_exactly_at_every_bit_width(n_segments):
    """Overlapping ragged masks, each added through its own box, spanning several of the
    field's slabs: each bit reads back as its mask (uint8, uint16 and uint64 fields alike)."""
    rng = np.random.default_rng(n_segments)
    shape = (21, 6, 5)
    field_ = SegmentField(shape, n_segments)
    masks = []
    for k in range(n_segments):
        lo = [int(rng.integers(0, n)) for n in shape]
        box = tuple(
            slice(a, int(rng.integers(a + 1, n + 1))) for a, n in zip(lo, shape, strict=True)
        )
        m = np.zeros(shape, bool)
        m[box] = rng.random(m[box].shape) < 0.6
        masks.append(m)
        field_.add(m, label=f"S{k}", number=k + 1, unified=1, within=box)
    assert field_.bits.dtype.itemsize == {3: 1, 12: 2, 40: 8}[n_segments]
    for k, m in enumerate(masks):
        np.testing.assert_array_equal(field_.mask(k), m, err_msg=f"segment {k}")
        assert field_.segments[k].voxels == int(m.sum())


def test_segment_bits_grow_to_64_then_refuse():
    from livercube.errors import SegmentLimitError
    from livercube.volumes.volume import bits_dtype

    assert bits_dtype(8) == np.uint8 and bits_dtype(9) == np.uint16 and bits_dtype(40) == np.uint64
    with pytest.raises(SegmentLimitError):
        bits_dtype(65)


@pytest.mark.parametrize(
    "raw,expected",
    [
        ("Recon 2: LIVER 3 PHASE (AP)", "Recon_2_LIVER_3_PHASE_AP"),
        ("../../etc", "etc"),
        ("a/b\\c", "a_b_c"),
        ("", "NA"),
        ("..", "NA"),
        (300, "300"),
    ],
)
def test_names_are_sanitized(raw, expected):
    assert sanitize(raw) == expected


def test_volume_path_has_four_safe_components():
    p = volume_path("crlm", "CRLM-CT-1001", "1.2.3/..", "Bind(17095/4/277..465)")
    assert p.count("/") == 3 and ".." not in p.split("/")


def test_incomplete_volume_is_invisible(plc_store, tmp_path):
    """A group without its completion record (interrupted write) never reaches the catalog."""
    import shutil

    url, _ = plc_store
    dst = tmp_path / "copy.zarr"
    shutil.copytree(url, dst)
    store = livercube.open(str(dst))
    victim = store.paths()[0]
    meta_file = Path(dst, victim, "zarr.json")
    meta = json.loads(meta_file.read_text())
    meta["attributes"]["livercube"]["status"] = "writing"
    del meta["attributes"]["livercube"]["complete"]
    meta_file.write_text(json.dumps(meta))
    write_catalog(str(dst))
    again = livercube.open(str(dst))
    assert victim not in again.paths() and len(again.paths()) == len(store.paths()) - 1
    with pytest.raises(VolumeNotFoundError):
        again.volume(victim)


def test_store_errors_are_specific(tmp_path):
    with pytest.raises(StoreError):
        livercube.open(str(tmp_path / "nothing-here.zarr")).catalog  # noqa: B018


def test_store_conforms_to_the_written_contract(plc_store):
    from livercube.store.contract import check_store

    url, _ = plc_store
    assert check_store(url) == []


def test_contract_checker_catches_violations(plc_store, tmp_path):
    """The checker is not a rubber stamp: a wrong phase and a wrong coordinate are caught."""
    import shutil

    from livercube.store.contract import check_store

    url, _ = plc_store
    dst = tmp_path / "bad.zarr"
    shutil.copytree(url, dst)
    victim = livercube.open(str(dst)).paths()[0]
    meta_file = Path(dst, victim, "zarr.json")
    meta = json.loads(meta_file.read_text())
    meta["attributes"]["livercube"]["phase"] = "venous-ish"
    meta_file.write_text(json.dumps(meta))
    second = data_path(livercube.open(str(dst)).paths()[1])
    zarr.open_array(str(dst), path=f"{second}/z", mode="r+")[0] = 999.0
    problems = check_store(str(dst))
    assert any("phase" in p and "venous-ish" in p for p in problems)
    assert any("coordinate z disagrees" in p for p in problems)


def test_contract_checker_requires_the_catalogs_own_consolidated_metadata(plc_store, tmp_path):
    """Readers open the catalog from its own document; a catalog without one (or with a stale
    one) would send them to the root document, which describes every volume."""
    import shutil

    from livercube.store.contract import check_store

    url, _ = plc_store
    for damage in ("strip", "stale"):
        dst = tmp_path / f"{damage}.zarr"
        shutil.copytree(url, dst)
        doc_file = dst / "catalog" / "zarr.json"
        doc = json.loads(doc_file.read_text())
        if damage == "strip":
            doc.pop("consolidated_metadata")
        else:
            doc["consolidated_metadata"]["metadata"].pop("phase")
        doc_file.write_text(json.dumps(doc))
        problems = check_store(str(dst))
        expected = "no consolidated metadata" if damage == "strip" else "['phase']"
        assert any("catalog" in p and expected in p for p in problems), problems


def test_class_locations_point_at_their_class(plc_store):
    url, _ = plc_store
    store = livercube.open(url)
    for i in range(4):
        ds = store.volume(i)
        label = ds.label.values
        loc = ds.class_locations.values
        assert ds.class_locations.dims == ("location", "component")
        assert set(loc[:, 0].tolist()) == set(np.unique(label[label > 0]).tolist())
        np.testing.assert_array_equal(label[loc[:, 1], loc[:, 2], loc[:, 3]], loc[:, 0])


def test_class_locations_are_capped_and_deterministic():
    from livercube.volumes.volume import class_locations

    label = np.zeros((20, 30, 30), np.uint8)
    label[2:18, 5:25, 5:25] = 1
    label[8:10, 8:10, 8:10] = 2
    a = class_locations(label, per_class=500)
    b = class_locations(label, per_class=500)
    np.testing.assert_array_equal(a, b)
    assert (a[:, 0] == 1).sum() == 500 and (a[:, 0] == 2).sum() == 8
    assert len(np.unique(a[a[:, 0] == 1], axis=0)) == 500  # no duplicates


def test_occupied_box_gives_the_labels_and_locations_of_the_whole_volume():
    """Painting the label and picking class locations inside the field's occupied box (set
    by the segments' own boxes) gives exactly what whole-volume passes give."""
    from livercube.volumes.volume import class_locations

    rng = np.random.default_rng(7)
    shape = (30, 40, 50)
    field_ = SegmentField(shape, 3)
    boxes = [
        (slice(5, 20), slice(8, 30), slice(10, 44)),
        (slice(9, 12), slice(10, 14), slice(20, 26)),
        (slice(18, 27), slice(2, 9), slice(30, 49)),
    ]
    for k, box in enumerate(boxes):
        m = np.zeros(shape, bool)
        m[box] = rng.random(m[box].shape) < 0.5
        field_.add(m, label=f"S{k}", number=k + 1, unified=(1, 2, 5)[k], within=box)
    assert field_.occupied == (slice(5, 27), slice(2, 30), slice(10, 49))
    whole = unified_label_map(field_.bits, field_.segments)
    boxed = unified_label_map(field_.bits, field_.segments, within=field_.occupied)
    np.testing.assert_array_equal(boxed, whole)
    np.testing.assert_array_equal(
        class_locations(whole, per_class=300, within=field_.occupied),
        class_locations(whole, per_class=300),
    )
    empty = SegmentField(shape, 1)
    empty.add(np.zeros(shape, bool), label="E", number=1, unified=1)
    assert empty.occupied == (slice(0, 0),) * 3  # an empty segment occupies nothing
    assert class_locations(np.zeros(shape, np.uint8), within=empty.occupied).shape == (0, 4)


@pytest.mark.parametrize("shape", [(0, 4, 4), (1, 3, 3), (16, 5, 5), (17, 5, 5), (40, 9, 7)])
def test_foreground_indices_equal_numpys_across_slab_edges(shape):
    """The slabbed foreground search finds exactly ``np.flatnonzero``'s voxels, in order,
    with classes up to 255 and foreground on the first and last voxel."""
    from livercube.volumes.volume import _flat_foreground

    rng = np.random.default_rng(sum(shape))
    label = (rng.random(shape) < 0.2).astype(np.uint8) * rng.integers(1, 256, shape, np.uint8)
    if label.size:
        label.flat[0] = label.flat[-1] = 255
    got = _flat_foreground(label)
    np.testing.assert_array_equal(got, np.flatnonzero(label))
    assert got.dtype == np.intp


def test_interrupted_upload_leaves_an_invisible_group(plc_store, tmp_path):
    """Arrays uploaded but no group document (the writer was killed): not a volume."""
    import shutil

    url, _ = plc_store
    dst = tmp_path / "copy.zarr"
    shutil.copytree(url, dst)
    victim = livercube.open(str(dst)).paths()[2]
    Path(dst, victim, "zarr.json").unlink()
    write_catalog(str(dst))
    store = livercube.open(str(dst))
    assert victim not in store.paths() and len(store.paths()) == 11
    from livercube.store.contract import check_store

    assert check_store(str(dst)) == []


def _big_volume():
    return phantom_volume()


def test_browse_pyramid_levels_validate_and_share_the_grid(tmp_path):
    from ome_zarr_models.common.omero import Omero
    from ome_zarr_models.v05.image import Image

    from livercube.store.pyramid import pyramid_factors, window_bounds
    from livercube.store.writer import write_volume

    vol = _big_volume()
    url = str(tmp_path / "s.zarr")
    zarr.open_group(url, mode="w", zarr_format=3)
    rec = write_volume(url, vol, fingerprint="x")
    write_catalog(url)
    group = zarr.open_group(url, path=rec["path"], mode="r", zarr_format=3)
    Image.from_zarr(group)
    # z (1 mm) halves along with the 1.4 mm in-plane axes while it stays the finer one
    assert pyramid_factors((24, 300, 260), (1.0, 1.4, 1.4)) == [(2, 2, 2), (4, 4, 4)]
    assert pyramid_factors((24, 512, 512), (5.0, 0.7, 0.7)) == [(1, 2, 2), (1, 4, 4)]
    assert pyramid_factors((24, 128, 128), (5.0, 0.7, 0.7)) == []
    ms = group.attrs["ome"]["multiscales"][0]["datasets"]
    assert [d["path"] for d in ms] == ["0/image", "1/image", "2/image"]
    np.testing.assert_allclose(ms[2]["coordinateTransformations"][0]["scale"], [4.0, 5.6, 5.6])
    lvl2 = group["2/image"][...]
    np.testing.assert_array_equal(lvl2, vol.image[::4, ::4, ::4])
    np.testing.assert_array_equal(group["2/z"][...], group["0/z"][...][::4])
    np.testing.assert_array_equal(group["2/label"][...], vol.label()[::4, ::4, ::4])
    np.testing.assert_array_equal(group["0/label"][...], vol.label())
    # viewers open with the CT soft-tissue window
    window = Omero.model_validate(group.attrs["ome"]["omero"]).channels[0].window
    assert (window.start, window.end) == window_bounds() == (-160.0, 240.0)
    # plain xarray still sees one consistent Dataset at the full-resolution group
    store = livercube.open(url)
    assert set(store.volume(0).data_vars) >= {"image", "label", "segments"}
    from livercube.store.contract import check_store

    assert check_store(url) == []


def test_contract_checker_catches_a_tree_datatree_cannot_open(tmp_path):
    """The 1.x layout (browse levels as arrays beside the data) is reported, not accepted."""
    from livercube.store.contract import dimension_conflicts

    root = zarr.open_group(str(tmp_path / "t.zarr"), mode="w", zarr_format=3)
    vol = root.create_group("v")
    vol.create_array("image", shape=(4, 8, 8), dtype="int16", dimension_names=("z", "y", "x"))
    pyr = vol.create_group("pyramid")
    pyr.create_array("1", shape=(4, 4, 4), dtype="int16", dimension_names=("z", "y", "x"))
    sibling = root.create_group("w")
    for k, n in enumerate((8, 4)):
        level = sibling.create_group(str(k))
        level.create_array("image", shape=(4, n, n), dtype="int16", dimension_names=("z", "y", "x"))
    problems = dimension_conflicts(root)
    assert problems and all(p.startswith("/v/pyramid/1:") for p in problems)
    assert any("y=4 conflicts with y=8" in p for p in problems)


FULL_SIZE = r"""
import json, sys, xarray as xr
url, path = sys.argv[1], sys.argv[2]
tree = xr.open_datatree(url, engine="zarr")
levels = [n for n in tree[path].children if n.isdigit()]
print(json.dumps({
    "livercube_imported": "livercube" in sys.modules,
    "levels": {k: dict(tree[f"{path}/{k}"].dataset.sizes) for k in levels},
    "image_level0": list(tree[f"{path}/0"].image.shape),
    "z1": tree[f"{path}/1"].z.values.tolist(),
}))
"""


@pytest.mark.slow
def test_full_size_store_opens_as_datatree_and_validates_as_ome(tmp_path):
    """A 512² volume (two browse levels): plain DataTree and OME-Zarr 0.5 both accept it."""
    from ome_zarr_models.v05.image import Image

    from livercube.store.writer import write_volume

    vol = phantom_volume(shape=(8, 512, 512), spacing=(2.5, 0.7, 0.7))
    url = str(tmp_path / "full.zarr")
    zarr.open_group(url, mode="w", zarr_format=3)
    rec = write_volume(url, vol, fingerprint="x")
    write_catalog(url)
    script = tmp_path / "tree.py"
    script.write_text(FULL_SIZE)
    out = subprocess.run(
        [sys.executable, "-I", str(script), url, rec["path"]],
        capture_output=True,
        text=True,
        check=True,
        cwd=tmp_path,
    )
    info = json.loads(out.stdout.strip().splitlines()[-1])
    assert info["livercube_imported"] is False
    assert info["image_level0"] == [8, 512, 512]
    sizes = {k: (v["z"], v["y"], v["x"]) for k, v in info["levels"].items()}
    assert sizes == {"0": (8, 512, 512), "1": (8, 256, 256), "2": (8, 128, 128)}
    np.testing.assert_allclose(info["z1"], vol.grid.centres(0))
    group = zarr.open_group(url, path=rec["path"], mode="r", zarr_format=3)
    image = Image.from_zarr(group)
    assert len(image.datasets[0]) == 3
    from livercube.store.contract import check_store

    assert check_store(url) == []


def test_resume_rewrites_volumes_of_an_older_layout(tmp_path):
    """A complete volume written by a 1.x livercube is not "unchanged": its layout is gone."""
    from livercube.convert import _existing_fingerprint
    from livercube.store.location import StoreLocation
    from livercube.store.writer import write_volume

    url = str(tmp_path / "s.zarr")
    zarr.open_group(url, mode="w", zarr_format=3)
    rec = write_volume(url, phantom_volume(shape=(4, 32, 32)), fingerprint="fp")
    assert _existing_fingerprint(StoreLocation.of(url), rec["path"]) == "fp"
    doc = Path(url, rec["path"], "zarr.json")
    meta = json.loads(doc.read_text())
    meta["attributes"]["livercube"]["schema_version"] = "1.0"
    doc.write_text(json.dumps(meta))
    assert _existing_fingerprint(StoreLocation.of(url), rec["path"]) is None


def test_consolidation_note_is_silenced_without_per_call_filters():
    """zarr's "consolidated metadata is not in the v3 spec" note never reaches the CLI's
    output: one exact-text filter installed with the store layer, not a thread-unsafe
    ``catch_warnings`` per call (pytest resets filters per test, hence a fresh process)."""
    import subprocess
    import sys

    code = (
        "import livercube.store.location, zarr\n"
        "from zarr.storage import MemoryStore\n"
        "s = MemoryStore()\n"
        "zarr.open_group(s, mode='w', zarr_format=3).create_group('a')\n"
        "zarr.consolidate_metadata(s, zarr_format=3)\n"
        "import warnings; warnings.warn('control: other warnings still show')\n"
    )
    res = subprocess.run(
        [sys.executable, "-W", "default", "-c", code], capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stderr
    assert "Consolidated metadata" not in res.stderr, res.stderr
    assert "control: other warnings still show" in res.stderr


def test_catalog_columns_built_as_ready_variables_equal_xarrays_own_conversion():
    """The catalog hands xarray finished Variables (skipping its dask check); the Dataset
    must be exactly what xarray's own conversion of the same columns gives."""
    import xarray as xr

    from livercube.store.catalog import _variables

    spec = {
        "path": ("volume", np.array(["a/0", "b/0", ""], dtype=object)),
        "when": ("volume", np.array(["2001-02-03", "NaT", "1999-12-31"], dtype="datetime64[ns]")),
        "age": ("volume", np.array([61.0, np.nan, 7.5]), {"units": "years"}),
        "n": ("volume", np.array([1, -1, 3], dtype=np.int64)),
        "ok": ("volume", np.array([True, False, True])),
        "spacing": (("volume", "axis"), np.arange(9.0).reshape(3, 3), {"units": "mm"}),
    }
    coords = {"axis": (("axis",), np.array(["z", "y", "x"], dtype=object))}
    ours = xr.Dataset(_variables(spec), coords=_variables(coords))
    theirs = xr.Dataset(spec, coords={"axis": coords["axis"][1]})
    xr.testing.assert_identical(ours, theirs)
    assert {k: v.dtype for k, v in ours.variables.items()} == {
        k: v.dtype for k, v in theirs.variables.items()
    }
    with pytest.raises(TypeError, match="'n' must be a numpy array"):
        _variables({"n": ("volume", [1, 2])})


def test_writing_the_catalog_does_not_import_dask_array(plc_store, tmp_path):
    """xarray imports dask.array (and scipy) the first time it checks a column for dask:
    ~0.4 CPU s of every ``convert`` run.  Rebuilding a catalog must not pay it."""
    import shutil

    url, _ = plc_store
    copy = tmp_path / "store.zarr"
    shutil.copytree(url, copy)
    code = (
        "import sys; from livercube.store.catalog import write_catalog; "
        "ds = write_catalog(sys.argv[1]); assert ds.sizes['volume'] > 0; "
        "print('dask.array' in sys.modules, 'scipy' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(copy)], capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == ["False", "False"], out.stdout + out.stderr


def test_segment_bits_change_only_through_add():
    """The occupied box the writer trusts covers every set bit only if bits are set through
    add(): writing them directly is refused, not silently left out of the store."""
    field_ = SegmentField((4, 5, 6), 2)
    with pytest.raises(ValueError, match="read-only"):
        field_.bits[0, 0, 0] = 1
    m = np.zeros((4, 5, 6), bool)
    m[1, 2, 3] = True
    field_.add(m, label="L", number=1, unified=1, within=(slice(1, 2), slice(2, 3), slice(3, 4)))
    assert field_.bits[1, 2, 3] == 1 and not field_.bits.flags.writeable
    with pytest.raises(ValueError, match="read-only"):
        field_.bits |= 2


def test_a_subsampled_box_holds_every_voxel_the_level_takes_from_the_box():
    from livercube.store.pyramid import subsample, subsampled_box

    rng = np.random.default_rng(5)
    shape = (23, 17, 19)
    for _ in range(50):
        lo = [int(rng.integers(0, n)) for n in shape]
        box = tuple(slice(a, int(rng.integers(a, n + 1))) for a, n in zip(lo, shape, strict=True))
        factor = tuple(int(f) for f in rng.integers(1, 5, 3))
        level0 = np.zeros(shape, np.uint8)
        level0[box] = 1
        level = subsample(level0, factor)
        inside = np.zeros(level.shape, bool)
        inside[subsampled_box(box, factor)] = True
        np.testing.assert_array_equal(level.astype(bool), inside, err_msg=f"{box} {factor}")
    assert subsampled_box(None, (1, 2, 2)) is None
