"""Real DICOM nobody here wrote: pydicom's bundled CT series, SEGs written by highdicom with its
defaults, checked against independent readers (SimpleITK for CT, highdicom's own decoding by
source instance for SEG) after a conversion through ``convert`` / the CLI.

pydicom's ``dicomdirtests/77654033/CT2`` is a real, decimated 1.25 mm axial series: slices at
z = -99.48 (InstanceNumber 18, AcquisitionNumber 4) and 103.02, 104.27, 105.52 (instances
180–182, AcquisitionNumbers 44, 45, 45).  The per-slice AcquisitionNumbers must not split the
stack; the slice 162 spacings away is a stray that must not be padded with 161 slices of air.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pydicom.data
import pytest
import SimpleITK as sitk
from seg_factory import write_hd_seg
from seg_invariant import assert_segment_counts

import livercube
from livercube.convert import convert
from livercube.sources import dicom_sop

LIVERCUBE = str(Path(sys.executable).parent / "livercube")
TEST_FILES = Path(pydicom.data.get_testdata_file("CT_small.dcm")).parent
CT2 = TEST_FILES / "dicomdirtests" / "77654033" / "CT2"
STRAY_Z = -99.48


def _tcia_tree(root: Path, files: list[Path], patient: str, series_folder: str) -> list[Path]:
    """Copy real files into a TCIA/NBIA-like layout (folder names are never trusted)."""
    d = root / patient / "01-01-2000-NA-CT-00001" / series_folder
    d.mkdir(parents=True)
    out = []
    for i, f in enumerate(sorted(files), start=1):
        dst = d / f"1-{i:02d}.dcm"
        shutil.copyfile(f, dst)
        out.append(dst)
    return out


def _ct2_sources() -> list[pydicom.Dataset]:
    """The CT2 datasets sorted along z."""
    dss = [pydicom.dcmread(p) for p in sorted(CT2.iterdir())]
    return sorted(dss, key=lambda ds: float(ds.ImagePositionPatient[2]))


def _masks(sources: list[pydicom.Dataset]) -> np.ndarray:
    """(slices, rows, cols, 2): Liver on the stray and on the outer two contiguous slices (the
    middle one empty, so its frame is omitted and no two Liver frames are adjacent), Mass on the
    middle slice only."""
    m = np.zeros((len(sources), 16, 16, 2), dtype=bool)
    z = [float(ds.ImagePositionPatient[2]) for ds in sources]
    for k, zk in enumerate(z):
        if abs(zk - STRAY_Z) < 0.01 or abs(zk - 103.02) < 0.01:
            m[k, 3:11, 2:9, 0] = True
        if abs(zk - 105.52) < 0.01:
            m[k, 5:14, 6:15, 0] = True
        if abs(zk - 104.27) < 0.01:
            m[k, 7:10, 7:12, 1] = True
    return m


def _write_seg(path: Path, sources, masks: np.ndarray, seg_type: str) -> Path:
    if seg_type == "LABELMAP":
        pixels = masks[..., 0].astype(np.uint8)
        pixels[masks[..., 1]] = 2
        return write_hd_seg(path, sources, pixels, ["Liver", "Mass"], seg_type)
    if seg_type == "FRACTIONAL":  # occupancy 0.75 ≥ 0.5: inside the segment
        pixels = masks.astype(np.float32) * 0.75
        return write_hd_seg(
            path, sources, pixels, ["Liver", "Mass"], seg_type, max_fractional_value=255
        )
    return write_hd_seg(path, sources, masks, ["Liver", "Mass"], seg_type)


@pytest.fixture()
def ct2_case(tmp_path: Path):
    """CT2 as a TCIA tree with a highdicom SEG (defaults: empty frames omitted)."""

    def make(seg_type: str) -> tuple[Path, list[pydicom.Dataset], np.ndarray]:
        root = tmp_path / f"HCC-{seg_type}"
        _tcia_tree(root, list(CT2.iterdir()), "77654033", "2.000000-Routine Brain-00002")
        sources = _ct2_sources()
        masks = _masks(sources)
        seg_dir = root / "77654033" / "01-01-2000-NA-CT-00001" / "300.000000-Segmentation-0003"
        seg_dir.mkdir()
        _write_seg(seg_dir / "1-1.dcm", sources, masks, seg_type)
        return root, sources, masks

    return make


def _sitk_lps(files: list[Path]) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(f) for f in files])
    return sitk.DICOMOrient(reader.Execute(), "LPS")


@pytest.mark.parametrize("seg_type", ["BINARY", "FRACTIONAL", "LABELMAP"])
def test_ct2_with_highdicom_seg_against_independent_readers(ct2_case, tmp_path, seg_type):
    root, sources, _ = ct2_case(seg_type)
    seg_path = next(root.rglob("300.000000-Segmentation-0003/1-1.dcm"))
    seg_ds = pydicom.dcmread(seg_path)
    if seg_type == "LABELMAP":
        assert seg_ds.SOPClassUID == dicom_sop.LABELMAP_SEGMENTATION
    else:  # highdicom's default omits empty frames: 3 Liver + 1 Mass frames for 4 slices
        assert int(seg_ds.NumberOfFrames) == 4
    dest = tmp_path / f"store-{seg_type}.zarr"
    report = convert(str(root), str(dest), "hcc-tace-seg", progress=False)

    # the stray slice and its Liver pixels are losses, said so; nothing else is
    lost = {Path(s["input"]).name if "/" in s["input"] else s["input"]: s["reason"]
            for s in report.skipped}  # fmt: skip
    assert report.exit_code == 3, report.summary()
    stray_file = next(
        p for p in root.rglob("1-*.dcm") if "Segmentation" not in str(p)
        and abs(float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2])
                - STRAY_Z) < 0.01
    )  # fmt: skip
    # (folder names carry descriptions, which the report cleans: compare patient and file)
    assert any(
        s["input"].startswith("77654033/")
        and Path(s["input"]).name == stray_file.name
        and "single CT slice" in s["reason"]
        for s in report.skipped
    ), report.skipped
    seg_losses = [s for s in report.skipped if "outside the CT volume" in s["reason"]]
    assert len(seg_losses) == 1 and "'Liver': 56" in seg_losses[0]["reason"], lost
    assert len(report.skipped) == 2, report.skipped
    assert len(report.converted) == 1 and not report.failed

    store = livercube.open(str(dest))
    ds = store.volume(0)
    contiguous = [s for s in sources if abs(float(s.ImagePositionPatient[2]) - STRAY_Z) > 1]
    # CT: voxels and geometry as SimpleITK reads the three contiguous files
    ref = _sitk_lps([Path(s.filename) for s in contiguous])
    np.testing.assert_array_equal(ds.image.values, sitk.GetArrayFromImage(ref))
    np.testing.assert_allclose(
        [ds.x.values[0], ds.y.values[0], ds.z.values[0]], ref.GetOrigin(), atol=1e-4
    )
    np.testing.assert_allclose(
        [float(np.diff(ds[a].values).mean()) for a in "xyz"], ref.GetSpacing(), rtol=1e-5
    )
    # one volume despite AcquisitionNumbers 44, 45, 45
    assert ds.image.shape == (3, 16, 16)

    # SEG: highdicom's own decoding, by source instance (no geometry involved), per CT slice
    hseg = hd.seg.segread(seg_path)
    got = store.segments(0)
    assert set(got) == {"Liver", "Mass"}
    for number, label in ((1, "Liver"), (2, "Mass")):
        for src in contiguous:
            z = int(np.argmin(np.abs(ds.z.values - float(src.ImagePositionPatient[2]))))
            expected = np.zeros((16, 16), dtype=bool)
            if src.SOPInstanceUID in {u for _, _, u in hseg.get_source_image_uids()} and _has_frame(
                hseg, src.SOPInstanceUID, number
            ):
                arr = hseg.get_pixels_by_source_instance(
                    source_sop_instance_uids=[src.SOPInstanceUID],
                    segment_numbers=[number],
                    combine_segments=False,
                    assert_missing_frames_are_empty=True,
                )[0, ..., 0]
                expected = arr > (0 if seg_type != "FRACTIONAL" else 0.5 - 1e-6)
            # store is LPS with identity direction; CT2 is axial with +x rows, +y columns
            np.testing.assert_array_equal(got[label][z], expected, err_msg=f"{label} z={z}")
    # the omitted middle Liver frame stays empty (it must not borrow a neighbour's content)
    assert not got["Liver"][1].any() and got["Liver"][0].any() and got["Liver"][2].any()
    assert_segment_counts(store, 0)
    if seg_type != "FRACTIONAL":  # dcmqi's segimage2itkimage writes binary/label maps only
        dq = _dcmqi_masks(seg_path, (ds.z.values, ds.y.values, ds.x.values), tmp_path / "dq")
        for label in ("Liver", "Mass"):
            np.testing.assert_array_equal(got[label], dq[label], err_msg=f"dcmqi {label}")


def _dcmqi_masks(seg_path: Path, coords, out: Path) -> dict[str, np.ndarray]:
    """Each segment as dcmqi's ``segimage2itkimage`` writes it, sampled at the stored voxels."""
    out.mkdir()
    run = subprocess.run(
        [str(Path(sys.executable).parent / "segimage2itkimage"), "--inputDICOM", str(seg_path),
         "--outputDirectory", str(out), "-t", "nifti"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    meta = json.loads((out / "meta.json").read_text())
    z, y, x = coords
    result = {}
    for n, group in enumerate(meta["segmentAttributes"], start=1):
        img = sitk.ReadImage(str(out / f"{n}.nii.gz"))
        arr = sitk.GetArrayFromImage(img)
        for attrs in group:
            mask = np.zeros((z.size, y.size, x.size), dtype=bool)
            for k, zk in enumerate(z):
                for j, yj in enumerate(y):
                    for i, xi in enumerate(x):
                        idx = img.TransformPhysicalPointToIndex((float(xi), float(yj), float(zk)))
                        if all(0 <= idx[a] < img.GetSize()[a] for a in range(3)):
                            mask[k, j, i] = arr[idx[2], idx[1], idx[0]] == attrs["labelID"]
            result[attrs["SegmentLabel"]] = mask
    return result


def _has_frame(hseg, sop_uid: str, number: int) -> bool:
    for f in range(int(hseg.NumberOfFrames)):
        item = hseg.PerFrameFunctionalGroupsSequence[f]
        refs = {
            s.ReferencedSOPInstanceUID
            for d in item.DerivationImageSequence
            for s in d.SourceImageSequence
        }
        seg_no = (
            int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
            if "SegmentIdentificationSequence" in item
            else number
        )
        if sop_uid in refs and seg_no == number:
            return True
    return False


def test_nothing_convertible_is_exit_3_with_every_file_named(tmp_path):
    """A single real CT slice (CT_small.dcm) and a damaged file: not a usage error."""
    root = tmp_path / "src"
    _tcia_tree(root, [TEST_FILES / "CT_small.dcm"], "1CT1", "1.000000-NA-00001")
    bad = root / "1CT1" / "01-01-2000-NA-CT-00001" / "1.000000-NA-00001" / "1-02.dcm"
    bad.write_bytes(b"")
    dest = tmp_path / "s.zarr"
    res = subprocess.run(
        [LIVERCUBE, "convert", str(root), str(dest), "--collection", "crlm", "--quiet"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 3, res.stdout + res.stderr
    report = json.loads((dest / "livercube-report.json").read_text())
    reasons = {s["input"]: s["reason"] for s in report["skipped"]}
    assert any(k.endswith("1-01.dcm") and "single CT slice" in v for k, v in reasons.items())
    assert any(k.endswith("1-02.dcm") and "zero-byte" in v for k, v in reasons.items())
    assert any("no convertible CT volume" in v for v in reasons.values())
    assert "Traceback" not in res.stderr


@pytest.mark.parametrize("mistake", ["hu", "seg-flip"])
def test_verify_source_catches_the_converters_own_mistakes(ct2_case, tmp_path, monkeypatch,
                                                           mistake):  # fmt: skip
    """A converter bug stays in effect during verify: only an independent decoder sees it."""
    from livercube.sources import dicom_ct, seg_place
    from livercube.store.verify import verify

    root, _, _ = ct2_case("BINARY")
    if mistake == "hu":
        real = dicom_ct.stored_to_hu

        def off_by_one(*args, **kwargs):
            hu, n = real(*args, **kwargs)
            return hu + np.int16(1), n

        monkeypatch.setattr(dicom_ct, "stored_to_hu", off_by_one)
    else:
        real_copy = seg_place._copy_frame

        def flipped(mask, g, f, values, positives):
            return real_copy(mask, g, f, values[::-1], positives)

        monkeypatch.setattr(seg_place, "_copy_frame", flipped)
    dest = str(tmp_path / "s.zarr")
    convert(str(root), dest, "hcc-tace-seg", progress=False)
    report = verify(dest, source=str(root), collection="hcc-tace-seg")
    assert report.exit_code == 4, report.summary()
    (vol,) = report.volumes
    expected = "image: " if mistake == "hu" else "segment 'Liver'"
    assert any(p.startswith(expected) for p in vol.problems), vol.problems
    monkeypatch.undo()
    clean = str(tmp_path / "clean.zarr")
    convert(str(root), clean, "hcc-tace-seg", progress=False)
    assert verify(clean, source=str(root), collection="hcc-tace-seg").exit_code == 0


@pytest.mark.parametrize("name", ["J2K_pixelrep_mismatch.dcm", "693_J2KI.dcm"])
def test_jpeg2000_ct_slices_decode_like_simpleitk(tmp_path, name):
    """Real JPEG 2000 CT (one with a codestream whose signedness disagrees with
    PixelRepresentation) made into a 3-slice series by re-positioning copies: the encoded
    pixel data is untouched; HU must equal SimpleITK's (GDCM's) decoding."""
    from livercube.store.verify import verify

    original = pydicom.dcmread(TEST_FILES / name)
    series = pydicom.uid.generate_uid()
    root = tmp_path / "src" / "P" / "study" / "series"
    root.mkdir(parents=True)
    files = []
    for k in range(3):
        ds = pydicom.dcmread(TEST_FILES / name)
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.SeriesInstanceUID = series
        ds.InstanceNumber = k + 1
        ipp = [float(v) for v in original.ImagePositionPatient]
        ds.ImagePositionPatient = [ipp[0], ipp[1], ipp[2] + 2.5 * k]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        files.append(root / f"1-{k + 1:02d}.dcm")
        ds.save_as(files[-1])
    dest = str(tmp_path / "s.zarr")
    report = convert(str(tmp_path / "src"), dest, "crlm", progress=False)
    assert report.exit_code == 0, report.summary()
    image = livercube.open(dest).volume(0).image.values
    ref = _sitk_lps(files)
    np.testing.assert_array_equal(image, sitk.GetArrayFromImage(ref))
    assert verify(dest, source=str(tmp_path / "src"), collection="crlm").exit_code == 0


def test_allow_listed_attributes_read_by_stored_bytes_equal_pydicoms_values():
    """Planning converts each distinct stored value once per chunk of headers; on every real
    file pydicom ships (explicit and implicit VR, big endian, other character sets, US/SS
    padding values) the result is pydicom's own value of each attribute, read afresh."""
    from livercube.sources.dicom_scan import ALLOWED_ATTRIBUTES, allowed_attrs, plain_value

    def reference(ds: pydicom.Dataset) -> dict:
        out = {}
        for key in ALLOWED_ATTRIBUTES:
            v = ds.get(key)
            if v is not None and v != "":
                out[key] = plain_value(v)
        return out

    paths = sorted(p for p in TEST_FILES.rglob("*") if p.is_file() and p.suffix in ("", ".dcm"))
    shared: dict = {}
    seen = 0
    for path in paths:
        try:
            fresh = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:
            continue  # not DICOM, or deliberately broken
        want = reference(fresh)
        for cache in ({}, shared, shared):  # cold, then warm twice
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            assert allowed_attrs(ds, cache) == want, path.name
        seen += bool(want)
    assert seen > 50 and len(shared) > 100  # the corpus really exercised the cache
