"""Conversion straight into a real S3 endpoint (moto_server on loopback), read back identical."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pytest

import livercube


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "livercube.cli", *args], capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def s3_store(plc_release, plc_overrides, s3_endpoint):
    """The tiny release converted through the CLI straight into a fresh bucket."""
    import s3fs

    root, _ = plc_release
    opts = {"key": "testing", "secret": "testing", "endpoint_url": s3_endpoint}
    bucket = f"lc-cli-{time.monotonic_ns()}"
    s3fs.S3FileSystem(**opts).mkdir(bucket)
    url = f"s3://{bucket}/stores/plc"
    res = _cli(
        "convert",
        str(root),
        url,
        "--collection",
        "plc-cect",
        "--overrides",
        str(plc_overrides),
        "--quiet",
        *[f"--storage-option={k}={v}" for k, v in opts.items()],
    )
    assert res.returncode == 0, res.stderr + res.stdout
    assert "12 volumes converted" in res.stdout
    return bucket, url, opts


def test_convert_to_s3_through_the_cli_reads_back_identical(s3_store, plc_store):
    bucket, url, opts = s3_store

    remote = livercube.open(url, **opts)
    local = livercube.open(plc_store[0])
    assert remote.paths() == local.paths()
    np.testing.assert_array_equal(remote.catalog.checksum.values, local.catalog.checksum.values)
    for i in (0, 5, 11):
        r, loc = remote.volume(i), local.volume(i)
        for name in ("image", "label", "segments"):
            np.testing.assert_array_equal(r[name].values, loc[name].values)
        np.testing.assert_array_equal(r.z.values, loc.z.values)
        assert remote.segments(i).keys() == local.segments(i).keys()

    # the report lives in the store too, and shards are few large objects
    import s3fs

    fs = s3fs.S3FileSystem(**opts)
    report = json.loads(fs.cat(f"{bucket}/stores/plc/livercube-report.json"))
    assert report["exit_code"] == 0 and len(report["converted"]) == 12
    first = remote.paths()[0]
    objects = fs.find(f"{bucket}/stores/plc/{first}/0/image")
    assert len([o for o in objects if "/c/" in o]) == 1  # one shard for a tiny volume


def test_plain_xarray_reads_the_s3_store(s3_store):
    import xarray as xr

    _, url, so = s3_store
    cat = xr.open_zarr(url, group="catalog", storage_options=so, zarr_format=3)
    assert cat.sizes["volume"] == 12
    tree = xr.open_datatree(url, engine="zarr", storage_options=so)
    assert "catalog" in tree.children and "plc-cect" in tree.children
