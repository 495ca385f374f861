"""DICOM CT discovery (headers only) and assembly into canonical volumes, vs SimpleITK."""

from __future__ import annotations

import pickle
import shutil
import tempfile
import uuid
from pathlib import Path

import fsspec
import numpy as np
import pytest
import SimpleITK as sitk
from dicom_factory import (
    BASIC_TEXT_SR,
    SEGMENTATION_STORAGE,
    Study,
    canonical_test_array,
    write_ct_series,
    write_non_image,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.uid import generate_uid

from livercube.errors import (
    GeometryError,
    IntensityError,
    SourceError,
    UnreadableFileError,
)
from livercube.sources.dicom_ct import FILL_HU, read_acquisition
from livercube.sources.dicom_geometry import analyse_spacing
from livercube.sources.dicom_scan import scan

SHAPE = (6, 16, 16)
SPACING = (2.5, 0.75, 0.7)
ORIGIN = (-100.0, -50.0, -60.0)


def sitk_reference(directory: Path) -> tuple[np.ndarray, tuple, tuple]:
    """(array z,y,x, spacing z,y,x, origin z,y,x) as SimpleITK/GDCM read the series in LPS."""
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(directory)))
    img = sitk.DICOMOrient(reader.Execute(), "LPS")
    assert np.allclose(img.GetDirection(), np.eye(3).ravel())
    return sitk.GetArrayFromImage(img), img.GetSpacing()[::-1], img.GetOrigin()[::-1]


def read_single(directory: Path | str, **kw):
    result = scan(str(directory), **kw)
    assert len(result.acquisitions) == 1, result
    return result, read_acquisition(result.acquisitions[0])


def assert_matches_sitk(directory: Path, vol, expected: np.ndarray | None = None) -> None:
    ref, spacing, origin = sitk_reference(directory)
    assert vol.image.dtype == np.int16
    np.testing.assert_array_equal(vol.image, ref)
    if expected is not None:
        np.testing.assert_array_equal(vol.image, expected)
    assert vol.grid.shape == ref.shape
    np.testing.assert_allclose(vol.grid.spacing, spacing, atol=1e-6)
    np.testing.assert_allclose(vol.grid.origin, origin, atol=1e-4)


# ----------------------------------------------------------------------------- basics


def test_plain_series_matches_sitk_and_keeps_only_allowed_attrs(tmp_path):
    a = canonical_test_array(SHAPE)
    write_ct_series(tmp_path, a, spacing_zyx=SPACING, origin_zyx=ORIGIN)
    result, vol = read_single(tmp_path)
    assert_matches_sitk(tmp_path, vol, a)
    assert vol.grid.spacing == pytest.approx(SPACING)
    assert vol.grid.origin == pytest.approx(ORIGIN)
    assert vol.filled_slices == []
    acq = result.acquisitions[0]
    assert acq.patient_id == "TEST_001" and acq.study_date == "20010203"
    assert acq.series_number == 3 and acq.series_description == "PRE LIVER"
    assert acq.acquisition_number == 1 and acq.acquisition_time == "101500"
    assert acq.rows == 16 and acq.columns == 16
    assert acq.estimated_bytes == a.nbytes
    offsets = acq.offsets
    assert list(offsets) == sorted(offsets)
    # picklable and small; nothing identifying
    blob = pickle.dumps(acq)
    assert len(blob) < 20_000
    text = repr(acq) + repr(vol.attrs)
    for secret in ("Doe", "19500101", "Somewhere"):
        assert secret not in text
    for key in ("Manufacturer", "ConvolutionKernel", "KVP", "SliceThickness", "StudyDate"):
        assert key in vol.attrs
    for key in (
        "study_date",
        "series_number",
        "series_description",
        "acquisition_number",
        "acquisition_time",
    ):
        assert key in vol.attrs
    assert vol.attrs["padding_voxels"] == 0
    # one SOP per canonical z, in z order
    assert sorted(vol.sop_uids_by_canonical_z) == list(range(SHAPE[0]))
    assert all(len(v) == 1 for v in vol.sop_uids_by_canonical_z.values())


def test_sop_uids_follow_canonical_z(tmp_path):
    a = canonical_test_array(SHAPE)
    write_ct_series(tmp_path, a, row_cos=(-1, 0, 0), col_cos=(0, -1, 0), reverse_instances=True)
    result, vol = read_single(tmp_path)
    by_uid = {s.sop_uid: s.position for s in result.acquisitions[0].slices}
    zs = [by_uid[vol.sop_uids_by_canonical_z[z][0]][2] for z in range(SHAPE[0])]
    np.testing.assert_allclose(zs, vol.grid.centres(0))
    np.testing.assert_allclose([p[2] for p in vol.slice_positions], vol.grid.centres(0))


