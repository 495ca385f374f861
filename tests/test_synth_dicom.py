"""The synthetic HCC-TACE-Seg / CRLM DICOM collections, checked with independent readers.

CT volumes are read back with SimpleITK (GDCM), SEGs with pydicom (frames placed by their own
PlanePositionSequence), highdicom and dcmqi's ``segimage2itkimage``; nothing here reuses the
generator's own geometry code.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import highdicom as hd
import numpy as np
import pandas as pd
import pydicom
import pytest
import SimpleITK as sitk

from livercube.sources.dicom_sop import LABELMAP_SEGMENTATION
from livercube.synth.dicom_collections import (
    AI_DESCRIPTION,
    CRLM_COLLECTION,
    HCC_COLLECTION,
    DicomCollectionTruth,
    write_crlm,
    write_hcc_tace_seg,
)
from livercube.synth.dicom_plans import CRLM, HCC_TACE_SEG, LIVER

warnings.filterwarnings("ignore", category=UserWarning, module="highdicom")

METADATA_COLUMNS = [
    "Series UID",
    "Collection",
    "3rd Party Analysis",
    "Data Description URI",
    "Subject ID",
    "Study UID",
    "Study Description",
    "Study Date",
    "Series Description",
    "Manufacturer",
    "Modality",
    "SOP Class Name",
    "SOP Class UID",
    "Number of Images",
    "File Size",
    "File Location",
    "Download Timestamp",
]
FLAGS = dict(
    junk_files=True, truncated_duplicate=True, missing_slice=True, missing_referenced_instance=True
)


@pytest.fixture(scope="module")
def hcc(tmp_path_factory) -> DicomCollectionTruth:
    return write_hcc_tace_seg(tmp_path_factory.mktemp("hcc"), n_patients=2, seed=0)


@pytest.fixture(scope="module")
def crlm(tmp_path_factory) -> DicomCollectionTruth:
    return write_crlm(tmp_path_factory.mktemp("crlm"), n_patients=2, seed=0)


@pytest.fixture(scope="module", params=["hcc", "crlm"])
def coll(request, hcc, crlm) -> DicomCollectionTruth:
    return hcc if request.param == "hcc" else crlm


# ----------------------------------------------------------------------------- helpers


def _header(path: Path) -> pydicom.Dataset:
    return pydicom.dcmread(path, stop_before_pixels=True)


def _sitk_read(files: list[str]) -> tuple[np.ndarray, sitk.Image]:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    img = sitk.DICOMOrient(reader.Execute(), "LPS")
    return sitk.GetArrayFromImage(img), img


def _acquisition_files(vol) -> list[str]:
    """The files of one acquisition, found from headers only, ordered by table position."""
    rows = []
    for f in sorted(vol.series_dir.glob("*.dcm")):
        ds = _header(f)
        if ds.SeriesInstanceUID == vol.series_uid and ds.get("AcquisitionNumber") == (
            vol.acquisition_number
        ):
            rows.append((float(ds.ImagePositionPatient[2]), str(f)))
    return [f for _, f in sorted(rows)]


def _seg_masks(path: Path, grid, n_labels: int) -> tuple[dict[str, np.ndarray], pydicom.Dataset]:
    """Paste every frame of a BINARY SEG onto ``grid`` by its PlanePositionSequence."""
    ds = pydicom.dcmread(path)
    frames = ds.pixel_array.reshape(int(ds.NumberOfFrames), ds.Rows, ds.Columns).astype(bool)
    labels = {int(s.SegmentNumber): s.SegmentLabel for s in ds.SegmentSequence}
    assert len(labels) == n_labels
    out = {lab: np.zeros(grid.shape, bool) for lab in labels.values()}
    iop = [
        float(v)
        for v in ds.SharedFunctionalGroupsSequence[0]
        .PlaneOrientationSequence[0]
        .ImageOrientationPatient
    ]
    row, col = np.array(iop[:3]), np.array(iop[3:])
    assert np.allclose(np.abs(row), [1, 0, 0]) and np.allclose(np.abs(col), [0, 1, 0])
    oz, oy, ox = grid.origin
    sz, sy, sx = grid.spacing
    for f, fg in enumerate(ds.PerFrameFunctionalGroupsSequence):
        x, y, z = (float(v) for v in fg.PlanePositionSequence[0].ImagePositionPatient)
        seg_no = int(fg.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        frame = frames[f]
        if row[0] < 0:
            frame = frame[:, ::-1]
        if col[1] < 0:
            frame = frame[::-1, :]
        # the first stored pixel sits at a grid corner
        assert np.isclose(x, ox if row[0] > 0 else ox + sx * (grid.shape[2] - 1), atol=1e-3)
        assert np.isclose(y, oy if col[1] > 0 else oy + sy * (grid.shape[1] - 1), atol=1e-3)
        k = (z - oz) / sz
        assert abs(k - round(k)) < 1e-3
        out[labels[seg_no]][round(k)] |= frame
    return out, ds


# ----------------------------------------------------------------------------- CT


def test_ct_volumes_match_simpleitk(coll):
    for vol in coll.volumes:
        same_series = [v for v in coll.volumes if v.series_uid == vol.series_uid]
        if len(same_series) == 1:
            files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(
                str(vol.series_dir), vol.series_uid
            )
            assert len(files) == vol.grid.shape[0]
        else:
            files = _acquisition_files(vol)
        arr, img = _sitk_read(list(files))
        assert arr.shape == vol.grid.shape, vol.key
        np.testing.assert_array_equal(arr, vol.hu, err_msg=vol.key)
        np.testing.assert_allclose(img.GetSpacing(), vol.grid.spacing[::-1], atol=1e-4)
        np.testing.assert_allclose(img.GetOrigin(), vol.grid.origin[::-1], atol=1e-3)
        np.testing.assert_allclose(img.GetDirection(), np.eye(3).ravel(), atol=1e-6)


def test_ct_headers_hcc(hcc):
    by_series = {}
    for v in hcc.volumes:
        by_series.setdefault(v.series_uid, []).append(v)
    headers = {v.key: _header(v.files[0]) for v in hcc.volumes}
    for h in headers.values():
        assert h.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        assert h.SOPClassUID == pydicom.uid.CTImageStorage
        assert h.PatientID.startswith("HCC_") and 1997 <= int(h.StudyDate[:4]) <= 2006
        assert h.PatientName and h.PatientBirthDate and h.InstitutionName  # dummy PHI
    # two studies per patient, 9-212 days apart, 3-6 CT series each
    for pid in hcc.patient_ids:
        vols = hcc.volumes_of(pid)
        dates = sorted({pd.Timestamp(v.study_date) for v in vols})
        assert len(dates) == 2 and 9 <= (dates[1] - dates[0]).days <= 212
        assert 3 <= len({v.series_uid for v in vols}) <= 6
    assert any(h.PixelRepresentation == 0 for h in headers.values())
    assert any(h.PixelRepresentation == 1 for h in headers.values())
    assert any("AcquisitionNumber" not in h for h in headers.values())
    assert sum(h.PatientAge == "" for h in headers.values()) == len(headers)
    assert {"PRE LIVER", "C-A-P", "Recon 2: LIVER 3 PHASE (AP)", "VENOUS", ""} <= {
        h.SeriesDescription for h in headers.values()
    }
    multi = [vs for vs in by_series.values() if len(vs) > 1]
    same_grid = [vs for vs in multi if len({v.grid for v in vs}) == 1]
    other_grid = [vs for vs in multi if len({v.grid for v in vs}) > 1]
    assert same_grid and other_grid
    phases = [v.phase for v in same_grid[0]]
    assert phases[:2] == ["arterial", "portal_venous"]
    # both acquisitions in one folder, ordinal file names 1-01…, 2-01…
    names = sorted(p.name for p in same_grid[0][0].series_dir.glob("*.dcm"))
    assert "1-01.dcm" in names and "2-01.dcm" in names
    assert len(names) == sum(v.grid.shape[0] for v in same_grid[0])
    contrast = [h for k, h in headers.items() if hcc.volume(k).phase == "arterial"]
    assert all(h.ContrastBolusAgent for h in contrast)
    assert all(h.RescaleSlope == 1 for h in headers.values())


def test_ct_headers_crlm(crlm):
    headers = {v.key: _header(v.files[-1]) for v in crlm.volumes}  # most superior = first file
    assert all(h.PatientID.startswith("CRLM-CT-1") for h in headers.values())
    assert all(1990 <= int(h.StudyDate[:4]) <= 1999 for h in headers.values())
    assert any(h.InstanceNumber == 45 for h in headers.values())
    assert any(h.SeriesNumber == 100 for h in headers.values())
    assert any(h.SeriesDescription.startswith("Bind(") for h in headers.values())
    assert any(h.SeriesDescription == "" for h in headers.values())
    thick = [
        abs(float(h.SliceThickness) - crlm.volume(k).grid.spacing[0]) > 0.1
        for k, h in headers.items()
    ]
    assert any(thick)
    assert any(
        [float(x) for x in h.ImageOrientationPatient] == [-1, 0, 0, 0, -1, 0]
        for h in headers.values()
    )
    for v in crlm.volumes:
        ds = pydicom.dcmread(v.files[0])
        assert ds.Manufacturer == "GE MEDICAL SYSTEMS"
        assert ds.PixelPaddingValue == -2000 and ds[0x00280120].VR == "SS"
        assert ds.pixel_array[0, 0] == -2000  # corner outside the circular FOV
        assert ds.pixel_array[32, 32] != -2000
        assert ds.PatientAge and ds.PatientSex


# ----------------------------------------------------------------------------- SEG


def test_seg_frames_match_truth(coll):
    for seg in coll.segs:
        masks, ds = _seg_masks(seg.path, seg.grid, len(seg.segment_labels))
        assert tuple(s.SegmentLabel for s in ds.SegmentSequence) == seg.segment_labels
        assert ds.SegmentationType == "BINARY"
        for label in seg.segment_labels:
            np.testing.assert_array_equal(
                masks[label], seg.masks[label], err_msg=f"{seg.path.name} {label}"
            )
        # each frame cites the CT slice at its position in the volume the truth names
        sop_at = {}
        for z, key in enumerate(seg.source_volume_by_z):
            if key is not None:
                sop_at[z] = coll.volume(key).sop_instance_uids[z]
        for fg in ds.PerFrameFunctionalGroupsSequence:
            z = float(fg.PlanePositionSequence[0].ImagePositionPatient[2])
            k = round((z - seg.grid.origin[0]) / seg.grid.spacing[0])
            ref = fg.DerivationImageSequence[0].SourceImageSequence[0]
            assert ref.ReferencedSOPInstanceUID == sop_at[k]
        n_frames = int(ds.NumberOfFrames)
        full = seg.grid.shape[0] * len(seg.segment_labels)
        assert (n_frames == full) == (not seg.omit_empty_frames)
        # highdicom reads it back too
        hseg = hd.seg.segread(seg.path)
        assert [d.segment_label for d in hseg.SegmentSequence] == list(seg.segment_labels)


def test_hcc_seg_quirks(hcc):
    for pid in hcc.patient_ids:
        expert = hcc.segs_of(pid, "expert")
        ai = hcc.segs_of(pid, "ai")
        assert len(expert) == 1 and len(ai) == 1
        first_study = min(hcc.volumes_of(pid), key=lambda v: v.study_date).study_uid
        for s in expert + ai:
            ds = _header(s.path)
            assert ds.SeriesNumber == 300 and ds.StudyInstanceUID == first_study
        assert _header(expert[0].path).SeriesDescription == "Segmentation"
        assert _header(ai[0].path).SeriesDescription == AI_DESCRIPTION
        assert ai[0].segment_labels == ("Liver", "Mass")
        assert expert[0].segment_labels[:4] == ("Liver", "Mass", "Portal vein", "Abdominal aorta")
        assert not np.array_equal(ai[0].masks["Liver"], expert[0].masks["Liver"]) or (
            ai[0].grid != expert[0].grid
        )
    experts = [s for s in hcc.segs if s.kind == "expert"]
    assert any("Necrosis" in s.segment_labels for s in experts)
    mixed = [s for s in experts if len(s.referenced_volumes) > 1]
    assert mixed, "one expert SEG must cite slices of several acquisitions"
    series = {hcc.volume(k).series_uid for k in mixed[0].referenced_volumes}
    assert len(series) == 1
    no_ref = [s for s in experts if not s.has_referenced_series_sequence]
    assert len(no_ref) == 1 and "ReferencedSeriesSequence" not in _header(no_ref[0].path)
    assert all(
        "ReferencedSeriesSequence" in _header(s.path)
        for s in experts
        if s.has_referenced_series_sequence
    )


def test_crlm_seg_quirks(crlm):
    for seg in crlm.segs:
        ds = _header(seg.path)
        assert ds.SeriesNumber == 100 and ds.SeriesDescription == "Segmentation"
        labels = seg.segment_labels
        assert labels[:4] == ("Liver", "Liver Remnant", "Hepatic", "Portal")
        tumours = [lab for lab in labels if lab.startswith("Tumor_")]
        assert len(tumours) >= 2 and all(seg.masks[t].any() for t in tumours)
        assert seg.omit_empty_frames
    overlapping = [s for s in crlm.segs if (s.masks["Tumor_1"] & s.masks["Tumor_2"]).any()]
    assert overlapping
    flipped = [s for s in crlm.segs if s.in_plane_flipped]
    assert len(flipped) == 1
    seg_iop = (
        _header(flipped[0].path)
        .SharedFunctionalGroupsSequence[0]
        .PlaneOrientationSequence[0]
        .ImageOrientationPatient
    )
    ct_iop = _header(crlm.volume(flipped[0].referenced_volumes[0]).files[0]).ImageOrientationPatient
    assert [float(v) for v in seg_iop] == [1, 0, 0, 0, 1, 0]
    assert [float(v) for v in ct_iop] == [-1, 0, 0, 0, -1, 0]
    # the shared series number
    ct_numbers = {v.series_number for v in crlm.volumes}
    assert 100 in ct_numbers


def _dcmqi() -> str:
    exe = Path(sys.executable).parent / "segimage2itkimage"
    found = str(exe) if exe.exists() else shutil.which("segimage2itkimage")
    if not found:
        pytest.skip("dcmqi's segimage2itkimage is not installed")
    return found


@pytest.mark.parametrize("which", ["hcc", "crlm"])
def test_dcmqi_reads_expert_seg(which, hcc, crlm, tmp_path):
    truth = hcc if which == "hcc" else crlm
    # HCC: the SEG mixing acquisitions; CRLM: the in-plane flipped one with omitted frames
    seg = next(
        s
        for s in truth.segs
        if s.kind == "expert"
        and (len(s.referenced_volumes) > 1 if which == "hcc" else s.in_plane_flipped)
    )
    subprocess.run(
        [
            _dcmqi(),
            "--inputDICOM",
            str(seg.path),
            "--outputDirectory",
            str(tmp_path),
            "--outputType",
            "nrrd",
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    meta = json.loads((tmp_path / "meta.json").read_text())
    seen = set()
    grid = seg.grid
    for i, group in enumerate(meta["segmentAttributes"], start=1):
        img = sitk.DICOMOrient(sitk.ReadImage(str(tmp_path / f"{i}.nrrd")), "LPS")
        arr = sitk.GetArrayFromImage(img)
        np.testing.assert_allclose(img.GetSpacing(), grid.spacing[::-1], atol=1e-3)
        off = np.rint((np.array(img.GetOrigin()[::-1]) - grid.origin) / grid.spacing).astype(int)
        assert (off >= 0).all()
        for attr in group:
            pasted = np.zeros(grid.shape, bool)
            sl = tuple(slice(o, o + n) for o, n in zip(off, arr.shape, strict=True))
            pasted[sl] = arr == attr["labelID"]
            np.testing.assert_array_equal(
                pasted, seg.masks[attr["SegmentLabel"]], err_msg=attr["SegmentLabel"]
            )
            seen.add(attr["SegmentLabel"])
    assert seen == set(seg.segment_labels)


# ----------------------------------------------------------------------------- layout


def test_tcia_layout_and_metadata(coll):
    collection_dir = {
        HCC_COLLECTION: "HCC-TACE-Seg",
        CRLM_COLLECTION: "Colorectal-Liver-Metastases",
    }
    study_re = re.compile(r"^\d\d-\d\d-(\d{4})-NA-[^/,():&]+-\d{5}$")
    series_re = re.compile(r"^\d+\.000000-[^/,():&]+-\d{5}$")
    for v in coll.volumes:
        rel = v.series_dir.relative_to(coll.root).parts
        assert rel[0] == collection_dir[coll.collection] and rel[1] == v.patient_id
        assert study_re.match(rel[2]) and rel[2][6:10] == v.study_date[:4]
        assert series_re.match(rel[3]) and rel[3].startswith(f"{v.series_number}.000000-")
        if not v.series_description:
            assert rel[3].split("-")[1] == "NA"
        assert all(re.match(r"^\d-\d\d\.dcm$", f.name) for f in v.files)
    with coll.metadata_csv.open(newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == METADATA_COLUMNS
        rows = list(reader)
    assert {r["Series UID"] for r in rows} == coll.series_uids()
    for r in rows:
        folder = coll.root / r["File Location"]
        assert folder.is_dir()
        assert int(r["Number of Images"]) == len(list(folder.glob("*.dcm")))
        assert r["Collection"] == coll.collection
    assert {r["3rd Party Analysis"] for r in rows if r["Modality"] == "CT"} == {"NO"}


def test_clinical_spreadsheets(hcc, crlm):
    sheets = pd.read_excel(hcc.clinical_path, sheet_name=None)
    assert list(sheets) == ["data table"]
    df = sheets["data table"]
    for col in (
        "TCIA_ID",
        "Sex",
        "age",
        "AFP",
        "TTP",
        "OS",
        "BCLC",
        "Vascular invasion",
        "Portal Vein Thrombosis",
        "1_mRECIST",
        "1_EASL",
        "1_RECIST",
        "CLIP_Score",
    ):
        assert col in df.columns
    assert set(hcc.patient_ids) < set(df["TCIA_ID"])  # plus a patient without images
    assert set(df["Sex"]) <= {1, 2}
    sheets = pd.read_excel(crlm.clinical_path, sheet_name=None)
    assert next(iter(sheets)) == "TCIA_n=197" and len(sheets) == 2
    df = sheets["TCIA_n=197"]
    assert df.columns[0] == "Patient-ID" and "mucin_percent" in df.columns
    assert set(crlm.patient_ids) < set(df["Patient-ID"])
    assert "30%" in set(df["mucin_percent"].astype(str))
    assert (df == -999).any().any()
    assert len(df) == len(crlm.clinical_rows)


# ----------------------------------------------------------------------------- determinism


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_same_seed_same_bytes(tmp_path):
    a = write_crlm(tmp_path / "a", n_patients=1, seed=3)
    b = write_crlm(tmp_path / "b", n_patients=1, seed=3)
    c = write_crlm(tmp_path / "c", n_patients=1, seed=4)
    assert _tree(a.root) == _tree(b.root)
    assert a.volumes[0].sop_instance_uids == b.volumes[0].sop_instance_uids
    assert a.volumes[0].sop_instance_uids != c.volumes[0].sop_instance_uids
    assert not np.array_equal(a.volumes[0].hu, c.volumes[0].hu)


def test_hcc_deterministic(hcc, tmp_path):
    again = write_hcc_tace_seg(tmp_path, n_patients=2, seed=0)
    assert _tree(again.root) == _tree(hcc.root)


# ----------------------------------------------------------------------------- flags, IDC


@pytest.mark.parametrize("which", ["hcc", "crlm"])
def test_quirk_flags_and_idc_layout(which, tmp_path):
    writer = write_hcc_tace_seg if which == "hcc" else write_crlm
    t = writer(tmp_path, n_patients=2, seed=1, layout="idc", **FLAGS)
    assert t.metadata_csv is None
    uuid_re = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
    for v in t.volumes:
        assert v.series_dir.parent == t.root and uuid_re.match(v.series_dir.name)
        assert all(uuid_re.match(f.stem) for f in v.files)
    # junk
    readme, ds_store, empty = t.quirks["junk_files"]
    assert readme.exists() and ds_store.name == ".DS_Store" and empty.stat().st_size == 0
    # truncated duplicate: same SOP instance, half the bytes, unreadable pixels
    dup, orig = t.quirks["truncated_duplicate"]
    assert 0 < dup.stat().st_size < orig.stat().st_size and dup.name != orig.name
    with pytest.raises(Exception):  # noqa: B017 - any read failure is fine
        pydicom.dcmread(dup).pixel_array  # noqa: B018
    # missing slice, recorded in truth
    (gone,) = t.quirks["missing_slice"]
    assert not gone.exists()
    vol = next(v for v in t.volumes if gone in v.files)
    z = vol.files.index(gone)
    assert z in vol.missing_z and 0 < z < vol.grid.shape[0] - 1
    # missing referenced instance: cited by a SEG frame, absent on disk
    (gone,) = t.quirks["missing_referenced_instance"]
    assert not gone.exists()
    seg = next(s for s in t.segs if s.missing_referenced_sop_uids)
    ds = _header(seg.path)
    cited = {
        fg.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        for fg in ds.PerFrameFunctionalGroupsSequence
    }
    assert set(seg.missing_referenced_sop_uids) <= cited
    on_disk = {
        _header(f).SOPInstanceUID
        for f in t.root.rglob("*.dcm")
        if f.stat().st_size > 0 and f != dup
    }
    assert not set(seg.missing_referenced_sop_uids) & on_disk


# ----------------------------------------------------------------------------- the descriptions


def _coded(item) -> tuple[str, str, str]:
    return (item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning)


@pytest.mark.parametrize("spec", [HCC_TACE_SEG, CRLM], ids=["hcc", "crlm"])
def test_collection_descriptions_are_consistent(spec):
    """Every plan's annotated series exists in its first study with the acquisitions it cites,
    and every label the AI SEG derives from is an expert segment."""
    for plan in spec.plans:
        series = {s.number: s for s in plan.studies[0].series}
        assert plan.seg_series in series, plan.like
        assert max(plan.seg_acqs) < len(series[plan.seg_series].acqs), plan.like
        for study in plan.studies:
            numbers = [s.number for s in study.series]
            assert len(numbers) == len(set(numbers)), plan.like  # SeriesNumber keys a volume
    labels = [s.label for s in spec.expert_segments]
    assert len(labels) == len(set(labels))
    if spec.ai_seg is not None:
        assert {label for label, _ in spec.ai_seg.segments} <= set(labels)
        assert {op for _, op in spec.ai_seg.segments} <= {"erode", "dilate"}
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.name = "other"  # type: ignore[misc]


def test_patient_ids_follow_the_real_collections():
    assert [HCC_TACE_SEG.patient_id(i) for i in (0, 1, 104)] == ["HCC_001", "HCC_002", "HCC_105"]
    crlm_ids = [CRLM.patient_id(i) for i in range(197)]
    assert crlm_ids[0] == "CRLM-CT-1001" and crlm_ids[-1] == "CRLM-CT-1198"
    assert "CRLM-CT-1024" not in crlm_ids and len(set(crlm_ids)) == 197


@pytest.mark.parametrize("which", ["hcc", "crlm"])
def test_segment_codes_travel_with_labels(which, hcc, crlm):
    """Each SEG codes its segments as the collection description says; a label means the same
    code in both collections and in the AI SEG (readers map by label, the codes must not lie)."""
    truth, spec = (hcc, HCC_TACE_SEG) if which == "hcc" else (crlm, CRLM)
    fixed = {s.label: s for s in spec.expert_segments + spec.plans[0].extra_segments}
    tumour = next((s for s in spec.expert_segments if s.mask == "tumour"), None)
    for seg in truth.segs:
        ds = _header(seg.path)
        for item in ds.SegmentSequence:
            label = item.SegmentLabel
            want = fixed.get(label) or (tumour if re.fullmatch(r"Tumor_\d+", label) else None)
            assert want is not None, label
            assert _coded(item.SegmentedPropertyCategoryCodeSequence[0]) == (
                want.category[0], "SCT", want.category[1]
            )  # fmt: skip
            assert _coded(item.SegmentedPropertyTypeCodeSequence[0]) == (
                want.type[0], "SCT", want.type[1]
            )  # fmt: skip
            algo = item.SegmentAlgorithmType
            assert algo == ("AUTOMATIC" if seg.kind == "ai" else "MANUAL")
    both = {s.label: s.type for s in HCC_TACE_SEG.expert_segments} | {
        s.label: s.type for s in CRLM.expert_segments
    }
    assert both["Liver"] == LIVER and both["Liver Remnant"] == LIVER


def test_defects_hit_the_volumes_the_descriptions_name(tmp_path):
    """``missing_slice``: HCC_001's post-TACE "Recon 2: PRE LIVER" (middle interior slice);
    CRLM: the last patient's CT, on its first interior slice without segmented content (the
    first interior slice when every one has some)."""
    hcc = write_hcc_tace_seg(tmp_path / "h", n_patients=1, seed=2, missing_slice=True)
    (gone,) = hcc.quirks["missing_slice"]
    vol = next(v for v in hcc.volumes if v.missing_z)
    assert vol.patient_id == "HCC_001" and vol.series_description == "Recon 2: PRE LIVER"
    assert vol.study_date == max(v.study_date for v in hcc.volumes)
    assert vol.files[vol.missing_z[0]] == gone and not gone.exists()
    crlm = write_crlm(tmp_path / "c", n_patients=2, seed=2, missing_slice=True)
    (gone,) = crlm.quirks["missing_slice"]
    vol = next(v for v in crlm.volumes if v.missing_z)
    assert vol.patient_id == crlm.patient_ids[-1]
    (z,) = vol.missing_z
    (seg,) = crlm.segs_of(vol.patient_id)
    assert 0 < z < vol.grid.shape[0] - 1
    interior = list(range(1, vol.grid.shape[0] - 1))
    blank = [k for k in interior if not any(m[k].any() for m in seg.masks.values())]
    assert z == (blank or interior)[0]


def test_plans_cycle_with_shifted_dates(tmp_path):
    """Patient 5 repeats patient 1's exam list, dates moved by the collection's date step."""
    truth = write_hcc_tace_seg(tmp_path, n_patients=5, seed=0, keep_arrays=False)
    first, fifth = truth.volumes_of("HCC_001"), truth.volumes_of("HCC_005")
    assert [(v.series_number, v.series_description, v.phase) for v in first] == [
        (v.series_number, v.series_description, v.phase) for v in fifth
    ]
    days = {
        (pd.Timestamp(b.study_date) - pd.Timestamp(a.study_date)).days
        for a, b in zip(first, fifth, strict=True)
    }
    assert days == {HCC_TACE_SEG.date_step[0]}
    assert {v.sop_instance_uids[0] for v in first}.isdisjoint(v.sop_instance_uids[0] for v in fifth)


def test_keep_arrays_off_changes_no_file(tmp_path):
    """Benchmarks and the phase tests write without arrays; the files must be the same."""
    a = write_crlm(tmp_path / "a", n_patients=1, seed=6)
    b = write_crlm(tmp_path / "b", n_patients=1, seed=6, keep_arrays=False)
    assert _tree(a.root) == _tree(b.root)
    assert all(v.hu is None for v in b.volumes) and all(s.masks is None for s in b.segs)
    assert [v.key for v in a.volumes] == [v.key for v in b.volumes]


def test_crlm_real_world_variants_are_written_where_documented(tmp_path):
    """What the converter tests rely on: per-slice AcquisitionNumbers on the first CT, a sparse
    SEG for the first patient, a LABELMAP SEG for the second, the last CT tilted and withdrawn."""
    t = write_crlm(
        tmp_path, n_patients=3, seed=5, per_slice_acquisition_numbers=True,
        sparse_seg_frames=True, labelmap_seg=True, gantry_tilt=True,
    )  # fmt: skip
    numbers = [int(_header(f).AcquisitionNumber) for f in t.quirks["per_slice_acquisition_numbers"]]
    assert len(set(numbers)) == len(numbers) == t.volumes[0].grid.shape[0]
    assert t.quirks["per_slice_acquisition_numbers"] == t.volumes[0].files
    sparse, labelmap = t.segs[0], t.segs[1]
    assert sparse.patient_id == t.patient_ids[0] and labelmap.patient_id == t.patient_ids[1]
    content = [
        z for z in range(sparse.grid.shape[0]) if any(m[z].any() for m in sparse.masks.values())
    ]
    assert content and min(np.diff(content)) >= 2
    assert _header(labelmap.path).SOPClassUID == LABELMAP_SEGMENTATION
    assert _header(sparse.path).SOPClassUID == pydicom.uid.SegmentationStorage
    stacked = np.stack(list(labelmap.masks.values()))
    assert stacked.sum(axis=0).max() == 1  # a label map cannot overlap
    # the tilted CT and its SEG are gone from the truth, present on disk
    assert t.patient_ids[-1] not in {v.patient_id for v in t.volumes}
    assert t.patient_ids[-1] not in {s.patient_id for s in t.segs}
    tilted = t.quirks["gantry_tilt"]
    assert all(p.exists() for p in tilted) and len(tilted) > 2
    tilts = {_header(p).get("GantryDetectorTilt") for p in tilted[:-1]}
    assert None not in tilts and _header(tilted[-1]).Modality == "SEG"
