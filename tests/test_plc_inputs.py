"""PLC-CECT hostile and odd inputs: each costs only itself, and the report says what happened."""

from __future__ import annotations

import gzip
import json
import shutil
import struct
import subprocess
import sys
import tracemalloc
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

import livercube
from livercube.convert import EXIT_PARTIAL, convert
from livercube.errors import IntensityError, UnreadableFileError
from livercube.sources import plc_cect
from livercube.sources.nifti import MAX_NIFTI_BYTES_ENV, load_nifti, to_scalar_volume
from livercube.sources.plc_cect import ct_to_hu, read_patient_table

GIB = 1 << 30


def _by_key(store):
    cat = store.catalog
    return {
        (str(p), str(s)): i
        for i, (p, s) in enumerate(zip(cat.patient_id.values, cat.series.values, strict=True))
    }


def _rewrite(path: Path, fn) -> None:
    """Load a NIfTI, let ``fn`` return a new image built from it, save it back in place."""
    img = nib.load(str(path))
    new = fn(img, np.asarray(img.dataobj))
    nib.save(new, str(path))


# --- RGB as a vector image -------------------------------------------------------------------


def test_simpleitk_vector_rgb_is_reduced_not_skipped(tmp_path):
    grey = np.random.default_rng(0).integers(0, 255, (6, 7, 8), dtype=np.uint8)  # (k, j, i)
    img = sitk.GetImageFromArray(np.repeat(grey[..., None], 3, axis=-1), isVector=True)
    path = tmp_path / "rgb.nii.gz"
    sitk.WriteImage(img, str(path))
    loaded = load_nifti(str(path))
    assert loaded.data.shape == (8, 7, 6, 1, 3)  # what nibabel sees: x, y, z, 1, components
    data, notes = to_scalar_volume(loaded.data, str(path))
    np.testing.assert_array_equal(data, grey.transpose(2, 1, 0))
    assert any("vector image" in n for n in notes)


def test_generator_vector_file_is_what_simpleitk_writes(plc_release):
    root, truth = plc_release
    ((pid, code),) = [k for k, t in truth.volumes.items() if t.form == "vector"]
    img = sitk.ReadImage(str(root / "ct_files" / f"{pid}_ct_{code}.nii.gz"))
    assert img.GetNumberOfComponentsPerPixel() == 3
    assert nib.load(str(root / "ct_files" / f"{pid}_ct_{code}.nii.gz")).header.get_intent()[0] == (
        "vector"
    )


# --- geometry and values ---------------------------------------------------------------------


def test_sheared_affine_is_stored_with_a_note(release_copy, tmp_path):
    root, truth = release_copy
    shear = np.eye(4)
    shear[0, 1] = 0.2
    for sub, name in (
        ("ct_files", "P0002_ct_C2.nii.gz"),
        ("liver_mask_files", "P0002-livermask_C2.nii.gz"),
        ("mask_files", "P0002_mask_C2.nii.gz"),
    ):

        def sheared(img, data):
            out = nib.Nifti1Image(data, shear, header=img.header)
            out.set_sform(shear, code=1)
            return out

        _rewrite(root / sub / name, sheared)
    dest = str(tmp_path / "s.zarr")
    report = convert(str(root), dest, "plc-cect", progress=False)
    assert report.exit_code == 0, report.summary()
    store = livercube.open(dest)
    i = _by_key(store)[("P0002", "C2")]
    attrs = store.volume_attrs(i)
    assert attrs["geometry_flags"]["affine_shear_deg"] == pytest.approx(11.31, abs=0.01)
    assert any("sheared" in n for n in attrs["notes"])
    assert any("P0002" in w and "sheared" in w for w in report.warnings)
    np.testing.assert_array_equal(
        store.volume(i).image.values, truth.volumes[("P0002", "C2")].image
    )


def test_nan_in_mask_is_background_and_the_ct_lands(release_copy, tmp_path):
    root, truth = release_copy
    path = root / "liver_mask_files" / "P0001-livermask_C1.nii.gz"

    def with_nan(img, data):
        f = data.astype(np.float32)
        f[0, 0, :] = np.nan
        out = nib.Nifti1Image(f, img.affine, header=img.header)
        out.set_data_dtype(np.float32)
        return out

    _rewrite(path, with_nan)
    dest = str(tmp_path / "s.zarr")
    report = convert(str(root), dest, "plc-cect", progress=False)
    assert report.exit_code == 0, report.summary()
    store = livercube.open(dest)
    i = _by_key(store)[("P0001", "C1")]
    np.testing.assert_array_equal(store.segments(i)["Liver"], truth.volumes[("P0001", "C1")].liver)
    assert any("NaN voxels read as 0" in n for n in store.volume_attrs(i)["notes"])