def test_shuffled_file_order(tmp_path):
    a = canonical_test_array(SHAPE, seed=1)
    # file names are random uuids (IDC-like), so listing order is unrelated to position
    write_ct_series(tmp_path, a, name="{sop}.dcm", shuffle_seed=3)
    _, vol = read_single(tmp_path)
    assert_matches_sitk(tmp_path, vol, a)


def test_reversed_z(tmp_path):
    a = canonical_test_array(SHAPE, seed=2)
    paths = write_ct_series(tmp_path, a, reverse_instances=True)
    import pydicom

    z = [float(pydicom.dcmread(p).ImagePositionPatient[2]) for p in paths]
    assert z == sorted(z, reverse=True)  # IPP decreases with InstanceNumber
    _, vol = read_single(tmp_path)
    assert_matches_sitk(tmp_path, vol, a)


def test_flipped_in_plane_orientation(tmp_path):
    a = canonical_test_array((5, 12, 10), seed=3)
    write_ct_series(tmp_path, a, row_cos=(-1, 0, 0), col_cos=(0, -1, 0))
    _, vol = read_single(tmp_path)
    assert_matches_sitk(tmp_path, vol, a)
    assert vol.reorientation.flips[1:] == (True, True)


@pytest.mark.parametrize(
    ("pixel_representation", "intercept"),
    [(0, -1024.0), (1, -1024.0), (1, 0.0)],
    ids=["unsigned-intercept-1024", "signed-intercept-1024", "signed-intercept-0"],
)
def test_signed_and_unsigned_storage(tmp_path, pixel_representation, intercept):
    a = canonical_test_array(SHAPE, seed=4)
    a[0, 0, :4] = [-1024, 3000, -1000, 0]
    write_ct_series(tmp_path, a, pixel_representation=pixel_representation, intercept=intercept)
    _, vol = read_single(tmp_path)
    assert_matches_sitk(tmp_path, vol, a)
    assert vol.attrs["pixel_representation"] == [pixel_representation]


@pytest.mark.parametrize("slope", [2.0, 0.5])
def test_rescale_slope_not_one(tmp_path, slope):
    a = canonical_test_array(SHAPE, seed=5)
    write_ct_series(tmp_path, a, slope=slope, intercept=-1024.0)
    _, vol = read_single(tmp_path)
    assert_matches_sitk(tmp_path, vol, a)
    assert vol.attrs["rescale_slopes"] == [slope]


