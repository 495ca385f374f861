"""DICOM-SEG matching and placement: generated collections, dcmqi as reader and writer, off-grid
SEGs against SimpleITK nearest-neighbour resampling, FRACTIONAL and unknown labels."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import fsspec
import highdicom as hd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from dicom_factory import Study, canonical_test_array, write_ct_series
from seg_factory import sorted_sources, write_hd_seg

from livercube.errors import UsageError
from livercube.schema import map_segment_label
from livercube.sources import dicom_sop
from livercube.sources.dicom_ct import read_acquisition
from livercube.sources.dicom_scan import scan
from livercube.sources.dicom_seg import (
    SegTarget,
    match_seg,
    place_seg,
    seg_kind,
    target_from_acquisition,
)
from livercube.synth.dicom_collections import write_crlm, write_hcc_tace_seg
from livercube.volumes.geometry import Grid

BIN = Path(sys.executable).parent
SEGIMAGE2ITK = BIN / "segimage2itkimage"
ITK2SEGIMAGE = BIN / "itkimage2segimage"
COLLECTION = {"HCC-TACE-Seg": "hcc-tace-seg", "Colorectal-Liver-Metastases": "crlm"}


# --------------------------------------------------------------------------- fixtures


class Generated:
    """A generated collection, scanned, with one SegTarget per acquisition (truth keys)."""

    def __init__(self, truth) -> None:
        self.truth = truth
        self.collection = COLLECTION[truth.collection]
        self.scan = scan(str(truth.root))
        self.acqs = {}
        for acq in self.scan.acquisitions:
            sops = {s.sop_uid for s in acq.slices}
            (key,) = [v.key for v in truth.volumes if sops & set(v.sop_instance_uids)]
            self.acqs[key] = acq
        self.targets = {k: target_from_acquisition(a, k) for k, a in self.acqs.items()}
        self.seg_url = {s.sop_uid: s.path for s in self.scan.segs}

    def patient_targets(self, pid: str) -> list[SegTarget]:
        return [t for k, t in self.targets.items() if k.startswith(pid + "/")]


@pytest.fixture(scope="module")
def hcc(tmp_path_factory) -> Generated:
    root = tmp_path_factory.mktemp("hcc")
    return Generated(
        write_hcc_tace_seg(
            root, n_patients=2, size="tiny", seed=3, missing_referenced_instance=True
        )
    )


@pytest.fixture(scope="module")
def crlm(tmp_path_factory) -> Generated:
    root = tmp_path_factory.mktemp("crlm")
    return Generated(write_crlm(root, n_patients=2, size="tiny", seed=5, layout="idc"))


@pytest.fixture(scope="module", params=["hcc", "crlm"])
def generated(request) -> Generated:
    return request.getfixturevalue(request.param)


# --------------------------------------------------------------------------- helpers


def masks_by_label(placed) -> dict[str, np.ndarray]:
    return {s.label: placed.segments.mask(s.bit) for s in placed.segments.segments}


def sitk_on_grid(img: sitk.Image, grid: Grid) -> np.ndarray:
    """Nearest-neighbour resampling of ``img`` onto a canonical grid (array z, y, x)."""
    ref = sitk.Image([int(v) for v in grid.shape[::-1]], sitk.sitkUInt8)
    ref.SetSpacing([float(v) for v in grid.spacing[::-1]])
    ref.SetOrigin([float(v) for v in grid.origin[::-1]])
    out = sitk.Resample(img, ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    return sitk.GetArrayFromImage(out).astype(bool)


def image_of(mask: np.ndarray, spacing_zyx, origin_zyx) -> sitk.Image:
    img = sitk.GetImageFromArray(mask.astype(np.uint8))
    img.SetSpacing([float(v) for v in spacing_zyx[::-1]])
    img.SetOrigin([float(v) for v in origin_zyx[::-1]])
    return img


def scan_target(directory: Path, key: str = "ct") -> SegTarget:
    (acq,) = scan(str(directory)).acquisitions
    return target_from_acquisition(acq, key)


# --------------------------------------------------------------------------- targets


def test_targets_equal_read_acquisition(generated: Generated) -> None:
    for key, acq in generated.acqs.items():
        vol = read_acquisition(acq)
        target = generated.targets[key]
        assert target.grid == vol.grid, key
        assert target.sop_uids_by_z == vol.sop_uids_by_canonical_z, key
        assert (target.series_uid, target.study_uid) == (acq.series_uid, acq.study_uid)


# --------------------------------------------------------------------------- generated SEGs


def test_generated_segs_match_and_place(generated: Generated) -> None:
    truth = generated.truth
    assert truth.segs
    for st in truth.segs:
        url = generated.seg_url[st.sop_instance_uid]
        m = match_seg(url, generated.patient_targets(st.patient_id))
        assert m.target_key in st.referenced_volumes, (st.patient_id, st.kind, m)
        assert m.exact, m
        # the acquisition cited most is chosen among acquisitions at identical positions
        assert m.referenced[m.target_key] == max(m.referenced.values())
        assert set(m.referenced) == set(st.referenced_volumes)
        placed = place_seg(url, generated.targets[m.target_key], collection=generated.collection)
        assert not placed.resampled and not placed.unknown_labels
        got = masks_by_label(placed)
        assert list(got) == list(st.segment_labels)  # SegmentNumber order
        for label, expected in st.masks.items():
            np.testing.assert_array_equal(got[label], expected, err_msg=f"{st.path} {label}")
        # as the volume task places it: with the frame table planning built
        assert m.known_frames is not None
        planned = place_seg(
            url,
            generated.targets[m.target_key],
            collection=generated.collection,
            known_frames=m.known_frames,
        )
        np.testing.assert_array_equal(planned.segments.bits, placed.segments.bits)
        assert planned.notes == placed.notes
        for seg in placed.segments.segments:
            assert seg.unified == map_segment_label(generated.collection, seg.label)
            codes = seg.codes
            assert codes["SegmentLabel"] == seg.label and codes["SegmentNumber"] == seg.number
            assert codes["SegmentedPropertyTypeCodeSequence"][0]["scheme"] == "SCT"
            assert set(codes["SegmentedPropertyCategoryCodeSequence"][0]) >= {
                "scheme",
                "value",
                "meaning",
            }
            assert len(codes["RecommendedDisplayCIELabValue"]) == 3
            json.dumps(codes)
        attrs = placed.seg_attrs
        json.dumps(attrs)
        assert attrs["kind"] == st.kind == seg_kind(st.series_description)
        assert attrs["SOPInstanceUID"] == st.sop_instance_uid
        assert attrs["SeriesNumber"] == st.series_number
        assert attrs["SegmentationType"] == "BINARY"
        assert attrs["Manufacturer"] == "QIICR"


def test_a_seg_changed_after_planning_is_placed_from_its_own_frames(crlm, tmp_path) -> None:
    """The plan's frame table stands in for the task's only while the SEG's header bytes are
    the ones it was built from: a frame moved since is placed where the file now says."""
    from livercube.sources.seg_frames import Decoder, KnownFrames, frames_of

    st = crlm.truth.segs[0]
    url = crlm.seg_url[st.sop_instance_uid]
    m = match_seg(url, crlm.patient_targets(st.patient_id))
    target = crlm.targets[m.target_key]
    before = place_seg(url, target, collection=crlm.collection)

    with open(url, "rb") as f:
        dec = Decoder(f, url, [])
        key = dec.header_key()
    assert key == m.known_frames.key  # the task sees what planning saw
    assert frames_of(dec.ds, url, KnownFrames(key, "planned"), key) == "planned"

    ds = pydicom.dcmread(url)
    pos = ds.PerFrameFunctionalGroupsSequence[0].PlanePositionSequence[0]
    pos.ImagePositionPatient = [*pos.ImagePositionPatient[:2], pos.ImagePositionPatient[2] + 1e3]
    moved = tmp_path / "moved.dcm"
    ds.save_as(moved)
    after = place_seg(str(moved), target, collection=crlm.collection, known_frames=m.known_frames)
    fresh = place_seg(str(moved), target, collection=crlm.collection)
    np.testing.assert_array_equal(after.segments.bits, fresh.segments.bits)
    assert not np.array_equal(after.segments.bits, before.segments.bits)  # frame 0 left the grid

    # sequences of undefined length (as DCMTK writes them) are keyed by the header bytes too
    ds = pydicom.dcmread(url)
    ds["PerFrameFunctionalGroupsSequence"].is_undefined_length = True
    undefined = tmp_path / "undefined.dcm"
    ds.save_as(undefined)
    mu = match_seg(str(undefined), crlm.patient_targets(st.patient_id))
    assert mu.known_frames.key != m.known_frames.key
    planned = place_seg(
        str(undefined), target, collection=crlm.collection, known_frames=mu.known_frames
    )
    np.testing.assert_array_equal(planned.segments.bits, before.segments.bits)


def _bit_frames_file(frames: np.ndarray, *, drop_bytes: int = 0):
    """A minimal file with 1-bit ``frames`` packed back to back as PS3.5 8.1.1 says."""
    import io

    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SegmentationStorage

    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = SegmentationStorage
    ds.SOPClassUID = SegmentationStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.3680043.8.498.5"
    n, ds.Rows, ds.Columns = frames.shape
    ds.NumberOfFrames, ds.BitsAllocated, ds.BitsStored, ds.HighBit = n, 1, 1, 0
    packed = np.packbits(frames.ravel(), bitorder="little").tobytes()
    ds.PixelData = packed[: len(packed) - drop_bytes] if drop_bytes else packed
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    buf.seek(0)
    return buf


@pytest.mark.parametrize("shape", [(4, 5, 3), (3, 8, 8), (5, 7, 9), (1, 1, 1)])
def test_one_bit_frames_unpack_wherever_they_start_in_a_byte(shape) -> None:
    """Frames of 15 or 63 pixels start inside a byte; each must come out as written."""
    from livercube.sources.seg_frames import Decoder

    frames = np.random.default_rng(sum(shape)).integers(0, 2, shape, dtype=np.uint8)
    dec = Decoder(_bit_frames_file(frames), "mem.dcm", [])
    for f in range(shape[0]):
        assert np.array_equal(dec.frame(f), frames[f]), f"frame {f + 1}"
    with pytest.raises(IndexError):
        dec.frame(shape[0])  # padding bits after the last frame are no frame


def test_one_bit_pixel_data_short_of_its_frames_is_refused() -> None:
    from livercube.errors import UnreadableFileError
    from livercube.sources.seg_frames import Decoder

    frames = np.ones((4, 8, 8), dtype=np.uint8)
    with pytest.raises(UnreadableFileError, match="holds 240 of the 256 pixels"):
        Decoder(_bit_frames_file(frames, drop_bytes=2), "mem.dcm", [])


def test_hcc_quirks(hcc: Generated) -> None:
    segs = {(s.patient_id, s.kind): s for s in hcc.truth.segs}
    # multi-acquisition SEG without ReferencedSeriesSequence
    mixed = segs[("HCC_002", "expert")]
    assert len(mixed.referenced_volumes) == 3 and not mixed.has_referenced_series_sequence
    m = match_seg(hcc.seg_url[mixed.sop_instance_uid], hcc.patient_targets("HCC_002"))
    assert "SEG has no ReferencedSeriesSequence" in m.notes
    assert any("several targets" in n for n in m.notes)
    # a referenced CT file is missing: still matched and placed by geometry
    first = segs[("HCC_001", "expert")]
    assert first.missing_referenced_sop_uids
    m = match_seg(hcc.seg_url[first.sop_instance_uid], hcc.patient_targets("HCC_001"))
    assert m.target_key == first.referenced_volumes[0] and m.exact
    assert any("found in no target" in n for n in m.notes)
    # the mass is recoverable as its own bit even where it overlaps necrosis
    placed = place_seg(
        hcc.seg_url[first.sop_instance_uid],
        hcc.targets[m.target_key],
        collection="hcc-tace-seg",
    )
    got = masks_by_label(placed)
    assert (got["Necrosis"] & got["Mass"]).any()
    assert "Necrosis" in got and placed.segments.segments[-1].unified == 2


def test_crlm_quirks(crlm: Generated) -> None:
    flipped = [s for s in crlm.truth.segs if s.in_plane_flipped]
    assert flipped and all(s.omit_empty_frames for s in crlm.truth.segs)
    st = flipped[0]
    ds = pydicom.dcmread(crlm.seg_url[st.sop_instance_uid], stop_before_pixels=True)
    assert int(ds.NumberOfFrames) < st.grid.shape[0] * len(st.segment_labels)  # omitted frames
    placed = place_seg(
        crlm.seg_url[st.sop_instance_uid], crlm.targets[st.referenced_volumes[0]], collection="crlm"
    )
    got = masks_by_label(placed)
    tumours = [label for label in got if label.startswith("Tumor_")]
    overlaps = [
        (a, b) for i, a in enumerate(tumours) for b in tumours[i + 1 :] if (got[a] & got[b]).any()
    ]
    assert overlaps, "the generator's overlapping tumours should survive as separate bits"
    remnant = next(s for s in placed.segments.segments if s.label == "Liver Remnant")
    assert remnant.unified is None


def test_frames_outside_target_are_noted(crlm: Generated) -> None:
    st = crlm.truth.segs[0]
    full = crlm.targets[st.referenced_volumes[0]]
    nz = full.grid.shape[0]
    content = [z for z in range(nz) if any(m[z].any() for m in st.masks.values())]
    cut = content[len(content) // 2]
    small = replace(
        full,
        key="cut",
        grid=Grid((cut, *full.grid.shape[1:]), full.grid.spacing, full.grid.origin),
        sop_uids_by_z={z: v for z, v in full.sop_uids_by_z.items() if z < cut},
    )
    placed = place_seg(crlm.seg_url[st.sop_instance_uid], small, collection="crlm")
    assert any("outside the grid of cut" in n for n in placed.notes), placed.notes
    for label, mask in masks_by_label(placed).items():
        np.testing.assert_array_equal(mask, st.masks[label][:cut])
    # the full target wins against the truncated one
    m = match_seg(crlm.seg_url[st.sop_instance_uid], [small, full])
    assert m.target_key == full.key


def test_seg_naming_an_acquisition_it_does_not_lie_in(crlm: Generated) -> None:
    """HCC_089: the SEG's references name one acquisition, its frames lie in another."""
    st = crlm.truth.segs[0]
    t = crlm.targets[st.referenced_volumes[0]]
    named = replace(  # owns every cited instance, but sits 400 mm away
        t,
        key="named",
        grid=Grid(t.grid.shape, t.grid.spacing, (t.grid.origin[0] + 400.0, *t.grid.origin[1:])),
    )
    actual = replace(t, key="actual", series_uid="1.2.3.999", sop_uids_by_z={})
    for order in ([named, actual], [actual, named]):
        m = match_seg(crlm.seg_url[st.sop_instance_uid], order)
        assert m.target_key == "actual", m.reason
        assert m.referenced == {"named": m.referenced["named"]} and m.referenced["named"] > 0
        assert any("placed by frame geometry" in n for n in m.notes), m.notes
    placed = place_seg(crlm.seg_url[st.sop_instance_uid], actual, collection="crlm")
    for label, mask in masks_by_label(placed).items():
        np.testing.assert_array_equal(mask, st.masks[label])


