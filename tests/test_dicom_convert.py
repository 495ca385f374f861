"""HCC-TACE-Seg and CRLM end to end: generated collections through the CLI, voxel for voxel."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from seg_invariant import assert_segment_counts

import livercube
from livercube.sources import dicom_sop
from livercube.store.contract import check_store
from livercube.synth.dicom_collections import write_crlm, write_hcc_tace_seg

LIVERCUBE = str(Path(sys.executable).parent / "livercube")


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([LIVERCUBE, *args], capture_output=True, text=True, timeout=600)


def _match(store, truth):
    """Store index of every truth volume, by (series UID, acquisition number)."""
    cat = store.catalog
    index = {}
    for i in range(cat.sizes["volume"]):
        acq = int(cat.acquisition_number.values[i])
        index[(str(cat.series_uid.values[i]), None if acq < 0 else acq)] = i
    return {v.key: index.get((v.series_uid, v.acquisition_number)) for v in truth.volumes}


def check_against_truth(url: str, truth, storage_options: dict | None = None) -> None:
    store = livercube.open(url, **(storage_options or {}))
    where = _match(store, truth)
    missing = [k for k, i in where.items() if i is None]
    assert not missing, f"volumes not in the store: {missing}"
    assert store.catalog.sizes["volume"] == len(truth.volumes)
    for v in truth.volumes:
        i = where[v.key]
        ds = store.volume(i)
        np.testing.assert_array_equal(ds.image.values, v.hu, err_msg=v.key)
        np.testing.assert_allclose(store.catalog.spacing.values[i], v.grid.spacing, atol=1e-4)
        np.testing.assert_allclose(store.catalog.origin.values[i], v.grid.origin, atol=1e-3)
        assert str(store.catalog.phase.values[i]) == v.phase, v.key
    for seg in truth.segs:
        if seg.kind != "expert":
            continue
        annotated = [
            where[k]
            for k in seg.referenced_volumes
            if bool(store.catalog.annotated.values[where[k]])
        ]
        assert len(annotated) == 1, f"{seg.path}: annotated volumes {annotated}"
        got = store.segments(annotated[0])
        assert list(got) == list(seg.segment_labels)
        for label, mask in seg.masks.items():
            np.testing.assert_array_equal(got[label], mask, err_msg=f"{seg.path} {label}")
        assert_segment_counts(store, annotated[0])
    assert check_store(url, storage_options) == []


@pytest.fixture(scope="module")
def hcc(tmp_path_factory):
    root = tmp_path_factory.mktemp("hcc") / "HCC-TACE-Seg"
    return root, write_hcc_tace_seg(root, n_patients=2, size="tiny", seed=1)


@pytest.fixture(scope="module")
def crlm(tmp_path_factory):
    root = tmp_path_factory.mktemp("crlm") / "CRLM"
    return root, write_crlm(root, n_patients=2, size="tiny", seed=2)


def test_hcc_tace_seg_through_the_cli(hcc, tmp_path):
    root, truth = hcc
    dest = tmp_path / "s.zarr"
    res = cli("convert", str(root), str(dest), "--collection", "hcc-tace-seg", "--quiet")
    # AI SEGs are left out on purpose and named in the report; nothing is skipped
    assert res.returncode == 0, res.stdout + res.stderr
    ai = [ln for ln in res.stdout.splitlines() if "AI segmentation, not used" in ln]
    assert len(ai) == 2, res.stdout
    check_against_truth(str(dest), truth)
    cat = livercube.open(str(dest)).catalog
    assert {"hcc_bclc", "hcc_afp", "hcc_tnm"} <= set(cat.data_vars)
    assert set(cat.sex.values.astype(str)) <= {"male", "female", ""}


def test_crlm_through_the_cli(crlm, tmp_path):
    root, truth = crlm
    dest = tmp_path / "s.zarr"
    res = cli("convert", str(root), str(dest), "--collection", "crlm", "--quiet")
    assert res.returncode == 0, res.stdout + res.stderr
    check_against_truth(str(dest), truth)
    store = livercube.open(str(dest))
    labels = [str(s) for s in store.catalog.segment_labels.values if s]
    assert all(s.startswith("Liver|Liver Remnant|Hepatic|Portal|Tumor_1") for s in labels)
    cat = store.catalog
    assert "crlm_overall_survival_months" in cat and "crlm_mucin_percent" in cat


@pytest.mark.slow
def test_crlm_real_world_variants_through_the_cli(tmp_path):
    """Per-slice AcquisitionNumbers, a SEG without adjacent frames, a LABELMAP SEG and a tilted
    CT, written by the generator, converted and verified against independent decoders."""
    root = tmp_path / "CRLM"
    truth = write_crlm(
        root, n_patients=3, size="tiny", seed=5, per_slice_acquisition_numbers=True,
        sparse_seg_frames=True, labelmap_seg=True, gantry_tilt=True,
    )  # fmt: skip
    # the variants are really there
    numbers = {int(pydicom.dcmread(f, stop_before_pixels=True).AcquisitionNumber)
               for f in truth.quirks["per_slice_acquisition_numbers"]}  # fmt: skip
    assert len(numbers) == len(truth.quirks["per_slice_acquisition_numbers"]) > 2
    sparse = pydicom.dcmread(truth.segs[0].path, stop_before_pixels=True)
    zs = sorted({round(float(f.PlanePositionSequence[0].ImagePositionPatient[2]), 3)
                 for f in sparse.PerFrameFunctionalGroupsSequence})  # fmt: skip
    assert min(np.diff(zs)) > truth.segs[0].grid.spacing[0] * 1.5
    labelmap = pydicom.dcmread(truth.segs[1].path, stop_before_pixels=True)
    assert labelmap.SOPClassUID == dicom_sop.LABELMAP_SEGMENTATION
    dest = tmp_path / "s.zarr"
    res = cli("convert", str(root), str(dest), "--collection", "crlm", "--quiet")
    assert res.returncode == 3, res.stdout + res.stderr
    skipped = [line for line in res.stdout.splitlines() if "SKIPPED" in line]
    assert any("gantry tilt" in line for line in skipped), skipped
    assert any("no CT acquisition of its study" in line for line in skipped), skipped
    assert len(skipped) == 2, skipped
    check_against_truth(str(dest), truth)
    res = cli("verify", str(dest), "--source", str(root), "--collection", "crlm")
    assert res.returncode == 0, res.stdout + res.stderr


def test_crlm_from_idc_layout_on_s3(tmp_path, s3_bucket):
    """The IDC bucket layout, read from a real S3 endpoint, written to another bucket."""
    import s3fs

    bucket, opts = s3_bucket
    root = tmp_path / "idc"
    truth = write_crlm(root, n_patients=2, size="tiny", seed=2, layout="idc")
    fs = s3fs.S3FileSystem(**opts)
    fs.put(str(root), f"{bucket}/idc", recursive=True)
    url = f"s3://{bucket}/store"
    res = cli(
        "convert",
        f"s3://{bucket}/idc",
        url,
        "--collection",
        "crlm",
        "--quiet",
        "--clinical",
        str(truth.clinical_path),
        *[f"--storage-option={k}={v}" for k, v in opts.items()],
        *[f"--source-option={k}={v}" for k, v in opts.items()],
    )
    assert res.returncode == 0, res.stdout + res.stderr
    check_against_truth(url, truth, opts)


def test_quirks_are_reported_not_lost(tmp_path):
    root = tmp_path / "HCC"
    truth = write_hcc_tace_seg(
        root,
        n_patients=2,
        size="tiny",
        seed=4,
        junk_files=True,
        truncated_duplicate=True,
        missing_slice=True,
        missing_referenced_instance=True,
    )
    dest = tmp_path / "s.zarr"
    res = cli("convert", str(root), str(dest), "--collection", "hcc-tace-seg", "--quiet")
    # nothing that exists is lost: the README is expected, the truncated copy is a note, the
    # hole is filled; the zero-byte "slice" is a damaged input, so the run says so (exit 3)
    assert res.returncode == 3, res.stdout + res.stderr
    skipped = [line for line in res.stdout.splitlines() if "SKIPPED" in line]
    assert len(skipped) == 1 and skipped[0].endswith(
        "1-00.dcm: zero-byte file (damaged or incomplete download)"
    ), skipped
    assert "README.txt" not in res.stdout
    assert "(1).dcm: duplicate SOPInstanceUID" in res.stdout and "truncated copy" in res.stdout
    assert "missing slice(s) filled with -1024 HU" in res.stdout
    store = livercube.open(str(dest))
    where = _match(store, truth)
    holed = [v for v in truth.volumes if v.missing_z]
    assert holed
    for v in holed:
        meta = store.volume_attrs(where[v.key])
        assert meta["source"]["filled_slices"] == v.missing_z
        img = store.volume(where[v.key]).image.values
        keep = [z for z in range(img.shape[0]) if z not in v.missing_z]
        np.testing.assert_array_equal(img[keep], v.hu[keep])
        assert (img[v.missing_z] == -1024).all()
    # the expert SEG whose referenced CT file is gone is still placed, by its own geometry
    seg = next(sg for sg in truth.segs if sg.missing_referenced_sop_uids)
    (annotated,) = [
        where[k] for k in seg.referenced_volumes if bool(store.catalog.annotated.values[where[k]])
    ]
    got = store.segments(annotated)
    for label, mask in seg.masks.items():
        np.testing.assert_array_equal(got[label], mask, err_msg=label)


def test_phase_override_file(hcc, tmp_path):
    root, truth = hcc
    v = next(v for v in truth.volumes if v.phase == "arterial")
    ov = tmp_path / "phases.csv"
    acq = "" if v.acquisition_number is None else str(v.acquisition_number)
    ov.write_text(f"series_uid,acquisition_number,phase\n{v.series_uid},{acq},delayed\n")
    dest = tmp_path / "s.zarr"
    res = cli(
        "convert",
        str(root),
        str(dest),
        "--collection",
        "hcc-tace-seg",
        "--quiet",
        "--overrides",
        str(ov),
        "--only",
        v.patient_id,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    store = livercube.open(str(dest))
    i = _match(store, truth)[v.key]
    assert str(store.catalog.phase.values[i]) == "delayed"
    assert str(store.catalog.phase_evidence.values[i]).startswith("override")