def test_fractional_slope_exact_or_clear_error(tmp_path):
    a = (canonical_test_array(SHAPE, seed=5) // 3) * 3
    write_ct_series(tmp_path / "exact", a, slope=1.5, intercept=0.0)
    _, vol = read_single(tmp_path / "exact")  # every HU is integral: accepted, exact
    np.testing.assert_array_equal(vol.image, a)
    # slope 0.3 on stored value 1 gives 0.3 HU: int16 would be lossy
    write_ct_series(
        tmp_path / "lossy",
        np.ones(SHAPE, np.int16),
        slope=1.0,
        intercept=0.0,
        extra={"RescaleSlope": "0.3"},
    )
    result = scan(str(tmp_path / "lossy"))
    with pytest.raises(IntensityError, match="non-integer HU"):
        read_acquisition(result.acquisitions[0])


def test_int16_overflow_is_a_clear_error(tmp_path):
    a = np.full(SHAPE, 30000, np.int16)
    write_ct_series(
        tmp_path, a, pixel_representation=0, intercept=0.0, extra={"RescaleIntercept": "5000"}
    )
    result = scan(str(tmp_path))
    with pytest.raises(IntensityError, match="int16"):
        read_acquisition(result.acquisitions[0])


def test_pixel_padding_value_kept_exact_and_counted(tmp_path):
    a = canonical_test_array(SHAPE, seed=6)
    pad = np.zeros(SHAPE, bool)
    pad[:, :2, :] = True
    write_ct_series(tmp_path, a, padding_value=-2000, padding_mask=pad, intercept=0.0)
    _, vol = read_single(tmp_path)
    assert vol.attrs["padding_voxels"] == int(pad.sum())
    assert vol.attrs["padding_values_stored"] == [-2000]
    assert (vol.image[pad] == -2000).all()  # exact rescaled value, below any real tissue
    ref, _, _ = sitk_reference(tmp_path)  # SimpleITK keeps the rescaled −2000 there too
    np.testing.assert_array_equal(vol.image, ref)


def test_padding_can_be_replaced_on_request(tmp_path):
    a = canonical_test_array(SHAPE, seed=6)
    pad = np.zeros(SHAPE, bool)
    pad[:, :2, :] = True
    write_ct_series(tmp_path, a, padding_value=-2000, padding_mask=pad, intercept=0.0)
    result = scan(str(tmp_path))
    vol = read_acquisition(result.acquisitions[0], padding_hu=-1024)
    expected = a.copy()
    expected[pad] = -1024
    np.testing.assert_array_equal(vol.image, expected)


# ----------------------------------------------------------------------------- acquisitions


def test_two_acquisitions_at_identical_positions(tmp_path):
    study, series = Study(), generate_uid()
    a1, a2 = canonical_test_array(SHAPE, seed=7), canonical_test_array(SHAPE, seed=8)
    write_ct_series(
        tmp_path,
        a1,
        study=study,
        series_uid=series,
        acquisition_number=1,
        acquisition_time="101500",
        series_description="LIVER 2 PHASE (C/A/P)",
    )
    write_ct_series(
        tmp_path,
        a2,
        study=study,
        series_uid=series,
        acquisition_number=2,
        acquisition_time="102000",
        instance_start=7,
        series_description="LIVER 2 PHASE (C/A/P)",
    )
    result = scan(str(tmp_path))
    assert [a.acquisition_number for a in result.acquisitions] == [1, 2]
    assert {a.series_uid for a in result.acquisitions} == {series}
    for acq, expected in zip(result.acquisitions, (a1, a2), strict=True):
        vol = read_acquisition(acq)
        np.testing.assert_array_equal(vol.image, expected)
        assert vol.attrs["acquisition_number"] == acq.acquisition_number


@pytest.mark.parametrize("times", [("101500", "102000"), (None, None)], ids=["by-time", "by-run"])
def test_repeated_positions_without_acquisition_number(tmp_path, times):
    study, series = Study(), generate_uid()
    a1, a2 = canonical_test_array(SHAPE, seed=9), canonical_test_array(SHAPE, seed=10)
    write_ct_series(
        tmp_path,
        a1,
        study=study,
        series_uid=series,
        acquisition_number=None,
        acquisition_time=times[0],
        name="1-{n:02d}.dcm",
    )
    write_ct_series(
        tmp_path,
        a2,
        study=study,
        series_uid=series,
        acquisition_number=None,
        acquisition_time=times[1],
        instance_start=7,
        name="2-{n:02d}.dcm",
    )
    result = scan(str(tmp_path))
    assert len(result.acquisitions) == 2
    got = [read_acquisition(acq).image for acq in result.acquisitions]
    np.testing.assert_array_equal(got[0], a1)
    np.testing.assert_array_equal(got[1], a2)
    assert all(acq.acquisition_number is None for acq in result.acquisitions)
    assert all(acq.notes for acq in result.acquisitions)  # the split is explained


@pytest.mark.parametrize("numbered", [True, False], ids=["acquisition-number", "time-only"])
def test_two_acquisitions_on_different_z_grids(tmp_path, numbered):
    study, series = Study(), generate_uid()
    a1 = canonical_test_array((5, 16, 16), seed=11)
    a2 = canonical_test_array((8, 16, 16), seed=12)
    write_ct_series(
        tmp_path,
        a1,
        study=study,
        series_uid=series,
        spacing_zyx=(5.0, 0.75, 0.7),
        origin_zyx=(-100.0, -50, -60),
        acquisition_number=1 if numbered else None,
        acquisition_time="101500",
        name="1-{n:02d}.dcm",
    )
    write_ct_series(
        tmp_path,
        a2,
        study=study,
        series_uid=series,
        spacing_zyx=(2.5, 0.75, 0.7),
        origin_zyx=(-98.75, -50, -60),
        acquisition_number=2 if numbered else None,
        acquisition_time="102000",
        instance_start=6,
        name="2-{n:02d}.dcm",
    )
    result = scan(str(tmp_path))
    assert len(result.acquisitions) == 2
    v1, v2 = (read_acquisition(acq) for acq in result.acquisitions)
    np.testing.assert_array_equal(v1.image, a1)
    np.testing.assert_array_equal(v2.image, a2)
    assert v1.grid.spacing[0] == pytest.approx(5.0)
    assert v2.grid.spacing[0] == pytest.approx(2.5)
    assert v2.grid.origin[0] == pytest.approx(-98.75)


def test_series_without_acquisition_number(tmp_path):
    a = canonical_test_array(SHAPE, seed=13)
    write_ct_series(tmp_path, a, acquisition_number=None, acquisition_time=None)
    result, vol = read_single(tmp_path)
    assert result.acquisitions[0].acquisition_number is None
    assert vol.attrs["acquisition_number"] is None
    assert_matches_sitk(tmp_path, vol, a)


# ----------------------------------------------------------------------------- geometry


@pytest.mark.parametrize("flipped", [False, True])
def test_missing_slice_is_filled_and_recorded(tmp_path, flipped):
    a = canonical_test_array((7, 16, 16), seed=14)
    orient = {"row_cos": (-1, 0, 0), "col_cos": (0, -1, 0)} if flipped else {}
    write_ct_series(tmp_path, a, skip={2, 3}, **orient)  # source k = canonical z (axial)
    _, vol = read_single(tmp_path)
    assert vol.grid.shape == a.shape
    assert vol.filled_slices == [2, 3]
    expected = a.copy()
    expected[[2, 3]] = FILL_HU
    np.testing.assert_array_equal(vol.image, expected)
    assert vol.spacing_report["n_filled"] == 2
    assert [p[2] for p in vol.spacing_report["filled_positions_mm"]] == pytest.approx(
        [ORIGIN[0] + 2 * 2.5, ORIGIN[0] + 3 * 2.5]
    )
    assert vol.sop_uids_by_canonical_z[2] == () and len(vol.sop_uids_by_canonical_z[4]) == 1
    assert vol.grid.spacing[0] == pytest.approx(2.5)


def test_missing_slice_with_reversed_source_order(tmp_path):
    a = canonical_test_array((7, 16, 16), seed=15)
    # normal pointing inferior: col cosines (0, -1, 0) with row (1, 0, 0) → normal (0, 0, -1)
    write_ct_series(tmp_path, a, row_cos=(1, 0, 0), col_cos=(0, -1, 0), skip={1})
    _, vol = read_single(tmp_path)
    # source k=1 is the second slice from the top: canonical z = 5
    assert vol.filled_slices == [5]
    expected = a.copy()
    expected[5] = FILL_HU
    np.testing.assert_array_equal(vol.image, expected)


def test_irregular_spacing_is_a_clear_geometry_error(tmp_path):
    a = canonical_test_array(SHAPE, seed=16)
    series = generate_uid()
    write_ct_series(tmp_path, a, series_uid=series, z_shift={3: 0.9})
    result = scan(str(tmp_path))
    with pytest.raises(GeometryError) as info:
        read_acquisition(result.acquisitions[0])
    msg = str(info.value)
    assert series in msg and "irregular slice spacing" in msg
    assert "-95.000→-91.600" in msg  # the positions around the bad step
    assert "regular spacing 2.5000 mm" in msg
    assert isinstance(info.value, SourceError)


def test_small_position_noise_is_tolerated(tmp_path):
    a = canonical_test_array(SHAPE, seed=17)
    write_ct_series(tmp_path, a, z_shift={2: 0.004, 4: -0.005})
    _, vol = read_single(tmp_path)
    np.testing.assert_array_equal(vol.image, a)
    assert vol.spacing_report["max_deviation_mm"] > 0


def test_slice_thickness_is_not_the_spacing(tmp_path):
    a = canonical_test_array(SHAPE, seed=18)
    write_ct_series(tmp_path, a, spacing_zyx=(0.8, 0.75, 0.7), slice_thickness=1.25)
    _, vol = read_single(tmp_path)
    assert_matches_sitk(tmp_path, vol, a)
    assert vol.grid.spacing[0] == pytest.approx(0.8)
    assert vol.spacing_report["slice_thickness_mm"] == [1.25]
    assert vol.spacing_report["thickness_differs_from_spacing"] is True
    assert vol.attrs["SliceThickness"] == 1.25


def test_instance_numbers_starting_at_45(tmp_path):
    a = canonical_test_array(SHAPE, seed=19)
    write_ct_series(tmp_path, a, instance_start=45, series_number=100, series_description="")
    result, vol = read_single(tmp_path)
    assert_matches_sitk(tmp_path, vol, a)
    assert result.acquisitions[0].series_number == 100


def test_analyse_spacing_units():
    r = analyse_spacing([0.0, 2.5, 5.0, 12.5, 15.0])
    assert r.spacing == pytest.approx(2.5) and r.missing == (3, 4) and r.n_grid == 7
    with pytest.raises(GeometryError, match="irregular"):
        analyse_spacing([0.0, 2.5, 5.0, 8.7])
    with pytest.raises(GeometryError, match="same position"):
        analyse_spacing([0.0, 2.5, 2.5, 5.0])
    with pytest.raises(GeometryError, match="no slice spacing"):
        analyse_spacing([1.0])


# ----------------------------------------------------------------------------- messy trees


@pytest.mark.parametrize("truncated_first", [True, False])
def test_truncated_duplicate_keeps_the_good_copy(tmp_path, truncated_first):
    a = canonical_test_array(SHAPE, seed=20)
    paths = write_ct_series(tmp_path / "b_series", a)
    victim = paths[2]
    copy = tmp_path / ("a_copy" if truncated_first else "c_copy") / victim.name
    copy.parent.mkdir()
    copy.write_bytes(victim.read_bytes()[: victim.stat().st_size - 200])
    result, vol = read_single(tmp_path)
    np.testing.assert_array_equal(vol.image, a)
    notes = [n for n in result.notes if "duplicate SOPInstanceUID" in n.reason]
    assert len(notes) == 1 and notes[0].path.endswith(str(copy.relative_to(tmp_path)))
    assert "truncated" in notes[0].reason


def test_truncated_unique_file_is_a_lost_input_and_a_flagged_gap(tmp_path):
    a = canonical_test_array(SHAPE, seed=27)
    paths = write_ct_series(tmp_path, a)
    victim = paths[3]
    victim.write_bytes(victim.read_bytes()[:-100])
    result = scan(str(tmp_path))
    (acq,) = result.acquisitions
    assert len(acq.slices) == SHAPE[0] - 1
    (lost,) = result.left_out
    assert lost.path == str(victim) and "truncated" in lost.reason
    vol = read_acquisition(acq)
    assert len(vol.filled_slices) == 1 and (vol.image[vol.filled_slices[0]] == FILL_HU).all()


def test_slice_damaged_after_the_scan_is_filled_and_named(tmp_path):
    a = canonical_test_array(SHAPE, seed=28)
    paths = write_ct_series(tmp_path, a)
    result = scan(str(tmp_path))
    paths[2].write_bytes(b"\x00" * 50)  # corrupted between planning and reading
    vol = read_acquisition(result.acquisitions[0])
    (damaged,) = vol.damaged_slices
    assert damaged["path"] == str(paths[2]) and "cannot read DICOM file" in damaged["reason"]
    assert damaged["z"] in vol.filled_slices
    keep = [z for z in range(SHAPE[0]) if z != damaged["z"]]
    np.testing.assert_array_equal(vol.image[keep], a[keep])
    for p in paths:
        p.write_bytes(b"")
    with pytest.raises(UnreadableFileError, match="no slice could be read"):
        read_acquisition(result.acquisitions[0])


def test_identical_duplicate_copy(tmp_path):
    a = canonical_test_array(SHAPE, seed=21)
    paths = write_ct_series(tmp_path / "s1", a)
    shutil.copytree(tmp_path / "s1", tmp_path / "s2")
    result, vol = read_single(tmp_path)
    np.testing.assert_array_equal(vol.image, a)
    assert sum("duplicate SOPInstanceUID" in n.reason for n in result.notes) == len(paths)


def test_junk_files_are_skipped_with_notes(tmp_path):
    a = canonical_test_array(SHAPE, seed=22)
    write_ct_series(tmp_path / "series", a)
    (tmp_path / "README.txt").write_text("not dicom\n")
    (tmp_path / "series" / "empty.dcm").write_bytes(b"")
    (tmp_path / "series" / "noise.dcm").write_bytes(np.random.default_rng(0).bytes(3000))
    (tmp_path / "metadata.csv").write_text("Series UID,Collection\n1.2.3,X\n")
    result, vol = read_single(tmp_path)
    np.testing.assert_array_equal(vol.image, a)
    # files the download layout ships are not worth a word; damaged "DICOM" files are losses
    assert result.notes == []
    lost = {Path(n.path).name: n.reason for n in result.left_out}
    assert set(lost) == {"empty.dcm", "noise.dcm"}
    assert lost["empty.dcm"].startswith("zero-byte file")
    assert "not DICOM" in lost["noise.dcm"]
    assert result.n_files == 6 + 4


def test_localizers_are_skipped(tmp_path):
    study = Study()
    a = canonical_test_array(SHAPE, seed=23)
    series = generate_uid()
    write_ct_series(tmp_path / "ct", a, study=study, series_uid=series)
    # an explicit LOCALIZER (coronal, one slice) in its own series
    write_ct_series(
        tmp_path / "scout",
        canonical_test_array((1, 16, 16)),
        study=study,
        row_cos=(1, 0, 0),
        col_cos=(0, 0, -1),
        series_number=1,
        extra={"ImageType": ["ORIGINAL", "PRIMARY", "LOCALIZER"]},
    )
    # a single orthogonal (sagittal) slice without the LOCALIZER flag
    write_ct_series(
        tmp_path / "scout2",
        canonical_test_array((16, 16, 1)),
        study=study,
        row_cos=(0, 1, 0),
        col_cos=(0, 0, -1),
        series_number=2,
    )
    # a localizer inside the CT series itself (same SeriesInstanceUID)
    write_ct_series(
        tmp_path / "ct",
        canonical_test_array((1, 16, 16)),
        study=study,
        series_uid=series,
        row_cos=(1, 0, 0),
        col_cos=(0, 0, -1),
        name="scout.dcm",
    )
    result, vol = read_single(tmp_path)
    np.testing.assert_array_equal(vol.image, a)
    reasons = sorted(n.reason for n in result.notes)
    assert any("ImageType contains LOCALIZER" in r for r in reasons)
    assert sum("single slice orthogonal" in r for r in reasons) == 2


def test_non_ct_objects_in_the_same_study(tmp_path):
    study = Study()
    a = canonical_test_array(SHAPE, seed=24)
    series = generate_uid()
    write_ct_series(tmp_path / "ct", a, study=study, series_uid=series)
    sr = write_non_image(tmp_path / "sr" / "1-1.dcm", study, BASIC_TEXT_SR, series_number=5)
    seg = write_non_image(
        tmp_path / "seg" / "1-1.dcm", study, SEGMENTATION_STORAGE, referenced_series=series
    )
    result, vol = read_single(tmp_path)
    np.testing.assert_array_equal(vol.image, a)
    assert [s.path for s in result.segs] == [str(seg)]
    s = result.segs[0]
    assert s.referenced_series_uids == (series,) and s.series_number == 300
    assert s.study_uid == study.study_uid and s.patient_id == study.patient_id
    sr_notes = [n for n in result.notes if n.path == str(sr)]
    assert sr_notes and "non-image" in sr_notes[0].reason


# ----------------------------------------------------------------------------- remote


@pytest.mark.parametrize("header_bytes", [64 * 1024, 300], ids=["prefix", "fallback-whole-file"])
def test_remote_memory_filesystem_idc_layout(tmp_path, header_bytes):
    a = canonical_test_array(SHAPE, seed=25)
    paths = write_ct_series(tmp_path, a, row_cos=(-1, 0, 0), col_cos=(0, -1, 0))
    fs = fsspec.filesystem("memory")
    root = f"/idc-{uuid.uuid4()}"
    series_prefix = f"{root}/{uuid.uuid4()}"
    try:
        for p in paths:
            fs.pipe(f"{series_prefix}/{uuid.uuid4()}.dcm", p.read_bytes())
        fs.pipe(f"{series_prefix}/junk.bin", b"\x00" * 100_000)
        result = scan(f"memory://{root}", header_bytes=header_bytes)
        assert len(result.acquisitions) == 1
        vol = read_acquisition(result.acquisitions[0])
        np.testing.assert_array_equal(vol.image, a)
        assert [Path(n.path).name for n in result.notes] == ["junk.bin"]
    finally:
        fs.rm(root, recursive=True)


def test_file_url(tmp_path):
    a = canonical_test_array(SHAPE, seed=26)
    write_ct_series(tmp_path, a)
    result = scan(tmp_path.as_uri(), storage_options={})
    vol = read_acquisition(result.acquisitions[0], storage_options={})
    np.testing.assert_array_equal(vol.image, a)


# ----------------------------------------------------------------------------- property


_AXES = [np.array(v, float) for v in ((1, 0, 0), (0, 1, 0), (0, 0, 1))]


@st.composite
def orientations(draw):
    perm = draw(st.permutations([0, 1, 2]))
    signs = draw(st.tuples(st.sampled_from([-1, 1]), st.sampled_from([-1, 1])))
    return tuple(signs[0] * _AXES[perm[0]]), tuple(signs[1] * _AXES[perm[1]])


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    orient=orientations(),
    reverse=st.booleans(),
    shuffle=st.integers(0, 10_000),
    seed=st.integers(0, 100),
)
def test_any_axis_aligned_orientation_and_order_gives_the_same_volume(
    orient, reverse, shuffle, seed
):
    a = canonical_test_array((4, 5, 6), seed=seed)
    row_cos, col_cos = orient
    with tempfile.TemporaryDirectory() as d:
        write_ct_series(
            d,
            a,
            spacing_zyx=(3.0, 1.5, 0.5),
            origin_zyx=(10.0, -20.0, 30.0),
            row_cos=row_cos,
            col_cos=col_cos,
            reverse_instances=reverse,
            name="{sop}.dcm",
            shuffle_seed=shuffle,
        )
        result = scan(d)
        assert len(result.acquisitions) == 1
        vol = read_acquisition(result.acquisitions[0])
    np.testing.assert_array_equal(vol.image, a)
    assert vol.grid.spacing == pytest.approx((3.0, 1.5, 0.5))
    assert vol.grid.origin == pytest.approx((10.0, -20.0, 30.0))


