"""``livercube publish`` / ``ls`` and anonymous reads: S3 without credentials, plain HTTP.

The HTTP server is the standard library's ``http.server`` with two changes that make it behave
like real static hosting (a bucket website, a CDN, nginx): no directory listings (fsspec would
otherwise parse the HTML index pages and hide the fact that HTTP cannot list) and byte-range
requests (the stock server ignores ``Range``; sharded reads of part of a shard need it).
"""

from __future__ import annotations

import http.server
import io
import json
import logging
import os
import re
import shutil
import threading
import time
from contextlib import redirect_stderr, redirect_stdout
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xarray as xr

import livercube
from livercube.cli import main
from livercube.convert import convert
from livercube.store.contract import check_store
from livercube.store.publish import catalog_frame, collection_info, publish
from livercube.store.verify import verify

# --------------------------------------------------------------------------- HTTP hosting


class _StaticHandler(http.server.SimpleHTTPRequestHandler):
    """Files only (no listings), with single byte ranges; records every request."""

    def log_message(self, *args) -> None:  # quiet
        pass

    def list_directory(self, path):
        self.send_error(404, "no listing")
        return None

    def send_head(self):
        self.server.log.append((self.command, self.path, self.headers.get("Range")))
        path = self.translate_path(self.path)
        if os.path.isdir(path):
            self.send_error(404, "no listing")
            return None
        rng = self.headers.get("Range")
        if not rng:
            return super().send_head()
        try:
            f = open(path, "rb")  # noqa: SIM115 (handed to the server, which closes it)
        except OSError:
            self.send_error(404, "not found")
            return None
        with f:
            size = os.fstat(f.fileno()).st_size
            m = re.fullmatch(r"bytes=(\d*)-(\d*)", rng.strip())
            if not m or (not m[1] and not m[2]):
                self.send_error(416, "bad range")
                return None
            if not m[1]:
                start, end = max(0, size - int(m[2])), size - 1
            else:
                start, end = int(m[1]), min(size - 1, int(m[2]) if m[2] else size - 1)
            f.seek(start)
            body = f.read(max(0, end - start + 1))
        self.send_response(206)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        return io.BytesIO(body)


@pytest.fixture(scope="module")
def published(plc_store, tmp_path_factory) -> Path:
    """A published copy of the tiny PLC-CECT store (inside a directory to be served)."""
    site = tmp_path_factory.mktemp("site")
    dst = site / "store.zarr"
    shutil.copytree(plc_store[0], dst)
    publish(str(dst))
    return dst


@pytest.fixture(scope="module")
def http_site(published):
    """``http://127.0.0.1:PORT`` serving the directory holding ``store.zarr``."""
    handler = partial(_StaticHandler, directory=str(published.parent))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.log = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join(10)


# --------------------------------------------------------------------------- publish (local)


def test_publish_writes_parquet_and_card_and_keeps_the_contract(published, plc_store):
    store = livercube.open(str(published))
    assert store.consolidated
    assert check_store(str(published)) == []
    cat = store.catalog

    table = pd.read_parquet(published / "catalog.parquet")
    assert list(table["path"]) == [str(p) for p in cat["path"].values]
    assert list(table["checksum"]) == [str(c) for c in cat["checksum"].values]
    np.testing.assert_array_equal(table["spacing_z"], cat["spacing"].values[:, 0])
    np.testing.assert_array_equal(table["extent_x"], cat["extent"].values[:, 2])
    assert table["annotated"].dtype == bool and len(table) == 12
    import pyarrow.parquet as pq

    schema = pq.read_schema(published / "catalog.parquet")
    assert json.loads(schema.field("spacing_z").metadata[b"livercube"])["units"] == "mm"
    assert json.loads(schema.field("plc_age").metadata[b"livercube"])["source_column"] == "age"

    card = (published / "README.md").read_text()
    plc = collection_info("plc-cect")
    assert "PLC-CECT" in card and "CC BY 4.0" in card and plc["doi"] in card
    assert "| PLC-CECT | 3 | 12 |" in card  # patients, volumes
    for name in ("background", "liver", "tumor", "portal_vein", "hepatic_vein", "aorta"):
        assert f"| {name} |" in card
    for phase in ("non_contrast", "arterial", "portal_venous", "delayed", "unknown"):
        assert f"`{phase}`" in card
    assert "livercube-report.json" in card and "12 converted" in card
    assert "approximate HU" in card and "untrusted" in card  # PLC-CECT's flags
    # collections not in the store are not claimed
    assert "HCC-TACE-Seg" not in card and collection_info("crlm")["doi"] not in card