def test_frame_of_reference_decides_between_identical_grids(crlm: Generated) -> None:
    """Two CTs on the same grid (e.g. a re-reconstruction): the SEG's FrameOfReferenceUID wins."""
    st = crlm.truth.segs[0]
    t = crlm.targets[st.referenced_volumes[0]]
    seg_for = str(pydicom.dcmread(crlm.seg_url[st.sop_instance_uid]).FrameOfReferenceUID)
    assert t.frame_of_reference_uid == seg_for  # recorded by the header scan
    right = replace(t, key="right", sop_uids_by_z={})
    other = replace(right, key="other", frame_of_reference_uid="1.2.3.4.5")
    for order in ([other, right], [right, other]):
        assert match_seg(crlm.seg_url[st.sop_instance_uid], order).target_key == "right"


def test_no_matching_target(crlm: Generated) -> None:
    st = crlm.truth.segs[0]
    t = crlm.targets[st.referenced_volumes[0]]
    far = replace(
        t,
        key="far",
        sop_uids_by_z={},
        grid=Grid(t.grid.shape, t.grid.spacing, (t.grid.origin[0] + 5000.0, *t.grid.origin[1:])),
    )
    m = match_seg(crlm.seg_url[st.sop_instance_uid], [far])
    assert m.target_key is None and "none of 1 target" in m.reason
    assert match_seg(crlm.seg_url[st.sop_instance_uid], []).target_key is None