def _rescale_header(slope: float, intercept: float, representation: int):
    """The decoder's header of a slice with these rescale attributes (read as pydicom would)."""
    from pydicom.dataset import Dataset

    from livercube.sources.slice_header import slice_header

    ds = Dataset()
    ds.RescaleSlope, ds.RescaleIntercept = str(slope), str(intercept)
    ds.PixelRepresentation = representation
    return slice_header(ds)


@pytest.mark.parametrize(
    ("dtype", "lo", "hi", "slope", "intercept"),
    [
        (np.uint16, 0, 65535, 1, -32768),  # the whole unsigned range maps onto int16 exactly
        (np.uint16, 0, 4095, 1, -1024),
        (np.int16, -32768, 32767 - 1024, 1, 1024),
        (np.int16, -2000, 4000, 3, -1024),
        (np.uint16, 0, 10000, 2, -20000),
    ],
)
def test_integral_rescale_is_exact_at_the_int16_edges(dtype, lo, hi, slope, intercept):
    """The int16/int32 shortcuts agree with 64-bit arithmetic wherever the result fits."""
    from livercube.sources.dicom_ct import stored_to_hu

    rng = np.random.default_rng(0)
    stored = rng.integers(lo, hi, size=(64, 64), endpoint=True).astype(dtype)
    stored.flat[:2] = (lo, hi)
    rep = int(np.dtype(dtype).kind == "i")
    hu, n_pad = stored_to_hu(_rescale_header(slope, intercept, rep), stored, source="t")
    assert hu.dtype == np.int16 and n_pad == 0
    np.testing.assert_array_equal(hu, stored.astype(np.int64) * slope + intercept)