def test_publish_consolidates_an_unconsolidated_root(plc_store, tmp_path, capsys):
    dst = tmp_path / "store.zarr"
    shutil.copytree(plc_store[0], dst)
    doc = json.loads((dst / "zarr.json").read_text())
    doc.pop("consolidated_metadata")
    (dst / "zarr.json").write_text(json.dumps(doc))
    assert not livercube.open(str(dst)).consolidated

    assert main(["publish", str(dst)]) == 0
    assert "12 volumes (plc-cect 12)" in capsys.readouterr().out
    assert livercube.open(str(dst)).consolidated
    assert (dst / "catalog.parquet").is_file() and (dst / "README.md").is_file()
    assert verify(str(dst)).ok


def test_ls_filters_the_catalog(published, capsys):
    assert main(["ls", str(published), "--where", "phase == 'arterial' and annotated"]) == 0
    out = capsys.readouterr().out
    lines = [ln for ln in out.splitlines() if ln.startswith("plc-cect/")]
    assert len(lines) == 3 and all("/C1" in ln for ln in lines)
    assert out.rstrip().endswith("3 of 12 volumes")

    main(["ls", str(published), "--where", "spacing_trusted", "--columns", "extent_z,plc_age"])
    assert "0 of 12 volumes" in capsys.readouterr().out
    assert main(["ls", str(published), "--where", "no_such_column > 1"]) == 2
    assert main(["ls", str(published), "--columns", "nope"]) == 2


def test_catalog_frame_flattens_axis_variables(published):
    frame = catalog_frame(livercube.open(str(published)).catalog)
    assert {"spacing_z", "spacing_y", "spacing_x", "origin_z", "extent_x"} <= set(frame.columns)
    assert list(frame.columns[:3]) == ["path", "collection", "patient_id"]


# --------------------------------------------------------------------------- HTTP


def test_store_reads_over_plain_http_without_listing(http_site, published):
    server, base = http_site
    url = f"{base}/store.zarr"
    del server.log[:]
    remote = livercube.open(url)
    cat = remote.catalog
    opened = list(server.log)
    local = livercube.open(str(published))
    assert remote.consolidated
    assert remote.paths() == local.paths()
    np.testing.assert_array_equal(cat["checksum"].values, local.catalog["checksum"].values)
    # the catalog's own consolidated document, then one object per catalog variable; not the
    # root document (it describes every volume), no listing
    n_vars = len(cat.variables)
    assert opened[0][:2] == ("GET", "/store.zarr/catalog/zarr.json")
    assert len(opened) == 1 + n_vars, opened
    assert len({p for _, p, _ in opened}) == 1 + n_vars
    assert "/store.zarr/zarr.json" not in {p for _, p, _ in opened}
    assert not [r for r in opened if r[1].endswith("/")]

    for i in (0, 5, 11):
        r, loc = remote.volume(i), local.volume(i)
        for name in ("image", "label", "segments"):
            np.testing.assert_array_equal(r[name].values, loc[name].values)
        np.testing.assert_array_equal(r.z.values, loc.z.values)
        rs, ls_ = remote.segments(i), local.segments(i)
        assert rs.keys() == ls_.keys()
        for k in rs:
            np.testing.assert_array_equal(rs[k], ls_[k])
    path = remote.paths()[3]
    part = remote.root[path]["0/image"][1:3, 2:9, 4:7]
    np.testing.assert_array_equal(part, local.root[path]["0/image"][1:3, 2:9, 4:7])
    # plain xarray, no livercube, over HTTP (consolidated metadata)
    plain = xr.open_zarr(url, group="catalog", zarr_format=3, consolidated=True)
    assert plain.sizes["volume"] == 12