def test_remote_url(crlm: Generated) -> None:
    st = crlm.truth.segs[1]
    url = f"memory://segs/{st.sop_instance_uid}.dcm"
    fs = fsspec.filesystem("memory")
    fs.pipe(url, Path(crlm.seg_url[st.sop_instance_uid]).read_bytes())
    try:
        m = match_seg(url, crlm.patient_targets(st.patient_id))
        placed = place_seg(url, crlm.targets[m.target_key], collection="crlm")
    finally:
        fs.rm(url)
    for label, mask in masks_by_label(placed).items():
        np.testing.assert_array_equal(mask, st.masks[label])


def test_seg_kind_and_usage() -> None:
    assert seg_kind("AIMI liver-tumor AI segmentation") == "ai"
    assert seg_kind("Segmentation") == "expert"
    assert seg_kind("") == "expert"
    assert seg_kind("Maintain") == "expert"
    with pytest.raises(UsageError):
        place_seg("/nonexistent.dcm", None, collection="nope")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- dcmqi as reader


def test_dcmqi_reader_agrees(generated: Generated, tmp_path: Path) -> None:
    for i, st in enumerate(s for s in generated.truth.segs if s.kind == "expert"):
        url = generated.seg_url[st.sop_instance_uid]
        out = tmp_path / f"out{i}"
        out.mkdir()
        run = subprocess.run(
            [str(SEGIMAGE2ITK), "--inputDICOM", url, "--outputDirectory", str(out), "-t", "nifti"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert run.returncode == 0, run.stderr
        meta = json.loads((out / "meta.json").read_text())
        target = generated.targets[st.referenced_volumes[0]]
        placed = masks_by_label(place_seg(url, target, collection=generated.collection))
        for n, attrs in enumerate(meta["segmentAttributes"], start=1):
            (seg_meta,) = attrs
            img = sitk.DICOMOrient(sitk.ReadImage(str(out / f"{n}.nii.gz")), "LPS")
            ref = sitk_on_grid(img != 0, target.grid)
            label = seg_meta["SegmentLabel"]
            np.testing.assert_array_equal(placed[label], ref, err_msg=f"{url} {label}")


# --------------------------------------------------------------------------- dcmqi as writer


def _dcmqi_meta(labels: list[str]) -> dict:
    def code(value: str, meaning: str) -> dict:
        return {"CodeValue": value, "CodingSchemeDesignator": "SCT", "CodeMeaning": meaning}

    return {
        "ContentCreatorName": "Reader^One",
        "ClinicalTrialSeriesID": "1",
        "ClinicalTrialTimePointID": "1",
        "ClinicalTrialCoordinatingCenterName": "test",
        "SeriesDescription": "Segmentation",
        "SeriesNumber": "300",
        "InstanceNumber": "1",
        "BodyPartExamined": "LIVER",
        "ContentLabel": "SEGMENTATION",
        "ContentDescription": "dcmqi test",
        "segmentAttributes": [
            [
                {
                    "labelID": n,
                    "SegmentLabel": label,
                    "SegmentDescription": label,
                    "SegmentAlgorithmType": "MANUAL",
                    "SegmentedPropertyCategoryCodeSequence": code(
                        "123037004", "Anatomical Structure"
                    ),
                    "SegmentedPropertyTypeCodeSequence": code("10200004", "Liver"),
                    "recommendedDisplayRGBValue": [200, 100, 50],
                }
                for n, label in enumerate(labels, start=1)
            ]
        ],
    }


@pytest.fixture(scope="module")
def dcmqi_case(tmp_path_factory) -> tuple[Path, np.ndarray, SegTarget]:
    """A CT with IOP (-1,0,0,0,-1,0) and an LPS label image (dcmqi writes the SEG unflipped)."""
    root = tmp_path_factory.mktemp("dcmqi")
    shape, spacing, origin = (6, 20, 18), (2.5, 0.75, 0.7), (-100.0, -50.0, -60.0)
    write_ct_series(
        root / "ct",
        canonical_test_array(shape),
        spacing_zyx=spacing,
        origin_zyx=origin,
        row_cos=(-1.0, 0.0, 0.0),
        col_cos=(0.0, -1.0, 0.0),
    )
    lab = np.zeros(shape, np.uint8)
    lab[1:4, 3:10, 2:8] = 1
    lab[2:5, 8:15, 6:14] = 2
    lab[4, 1:3, 1:3] = 3
    sitk.WriteImage(image_of(lab, spacing, origin), str(root / "label.nrrd"))
    (root / "meta.json").write_text(json.dumps(_dcmqi_meta(["Liver", "Mass", "Gallbladder"])))
    return root, lab, scan_target(root / "ct")


@pytest.mark.parametrize("mode", ["binary", "labelmap"])
def test_dcmqi_written_seg(dcmqi_case, mode: str) -> None:
    root, lab, target = dcmqi_case
    out = root / f"seg_{mode}.dcm"
    run = subprocess.run(
        [
            str(ITK2SEGIMAGE),
            "--inputImageList",
            str(root / "label.nrrd"),
            "--inputDICOMDirectory",
            str(root / "ct"),
            "--outputDICOM",
            str(out),
            "--inputMetadata",
            str(root / "meta.json"),
            "--segmentationType",
            mode,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if run.returncode != 0 and mode == "labelmap" and "segmentationType" in run.stderr:
        pytest.skip(f"this dcmqi cannot write labelmap SEGs: {run.stderr[-300:]}")
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    m = match_seg(str(out), [target])
    assert m.target_key == "ct" and m.exact, m
    placed = place_seg(str(out), target, collection="hcc-tace-seg")
    assert placed.seg_attrs["SegmentationType"] == mode.upper()
    assert not placed.resampled
    assert placed.unknown_labels == ["Gallbladder"]
    got = masks_by_label(placed)
    assert list(got) == ["Liver", "Mass", "Gallbladder"]
    for n, label in enumerate(got, start=1):
        np.testing.assert_array_equal(got[label], lab == n, err_msg=label)
    gall = placed.segments.segments[2]
    assert gall.unified == 0 and gall.codes["SegmentDescription"] == "Gallbladder"
    # planning's frame table carries over to the task
    assert m.known_frames is not None
    planned = place_seg(str(out), target, collection="hcc-tace-seg", known_frames=m.known_frames)
    np.testing.assert_array_equal(planned.segments.bits, placed.segments.bits)


# --------------------------------------------------------------------------- off-grid SEG


def _blob(shape, centre, radii) -> np.ndarray:
    z, y, x = np.meshgrid(*(np.arange(s) for s in shape), indexing="ij")
    return (
        ((z - centre[0]) / radii[0]) ** 2
        + ((y - centre[1]) / radii[1]) ** 2
        + ((x - centre[2]) / radii[2]) ** 2
    ) <= 1.0


def test_off_grid_seg_is_resampled(tmp_path: Path) -> None:
    study = Study()
    shape, spacing, origin = (6, 20, 18), (2.5, 0.75, 0.7), (-100.0, -50.0, -60.0)
    write_ct_series(
        tmp_path / "ct", canonical_test_array(shape), spacing_zyx=spacing, origin_zyx=origin,
        study=study,
    )  # fmt: skip
    target = scan_target(tmp_path / "ct", "ct")
    elsewhere = replace(
        target, key="elsewhere", grid=replace(target.grid, origin=(200.0, -50.0, -60.0))
    )
    # the SEG's own grid: finer, shifted, flipped in-plane; its CT is not among the targets
    s_shape, s_spacing, s_origin = (13, 30, 24), (1.3, 0.55, 0.6), (-101.13, -50.61, -60.77)
    write_ct_series(
        tmp_path / "segct",
        np.zeros(s_shape, np.int16),
        spacing_zyx=s_spacing,
        origin_zyx=s_origin,
        row_cos=(-1.0, 0.0, 0.0),
        col_cos=(0.0, -1.0, 0.0),
        study=study,
    )
    sources = sorted_sources(tmp_path / "segct")
    liver = _blob(s_shape, (6, 14, 11), (5.2, 11.3, 9.1))
    mass = _blob(s_shape, (4, 10, 8), (2.6, 4.2, 3.7))
    # frames in source order: k ascends along the normal (+z), rows along -y, columns along -x
    stack = np.stack([liver, mass], axis=-1)[:, ::-1, ::-1, :]
    url = str(
        write_hd_seg(tmp_path / "seg.dcm", sources, stack.astype(np.uint8), ["Liver", "Mass"])
    )

    m = match_seg(url, [elsewhere, target])
    assert m.target_key == "ct" and not m.exact and m.referenced == {}
    placed = place_seg(url, target, collection="hcc-tace-seg")
    assert placed.resampled
    assert any("nearest-neighbour" in n for n in placed.notes)
    got = masks_by_label(placed)
    for label, mask in (("Liver", liver), ("Mass", mass)):
        ref = sitk_on_grid(image_of(mask, s_spacing, s_origin), target.grid)
        assert ref.any()
        np.testing.assert_array_equal(got[label], ref, err_msg=label)


def test_fractional_and_unknown_label(tmp_path: Path) -> None:
    shape, spacing, origin = (5, 12, 10), (2.5, 0.75, 0.7), (-100.0, -50.0, -60.0)
    write_ct_series(
        tmp_path / "ct", canonical_test_array(shape), spacing_zyx=spacing, origin_zyx=origin
    )
    target = scan_target(tmp_path / "ct")
    rng = np.random.default_rng(1)
    prob = rng.choice([0.0, 0.2, 0.45, 0.55, 0.8, 1.0], size=(*shape, 2))
    url = str(
        write_hd_seg(
            tmp_path / "frac.dcm",
            sorted_sources(tmp_path / "ct"),
            prob.astype(np.float32),
            ["Liver", "Spleen"],
            seg_type="FRACTIONAL",
            max_fractional_value=200,
        )
    )
    placed = place_seg(url, target, collection="hcc-tace-seg")
    assert placed.seg_attrs["SegmentationType"] == "FRACTIONAL"
    assert placed.seg_attrs["MaximumFractionalValue"] == 200
    assert placed.unknown_labels == ["Spleen"]
    assert [s.unified for s in placed.segments.segments] == [1, 0]
    got = masks_by_label(placed)
    np.testing.assert_array_equal(got["Liver"], prob[..., 0] >= 0.5)
    np.testing.assert_array_equal(got["Spleen"], prob[..., 1] >= 0.5)


def test_highdicom_labelmap(tmp_path: Path) -> None:
    shape = (4, 10, 12)
    write_ct_series(tmp_path / "ct", canonical_test_array(shape), row_cos=(0.0, 1.0, 0.0),
                    col_cos=(1.0, 0.0, 0.0))  # fmt: skip
    target = scan_target(tmp_path / "ct")
    sources = sorted_sources(tmp_path / "ct")
    lab = np.zeros(shape, np.uint8)
    lab[1:3, 2:7, 3:9] = 1
    lab[2:4, 5:9, 1:4] = 2
    # source frames: k along the normal -z, rows along +x, columns along +y (transposed)
    frames = np.ascontiguousarray(np.transpose(lab[::-1], (0, 2, 1)))
    url = str(write_hd_seg(tmp_path / "lm.dcm", sources, frames, ["Liver", "Mass"], "LABELMAP"))
    assert pydicom.dcmread(url).SOPClassUID == dicom_sop.LABELMAP_SEGMENTATION
    placed = place_seg(url, target, collection="crlm")
    assert not placed.resampled
    got = masks_by_label(placed)
    np.testing.assert_array_equal(got["Liver"], lab == 1)
    np.testing.assert_array_equal(got["Mass"], lab == 2)


@pytest.fixture(autouse=True, scope="module")
def _tools() -> None:
    for tool in (SEGIMAGE2ITK, ITK2SEGIMAGE):
        if not tool.exists() and shutil.which(tool.name) is None:
            pytest.fail(f"dcmqi tool {tool.name} missing from the venv")


def test_resampling_path_equals_copy_on_grid(crlm: Generated, monkeypatch) -> None:
    """Forcing the nearest-neighbour path on on-grid SEGs (flipped one included) changes nothing."""
    import livercube.sources.seg_match as mod

    monkeypatch.setattr(mod, "GRID_TOL_VOXEL", -1.0)  # no frame counts as on the lattice
    for st in crlm.truth.segs:
        url = crlm.seg_url[st.sop_instance_uid]
        placed = place_seg(url, crlm.targets[st.referenced_volumes[0]], collection="crlm")
        assert placed.resampled
        for label, mask in masks_by_label(placed).items():
            np.testing.assert_array_equal(mask, st.masks[label], err_msg=label)


def test_segments_are_added_through_the_box_their_frames_cover(crlm: Generated, monkeypatch):
    """Placement hands each segment's bounding box to the bit field: every voxel of the mask
    lies inside it, and a tumour's box is a few slices, not the volume."""
    from livercube.volumes.volume import SegmentField

    seen: list[tuple[str, tuple[slice, ...], int]] = []
    real_add = SegmentField.add

    def spy(self, mask, *, within=None, **kw):
        assert within is not None, "placement must pass the segment's box"
        outside = mask.copy()
        outside[within] = False
        assert not outside.any(), f"{kw['label']}: voxels outside its box {within}"
        seen.append((kw["label"], within, mask.shape[0]))
        return real_add(self, mask, within=within, **kw)

    monkeypatch.setattr(SegmentField, "add", spy)
    for st in crlm.truth.segs:
        url = crlm.seg_url[st.sop_instance_uid]
        placed = place_seg(url, crlm.targets[st.referenced_volumes[0]], collection="crlm")
        for label, mask in masks_by_label(placed).items():
            np.testing.assert_array_equal(mask, st.masks[label], err_msg=label)
    tumours = [(w, n) for label, w, n in seen if label.startswith("Tumor")]
    assert tumours and all(w[0].stop - w[0].start < n for w, n in tumours), tumours


def test_extent_is_the_union_of_pasted_boxes() -> None:
    from livercube.volumes.volume import Extent

    e = Extent()
    assert e.box() is None
    e.include(None)
    e.include((slice(3, 4), slice(2, 9), slice(0, 5)))
    e.include((slice(1, 2), slice(4, 6), slice(3, 8)))
    assert e.box() == (slice(1, 4), slice(2, 9), slice(0, 8))


def test_placement_does_not_depend_on_highdicom(crlm: Generated, monkeypatch) -> None:
    """The hot path unpacks frames with numpy; highdicom stays an independent reference."""

    def refuse(*args, **kwargs):
        raise AssertionError("highdicom must not be on the placement path")

    monkeypatch.setattr(hd.seg, "segread", refuse)
    st = next(s for s in crlm.truth.segs if s.in_plane_flipped)
    url = crlm.seg_url[st.sop_instance_uid]
    placed = place_seg(url, crlm.targets[st.referenced_volumes[0]], collection="crlm")
    for label, mask in masks_by_label(placed).items():
        np.testing.assert_array_equal(mask, st.masks[label], err_msg=label)


def test_encapsulated_seg_frames(tmp_path: Path) -> None:
    """Compressed (encapsulated, RLE) frames decode frame by frame to the same masks."""
    from pydicom.uid import RLELossless

    shape = (4, 10, 12)
    write_ct_series(tmp_path / "ct", canonical_test_array(shape))
    target = scan_target(tmp_path / "ct")
    lab = np.zeros(shape, np.uint8)
    lab[1:3, 2:7, 3:9] = 1
    url = write_hd_seg(
        tmp_path / "s.dcm", sorted_sources(tmp_path / "ct"), lab, ["Liver"], "LABELMAP",
        transfer_syntax_uid=RLELossless,
    )  # fmt: skip
    placed = place_seg(str(url), target, collection="crlm")
    np.testing.assert_array_equal(masks_by_label(placed)["Liver"], lab == 1)


def test_planning_matches_segs_from_frame_tables_built_beside_the_header_reads(
    tmp_path: Path, monkeypatch
) -> None:
    """The SEG frame tables are built where the headers are read (a cluster's workers): the
    client matches SEGs without reading one again, exactly as when it read them itself, and
    the volume task places the SEG from that table without building its own."""
    from livercube.sources import dicom_collection, dicom_scan, seg_frames, seg_match

    src = tmp_path / "src"
    write_crlm(src, n_patients=2, size="tiny")

    def forbidden(*args, **kwargs):
        raise AssertionError("a SEG header was parsed again")

    monkeypatch.setattr(seg_match, "read_seg_header", forbidden)
    plan = dicom_collection.plan(str(src), "crlm")
    monkeypatch.undo()
    monkeypatch.setattr(dicom_scan, "_seg_frames", lambda hdr: None)  # the client reads them
    again = dicom_collection.plan(str(src), "crlm")
    monkeypatch.undo()
    with_seg = [t for t in plan.tasks if t.seg is not None]
    assert len(with_seg) == 2
    for a, b in zip(plan.tasks, again.tasks, strict=True):
        assert (a.key, a.seg_notes) == (b.key, b.seg_notes)
        assert (a.seg is None) == (b.seg is None)
        if a.seg is None:
            continue
        assert a.seg.sop_uid == b.seg.sop_uid and a.seg_frames.key == b.seg_frames.key
        fa, fb = a.seg_frames.frames, b.seg_frames.frames
        assert fa.refs == fb.refs
        for name in ("position", "row_cos", "col_cos", "pixel_spacing", "segment"):
            np.testing.assert_array_equal(getattr(fa, name), getattr(fb, name), err_msg=name)
    monkeypatch.setattr(seg_frames, "frame_table", forbidden)
    volume, _ = with_seg[0].read(None)
    assert volume.annotated


# --------------------------------------------------------------------------- frame tables


def _keyword_frame_table(ds: pydicom.Dataset) -> dict[str, list]:
    """Every frame's geometry, segment and references through pydicom's keyword access: the
    fully converted values the frame table's raw-bytes reads must reproduce."""
    shared_seq = ds.get("SharedFunctionalGroupsSequence") or []
    shared = shared_seq[0] if len(shared_seq) else None

    def group(item, keyword):
        for holder in (item, shared):
            if holder is not None and len(holder.get(keyword) or []):
                return holder.get(keyword)[0]
        return None

    out: dict[str, list] = {k: [] for k in ("pos", "iop", "ps", "th", "seg", "refs")}
    for item in ds.PerFrameFunctionalGroupsSequence:
        m = group(item, "PixelMeasuresSequence")
        out["pos"].append(
            [float(v) for v in group(item, "PlanePositionSequence").ImagePositionPatient]
        )
        out["iop"].append(
            [float(v) for v in group(item, "PlaneOrientationSequence").ImageOrientationPatient]
        )
        out["ps"].append([float(v) for v in m.PixelSpacing])
        thickness = m.get("SliceThickness")
        out["th"].append(float(thickness) if thickness not in (None, "") else np.nan)
        ident = group(item, "SegmentIdentificationSequence")
        number = None if ident is None else ident.get("ReferencedSegmentNumber")
        out["seg"].append(0 if number is None else int(number))
        uids = [
            str(src.ReferencedSOPInstanceUID)
            for der in item.get("DerivationImageSequence") or []
            for src in der.get("SourceImageSequence") or []
            if src.get("ReferencedSOPInstanceUID")
        ]
        out["refs"].append(tuple(dict.fromkeys(uids)))
    return out


def _reencoded(url: str, tmp_path: Path, syntax: str) -> str:
    """The SEG rewritten in another uncompressed transfer syntax (headers only matter here)."""
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    uid = {"explicit-le": ExplicitVRLittleEndian, "implicit-le": ImplicitVRLittleEndian,
           "explicit-be": ExplicitVRBigEndian}[syntax]  # fmt: skip
    ds = pydicom.dcmread(url)
    if "PixelData" in ds:  # never decoded here; dropping it keeps big-endian writing simple
        del ds.PixelData
    ds.file_meta.TransferSyntaxUID = uid
    tmp_path.mkdir(parents=True, exist_ok=True)
    out = tmp_path / f"{syntax}.dcm"
    pydicom.dcmwrite(
        out, ds, implicit_vr=uid.is_implicit_VR, little_endian=uid.is_little_endian,
        force_encoding=True,
    )  # fmt: skip
    return str(out)


def _highdicom_segs(tmp_path: Path) -> list[str]:
    shape = (4, 10, 12)
    write_ct_series(tmp_path / "ct", canonical_test_array(shape))
    sources = sorted_sources(tmp_path / "ct")
    lab = np.zeros(shape, np.uint8)
    lab[1:3, 2:7, 3:9] = 1
    lab[2:4, 5:9, 1:4] = 2
    binary = np.stack([lab == 1, lab == 2], axis=-1).astype(np.uint8)
    return [
        str(write_hd_seg(tmp_path / "bin.dcm", sources, binary, ["Liver", "Mass"])),
        str(write_hd_seg(tmp_path / "lm.dcm", sources, lab, ["Liver", "Mass"], "LABELMAP")),
        str(
            write_hd_seg(
                tmp_path / "frac.dcm",
                sources,
                binary.astype(np.float32) * 0.75,
                ["Liver", "Mass"],
                "FRACTIONAL",
                max_fractional_value=255,
            )
        ),
    ]


@pytest.mark.parametrize("syntax", ["explicit-le", "implicit-le", "explicit-be"])
def test_frame_tables_equal_pydicoms_converted_values(hcc, crlm, tmp_path, syntax) -> None:
    from livercube.sources.seg_frames import frame_table

    urls = [*hcc.seg_url.values(), *crlm.seg_url.values(), *_highdicom_segs(tmp_path / "hd")]
    assert len(urls) >= 7
    seen_refs = seen_segments = 0
    for i, url in enumerate(urls):
        url = _reencoded(url, tmp_path / f"{i}", syntax) if syntax != "explicit-le" else url
        want = _keyword_frame_table(pydicom.dcmread(url, stop_before_pixels=True))
        got = frame_table(pydicom.dcmread(url, stop_before_pixels=True), url)  # untouched copy
        np.testing.assert_array_equal(got.position, want["pos"], err_msg=url)
        iop = np.asarray(want["iop"])
        for cos, ref in ((got.row_cos, iop[:, :3]), (got.col_cos, iop[:, 3:])):
            np.testing.assert_allclose(cos, ref / np.linalg.norm(ref, axis=1, keepdims=True))
        np.testing.assert_array_equal(got.pixel_spacing, want["ps"])
        np.testing.assert_array_equal(got.thickness, want["th"])
        np.testing.assert_array_equal(got.segment, want["seg"])
        assert got.refs == want["refs"]
        seen_refs += any(want["refs"])
        seen_segments += any(want["seg"])
    assert seen_refs >= 6 and seen_segments >= 6  # the comparison had values to compare