def test_integral_rescale_out_of_int16_is_refused_before_wrapping():
    from livercube.sources.dicom_ct import stored_to_hu

    stored = np.array([[0, 40000]], np.uint16)  # 40000 - 1024 does not fit int16
    with pytest.raises(IntensityError, match=r"\[-1024, 38976\]"):
        stored_to_hu(_rescale_header(1, -1024, 0), stored, source="t")


def test_plain_16_bit_slices_skip_pydicom_decoding_with_identical_values():
    """The frombuffer shortcut equals pydicom's decoder on pydicom's own real CT slices, and
    leaves anything not plain 16-bit native to pydicom."""
    import pydicom
    from pydicom.data import get_testdata_file

    from livercube.sources.dicom_ct import _native_int16_pixels

    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    fast = _native_int16_pixels(ds)
    assert fast is not None
    np.testing.assert_array_equal(fast, ds.pixel_array)
    assert fast.dtype == ds.pixel_array.dtype
    for name in ("MR_small_RLE.dcm", "MR_small_bigendian.dcm", "JPEG2000.dcm"):
        assert _native_int16_pixels(pydicom.dcmread(get_testdata_file(name))) is None
    ds.BitsStored = 12
    assert _native_int16_pixels(ds) is None


# -- the header planning read, reused by the task -------------------------------------------
def _refuse_dcmread(monkeypatch) -> None:
    import livercube.sources.dicom_ct as ct

    def refuse(*args, **kwargs):
        raise AssertionError("the task parsed a header planning had already read")

    monkeypatch.setattr(ct.pydicom, "dcmread", refuse)


