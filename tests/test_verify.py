"""``livercube verify``: damaged, missing and mismatching data is found, intact data passes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import livercube
from livercube.cli import main
from livercube.store.verify import EXIT_DAMAGED, expected_shard_keys, verify


@pytest.fixture()
def store_copy(plc_store, tmp_path) -> Path:
    """A private, mutable copy of the converted tiny PLC-CECT store."""
    dst = tmp_path / "store.zarr"
    shutil.copytree(plc_store[0], dst)
    return dst


def _shard(store: Path, volume: str, array: str = "image") -> Path:
    shards = sorted((store / volume / "0" / array / "c").rglob("*"))
    shards = [p for p in shards if p.is_file()]
    assert shards, f"no shard objects under {volume}/{array}"
    return shards[0]


def test_untouched_store_is_clean(plc_store, capsys):
    report = verify(plc_store[0])
    assert report.ok and report.exit_code == 0, report.summary()
    assert len(report.volumes) == 12 and report.listed
    assert all(v.computed == v.checksum for v in report.volumes)

    assert main(["verify", plc_store[0]]) == 0
    out = capsys.readouterr().out
    assert "12 volumes" in out and "0 damaged" in out and "OK" in out


def test_expected_shard_keys_are_the_stored_objects(plc_store):
    store = livercube.open(plc_store[0])
    path = store.paths()[0]
    keys = expected_shard_keys(path, "0/image", store.root[path]["0/image"])
    base = Path(plc_store[0])
    on_disk = {str(p.relative_to(base)) for p in (base / path / "0" / "image" / "c").rglob("*")}
    assert keys and set(keys) == {k for k in on_disk if (base / k).is_file()}


def test_flipped_byte_in_one_shard_is_caught_for_exactly_that_volume(store_copy, capsys):
    victim = livercube.open(str(store_copy)).paths()[4]
    shard = _shard(store_copy, victim)
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))

    report = verify(str(store_copy))
    assert [v.path for v in report.damaged] == [victim]
    assert report.exit_code == EXIT_DAMAGED and not report.problems
    problems = " ".join(report.damaged[0].problems)
    assert "checksum" in problems or "cannot be decoded" in problems

    assert main(["verify", str(store_copy), "--json"]) == EXIT_DAMAGED
    body = json.loads(capsys.readouterr().out)
    assert body["damaged"] == [victim] and body["exit_code"] == EXIT_DAMAGED
    assert body["n_volumes"] == 12 and body["n_damaged"] == 1


def test_deleted_shard_is_caught_and_named(store_copy, capsys):
    victim = livercube.open(str(store_copy)).paths()[7]
    shard = _shard(store_copy, victim, "label")
    shard.unlink()
    key = str(shard.relative_to(store_copy))

    report = verify(str(store_copy))
    assert [v.path for v in report.damaged] == [victim]
    problems = report.damaged[0].problems
    assert f"missing shard object {key}" in problems
    assert any("content checksum" in p for p in problems)  # it reads back as fill values

    assert main(["verify", str(store_copy)]) == EXIT_DAMAGED
    out = capsys.readouterr().out
    assert f"DAMAGED {victim}" in out and "1 damaged" in out and "DAMAGE FOUND" in out


def test_missing_all_fill_shard_is_fine_when_the_checksum_matches(store_copy):
    """Zarr never writes a shard holding only the fill value: absent + matching = intact."""
    import zarr

    store = livercube.open(str(store_copy))
    victim = store.paths()[0]
    group = zarr.open_group(str(store_copy / victim), mode="r+", zarr_format=3)
    # an extra all-zero array beside the volume (as zarr writes it: no shard object at all)
    group.create_array(
        "extra", shape=(4, 4, 4), chunks=(4, 4, 4), shards=(4, 4, 4), dtype="uint8", fill_value=0
    )[...] = 0
    assert not (store_copy / victim / "extra" / "c").exists()
    report = verify(str(store_copy))
    assert report.ok, report.summary()
    assert any("extra" in n for v in report.volumes for n in v.notes)


def test_catalog_disagreeing_with_a_volume_is_a_problem(store_copy):
    import zarr

    victim = livercube.open(str(store_copy)).paths()[2]
    group = zarr.open_group(str(store_copy / victim), mode="r+", zarr_format=3)
    meta = dict(group.attrs["livercube"])
    meta["checksum"] = meta["complete"]["checksum"] = "blake3:" + "0" * 64
    group.attrs["livercube"] = meta
    report = verify(str(store_copy))
    assert [v.path for v in report.damaged] == [victim]
    assert any("catalog checksum" in p for p in report.damaged[0].problems)
    assert any("consolidated metadata is stale" in p for p in report.problems)


def _restamp_checksum(store: Path, victim: str, checksum: str) -> None:
    """Give a volume another checksum everywhere it is recorded (group, completion record,
    catalog, consolidated metadata), as a store written that way would hold it."""
    import zarr

    from livercube.store.catalog import write_catalog

    group = zarr.open_group(str(store / victim), mode="r+", zarr_format=3)
    meta = dict(group.attrs["livercube"])
    meta["checksum"] = checksum
    meta["complete"] = {**meta["complete"], "checksum": checksum}
    group.attrs["livercube"] = meta
    write_catalog(str(store))


def test_checksum_is_recomputed_by_the_algorithm_it_names(store_copy):
    """A volume whose checksum is SHA-256 (stores before contract 2.2) is checked with SHA-256;
    a checksum naming no known algorithm is a problem, not a silent pass."""
    from livercube.volumes.volume import content_checksum

    store = livercube.open(str(store_copy))
    victim = store.paths()[1]
    ds = store.volume(1)
    arrays = {n: ds[n].values for n in ("image", "label", "segments") if n in ds}
    sha = content_checksum(arrays, "sha256")
    assert sha.startswith("sha256:") and sha != content_checksum(arrays)
    _restamp_checksum(store_copy, victim, sha)
    (vol,) = [v for v in verify(str(store_copy)).volumes if v.path == victim]
    assert vol.computed == sha, vol.problems  # the content matches its SHA-256
    # ... and the only complaint is the contract's: a 2.2 volume's checksum is BLAKE3
    assert vol.problems and all("does not match '^blake3:" in p for p in vol.problems)

    _restamp_checksum(store_copy, victim, "crc7:" + "0" * 8)
    (vol,) = [v for v in verify(str(store_copy)).volumes if v.path == victim]
    assert any("names no known algorithm" in p for p in vol.problems), vol.problems


def test_source_comparison_is_clean_against_the_release(plc_store, plc_release, plc_overrides):
    root, _ = plc_release
    report = verify(
        plc_store[0], source=str(root), collection="plc-cect", overrides=str(plc_overrides)
    )
    assert report.ok, report.summary()
    assert all(v.source_checked for v in report.volumes)


def test_modified_source_file_is_reported_as_mismatch(
    plc_store, release_copy, plc_overrides, capsys
):
    root, _ = release_copy
    ct = root / "ct_files" / "P0002_ct_C2.nii.gz"
    img = nib.load(ct)
    data = np.asarray(img.dataobj).copy()
    idx = tuple(s // 2 for s in data.shape)
    data[idx] = 255 if data[idx] < 128 else 0
    nib.save(nib.Nifti1Image(data, img.affine, img.header), ct)

    code = main(
        [
            "verify",
            plc_store[0],
            "--source",
            str(root),
            "--collection",
            "plc-cect",
            "--overrides",
            str(plc_overrides),
            "--json",
        ]
    )
    body = json.loads(capsys.readouterr().out)
    assert code == EXIT_DAMAGED
    assert body["damaged"] == ["plc-cect/P0002/CECT/C2"]
    (bad,) = [v for v in body["volumes"] if not v["ok"]]
    assert bad["problems"] and all("differ from the source" in p for p in bad["problems"])
    assert "image: 1 voxels differ" in bad["problems"][0]


def test_verify_needs_collection_with_source(plc_store, capsys):
    assert main(["verify", plc_store[0], "--source", "/nonexistent"]) == 2
    assert "--collection" in capsys.readouterr().err
