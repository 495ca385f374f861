"""PLC-CECT end to end: the converted store equals the generator's truth voxel for voxel."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

import livercube
from livercube.convert import EXIT_PARTIAL, convert
from livercube.errors import UnreadableFileError
from livercube.sources.plc_cect import hu_from_window, read_patient_table, window_from_hu


def _by_key(store):
    cat = store.catalog
    return {
        (str(p), str(s)): i
        for i, (p, s) in enumerate(zip(cat.patient_id.values, cat.series.values, strict=True))
    }


def test_every_volume_equals_truth(plc_store):
    url, truth = plc_store
    store = livercube.open(url)
    index = _by_key(store)
    assert set(index) == set(truth.volumes)
    forms = set()
    for key, t in truth.volumes.items():
        ds = store.volume(index[key])
        np.testing.assert_array_equal(ds.image.values, t.image, err_msg=str(key))
        segs = store.segments(index[key])
        np.testing.assert_array_equal(segs["Liver"], t.liver)
        expected_label = np.where(t.liver, 1, 0)
        if t.lesion is None:
            assert "Lesion" not in segs
        else:
            np.testing.assert_array_equal(segs["Lesion"], t.lesion)
            expected_label = np.where(t.lesion, 2, expected_label)
        np.testing.assert_array_equal(ds.label.values, expected_label.astype(np.uint8))
        forms.add(t.form)
    assert {"rgb", "vector", "4d", "5d", "3d"} <= forms  # the quirky files were really exercised


def test_window_mapping_is_lossless_and_marked_approximate(plc_store):
    v = np.arange(256, dtype=np.uint8)
    hu = hu_from_window(v)
    assert hu.dtype == np.int16 and len(np.unique(hu)) == 256
    assert hu[0] == -200 and hu[255] == 200
    np.testing.assert_array_equal(window_from_hu(hu), v)
    url, _ = plc_store
    store = livercube.open(url)
    meta = store.volume_attrs(0)
    assert meta["intensity"]["exact"] is False and meta["intensity"]["windowed"] is True
    assert not store.catalog.intensity_exact.values.any()
    assert not store.catalog.spacing_trusted.values.any()


def test_reorientation_matches_simpleitk(plc_store, plc_release):
    """SimpleITK reads the file; we reverse its slices (the documented quirk) and DICOMOrient."""
    url, truth = plc_store
    root, _ = plc_release
    store = livercube.open(url)
    index = _by_key(store)
    checked = 0
    for (pid, code), t in truth.volumes.items():
        if t.form != "3d":
            continue
        img = sitk.ReadImage(str(root / "ct_files" / f"{pid}_ct_{code}.nii.gz"))
        arr = sitk.GetArrayFromImage(img)  # (k, j, i)
        if t.slice_order == "superior_first":
            arr = arr[::-1]
        fixed = sitk.GetImageFromArray(np.ascontiguousarray(arr))
        fixed.CopyInformation(img)
        lps = sitk.DICOMOrient(fixed, "LPS")
        ds = store.volume(index[(pid, code)])
        np.testing.assert_array_equal(ds.image.values, hu_from_window(sitk.GetArrayFromImage(lps)))
        np.testing.assert_allclose(ds.z.values[0], lps.GetOrigin()[2])
        np.testing.assert_allclose(ds.y.values[0], lps.GetOrigin()[1])
        np.testing.assert_allclose(ds.x.values[0], lps.GetOrigin()[0])
        np.testing.assert_allclose(
            store.catalog.spacing.values[index[(pid, code)]], lps.GetSpacing()[::-1]
        )
        checked += 1
    assert checked >= 6


def test_flipped_phase_is_detected_without_overrides(plc_release, tmp_path):
    """The one phase stored as the header says is found from the other phases and kept as is."""
    root, truth = plc_release
    ((key, _t),) = [(k, t) for k, t in truth.volumes.items() if t.slice_order == "header"]
    dest = str(tmp_path / "s.zarr")
    report = convert(str(root), dest, "plc-cect", progress=False)
    assert report.exit_code == 0, report.summary()
    store = livercube.open(dest)
    for k, other in truth.volumes.items():
        got = store.volume(_by_key(store)[k]).image.values
        np.testing.assert_array_equal(got, other.image, err_msg=str(k))
    attrs = store.volume_attrs(_by_key(store)[key])
    assert attrs["geometry_flags"]["slice_order"] == "header"
    assert "detected" in attrs["geometry_flags"]["slice_order_source"]
    assert any(f"phase {key[1]} runs opposite" in n for n in attrs["notes"])
    assert any(key[0] in w and "runs opposite" in w for w in report.warnings)


def test_overrides_win_over_detection(release_copy, tmp_path):
    root, truth = release_copy
    ((key, t),) = [(k, t) for k, t in truth.volumes.items() if t.slice_order == "header"]
    ov = tmp_path / "ov.csv"
    ov.write_text(f"patient_id,phase,slice_order\n{key[0]},{key[1]},superior_first\n")
    dest = str(tmp_path / "s.zarr")
    assert convert(str(root), dest, "plc-cect", overrides=str(ov), progress=False).exit_code == 0
    store = livercube.open(dest)
    i = _by_key(store)[key]
    np.testing.assert_array_equal(store.volume(i).image.values, t.image[::-1])
    attrs = store.volume_attrs(i)
    assert attrs["geometry_flags"]["slice_order_source"] == "overrides file"
    assert any("overrides file sets" in n for n in attrs["notes"])


@pytest.mark.parametrize("flipped", [(1, "P"), (0, "C1")])
def test_generator_flipped_phase_is_detected(tmp_path, flipped):
    from livercube.synth.plc_cect import write_plc_cect

    root = tmp_path / "PLC"
    truth = write_plc_cect(root, n_subjects=2, size="tiny", seed=11, flipped={flipped})
    assert sum(t.slice_order == "header" for t in truth.volumes.values()) == 1
    report = convert(str(root), str(tmp_path / "s.zarr"), "plc-cect", progress=False)
    assert report.exit_code == 0, report.summary()
    store = livercube.open(str(tmp_path / "s.zarr"))
    for k, t in truth.volumes.items():
        i = _by_key(store)[k]
        np.testing.assert_array_equal(store.volume(i).image.values, t.image, err_msg=str(k))
        assert store.volume_attrs(i)["geometry_flags"]["slice_order"] == t.slice_order


def test_spacing_override_is_used_and_trusted(plc_release, tmp_path):
    root, truth = plc_release
    ov = tmp_path / "ov.csv"
    ov.write_text(truth.overrides_csv + "P0002,C2,,2.5,0.78125,0.78125\n")
    dest = str(tmp_path / "s.zarr")
    assert convert(str(root), dest, "plc-cect", overrides=str(ov), progress=False).exit_code == 0
    store = livercube.open(dest)
    i = _by_key(store)[("P0002", "C2")]
    np.testing.assert_allclose(store.catalog.spacing.values[i], [2.5, 0.78125, 0.78125])
    assert bool(store.catalog.spacing_trusted.values[i])
    np.testing.assert_allclose(np.diff(store.volume(i).z.values), 2.5)
    np.testing.assert_array_equal(
        store.volume(i).image.values, truth.volumes[("P0002", "C2")].image
    )


def test_clinical_covariates_in_catalog(plc_store):
    url, truth = plc_store
    cat = livercube.open(url).catalog
    assert cat.plc_age.attrs["source_column"] == "age" and cat.plc_age.dtype == np.float64
    for i, pid in enumerate(cat.patient_id.values):
        p = truth.patients[str(pid)]
        if p["age"] is None:
            assert np.isnan(cat.plc_age.values[i])
        else:
            assert cat.plc_age.values[i] == p["age"]
        assert str(cat.plc_cancer_type.values[i]) == p["cancer_type"]
        assert str(cat.sex.values[i]) == (p["gender"] or "")
    controls = cat.plc_cancer_type.values.astype(str) == "CN"
    assert controls.any()
    assert cat.annotation_complete.values[controls].all()  # no lesion mask expected
    assert (cat.n_segments.values[controls] == 1).all()


def test_truncated_gz_is_reported_and_the_other_phases_land(release_copy, tmp_path):
    root, truth = release_copy
    victim = root / "ct_files" / "P0002_ct_C1.nii.gz"
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    with pytest.raises(UnreadableFileError, match="truncated or corrupt gzip"):
        from livercube.sources.nifti import load_nifti

        load_nifti(str(victim))
    dest = str(tmp_path / "s.zarr")
    report = convert(str(root), dest, "plc-cect", progress=False)
    assert report.exit_code == EXIT_PARTIAL
    assert [s["input"] for s in report.skipped] == [str(victim)]
    assert "truncated" in report.skipped[0]["reason"]
    store = livercube.open(dest)
    keys = set(_by_key(store))
    assert ("P0002", "C1") not in keys
    assert keys == set(truth.volumes) - {("P0002", "C1")}
    assert not any("P0002/CECT/C1" in p for p in store.paths())


def test_missing_mask_keeps_ct_marks_annotation_incomplete(release_copy, tmp_path):
    root, truth = release_copy
    (root / "mask_files" / "P0001_mask_C2.nii.gz").unlink()
    dest = str(tmp_path / "s.zarr")
    report = convert(str(root), dest, "plc-cect", progress=False)
    assert report.exit_code == EXIT_PARTIAL
    assert any("lesion mask file missing" in s["reason"] for s in report.skipped)
    store = livercube.open(dest)
    i = _by_key(store)[("P0001", "C2")]
    assert not bool(store.catalog.annotation_complete.values[i])
    assert list(store.segments(i)) == ["Liver"]
    np.testing.assert_array_equal(
        store.volume(i).image.values, truth.volumes[("P0001", "C2")].image
    )


def test_unknown_phase_code_converts_as_unknown(release_copy, tmp_path):
    root, _ = release_copy
    for sub, old, new in (
        ("ct_files", "P0001_ct_C3", "P0001_ct_C4"),
        ("mask_files", "P0001_mask_C3", "P0001_mask_C4"),
        ("liver_mask_files", "P0001-livermask_C3", "P0001-livermask_C4"),
    ):
        (root / sub / f"{old}.nii.gz").rename(root / sub / f"{new}.nii.gz")
    dest = str(tmp_path / "s.zarr")
    report = convert(str(root), dest, "plc-cect", progress=False)
    # the CSV still lists C3, whose file is now missing: that is reported
    assert any("P0001 C3" in s["input"] for s in report.skipped)
    store = livercube.open(dest)
    i = _by_key(store)[("P0001", "C4")]
    assert str(store.catalog.phase.values[i]) == "unknown"
    assert any("unknown phase code 'C4'" in n for n in store.volume_attrs(i)["notes"])


def test_csv_with_bom_and_old_header(plc_release):
    root, truth = plc_release
    text = (root / "patient_data.csv").read_text()
    bom = read_patient_table("\ufeff" + text)
    assert bom.header_version == "current"
    assert {k: v["cancer_type"] for k, v in bom.covariates.items()} == {
        k: v["cancer_type"] for k, v in truth.patients.items()
    }
    old = read_patient_table(
        "\ufeffPatient ID,Stage,Cancer Type,CT File,Mask File,Liver Mask File\n"
        "P0001,II,HCC,P0001_ct_C1.nii.gz,P0001_mask_C1.nii.gz,P0001-livermask_C1.nii.gz\n"
        "P0003,,CN,P0003_ct_P.nii.gz,,P0003-livermask_P.nii.gz\n"
    )
    assert old.header_version == "old"
    assert old.covariates["P0001"] == {"Stage": "II", "cancer_type": "HCC"}
    assert old.files[("P0003", "P")]["mask"] == ""
    with pytest.raises(UnreadableFileError, match="unrecognised header"):
        read_patient_table("id,foo\n1,2\n")


def test_old_header_release_converts(tmp_path):
    from livercube.synth.plc_cect import write_plc_cect

    root = tmp_path / "PLC"
    truth = write_plc_cect(root, n_subjects=2, size="tiny", seed=3, header_version="old")
    (tmp_path / "ov.csv").write_text(truth.overrides_csv)
    report = convert(
        str(root),
        str(tmp_path / "s.zarr"),
        "plc-cect",
        overrides=str(tmp_path / "ov.csv"),
        progress=False,
    )
    assert report.exit_code == 0, report.summary()
    cat = livercube.open(str(tmp_path / "s.zarr")).catalog
    assert set(cat.plc_cancer_type.values.astype(str)) == {"HCC", "CN"}
    assert "plc_stage" in cat and "plc_age" not in cat


def test_gzip_of_non_nifti_is_unreadable(tmp_path):
    from livercube.sources.nifti import load_nifti

    bad = Path(tmp_path / "x.nii.gz")
    bad.write_bytes(gzip.compress(b"not a nifti file at all" * 20))
    with pytest.raises(UnreadableFileError, match="not a readable NIfTI"):
        load_nifti(str(bad))


def test_empty_liver_masks_fall_back_to_intensity_profiles(tmp_path):
    """A patient whose liver masks are empty is still checked, from the CTs' mean intensity."""
    import nibabel as nib

    from livercube.sources.plc_cect import plan
    from livercube.synth.plc_cect import write_plc_cect

    root = tmp_path / "PLC"
    truth = write_plc_cect(root, n_subjects=2, size="tiny", seed=1)
    for f in (root / "liver_mask_files").glob("P0001-*"):
        img = nib.load(str(f))
        empty = nib.Nifti1Image(np.zeros(img.shape, np.uint8), img.affine, header=img.header)
        nib.save(empty, str(f))
    tasks = {t.key: t for t in plan(str(root)).tasks}
    for (pid, code), t in truth.volumes.items():
        assert tasks[f"{pid}_{code}"].slice_order == t.slice_order, (pid, code)
    assert any("mean intensity" in n for n in tasks["P0001_C3"].notes)