@pytest.mark.parametrize("implicit", [False, True])
def test_task_reuses_the_planned_header_of_unchanged_files(tmp_path, monkeypatch, implicit):
    """Plain slices are decoded from planning's header and a view of their bytes: no second
    parse, and the same volume SimpleITK reads (padding and rescale included)."""
    a = canonical_test_array(SHAPE, seed=31)
    a.flat[:5] = -2000 - 1024  # stored -2000: GE's padding value
    write_ct_series(tmp_path, a, padding_value=-2000, intercept=-1024.0)
    if implicit:
        import pydicom

        for p in sorted(tmp_path.glob("*.dcm")):
            ds = pydicom.dcmread(p)
            ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
            ds.save_as(p, enforce_file_format=True)
    result = scan(str(tmp_path))
    acq = result.acquisitions[0]
    assert all(ref.header is not None and ref.header.pixels is not None for ref in acq.slices)
    _refuse_dcmread(monkeypatch)
    vol = read_acquisition(acq)
    monkeypatch.undo()
    assert_matches_sitk(tmp_path, vol, a)
    assert vol.attrs["padding_voxels"] == 5 and vol.attrs["padding_values_stored"] == [-2000]


def test_a_file_rewritten_after_planning_is_parsed_again(tmp_path):
    """Different header bytes (a new intercept) mean a different digest: the task reads the
    file as it is now, not as planning saw it."""
    import pydicom

    a = canonical_test_array(SHAPE, seed=32)
    paths = write_ct_series(tmp_path, a)
    result = scan(str(tmp_path))
    ds = pydicom.dcmread(paths[3])
    ds.RescaleIntercept = "-1000"  # same length on disk as "-1024"
    ds.save_as(paths[3], enforce_file_format=True)
    vol = read_acquisition(result.acquisitions[0])
    z = [s for s, uids in vol.sop_uids_by_canonical_z.items() if ds.SOPInstanceUID in uids]
    (z,) = z
    np.testing.assert_array_equal(vol.image[z], a[z] + 24)
    assert sorted(vol.attrs["rescale_intercepts"]) == [-1024.0, -1000.0]


