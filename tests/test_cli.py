"""End-to-end runs through the real console script: exit codes, reports, demo."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

LIVERCUBE = str(Path(sys.executable).parent / "livercube")


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([LIVERCUBE, *args], capture_output=True, text=True, timeout=600, cwd=cwd)


def test_convert_exit_0_and_report(plc_release, plc_overrides, tmp_path):
    root, _ = plc_release
    dest = tmp_path / "s.zarr"
    res = run(
        "convert",
        str(root),
        str(dest),
        "--collection",
        "plc-cect",
        "--overrides",
        str(plc_overrides),
    )
    assert res.returncode == 0, res.stderr
    assert "12 volumes converted, 0 unchanged, 0 inputs skipped, 0 failed" in res.stdout
    assert "convert" in res.stderr  # the progress bar
    report = json.loads((dest / "livercube-report.json").read_text())
    assert report["exit_code"] == 0 and len(report["converted"]) == 12

    info = run("info", str(dest), "--where", "phase == 'arterial'")
    assert info.returncode == 0, info.stderr
    assert "3 of 12 volumes" in info.stdout and "plc-cect/P0001/CECT/C1" in info.stdout

    png = tmp_path / "p.png"
    prev = run("preview", str(dest), "--out", str(png), "--max", "2")
    assert prev.returncode == 0, prev.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_convert_partial_exit_3_names_the_bad_file(plc_release, tmp_path):
    root, _ = plc_release
    src = tmp_path / "PLC"
    shutil.copytree(root, src)
    bad = src / "ct_files" / "P0003_ct_P.nii.gz"
    bad.write_bytes(b"\x1f\x8b" + bad.read_bytes()[2:100])
    res = run("convert", str(src), str(tmp_path / "s.zarr"), "--collection", "plc-cect", "--quiet")
    assert res.returncode == 3, res.stdout + res.stderr
    assert "11 volumes converted, 0 unchanged, 1 inputs skipped" in res.stdout
    assert f"SKIPPED {bad}: truncated or corrupt gzip" in res.stdout


@pytest.mark.parametrize(
    "args",
    [
        ["convert", "x", "y"],  # --collection missing
        ["convert", "x", "y", "--collection", "nope"],
        ["frobnicate"],
    ],
)
def test_usage_errors_exit_2(args, tmp_path):
    assert run(*args, cwd=tmp_path).returncode == 2


def test_source_that_is_not_plc_is_a_usage_error(tmp_path):
    res = run("convert", str(tmp_path), str(tmp_path / "s.zarr"), "--collection", "plc-cect")
    assert res.returncode == 2
    assert "no ct_files/" in res.stderr


def test_demo_runs_end_to_end(tmp_path):
    res = run("demo", "--workdir", str(tmp_path / "demo"), "--size", "tiny")
    assert res.returncode in (0, 3), res.stdout + res.stderr
    assert "[store]" in res.stdout and "[preview]" in res.stdout
    assert (tmp_path / "demo" / "preview.png").stat().st_size > 10_000
    sheets = sorted(p.name for p in (tmp_path / "demo" / "sheets").glob("*.png"))
    assert sheets == ["crlm.png", "hcc-tace-seg.png", "plc-cect.png"], sheets
