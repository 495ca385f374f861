"""Faults: re-runs, interrupted jobs, crashing inputs and a misbehaving object store."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from store_checks import complete_count, fingerprint_of_store

import livercube
from livercube.convert import EXIT_PARTIAL, convert
from livercube.faults import ENV
from livercube.store.contract import check_store
from livercube.synth.plc_cect import write_plc_cect

LIVERCUBE = str(Path(sys.executable).parent / "livercube")


@pytest.fixture(scope="module")
def small_release(tmp_path_factory):
    """A release big enough that a conversion takes a few seconds (24 volumes, 128² slices)."""
    root = tmp_path_factory.mktemp("plc-small") / "PLC"
    truth = write_plc_cect(root, n_subjects=6, size="small", seed=11)
    overrides = root.parent / "ov.csv"
    overrides.write_text(truth.overrides_csv)
    return root, overrides


@pytest.fixture(scope="module")
def clean_run(small_release, tmp_path_factory):
    root, overrides = small_release
    dest = tmp_path_factory.mktemp("clean") / "s.zarr"
    report = convert(str(root), str(dest), "plc-cect", overrides=str(overrides), progress=False)
    assert report.exit_code == 0, report.summary()
    return dest, fingerprint_of_store(str(dest))


def test_rerun_skips_unchanged_and_redoes_changed_and_partial(plc_release, plc_overrides, tmp_path):
    root, _ = plc_release
    src = tmp_path / "PLC"
    import shutil

    shutil.copytree(root, src)
    dest = str(tmp_path / "s.zarr")
    first = convert(str(src), dest, "plc-cect", overrides=str(plc_overrides), progress=False)
    before = fingerprint_of_store(dest)

    again = convert(str(src), dest, "plc-cect", overrides=str(plc_overrides), progress=False)
    assert len(again.unchanged) == 12 and not again.converted
    assert fingerprint_of_store(dest) == before

    # a source file changes, and another volume is left half-written by a crash
    touched = src / "ct_files" / "P0002_ct_C2.nii.gz"
    touched.write_bytes(touched.read_bytes())
    os.utime(touched, (time.time() + 10, time.time() + 10))
    partial = Path(dest, "plc-cect/P0003/CECT/C1/zarr.json")
    meta = json.loads(partial.read_text())
    meta["attributes"]["livercube"]["status"] = "writing"
    partial.write_text(json.dumps(meta))
    third = convert(str(src), dest, "plc-cect", overrides=str(plc_overrides), progress=False)
    assert sorted(r["path"] for r in third.converted) == [
        "plc-cect/P0002/CECT/C2",
        "plc-cect/P0003/CECT/C1",
    ]
    assert len(third.unchanged) == 10
    assert (
        fingerprint_of_store(dest)
        == before
        == {p: c for p, c in fingerprint_of_store(dest).items()}
    )
    assert len(first.converted) == 12

    forced = convert(
        str(src),
        dest,
        "plc-cect",
        overrides=str(plc_overrides),
        progress=False,
        overwrite=True,
        only=["P0001"],
    )
    assert sorted(r["path"] for r in forced.converted) == [
        f"plc-cect/P0001/CECT/{c}" for c in ("C1", "C2", "C3", "P")
    ]
    assert fingerprint_of_store(dest) == before


def test_changing_an_override_reconverts_that_volume(plc_release, plc_overrides, tmp_path):
    root, _ = plc_release
    dest = str(tmp_path / "s.zarr")
    convert(str(root), dest, "plc-cect", overrides=str(plc_overrides), progress=False)
    ov = tmp_path / "ov.csv"
    ov.write_text(plc_overrides.read_text() + "P0001,P,,3.0,0.8,0.8\n")
    rep = convert(str(root), dest, "plc-cect", overrides=str(ov), progress=False)
    assert [r["path"] for r in rep.converted] == ["plc-cect/P0001/CECT/P"]
    i = livercube.open(dest).paths().index("plc-cect/P0001/CECT/P")
    np.testing.assert_allclose(livercube.open(dest).catalog.spacing.values[i], [3.0, 0.8, 0.8])


def test_killed_client_then_rerun_gives_the_clean_store(small_release, clean_run, tmp_path):
    root, overrides = small_release
    dest = tmp_path / "s.zarr"
    cmd = [
        LIVERCUBE,
        "convert",
        str(root),
        str(dest),
        "--collection",
        "plc-cect",
        "--overrides",
        str(overrides),
        "--quiet",
        "--workers",
        "1",
    ]
    # the client kills itself right after its third volume is complete (no polling race)
    killed = subprocess.run(
        cmd, capture_output=True, text=True, timeout=300,
        env={**os.environ, ENV: "volume-written:3"},
    )  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    done_before = complete_count(dest)
    assert done_before == 3

    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    report = json.loads((dest / "livercube-report.json").read_text())
    assert len(report["unchanged"]) == done_before
    assert len(report["converted"]) == 24 - done_before
    assert fingerprint_of_store(str(dest)) == clean_run[1]
    assert check_store(str(dest)) == []


def test_a_crashing_input_is_quarantined_the_rest_completes(
    plc_release, plc_overrides, tmp_path, monkeypatch
):
    from livercube.sources import plc_cect

    real = plc_cect.read_volume

    def explode(task, storage_options=None):
        if task.key == "P0002_C3":
            raise RuntimeError("decoder crashed on this file")
        return real(task, storage_options)

    monkeypatch.setattr(plc_cect, "read_volume", explode)
    root, _ = plc_release
    dest = str(tmp_path / "s.zarr")
    rep = convert(str(root), dest, "plc-cect", overrides=str(plc_overrides), progress=False)
    assert rep.exit_code == EXIT_PARTIAL
    assert [f["input"] for f in rep.failed] == ["P0002_C3"]
    assert "RuntimeError: decoder crashed" in rep.failed[0]["reason"]
    assert "explode" in rep.failed[0]["traceback"]
    assert len(rep.converted) == 11
    assert "plc-cect/P0002/CECT/C3" not in livercube.open(dest).paths()


def test_flaky_slow_object_store_loses_nothing(plc_release, plc_overrides, plc_store, s3_endpoint):
    import s3fs
    from faulty_proxy import FaultyProxy

    root, _ = plc_release
    with FaultyProxy(s3_endpoint, fail_every=12, delay=0.01) as proxy:
        opts = {"key": "testing", "secret": "testing", "endpoint_url": proxy.url}
        bucket = f"flaky-{time.monotonic_ns()}"
        s3fs.S3FileSystem(key="testing", secret="testing", endpoint_url=s3_endpoint).mkdir(bucket)
        url = f"s3://{bucket}/store"
        rep = convert(
            str(root),
            url,
            "plc-cect",
            overrides=str(plc_overrides),
            storage_options=opts,
            progress=False,
        )
        assert rep.exit_code == 0, rep.summary()
        assert proxy.injected >= 10  # the store really misbehaved, many times
    direct = {"key": "testing", "secret": "testing", "endpoint_url": s3_endpoint}
    assert fingerprint_of_store(url, **direct) == fingerprint_of_store(plc_store[0])
    assert check_store(url, direct) == []