def test_pixels_changed_after_planning_are_read_as_they_are_now(tmp_path, monkeypatch):
    """Only the header is vouched for by planning: new pixel bytes under the same header are
    read from the file (still without parsing it again)."""
    import pydicom

    a = canonical_test_array(SHAPE, seed=33)
    paths = write_ct_series(tmp_path, a)
    result = scan(str(tmp_path))
    ds = pydicom.dcmread(paths[1])
    arr = ds.pixel_array.copy()
    arr[0, :4] += 7
    ds.PixelData = arr.tobytes()
    ds.save_as(paths[1], enforce_file_format=True)
    _refuse_dcmread(monkeypatch)
    vol = read_acquisition(result.acquisitions[0])
    monkeypatch.undo()
    expected = read_acquisition(scan(str(tmp_path)).acquisitions[0])  # planned afresh
    np.testing.assert_array_equal(vol.image, expected.image)
    assert not np.array_equal(vol.image, a)


def test_pixel_location_only_for_plain_native_slices():
    """pydicom's real files: the planned view equals pydicom's decoder wherever a location is
    given, and nothing compressed, big endian, deflated or not 16-bit gets one."""
    import io

    import pydicom
    from pydicom.data import get_testdata_file, get_testdata_files

    from livercube.sources.slice_header import pixel_location, slice_header

    located = {}
    for path in get_testdata_files("*.dcm"):
        blob = Path(path).read_bytes()
        fp = io.BytesIO(blob)
        try:
            ds = pydicom.dcmread(fp, stop_before_pixels=True)
        except Exception:
            continue
        try:
            where = pixel_location(ds, blob, fp.tell())
        except Exception as exc:  # a damaged header may refuse, never crash the scan
            pytest.fail(f"{Path(path).name}: {exc!r}")
        if where is None:
            continue
        full = pydicom.dcmread(path)
        view = where.view(blob, int(full.Rows), int(full.Columns))
        if view is None:  # MR_truncated.dcm: the header announces more than the file holds
            assert len(blob) < where.start + 2 * int(full.Rows) * int(full.Columns), path
            with pytest.raises(ValueError):
                _ = full.pixel_array
            continue
        np.testing.assert_array_equal(view, full.pixel_array, err_msg=path)
        assert view.dtype == full.pixel_array.dtype
        assert slice_header(ds, where) == slice_header(full, where)
        located[Path(path).name] = str(full.file_meta.TransferSyntaxUID.name)
    assert {"CT_small.dcm", "MR_small_implicit.dcm"} <= set(located), located
    for name in ("MR_small_RLE.dcm", "MR_small_bigendian.dcm", "JPEG2000.dcm", "image_dfl.dcm"):
        blob = Path(get_testdata_file(name)).read_bytes()
        fp = io.BytesIO(blob)
        ds = pydicom.dcmread(fp, stop_before_pixels=True)
        assert pixel_location(ds, blob, fp.tell()) is None, name
    ct = Path(get_testdata_file("CT_small.dcm")).read_bytes()
    fp = io.BytesIO(ct)
    ds = pydicom.dcmread(fp, stop_before_pixels=True)
    where = pixel_location(ds, ct, fp.tell())
    frame_end = where.start + 2 * 128 * 128
    assert where.view(ct[:frame_end], 128, 128) is not None
    assert where.view(ct[: frame_end - 2], 128, 128) is None  # a frame cut short is not viewed
    changed = bytearray(ct)
    changed[200] ^= 1
    assert where.view(bytes(changed), 128, 128) is None  # nor one under other header bytes