def _int16_ct(root: Path, key: tuple[str, str], slope: float, inter: float, stored) -> Path:
    path = root / "ct_files" / f"{key[0]}_ct_{key[1]}.nii.gz"

    def as_int16(img, data):
        out = nib.Nifti1Image(stored(data), img.affine, header=img.header)
        out.set_data_dtype(np.int16)
        out.header.set_slope_inter(slope, inter)
        return out

    _rewrite(path, as_int16)
    return path


def test_int16_ct_with_slope_converts_exactly(release_copy, tmp_path):
    root, truth = release_copy
    key = ("P0003", "C1")
    # store (HU + 1024) / 2 with slope 2, intercept -1024: exact integer HU after scaling
    hu = plc_cect.hu_from_window(
        np.asarray(nib.load(str(root / "ct_files" / "P0003_ct_C1.nii.gz")).dataobj)
    )
    even = (hu // 2) * 2
    _int16_ct(root, key, 2.0, -1024.0, lambda d: ((even + 1024) // 2).astype(np.int16))
    dest = str(tmp_path / "s.zarr")
    report = convert(str(root), dest, "plc-cect", progress=False)
    assert report.exit_code == 0, report.summary()
    store = livercube.open(dest)
    i = _by_key(store)[key]
    t = truth.volumes[key]
    expected = (t.image // 2) * 2
    np.testing.assert_array_equal(store.volume(i).image.values, expected)
    intensity = store.volume_attrs(i)["intensity"]
    assert intensity["exact"] is True and intensity["scl_slope"] == 2.0


def test_int16_ct_with_fractional_slope_is_refused_with_the_reason(release_copy, tmp_path):
    root, _ = release_copy
    path = _int16_ct(root, ("P0003", "C1"), 0.5, 0.0, lambda d: d.astype(np.int16) * 2 + 1)
    dest = str(tmp_path / "s.zarr")
    report = convert(str(root), dest, "plc-cect", progress=False)
    assert report.exit_code == EXIT_PARTIAL
    (rec,) = [s for s in report.skipped if s["input"] == str(path)]
    assert "scl_slope 0.5" in rec["reason"] and "non-integer HU" in rec["reason"]
    assert "float64" not in rec["reason"]


def test_ct_to_hu_pure():
    v = np.array([[[0, 255]]], np.uint8)
    hu, info = ct_to_hu(v, None, None, "x")
    assert info["windowed"] and hu.tolist() == [[[-200, 200]]]
    hu, info = ct_to_hu(np.array([[[0, 3000]]], np.int16), 1.0, -1024.0, "x")
    assert hu.tolist() == [[[-1024, 1976]]] and info["exact"]
    hu, _ = ct_to_hu(np.array([[[-1000.0, 40.0]]]), None, None, "x")
    assert hu.dtype == np.int16 and hu.tolist() == [[[-1000, 40]]]
    with pytest.raises(IntensityError, match="non-integer"):
        ct_to_hu(np.array([[[1.5]]]), None, None, "x")
    with pytest.raises(IntensityError, match="does not fit int16"):
        ct_to_hu(np.array([[[0, 40000]]], np.int32), None, None, "x")


# --- patient_data.csv ------------------------------------------------------------------------


def test_latin1_csv_is_decoded_with_a_warning(release_copy):
    root, _ = release_copy
    csv_path = root / "patient_data.csv"
    text = csv_path.read_text().replace('"male"', '"mâle"')
    assert "mâle" in text
    csv_path.write_bytes(text.encode("latin-1"))
    plan = plc_cect.plan(str(root))
    genders = {t.clinical.get("gender") for t in plan.tasks}
    assert "mâle" in genders and not any("\ufffd" in str(g) for g in genders)
    assert any("not UTF-8" in w and "Windows-1252" in w for w in plan.warnings)


def test_conflicting_duplicate_rows_are_warned():
    header = ",".join(plc_cect.CURRENT_HEADER)
    row = "P0001,{age},male,C1,HCC,ct_files/P0001_ct_C1.nii.gz,,liver_mask_files/x.nii.gz"
    t = read_patient_table(
        "\n".join([header, row.format(age=60), row.format(age=61), row.format(age=60)]) + "\n"
    )
    assert t.covariates["P0001"]["age"] == 60.0
    (note,) = t.notes
    assert "P0001 phase C1" in note and "listed twice" in note and "61" in note
    same = read_patient_table("\n".join([header, row.format(age=60), row.format(age=60)]) + "\n")
    assert same.notes == []
    other = row.format(age=62).replace(",C1,", ",C2,")
    t = read_patient_table("\n".join([header, row.format(age=60), other]) + "\n")
    assert any("P0001 has age 60.0" in n and "62" in n for n in t.notes)


def _broken(text: str, kind: str) -> bytes:
    if kind == "zero-byte":
        return b""
    if kind == "empty":
        return b"\n  \n"
    if kind == "header only":
        return (text.splitlines()[0] + "\n").encode()
    return text.encode()[: len(text) // 2]  # truncated mid-row


@pytest.mark.parametrize("kind", ["truncated", "zero-byte", "empty", "header only"])
def test_broken_patient_data_csv_costs_only_the_covariates(release_copy, tmp_path, kind):
    root, truth = release_copy
    csv_path = root / "patient_data.csv"
    csv_path.write_bytes(_broken(csv_path.read_text(), kind))
    dest = str(tmp_path / "s.zarr")
    report = convert(str(root), dest, "plc-cect", progress=False)
    assert report.exit_code == EXIT_PARTIAL
    assert any("patient_data.csv" in s["input"] for s in report.skipped), report.summary()
    store = livercube.open(dest)
    assert set(_by_key(store)) == set(truth.volumes)
    if kind != "truncated":
        assert "plc_age" not in store.catalog


# --- duplicate files -------------------------------------------------------------------------


def test_nii_beside_nii_gz_is_deduplicated(release_copy, tmp_path):
    root, truth = release_copy
    gz = root / "ct_files" / "P0002_ct_C2.nii.gz"
    (root / "ct_files" / "P0002_ct_C2.nii").write_bytes(gzip.decompress(gz.read_bytes()))
    liver = root / "liver_mask_files" / "P0002-livermask_C2.nii.gz"
    shutil.copy(liver, liver.with_suffix(""))  # a .nii that is really gzip: still one file wins
    dest = str(tmp_path / "s.zarr")
    report = convert(str(root), dest, "plc-cect", progress=False)
    assert report.exit_code == 0, report.summary()
    assert any("P0002_ct_C2.nii beside P0002_ct_C2.nii.gz" in w for w in report.warnings)
    assert any("P0002-livermask_C2.nii beside" in w for w in report.warnings)
    store = livercube.open(dest)
    assert set(_by_key(store)) == set(truth.volumes)
    assert store.volume_attrs(_by_key(store)[("P0002", "C2")])["source"]["ct"] == str(gz)


# --- decompression bombs ---------------------------------------------------------------------


def _bomb(path: Path, shape: tuple[int, int, int], payload_bytes: int) -> Path:
    """A .nii.gz declaring ``shape`` uint8 followed by ``payload_bytes`` zeros, built cheaply.

    gzip members concatenate: one compressed 64 MiB block of zeros is written again and again,
    so a 4 GiB stream costs a few MB on disk and well under a second to make.
    """
    hdr = nib.Nifti1Header()
    hdr.set_data_dtype(np.uint8)
    hdr.set_data_shape(shape)
    hdr["vox_offset"] = 352
    head = hdr.binaryblock + b"\0" * 4
    block = 64 << 20
    zeros = gzip.compress(b"\0" * block, compresslevel=1)
    with open(path, "wb") as f:
        f.write(gzip.compress(head))
        for _ in range(payload_bytes // block):
            f.write(zeros)
    return path


def test_bomb_is_refused_from_its_header_with_bounded_memory(tmp_path):
    bomb = _bomb(tmp_path / "P0001_ct_C1.nii.gz", (2048, 2048, 1024), 4 * GIB)
    with gzip.open(bomb) as f:
        assert struct.unpack("<i", f.read(4))[0] == 348
    assert bomb.stat().st_size < 32 << 20
    tracemalloc.start()
    try:
        with pytest.raises(UnreadableFileError, match=r"4\.00 GiB image") as err:
            load_nifti(str(bomb))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert MAX_NIFTI_BYTES_ENV in str(err.value) and str(bomb) in str(err.value)
    assert peak < 64 << 20


def test_small_header_on_a_huge_stream_reads_only_what_it_declares(tmp_path):
    bomb = _bomb(tmp_path / "x.nii.gz", (64, 64, 16), 4 * GIB)
    tracemalloc.start()
    try:
        img = load_nifti(str(bomb))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert img.data.shape == (64, 64, 16) and not img.data.any()
    assert "data after the declared image ignored" in img.notes
    assert peak < 64 << 20


def test_limit_is_configurable(tmp_path, monkeypatch, plc_release):
    root, _ = plc_release
    path = root / "ct_files" / "P0001_ct_P.nii.gz"
    monkeypatch.setenv(MAX_NIFTI_BYTES_ENV, "10KiB")
    with pytest.raises(UnreadableFileError, match="limit"):
        load_nifti(str(path))
    monkeypatch.setenv(MAX_NIFTI_BYTES_ENV, "1GiB")
    assert load_nifti(str(path)).data.ndim >= 3
    monkeypatch.setenv(MAX_NIFTI_BYTES_ENV, "lots")
    with pytest.raises(livercube.errors.UsageError, match=MAX_NIFTI_BYTES_ENV):
        load_nifti(str(path))


def test_bomb_in_a_release_costs_only_itself(release_copy, tmp_path):
    root, truth = release_copy
    victim = root / "ct_files" / "P0001_ct_C2.nii.gz"
    _bomb(victim, (2048, 2048, 1024), 4 * GIB)
    dest = str(tmp_path / "s.zarr")
    report = convert(str(root), dest, "plc-cect", progress=False)
    assert report.exit_code == EXIT_PARTIAL
    (rec,) = [s for s in report.skipped if s["input"] == str(victim)]
    assert "decompression bomb" in rec["reason"]
    assert set(_by_key(livercube.open(dest))) == set(truth.volumes) - {("P0001", "C2")}


@pytest.mark.slow
def test_bomb_through_the_cli_keeps_rss_bounded(release_copy, tmp_path):
    """The real console script, in a fresh wrapper whose only child is the CLI: peak RSS."""
    root, _ = release_copy
    victim = root / "ct_files" / "P0002_ct_C1.nii.gz"
    _bomb(victim, (2048, 2048, 1024), 4 * GIB)
    dest = tmp_path / "s.zarr"
    cli = str(Path(sys.executable).parent / "livercube")
    args = [cli, "convert", str(root), str(dest), "--collection", "plc-cect", "--quiet"]
    wrapper = (
        "import resource, subprocess, sys, json;"
        f"r = subprocess.run({args!r}, capture_output=True, text=True);"
        "print(json.dumps([r.returncode, r.stderr[-2000:],"
        " resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", wrapper], capture_output=True, text=True, timeout=600
    )
    code, stderr, maxrss_kib = json.loads(out.stdout.strip().splitlines()[-1])
    assert code == EXIT_PARTIAL, stderr
    print(f"peak RSS of convert with a 4 GiB bomb: {maxrss_kib / 1024:.0f} MiB")
    assert maxrss_kib * 1024 < 1.5 * GIB  # the 4 GiB image was never materialised
    report = json.loads((dest / "livercube-report.json").read_text())
    assert [s["input"] for s in report["skipped"]] == [str(victim)]
    assert "decompression bomb" in report["skipped"][0]["reason"]


def test_csv_named_file_wins_over_the_compressed_copy(release_copy, tmp_path):
    root, _ = release_copy
    gz = root / "ct_files" / "P0003_ct_P.nii.gz"
    nii = gz.with_suffix("")
    nii.write_bytes(gzip.decompress(gz.read_bytes()))
    gz.write_bytes(gz.read_bytes()[:100])  # the .nii.gz is damaged; the CSV names the .nii
    csv_path = root / "patient_data.csv"
    csv_path.write_text(csv_path.read_text().replace("P0003_ct_P.nii.gz", "P0003_ct_P.nii"))
    plan = plc_cect.plan(str(root))
    (task,) = [t for t in plan.tasks if t.key == "P0003_P"]
    assert task.ct == str(nii)
    assert any("named in patient_data.csv" in w for w in plan.warnings)


def test_qform_sform_disagreement_is_noted():
    from livercube.sources.nifti import geometry_notes

    img = nib.Nifti1Image(np.zeros((2, 2, 2), np.uint8), np.eye(4))
    img.set_qform(np.eye(4), code=1)
    moved = np.eye(4)
    moved[:3, 3] = 10
    img.set_sform(moved, code=1)
    assert any("disagree" in n for n in geometry_notes(img.header))
    img.set_sform(np.eye(4), code=1)
    assert geometry_notes(img.header) == []


def test_corrupt_gzip_crc_after_the_image_is_still_caught(tmp_path, plc_release):
    root, _ = plc_release
    raw = bytearray((root / "ct_files" / "P0001_ct_P.nii.gz").read_bytes())
    raw[-8] ^= 0xFF  # CRC32 of the gzip trailer
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(bytes(raw))
    with pytest.raises(UnreadableFileError, match="corrupt gzip"):
        load_nifti(str(bad))
    assert zlib  # the stream check is zlib's own