def test_a_volume_url_opens_over_http_without_listing(http_site, published):
    """Only the volume's URL is known (no root, no catalog): its documents suffice."""
    import zarr
    from ome_zarr_models.v05.image import Image

    server, base = http_site
    path = livercube.open(str(published)).paths()[4]
    local = livercube.open(str(published)).volume(path)
    del server.log[:]
    ds = xr.open_zarr(f"{base}/store.zarr/{path}/0", zarr_format=3, consolidated=True)
    np.testing.assert_array_equal(ds["image"].values, local["image"].values)
    np.testing.assert_array_equal(ds["z"].values, local["z"].values)
    group = zarr.open_group(f"{base}/store.zarr/{path}", mode="r", zarr_format=3)
    Image.from_zarr(group)  # the OME image, as a viewer opens it
    assert {"0", "image", "label"} <= {k.rsplit("/", 1)[-1] for k, _ in group.members(2)}
    requested = [p for _, p, _ in server.log]
    assert not [p for p in requested if p.endswith("/")], requested
    assert all(p.startswith(f"/store.zarr/{path}/") for p in requested), requested


def test_partial_shard_reads_over_http_use_byte_ranges(http_site, published):
    """Tiny test volumes hold one chunk per shard (read whole); real ones hold many, and a
    patch read fetches the shard index and its chunks by byte range."""
    import zarr

    from livercube.store.location import StoreLocation

    server, base = http_site
    data = np.arange(16 * 32 * 32, dtype=np.int16).reshape(16, 32, 32)
    arr = zarr.create_array(
        str(published.parent / "ranged.zarr"),
        shape=data.shape,
        dtype=data.dtype,
        chunks=(8, 16, 16),
        shards=(16, 32, 32),
    )
    arr[...] = data
    del server.log[:]
    ranged = StoreLocation.of(f"{base}/ranged.zarr").zarr_store(read_only=True)
    remote = zarr.open_array(ranged, mode="r")
    np.testing.assert_array_equal(remote[2:5, 3:9, 20:30], data[2:5, 3:9, 20:30])
    ranges = [rng for _, _, rng in server.log if rng]
    assert len(ranges) == 2 and ranges[0].startswith("bytes=-"), server.log  # index, chunk


def test_verify_over_http_uses_consolidated_metadata(http_site):
    _, base = http_site
    report = verify(f"{base}/store.zarr")
    assert not report.listed and report.ok, report.summary()
    assert len(report.volumes) == 12
    assert any("cannot be listed" in n for n in report.notes)


# --------------------------------------------------------------------------- S3

SECRET = "lcSECRETzq8Vx3NpT2wK9mHbR7dYfE4uJ0aGsL1c"
KEY_ID = "LCKEYID7W3QXZ9PLM2NB"


@pytest.fixture(scope="module")
def s3_published(plc_release, plc_overrides, s3_endpoint):
    """The tiny release converted and published to a fresh bucket with explicit credentials;
    everything said on stdout/stderr and by every logger (DEBUG) on the way is captured."""
    import s3fs

    root, _ = plc_release
    opts = {"key": KEY_ID, "secret": SECRET, "endpoint_url": s3_endpoint}
    bucket = f"lc-pub-{time.monotonic_ns()}"
    fs = s3fs.S3FileSystem(**opts)
    fs.mkdir(bucket)
    url = f"s3://{bucket}/stores/plc"

    logs = io.StringIO()
    handler = logging.StreamHandler(logs)
    handler.setLevel(logging.DEBUG)
    handler.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
    root_logger = logging.getLogger()
    old_level = root_logger.level
    root_logger.addHandler(handler)
    root_logger.setLevel(logging.DEBUG)
    out = io.StringIO()
    try:
        with redirect_stdout(out), redirect_stderr(out):
            report = convert(
                str(root),
                url,
                "plc-cect",
                overrides=str(plc_overrides),
                storage_options=opts,
                progress=False,
            )
            print(report.summary())
            assert (
                main(["publish", url, *[f"--storage-option={k}={v}" for k, v in opts.items()]]) == 0
            )
    finally:
        root_logger.removeHandler(handler)
        root_logger.setLevel(old_level)
    assert report.exit_code == 0, report.summary()
    return {
        "bucket": bucket,
        "url": url,
        "opts": opts,
        "fs": fs,
        "said": out.getvalue() + logs.getvalue(),
    }


