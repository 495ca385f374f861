"""Going back out: NIfTI and nnU-Net exports, the MONAI reader and the TorchIO subject, each
checked with the real third-party readers against the store's own coordinates and voxels."""

from __future__ import annotations

import csv
import io
import json
import pickle
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from volume_factory import phantom_volume

import livercube
from livercube.cli import main
from livercube.convert import convert
from livercube.export import export
from livercube.export.geometry import ras_affine, volume_grid
from livercube.schema import unified_labels
from livercube.store.catalog import write_catalog
from livercube.store.writer import write_volume
from livercube.volumes.geometry import Grid

#: Distinct, anisotropic spacings (z, y, x) per PLC-CECT phase code, y != x, so a swapped or
#: mis-signed axis and an off-grid resampling all show up.
PHASE_SPACING = {
    "C1": (2.0, 0.8, 0.7),
    "C2": (2.5, 0.75, 0.9),
    "C3": (1.5, 0.7, 0.8),
    "P": (3.0, 0.9, 0.85),
}


@pytest.fixture(scope="module")
def store_url(plc_release, tmp_path_factory) -> str:
    """The tiny PLC release converted with true (anisotropic) spacings per phase, plus two
    small CRLM volumes written straight through the store writer: one not annotated, one
    annotated portal-venous volume alone in its study (so it has no arterial partner)."""
    root, truth = plc_release
    tmp = tmp_path_factory.mktemp("export")
    order = {
        (r["patient_id"], r["phase"]): r["slice_order"]
        for r in csv.DictReader(io.StringIO(truth.overrides_csv))
    }
    lines = ["patient_id,phase,slice_order,spacing_z,spacing_y,spacing_x"]
    for patient in ("P0001", "P0002", "P0003"):
        for code, sp in PHASE_SPACING.items():
            so = order.get((patient, code), "")
            lines.append(f"{patient},{code},{so},{sp[0]},{sp[1]},{sp[2]}")
    overrides = tmp / "overrides.csv"
    overrides.write_text("\n".join(lines) + "\n")
    url = str(tmp / "store.zarr")
    report = convert(str(root), url, "plc-cect", overrides=str(overrides), progress=False)
    assert report.exit_code == 0, report.summary()
    for patient, annotated in (("CRLM-CT-1001", False), ("CRLM-CT-1002", True)):
        vol = phantom_volume(
            "crlm",
            patient,
            "7",
            shape=(10, 60, 56),
            spacing=(5.0, 4.0, 3.5),
            annotated=annotated,
            seed=5,
        )
        write_volume(url, vol, fingerprint="x")
    write_catalog(url)
    return url


@pytest.fixture(scope="module")
def store(store_url) -> livercube.Store:
    return livercube.open(store_url)


@pytest.fixture(scope="module")
def nifti_export(store_url, tmp_path_factory) -> Path:
    dest = tmp_path_factory.mktemp("nifti") / "out"
    result = export(store_url, dest, "nifti", segments=True)
    assert len(result.written) == 14
    return dest


