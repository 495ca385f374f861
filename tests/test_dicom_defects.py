"""Real-world DICOM shapes that used to be split wrongly, crash a run or vanish with exit 0.

Each case goes through :func:`scan` and :func:`convert` (the code path the CLI takes) and checks
the report: what was lost is named under ``skipped`` (exit 3), everything else converts.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from dicom_factory import Study, canonical_test_array, write_ct_series
from pydicom.uid import generate_uid
from seg_factory import sorted_sources, write_hd_seg

import livercube
from livercube.convert import convert
from livercube.sources import dicom_sop
from livercube.sources.dicom_scan import scan

SHAPE = (6, 16, 16)
DCM2NIIX = Path(sys.executable).parent / "dcm2niix"


def _convert(root: Path, tmp_path: Path, collection: str = "crlm"):
    return convert(str(root), str(tmp_path / "store.zarr"), collection, progress=False)


def _reasons(report) -> list[str]:
    return [f"{s['input']}: {s['reason']}" for s in report.skipped]


def test_per_slice_acquisition_numbers_make_one_volume(tmp_path):
    a = canonical_test_array(SHAPE, seed=1)
    paths = write_ct_series(tmp_path / "ct", a)
    for n, p in enumerate(paths):  # one AcquisitionNumber per slice, as some scanners write
        ds = pydicom.dcmread(p)
        ds.AcquisitionNumber = 40 + n
        ds.AcquisitionTime = f"1015{n:02d}"
        ds.save_as(p)
    result = scan(str(tmp_path))
    (acq,) = result.acquisitions
    assert len(acq.slices) == SHAPE[0] and not result.left_out
    assert any("kept as one volume" in n.reason for n in acq.notes)
    report = _convert(tmp_path, tmp_path)
    assert report.exit_code == 0, report.summary()
    np.testing.assert_array_equal(livercube.open(str(tmp_path / "store.zarr")).volume(0).image, a)


def test_stray_slice_far_away_is_not_padded_with_air(tmp_path):
    a = canonical_test_array(SHAPE, seed=2)
    study = Study()
    series = generate_uid()
    write_ct_series(tmp_path / "ct", a, study=study, series_uid=series)
    stray = write_ct_series(
        tmp_path / "ct", canonical_test_array((1, 16, 16), seed=3), study=study,
        series_uid=series, origin_zyx=(400.0, -50.0, -60.0), name="stray.dcm",
    )[0]  # fmt: skip
    report = _convert(tmp_path, tmp_path)
    assert report.exit_code == 3
    (lost,) = report.skipped
    assert lost["input"].endswith("stray.dcm") and "single CT slice" in lost["reason"]
    img = livercube.open(str(tmp_path / "store.zarr")).volume(0).image
    assert img.shape == SHAPE  # not 6 + 196 filled slices
    assert stray.exists()


def test_duplicate_positions_with_other_pixels_and_mixed_orientations_do_not_crash(tmp_path):
    study = Study()
    series = generate_uid()
    a, b = canonical_test_array(SHAPE, seed=4), canonical_test_array(SHAPE, seed=5)
    # same series, same AcquisitionNumber and time, same positions, different pixels
    write_ct_series(tmp_path / "s", a, study=study, series_uid=series, name="a{n:02d}.dcm")
    write_ct_series(tmp_path / "s", b, study=study, series_uid=series, name="b{n:02d}.dcm",
                    instance_start=7)  # fmt: skip
    # and a coronal stack inside the same acquisition
    write_ct_series(tmp_path / "s", canonical_test_array((16, 4, 16), seed=6), study=study,
                    series_uid=series, row_cos=(1, 0, 0), col_cos=(0, 0, -1),
                    name="c{n:02d}.dcm")  # fmt: skip
    report = _convert(tmp_path, tmp_path)
    assert report.exit_code == 0, report.summary()
    paths = sorted(r["path"] for r in report.converted)
    assert len(paths) == 3 and len(set(paths)) == 3, paths
    store = livercube.open(str(tmp_path / "store.zarr"))
    images = [store.volume(i).image.values for i in range(3)]
    assert any(np.array_equal(im, a) for im in images)
    assert any(np.array_equal(im, b) for im in images)


def test_zero_byte_and_unreadable_slices_are_losses_and_flag_the_volume(tmp_path):
    a = canonical_test_array(SHAPE, seed=7)
    paths = write_ct_series(tmp_path / "ct", a)
    paths[2].write_bytes(b"")
    paths[4].write_bytes(paths[4].read_bytes()[:-300])  # truncated pixel data
    report = _convert(tmp_path, tmp_path)
    assert report.exit_code == 3
    reasons = _reasons(report)
    assert any(paths[2].name in r and "zero-byte" in r for r in reasons), reasons
    assert any(paths[4].name in r and "truncated" in r for r in reasons), reasons
    store = livercube.open(str(tmp_path / "store.zarr"))
    meta = store.volume_attrs(0)
    assert meta["geometry_flags"]["filled_slices"] == 2
    assert len(meta["source"]["filled_slices"]) == 2


def test_implausible_matrix_is_refused_before_allocating(tmp_path):
    a = canonical_test_array(SHAPE, seed=8)
    paths = write_ct_series(tmp_path / "ct", a)
    for p in paths:
        ds = pydicom.dcmread(p)
        ds.Rows = ds.Columns = 65535  # header claims 8 GiB per slice
        ds.save_as(p)
    report = _convert(tmp_path, tmp_path)
    assert report.exit_code == 3
    assert sum("implausible matrix 65535×65535" in r for r in _reasons(report)) == len(paths)


def _tilted_series(root: Path, tilt_mm_per_slice: float) -> list[Path]:
    a = canonical_test_array(SHAPE, seed=9)
    paths = write_ct_series(root, a, spacing_zyx=(2.5, 0.75, 0.7))
    for p in paths:
        ds = pydicom.dcmread(p)
        ipp = [float(v) for v in ds.ImagePositionPatient]
        k = (ipp[2] - (-100.0)) / 2.5
        ipp[1] += k * tilt_mm_per_slice  # origins walk along y: gantry tilt
        ds.ImagePositionPatient = [f"{v:.4f}" for v in ipp]
        ds.GantryDetectorTilt = f"{np.degrees(np.arctan(tilt_mm_per_slice / 2.5)):.2f}"
        ds.save_as(p)
    return paths


def test_gantry_tilt_is_refused_like_dcm2niix_detects_it(tmp_path):
    _tilted_series(tmp_path / "src" / "ct", 0.5)
    report = _convert(tmp_path / "src", tmp_path)
    assert report.exit_code == 3 and not report.converted
    (lost,) = report.skipped[:1]
    assert "gantry tilt" in lost["reason"] and "11.3°" in lost["reason"], lost
    # the independent reader sees the same: dcm2niix tilt-corrects it (its output says Tilt)
    out = tmp_path / "nii"
    out.mkdir()
    res = subprocess.run([str(DCM2NIIX), "-z", "n", "-o", str(out), str(tmp_path / "src")],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    assert any("Tilt" in p.name for p in out.iterdir()), (res.stdout, list(out.iterdir()))


def test_tiny_position_rounding_is_not_tilt(tmp_path):
    _tilted_series(tmp_path / "ct", 0.0005)
    report = _convert(tmp_path, tmp_path)
    assert report.exit_code == 0, report.summary()


def test_legacy_converted_enhanced_ct_converts_frame_by_frame(tmp_path):
    """A multi-frame CT (highdicom's Legacy Converted Enhanced CT of a single-frame series)
    gives the same volume as the series, and verify's SimpleITK decoding agrees."""
    from livercube.store.verify import verify

    a = canonical_test_array(SHAPE, seed=10)
    write_ct_series(tmp_path / "single", a, row_cos=(-1, 0, 0), col_cos=(0, -1, 0))
    legacy = hd.legacy.LegacyConvertedEnhancedCTImage(
        legacy_datasets=sorted_sources(tmp_path / "single"),
        series_instance_uid=generate_uid(),
        series_number=9,
        sop_instance_uid=generate_uid(),
        instance_number=1,
    )
    src = tmp_path / "src" / "enhanced"
    src.mkdir(parents=True)
    legacy.save_as(src / "1-1.dcm")
    assert pydicom.dcmread(src / "1-1.dcm").SOPClassUID == dicom_sop.LEGACY_ENHANCED_CT_IMAGE
    result = scan(str(tmp_path / "src"))
    (acq,) = result.acquisitions
    assert sorted(s.frame for s in acq.slices) == list(range(SHAPE[0]))
    report = _convert(tmp_path / "src", tmp_path)
    assert report.exit_code == 0, report.summary()
    dest = str(tmp_path / "store.zarr")
    np.testing.assert_array_equal(livercube.open(dest).volume(0).image, a)
    assert verify(dest, source=str(tmp_path / "src"), collection="crlm").exit_code == 0


def test_damaged_multiframe_header_is_a_loss(tmp_path):
    a = canonical_test_array(SHAPE, seed=12)
    write_ct_series(tmp_path / "single", a)
    legacy = hd.legacy.LegacyConvertedEnhancedCTImage(
        legacy_datasets=sorted_sources(tmp_path / "single"),
        series_instance_uid=generate_uid(), series_number=9,
        sop_instance_uid=generate_uid(), instance_number=1,
    )  # fmt: skip
    del legacy.PerFrameFunctionalGroupsSequence[-1]
    (tmp_path / "src").mkdir()
    legacy.save_as(tmp_path / "src" / "1-1.dcm")
    report = _convert(tmp_path / "src", tmp_path)
    assert report.exit_code == 3
    assert any("damaged multi-frame CT" in r for r in _reasons(report)), _reasons(report)


# --------------------------------------------------------------------------- SEG problems


def _ct_with_seg(root: Path, edit=None, n_segments: int = 1) -> tuple[Path, np.ndarray]:
    a = canonical_test_array(SHAPE, seed=11)
    write_ct_series(root / "ct", a, series_description="PORTAL VENOUS")
    sources = sorted_sources(root / "ct")
    masks = np.zeros((SHAPE[0], 16, 16, n_segments), dtype=bool)
    masks[1:4, 3:9, 4:12, :] = True
    labels = ["Liver"] + [f"Tumor_{i}" for i in range(1, n_segments)]
    seg = write_hd_seg(root / "seg.dcm", sources, masks, labels)
    if edit:
        ds = pydicom.dcmread(seg)
        edit(ds)
        ds.save_as(seg)
    return seg, a


def test_seg_with_too_many_segments_costs_only_the_seg(tmp_path):
    _, a = _ct_with_seg(tmp_path / "src", n_segments=70)
    report = _convert(tmp_path / "src", tmp_path)
    assert report.exit_code == 3 and len(report.converted) == 1
    assert any("seg.dcm" in r and "segments exceed" in r for r in _reasons(report))
    store = livercube.open(str(tmp_path / "store.zarr"))
    np.testing.assert_array_equal(store.volume(0).image, a)
    assert not bool(store.catalog.annotated.values[0])


def test_seg_without_segments_is_not_annotation_complete(tmp_path):
    def drop(ds):
        ds.SegmentSequence = []

    _ct_with_seg(tmp_path / "src", drop)
    report = _convert(tmp_path / "src", tmp_path)
    assert report.exit_code == 3
    assert any("describes no segments" in r for r in _reasons(report)), _reasons(report)
    meta = livercube.open(str(tmp_path / "store.zarr")).volume_attrs(0)
    assert meta["annotation_complete"] is False


def test_seg_with_more_functional_groups_than_frames_is_damaged(tmp_path):
    def extra(ds):
        ds.PerFrameFunctionalGroupsSequence.append(ds.PerFrameFunctionalGroupsSequence[0])

    _ct_with_seg(tmp_path / "src", extra)
    report = _convert(tmp_path / "src", tmp_path)
    assert report.exit_code == 3 and len(report.converted) == 1
    assert any("damaged DICOM-SEG" in r for r in _reasons(report)), _reasons(report)


@pytest.mark.parametrize("damage", ["zero-byte", "truncated"])
def test_unreadable_expert_seg_is_reported(tmp_path, damage):
    seg, _ = _ct_with_seg(tmp_path / "src")
    data = seg.read_bytes()
    seg.write_bytes(b"" if damage == "zero-byte" else data[: len(data) - 200])
    report = _convert(tmp_path / "src", tmp_path)
    assert report.exit_code == 3 and len(report.converted) == 1
    assert any("seg.dcm" in r for r in _reasons(report)), _reasons(report)