def test_credentials_never_reach_store_report_or_logs(s3_published):
    fs, bucket = s3_published["fs"], s3_published["bucket"]
    said = s3_published["said"]
    assert "published s3://" in said and len(said) > 1000  # logging really was captured
    assert SECRET not in said

    objects = fs.find(bucket)
    assert any(o.endswith("livercube-report.json") for o in objects)
    assert any(o.endswith("catalog.parquet") for o in objects)
    assert any(o.endswith("README.md") for o in objects)
    contents = fs.cat(objects)
    assert len(contents) == len(objects) > 50
    for key, body in contents.items():
        for needle in (SECRET, KEY_ID):
            for form in (needle.encode(), needle.encode("utf-16-le"), needle.lower().encode()):
                assert form not in body, f"{needle} in {key}"
    # catalog arrays decoded too (string arrays are compressed on disk)
    cat = livercube.open(s3_published["url"], **s3_published["opts"]).catalog
    for name in cat.variables:
        text = " ".join(map(str, np.ravel(cat[name].values))) + json.dumps(cat[name].attrs)
        assert SECRET not in text and KEY_ID not in text


@pytest.fixture()
def no_aws_env(monkeypatch):
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)


def _public(bucket: str, endpoint: str) -> None:
    import boto3

    policy = {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Allow",
                "Principal": "*",
                "Action": ["s3:GetObject", "s3:ListBucket"],
                "Resource": [f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/*"],
            }
        ],
    }
    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=KEY_ID,
        aws_secret_access_key=SECRET,
        region_name="us-east-1",
    )
    client.put_bucket_policy(Bucket=bucket, Policy=json.dumps(policy))
    assert json.loads(client.get_bucket_policy(Bucket=bucket)["Policy"]) == policy


def test_public_bucket_reads_anonymously(s3_published, s3_endpoint, plc_store, no_aws_env):
    _public(s3_published["bucket"], s3_endpoint)
    assert not [k for k in os.environ if k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")]
    store = livercube.open(s3_published["url"], anon=True, endpoint_url=s3_endpoint)
    local = livercube.open(plc_store[0])
    assert store.consolidated and store.paths() == local.paths()
    np.testing.assert_array_equal(store.catalog.checksum.values, local.catalog.checksum.values)
    for i in (1, 6):
        np.testing.assert_array_equal(store.volume(i).image.values, local.volume(i).image.values)
        assert store.segments(i).keys() == local.segments(i).keys()
    # the whole store verifies anonymously, listing included
    report = verify(s3_published["url"], {"anon": True, "endpoint_url": s3_endpoint})
    assert report.ok and report.listed, report.summary()
    # and the CLI lists it with --storage-option anon=true
    assert (
        main(
            [
                "ls",
                s3_published["url"],
                "--storage-option=anon=true",
                f"--storage-option=endpoint_url={s3_endpoint}",
            ]
        )
        == 0
    )


def test_opening_the_catalog_costs_few_requests(s3_published, s3_endpoint, no_aws_env):
    from faulty_proxy import FaultyProxy

    _public(s3_published["bucket"], s3_endpoint)  # this test must not rely on another's policy

    class CountingProxy(FaultyProxy):
        async def _handle(self, request):
            self.log.append((request.method, request.path_qs))
            return await super()._handle(request)

    with CountingProxy(s3_endpoint, fail_every=0, delay=0) as proxy:
        proxy.log = []
        store = livercube.open(s3_published["url"], anon=True, endpoint_url=proxy.url)
        opened = len(proxy.log)
        cat = store.catalog
        with_catalog = list(proxy.log)
        store.volume(3)
        volume_meta = len(proxy.log) - len(with_catalog)

    n_vars = len(cat.variables)
    print(
        f"open: {opened} requests; with catalog: {len(with_catalog)} ({n_vars} catalog arrays); "
        f"volume(): {volume_meta}"
    )
    # open = the catalog's own consolidated document (the root's describes every volume)
    assert opened == 1, with_catalog
    # the catalog: one GET per catalog array, never a listing, independent of the volume count
    assert len(with_catalog) == 1 + n_vars, with_catalog
    assert not [r for r in with_catalog if "list-type" in r[1] or r[0] != "GET"], with_catalog
    # a lazy volume: the root document (consolidated: every volume's metadata in one GET, read
    # on first need), then only its z/y/x index coordinates
    assert volume_meta <= 1 + 3


def test_contact_sheets_of_a_hosted_store_without_listing(http_site, published, tmp_path):
    from livercube.preview import contact_sheets

    server, base = http_site
    del server.log[:]
    sheets = contact_sheets(livercube.open(f"{base}/store.zarr"), tmp_path / "sheets")
    assert [p.name for p in sheets] == ["plc-cect.png"]
    assert not [r for r in server.log if r[1].endswith("/")], "a directory listing was asked"
    assert all(code == "GET" for code, *_ in server.log)