def world_ras(store, path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """RAS mm of the voxel centres along i (= x), j (= y), k (= z), from the store's coords."""
    ds = store.volume(path)
    return -ds["x"].values, -ds["y"].values, ds["z"].values


def float32_affine(grid: Grid) -> np.ndarray:
    """What NIfTI-1 can hold of an affine: its float32 rounding."""
    return ras_affine(grid).astype(np.float32).astype(np.float64)


# ------------------------------------------------------------------------------ geometry
def test_ras_affine_maps_indices_to_lps_coordinates_with_x_and_y_negated():
    grid = Grid((7, 5, 4), (2.5, 0.8, 0.7), (-12.25, 30.5, -101.0))
    affine = ras_affine(grid)
    ijk = np.array([[0, 0, 0], [3, 4, 6], [1, 2, 3]])
    ras = (affine @ np.c_[ijk, np.ones(len(ijk))].T).T[:, :3]
    for (i, j, k), (r, a, s) in zip(ijk, ras, strict=True):
        assert r == pytest.approx(-grid.centres(2)[i])
        assert a == pytest.approx(-grid.centres(1)[j])
        assert s == pytest.approx(grid.centres(0)[k])


# ---------------------------------------------------------------------------------- NIfTI
def test_nifti_voxels_and_affine_in_nibabel(store, nifti_export):
    manifest = json.loads((nifti_export / "livercube-export.json").read_text())
    assert [w["path"] for w in manifest["written"]] == store.paths()
    for path in store.paths():
        ds = store.volume(path)
        grid = volume_grid(store.volume_attrs(path))
        ri, rj, rk = world_ras(store, path)
        for name, dtype in (("image", np.int16), ("label", np.uint8)):
            file = nifti_export / path / f"{name}.nii.gz"
            if name not in ds:
                assert not file.exists()
                continue
            img = nib.load(file)
            assert img.get_data_dtype() == dtype
            assert int(img.header["sform_code"]) == 1 and int(img.header["qform_code"]) == 1
            data = np.asanyarray(img.dataobj)
            assert data.dtype == dtype  # never rescaled
            np.testing.assert_array_equal(data.transpose(2, 1, 0), ds[name].values)
            np.testing.assert_array_equal(img.affine, float32_affine(grid))
            np.testing.assert_allclose(img.get_qform(), img.affine, atol=1e-5)
            n = np.array(data.shape)
            ijk = np.array([[0, 0, 0], n - 1, n // 2, [n[0] - 1, 0, n[2] // 3]])
            ras = nib.affines.apply_affine(img.affine, ijk)
            expected = np.c_[ri[ijk[:, 0]], rj[ijk[:, 1]], rk[ijk[:, 2]]]
            np.testing.assert_allclose(ras, expected, atol=1e-4)


def test_nifti_in_simpleitk_oriented_to_lps(store, nifti_export):
    for path in store.paths():
        ds = store.volume(path)
        x, y, z = ds["x"].values, ds["y"].values, ds["z"].values
        for name in ("image", "label"):
            if name not in ds:
                continue
            im = sitk.DICOMOrient(
                sitk.ReadImage(str(nifti_export / path / f"{name}.nii.gz")), "LPS"
            )
            np.testing.assert_array_equal(sitk.GetArrayFromImage(im), ds[name].values)
            np.testing.assert_allclose(im.GetDirection(), np.eye(3).ravel(), atol=1e-6)
            np.testing.assert_allclose(im.GetOrigin(), (x[0], y[0], z[0]), atol=1e-4)
            for i, j, k in ((0, 0, 0), (len(x) - 1, len(y) - 1, len(z) - 1), (3, 1, 2)):
                np.testing.assert_allclose(
                    im.TransformIndexToPhysicalPoint((i, j, k)), (x[i], y[j], z[k]), atol=1e-4
                )


def test_nifti_in_torchio(store, nifti_export):
    import torchio as tio

    for path in store.paths():
        ds = store.volume(path)
        sp = store.volume_attrs(path)["spacing_zyx"]
        ri, rj, rk = world_ras(store, path)
        image = tio.ScalarImage(nifti_export / path / "image.nii.gz")
        np.testing.assert_array_equal(image.data[0].numpy().transpose(2, 1, 0), ds["image"].values)
        assert image.orientation == ("L", "P", "S")
        np.testing.assert_allclose(image.spacing, sp[::-1], atol=1e-5)
        np.testing.assert_allclose(image.affine[:3, 3], (ri[0], rj[0], rk[0]), atol=1e-4)
        if "label" in ds:
            label = tio.LabelMap(nifti_export / path / "label.nii.gz")
            np.testing.assert_array_equal(
                label.data[0].numpy().transpose(2, 1, 0), ds["label"].values
            )
            np.testing.assert_allclose(label.affine, image.affine)


def test_nifti_segments_are_the_reader_masks(store, nifti_export):
    path = "crlm/CRLM-CT-1002/S1/7"
    masks = store.segments(path)
    table = json.loads((nifti_export / path / "segments" / "segments.json").read_text())
    assert [t["label"] for t in table] == list(masks) == ["Liver", "Tumor_1"]
    for entry, (name, mask) in zip(table, masks.items(), strict=True):
        data = np.asanyarray(nib.load(nifti_export / entry["file"]).dataobj)
        np.testing.assert_array_equal(data.transpose(2, 1, 0), mask.astype(np.uint8))
        assert entry["unified_label"] == {"Liver": 1, "Tumor_1": 2}[name]
    assert not (nifti_export / "crlm/CRLM-CT-1001/S1/7/segments").exists()  # not annotated


# ------------------------------------------------------------------------ command, --where
def test_cli_export_where_is_the_ls_query(store, store_url, tmp_path, capsys):
    dest = tmp_path / "thick"
    # a per-axis column: the expression `ls` accepts
    assert (
        main(["export", store_url, str(dest), "--format", "nifti", "--where", "spacing_z > 2.7"])
        == 0
    )
    assert "volumes exported" in capsys.readouterr().out
    spacing_z = store.catalog["spacing"].values[:, 0]
    expected = [p for p, s in zip(store.paths(), spacing_z, strict=True) if s > 2.7]
    assert len(expected) == 5  # 3 PLC non-contrast (3 mm), 2 CRLM (5 mm)
    written = json.loads((dest / "livercube-export.json").read_text())["written"]
    assert [w["path"] for w in written] == expected
    assert sorted(p.parent.relative_to(dest).as_posix() for p in dest.rglob("image.nii.gz")) == (
        sorted(expected)
    )
    assert main(["ls", store_url, "--where", "spacing_z > 2.7"]) == 0
    assert f"{len(expected)} of {len(spacing_z)} volumes" in capsys.readouterr().out

    liver = tmp_path / "liver"
    assert (
        main(
            [
                "export",
                store_url,
                str(liver),
                "--format",
                "nnunet",
                "--where",
                "patient_id == 'CRLM-CT-1002'",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "1 cases exported" in out and "DatasetNNN_Name" in out
    assert json.loads((liver / "dataset.json").read_text())["numTraining"] == 1

    # an export never mixes into an earlier one by accident; bad expressions are usage errors
    assert main(["export", store_url, str(dest), "--format", "nifti"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (
        main(["export", store_url, str(tmp_path / "x"), "--format", "nifti", "--where", "nope >"])
        == 2
    )
    assert main(["export", store_url, str(tmp_path / "y"), "--format", "nnunet", "--segments"]) == 2
    assert (
        main(["export", store_url, str(tmp_path / "z"), "--format", "nnunet", "--phases", "venous"])
        == 2
    )


# --------------------------------------------------------------------------------- nnU-Net
def run_nnunet_checker(dest: Path, capfd) -> str:
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    capfd.readouterr()
    verify_dataset_integrity(str(dest), num_processes=1)
    out = capfd.readouterr()
    text = out.out + out.err
    assert "verify_dataset_integrity Done" in text
    assert "Error" not in text and "Warning" not in text, text
    return text


@pytest.mark.slow  # nnU-Net's checker spawns a worker process
def test_nnunet_dataset_single_channel(store, store_url, tmp_path, capfd, monkeypatch):
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(var, str(tmp_path / var))
    dest = tmp_path / "nnUNet_raw" / "Dataset501_Liver"
    result = export(store_url, dest, "nnunet")
    annotated = [
        p for p, a in zip(store.paths(), store.catalog["annotated"].values, strict=True) if a
    ]
    assert [c["label_from"] for c in result.written] == annotated
    assert result.skipped == [("crlm/CRLM-CT-1001/S1/7", "not annotated")]
    doc = json.loads((dest / "dataset.json").read_text())
    assert doc["labels"] == {name: value for value, name in unified_labels().items()}
    assert doc["channel_names"] == {"0": "CT"}
    assert doc["numTraining"] == len(annotated) == 13 and doc["file_ending"] == ".nii.gz"
    for case in result.written:
        path = case["label_from"]
        ds = store.volume(path)
        img = nib.load(dest / "imagesTr" / f"{case['case']}_0000.nii.gz")
        lab = nib.load(dest / "labelsTr" / f"{case['case']}.nii.gz")
        np.testing.assert_array_equal(np.asanyarray(img.dataobj).transpose(2, 1, 0), ds["image"])
        np.testing.assert_array_equal(np.asanyarray(lab.dataobj).transpose(2, 1, 0), ds["label"])
        np.testing.assert_array_equal(lab.affine, img.affine)
    assert len(list((dest / "imagesTr").iterdir())) == 13
    run_nnunet_checker(dest, capfd)


def nearest_expected(src: np.ndarray, src_axes, ref_axes, pad) -> tuple[np.ndarray, np.ndarray]:
    """Nearest-neighbour resampling of ``src`` (z, y, x) at the ``ref_axes`` coordinates,
    computed independently of the sampler: (values, ambiguous) where ``ambiguous`` marks
    voxels equidistant from two source centres (either neighbour is then right)."""
    lo_idx, hi_idx, inside, tie = [], [], [], []
    for c_src, c_ref in zip(src_axes, ref_axes, strict=True):
        d = np.abs(c_ref[:, None] - c_src[None, :])
        best = d.min(axis=1)
        near = np.isclose(d, best[:, None], atol=1e-6)
        lo_idx.append(near.argmax(axis=1))
        hi_idx.append(near.shape[1] - 1 - near[:, ::-1].argmax(axis=1))
        step = c_src[1] - c_src[0] if len(c_src) > 1 else 1.0
        inside.append(best <= abs(step) / 2 + 1e-6)
        tie.append(near.sum(axis=1) > 1)
    mask = inside[0][:, None, None] & inside[1][None, :, None] & inside[2][None, None, :]
    ambiguous = tie[0][:, None, None] | tie[1][None, :, None] | tie[2][None, None, :]
    out = np.full(mask.shape, pad, dtype=np.float64)
    lo = src[np.ix_(*lo_idx)]
    hi = src[np.ix_(*hi_idx)]
    out[mask] = lo[mask]
    return out, ambiguous & mask & (lo != hi)


@pytest.mark.slow  # nnU-Net's checker spawns a worker process
@pytest.mark.parametrize("interpolation", ["nearest", "linear"])
def test_nnunet_phases_resampled_onto_the_annotated_grid(
    store, store_url, tmp_path, capfd, interpolation
):
    from scipy.ndimage import map_coordinates

    dest = tmp_path / "Dataset502_Phases"
    result = export(
        store_url,
        dest,
        "nnunet",
        phases=["portal_venous", "arterial"],
        interpolation=interpolation,
    )
    # one case per study, the portal-venous volume is the reference (first listed, annotated)
    assert [c["label_from"] for c in result.written] == [
        f"plc-cect/P000{i}/CECT/C2" for i in (1, 2, 3)
    ]
    assert ("crlm/CRLM-CT-1002/S1/7", "study has no arterial volume") in result.skipped
    doc = json.loads((dest / "dataset.json").read_text())
    assert doc["channel_names"] == {"0": "CT", "1": "CT"}
    assert doc["livercube"]["channels"] == ["portal_venous", "arterial"]
    for case in result.written:
        ref_path, art_path = case["channels"]
        assert ref_path == case["label_from"] and art_path.endswith("/C1")
        ref, art = store.volume(ref_path), store.volume(art_path)
        files = [dest / "imagesTr" / f"{case['case']}_{c:04d}.nii.gz" for c in (0, 1)]
        lab = nib.load(dest / "labelsTr" / f"{case['case']}.nii.gz")
        ch0, ch1 = (nib.load(f) for f in files)
        for img in (ch0, ch1):
            np.testing.assert_array_equal(img.affine, lab.affine)
            np.testing.assert_array_equal(
                img.affine, float32_affine(volume_grid(store.volume_attrs(ref_path)))
            )
        assert ch0.get_data_dtype() == np.int16  # the reference keeps exact HU
        np.testing.assert_array_equal(np.asanyarray(ch0.dataobj).transpose(2, 1, 0), ref["image"])
        np.testing.assert_array_equal(np.asanyarray(lab.dataobj).transpose(2, 1, 0), ref["label"])
        got = np.asanyarray(ch1.dataobj).transpose(2, 1, 0).astype(np.float64)
        src = art["image"].values
        src_axes = [art[a].values for a in "zyx"]
        ref_axes = [ref[a].values for a in "zyx"]
        if interpolation == "nearest":
            assert ch1.get_data_dtype() == np.int16
            expected, ambiguous = nearest_expected(src, src_axes, ref_axes, -1024)
            np.testing.assert_array_equal(got[~ambiguous], expected[~ambiguous])
            assert ambiguous.mean() < 0.5
        else:
            assert ch1.get_data_dtype() == np.float32
            # continuous source index of every reference voxel centre, per axis
            cont = [(r - s[0]) / (s[1] - s[0]) for r, s in zip(ref_axes, src_axes, strict=True)]
            grid = np.meshgrid(*cont, indexing="ij")
            expected = map_coordinates(src.astype(np.float64), grid, order=1, mode="nearest")
            interior = np.ones(got.shape, dtype=bool)
            for d, c in enumerate(cont):
                ok = (c >= 0) & (c <= src.shape[d] - 1)
                interior &= ok.reshape([-1 if e == d else 1 for e in range(3)])
            assert interior.mean() > 0.3
            np.testing.assert_allclose(got[interior], expected[interior], atol=2e-3)
            outside = np.zeros(got.shape, dtype=bool)
            for d, c in enumerate(cont):
                far = (c < -1) | (c > src.shape[d])
                outside |= far.reshape([-1 if e == d else 1 for e in range(3)])
            assert outside.any()
            np.testing.assert_array_equal(got[outside], -1024)
    if interpolation == "linear":  # one checker run covers the two-channel layout
        run_nnunet_checker(dest, capfd)


# ------------------------------------------------------------------------ MONAI, TorchIO
def test_monai_loadimaged_gives_the_store_geometry(store, store_url, nifti_export):
    import torch
    from monai.data import NibabelReader
    from monai.transforms import LoadImage, LoadImaged

    from livercube.integrations.monai import LivercubeReader

    path = "plc-cect/P0002/CECT/C3"
    load = LoadImaged(["image", "label"], reader=LivercubeReader(), dtype=None)
    item = load({"image": f"{store_url}#{path}", "label": f"{store_url}#{path}:label"})
    ds = store.volume(path)
    ri, rj, rk = world_ras(store, path)
    for name in ("image", "label"):
        t = item[name]
        assert t.dtype == {"image": torch.int16, "label": torch.uint8}[name]  # as stored
        np.testing.assert_array_equal(t.numpy().transpose(2, 1, 0), ds[name].values)
        aff = t.affine.numpy()
        n = np.array(t.shape)
        ijk = np.array([[0, 0, 0], n - 1, n // 2])
        np.testing.assert_allclose(
            nib.affines.apply_affine(aff, ijk),
            np.c_[ri[ijk[:, 0]], rj[ijk[:, 1]], rk[ijk[:, 2]]],
            rtol=0,
            atol=1e-9,  # float64 from the store, not NIfTI's float32
        )
        assert str(t.meta["space"]) == "RAS"
        # the same MetaTensor MONAI's own NIfTI reader makes of the exported file
        ref = LoadImage(reader=NibabelReader(), dtype=None)(
            str(nifti_export / path / f"{name}.nii.gz")
        )
        assert ref.dtype == t.dtype and ref.shape == t.shape
        np.testing.assert_array_equal(ref.numpy(), t.numpy())
        np.testing.assert_allclose(ref.affine.numpy(), aff, atol=1e-4)
    # a bare path with the store given to the reader, and two phases stacked as channels
    reader = LivercubeReader(store_url)
    one = LoadImage(reader=reader, image_only=True)(path)
    np.testing.assert_array_equal(one.numpy(), item["image"].numpy())
    with pytest.raises(ValueError, match="not on the grid"):
        LoadImage(reader=reader)([path, "plc-cect/P0002/CECT/C1"])
    # DataLoader workers get a pickled copy that opens its own store
    clone = pickle.loads(pickle.dumps(reader))
    np.testing.assert_array_equal(LoadImage(reader=clone)(path).numpy(), one.numpy())


def test_store_references_survive_pathlib():
    from livercube.errors import UsageError
    from livercube.integrations.volumes import parse_ref, repair_url

    assert repair_url(str(Path("s3://b/lc"))) == "s3://b/lc"
    assert repair_url(str(Path("https://host/lc"))) == "https://host/lc"
    assert repair_url(str(Path("file:///tmp/lc"))) == "file:///tmp/lc"
    assert repair_url("/tmp/lc") == "/tmp/lc" and repair_url("C:/data/lc") == "C:/data/lc"
    assert parse_ref("s3:/b/lc#crlm/P/S/7:label", None, "image") == (
        "s3://b/lc",
        "crlm/P/S/7",
        "label",
    )
    assert parse_ref("crlm/P/S/7", "/x/lc", "image") == ("/x/lc", "crlm/P/S/7", "image")
    with pytest.raises(UsageError, match="STORE_URL#"):
        parse_ref("crlm/P/S/7", None, "image")
    with pytest.raises(UsageError, match="array must be one of"):
        parse_ref("/x#crlm/P/S/7:segments", None, "image")


@pytest.mark.slow  # a real S3 endpoint (moto server)
def test_monai_reads_an_s3_store(store, store_url, s3_bucket):
    import fsspec
    from monai.transforms import LoadImaged

    from livercube.integrations.monai import LivercubeReader

    bucket, opts = s3_bucket
    fs = fsspec.filesystem("s3", **opts)
    fs.put(store_url, f"{bucket}/lc", recursive=True)
    path = "crlm/CRLM-CT-1002/S1/7"
    # LoadImage passes names through pathlib, which turns s3://b into s3:/b; the reader copes
    load = LoadImaged(["image"], reader=LivercubeReader(storage_options=opts), dtype=None)
    got = load({"image": f"s3://{bucket}/lc#{path}"})["image"]
    np.testing.assert_array_equal(got.numpy().transpose(2, 1, 0), store.volume(path)["image"])
    np.testing.assert_allclose(
        got.affine.numpy(), ras_affine(volume_grid(store.volume_attrs(path)))
    )


def test_torchio_subject_matches_store_and_exported_file(store, store_url, nifti_export):
    import torchio as tio

    from livercube.integrations.torchio import subject

    path = "crlm/CRLM-CT-1002/S1/7"
    s = subject(store_url, path)
    assert subject(store, store.paths().index(path))["path"] == path  # by catalog index too
    ds = store.volume(path)
    ri, rj, rk = world_ras(store, path)
    assert s["path"] == path and s["phase"] == "portal_venous"
    assert isinstance(s["image"], tio.ScalarImage) and isinstance(s["label"], tio.LabelMap)
    for name in ("image", "label"):
        im = s[name]
        np.testing.assert_array_equal(im.data[0].numpy().transpose(2, 1, 0), ds[name].values)
        assert im.orientation == ("L", "P", "S")
        n = np.array(im.spatial_shape)
        ijk = np.array([[0, 0, 0], n - 1, n // 2])
        np.testing.assert_allclose(
            nib.affines.apply_affine(im.affine, ijk),
            np.c_[ri[ijk[:, 0]], rj[ijk[:, 1]], rk[ijk[:, 2]]],
            rtol=0,
            atol=1e-9,
        )
        from_file = (tio.ScalarImage if name == "image" else tio.LabelMap)(
            nifti_export / path / f"{name}.nii.gz"
        )
        np.testing.assert_array_equal(from_file.data.numpy(), im.data.numpy())
        np.testing.assert_allclose(from_file.affine, im.affine, atol=1e-4)
    # TorchIO's own geometry: to RAS+ and back to the same physical voxel
    canon = tio.ToCanonical()(s)
    assert canon["image"].orientation == ("R", "A", "S")
    i, j, k = 3, 5, 2
    ni, nj, _ = s["image"].spatial_shape
    np.testing.assert_allclose(
        nib.affines.apply_affine(canon["image"].affine, [ni - 1 - i, nj - 1 - j, k]),
        nib.affines.apply_affine(s["image"].affine, [i, j, k]),
        atol=1e-9,
    )
    assert canon["image"].data[0, ni - 1 - i, nj - 1 - j, k] == s["image"].data[0, i, j, k]
    unannotated = subject(store, "crlm/CRLM-CT-1001/S1/7")
    assert "label" not in unannotated


def test_livercube_and_export_import_without_monai_or_torchio():
    code = (
        "import sys, livercube, livercube.export, livercube.export.nnunet, "
        "livercube.integrations, livercube.cli\n"
        "bad = [m for m in ('monai', 'torchio', 'nnunetv2', 'torch') if m in sys.modules]\n"
        "assert not bad, bad"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
