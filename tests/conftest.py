"""Shared fixtures: generated collections, converted stores, and a real S3 endpoint on loopback."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from servers import moto_server

from livercube.convert import convert
from livercube.synth.plc_cect import write_plc_cect


@pytest.fixture(scope="session")
def plc_release(tmp_path_factory) -> tuple[Path, object]:
    """A tiny PLC-CECT release (3 subjects: HCC, ICC, CN control) and its truth."""
    root = tmp_path_factory.mktemp("plc") / "PLC-CECT"
    return root, write_plc_cect(root, n_subjects=3, size="tiny", seed=7)


@pytest.fixture(scope="session")
def plc_overrides(plc_release, tmp_path_factory) -> Path:
    _, truth = plc_release
    path = tmp_path_factory.mktemp("ov") / "overrides.csv"
    path.write_text(truth.overrides_csv)
    return path


@pytest.fixture(scope="session")
def plc_store(plc_release, plc_overrides, tmp_path_factory) -> tuple[str, object]:
    """The tiny release converted (with the slice-order override for the one exception)."""
    root, truth = plc_release
    dest = str(tmp_path_factory.mktemp("store") / "store.zarr")
    report = convert(str(root), dest, "plc-cect", overrides=str(plc_overrides), progress=False)
    assert report.exit_code == 0, report.summary()
    return dest, truth


@pytest.fixture()
def release_copy(plc_release, tmp_path) -> tuple[Path, object]:
    """A private, mutable copy of the tiny release for bad-input tests."""
    root, truth = plc_release
    dst = tmp_path / "PLC-CECT"
    shutil.copytree(root, dst)
    return dst, truth


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A real moto S3 server process on loopback (as s3fs and zarr test themselves)."""
    with moto_server() as url:
        yield url


@pytest.fixture()
def s3_bucket(s3_endpoint) -> tuple[str, dict]:
    """A fresh bucket on the moto endpoint and the fsspec options to reach it."""
    import s3fs

    opts = {"key": "testing", "secret": "testing", "endpoint_url": s3_endpoint}
    fs = s3fs.S3FileSystem(**opts)
    name = f"lc-{time.monotonic_ns()}"
    fs.mkdir(name)
    return name, opts


#: Modules whose tests run whole conversions, the CLI in subprocesses or real servers; all of
#: their tests are ``slow``.  A test elsewhere that starts a real S3 endpoint is slow too.
#: ``pytest -m "not slow"`` is the quick run of the logic tests.
E2E_MODULES = frozenset(
    {
        "test_cli",
        "test_clinical",
        "test_cluster",
        "test_dicom_convert",
        "test_dicom_defects",
        "test_export",
        "test_faults",
        "test_idc",
        "test_phi",
        "test_plc_cect",
        "test_plc_inputs",
        "test_preview",
        "test_publish",
        "test_query",
        "test_real_dicom",
        "test_s3",
        "test_sampling",
        "test_sampling_integrity",
        "test_sampling_stream",
        "test_synth_dicom",
        "test_verify",
    }
)
SERVER_FIXTURES = frozenset({"s3_endpoint", "s3_bucket"})


def pytest_collection_modifyitems(config, items) -> None:
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1] if item.module else ""
        if module in E2E_MODULES or SERVER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