def test_planning_cache_gives_the_values_pydicom_gives():
    """One conversion cache shared across many headers (as a planning chunk shares it) never
    hands one file another's value: pydicom's real files, and the same padding bytes read as
    unsigned and as signed (the VR of PixelPaddingValue follows PixelRepresentation)."""
    import io

    import pydicom
    from pydicom.data import get_testdata_files
    from pydicom.filebase import DicomBytesIO

    from livercube.sources.slice_header import slice_header

    def implicit_file(rep: int) -> bytes:
        ds = pydicom.Dataset()
        ds.SOPInstanceUID = generate_uid()
        ds.Rows, ds.Columns, ds.PixelRepresentation = 2, 2, rep
        ds.RescaleSlope, ds.RescaleIntercept = "1", "-1024"
        ds.add_new(0x00280120, "US" if rep == 0 else "SS", 0xF830 if rep == 0 else -2000)
        fp = DicomBytesIO()
        fp.is_little_endian, fp.is_implicit_VR = True, True
        pydicom.filewriter.write_dataset(fp, ds)
        return fp.getvalue()

    cache: dict = {}
    headers = []
    for rep in (0, 1, 0):
        raw = pydicom.dcmread(io.BytesIO(implicit_file(rep)), force=True)
        parsed = pydicom.dcmread(io.BytesIO(implicit_file(rep)), force=True)
        parsed.PixelPaddingValue  # noqa: B018 (converted on its own, no cache)
        got = slice_header(raw, None, cache)
        assert got._replace(sop_uid="") == slice_header(parsed)._replace(sop_uid="")
        headers.append(got.padding_value)
    assert headers == [0xF830, -2000, 0xF830]
    for path in get_testdata_files("*.dcm"):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            expected = slice_header(pydicom.dcmread(path, stop_before_pixels=True))
        except Exception:
            continue
        assert slice_header(ds, None, cache) == expected, path
