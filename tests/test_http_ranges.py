"""The reader's remote client: exact bytes over S3 and HTTP, signatures checked by a real server,
retries, refusals, stale connections, region redirects, ``fork`` — and fsspec where it must stay.

The S3 endpoint that checks signatures is a moto server started with authentication on
(``INITIAL_NO_AUTH_ACTION_COUNT``): it recomputes every request's SigV4 signature from the
bytes on the wire and refuses a wrong one, so a signing mistake cannot pass here.
"""

from __future__ import annotations

import multiprocessing as mp
import time
from pathlib import Path

import numpy as np
import pytest
from aiohttp import web
from array_factory import expected_box, write_sharded_array
from servers import LoopbackHttp, moto_server, static_app

from livercube.errors import RemoteAccessDeniedError, RemoteReadError
from livercube.sampling import ArrayInfo, ShardReader
from livercube.sampling.http_ranges import _S3Target, client_for
from livercube.sampling.ranges import ByteRange
from livercube.store.location import StoreLocation

SHAPE = (16, 40, 36)


@pytest.fixture(scope="module")
def array_dir(tmp_path_factory) -> tuple[Path, ArrayInfo, np.ndarray]:
    """A sharded, CRC-checked int16 array like the store's images (index at the shard end)."""
    root = tmp_path_factory.mktemp("remote") / "s.zarr"
    data = np.random.default_rng(7).integers(-1024, 3000, SHAPE).astype(np.int16)
    info = write_sharded_array(root / "img", data, chunks=(4, 8, 12), shards=(8, 40, 36))
    return root, info, data


def boxes(n: int = 12, seed: int = 0) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        size = tuple(int(rng.integers(1, s + 1)) for s in SHAPE)
        start = tuple(int(rng.integers(-3, s)) for s in SHAPE)  # some reach past the border
        out.append((start, size))
    return out


def assert_reads_exact(reader: ShardReader, info: ArrayInfo, data: np.ndarray) -> None:
    for start, size in boxes():
        np.testing.assert_array_equal(
            reader.read(info, start, size, fill=-7), expected_box(data, start, size, -7)
        )


# -- an S3 endpoint that checks every signature ------------------------------------------------
@pytest.fixture(scope="module")
def signed_s3(array_dir):
    """(endpoint, key, secret, bucket) of a moto server that authenticates every request."""
    import boto3

    with moto_server({"INITIAL_NO_AUTH_ACTION_COUNT": "3"}) as endpoint:  # user, key, policy
        kw = {"endpoint_url": endpoint, "region_name": "us-east-1"}
        iam = boto3.client("iam", aws_access_key_id="a", aws_secret_access_key="a", **kw)
        iam.create_user(UserName="reader")
        key = iam.create_access_key(UserName="reader")["AccessKey"]
        iam.put_user_policy(
            UserName="reader",
            PolicyName="all",
            PolicyDocument='{"Version": "2012-10-17", "Statement": '
            '[{"Effect": "Allow", "Action": "*", "Resource": "*"}]}',
        )
        creds = {
            "aws_access_key_id": key["AccessKeyId"],
            "aws_secret_access_key": key["SecretAccessKey"],
        }
        s3 = boto3.client("s3", **creds, **kw)
        s3.create_bucket(Bucket="lc-signed")
        root, _, _ = array_dir
        for path in root.rglob("*"):
            if path.is_file():
                s3.upload_file(str(path), "lc-signed", f"store/{path.relative_to(root)}")
        yield endpoint, key["AccessKeyId"], key["SecretAccessKey"], "lc-signed"


@pytest.mark.slow
def test_signed_s3_reads_are_exact_and_the_server_checks_the_signature(signed_s3, array_dir):
    endpoint, key, secret, bucket = signed_s3
    _, info, data = array_dir
    url = f"s3://{bucket}/store"
    reader = ShardReader(url, {"key": key, "secret": secret, "endpoint_url": endpoint})
    assert reader._client is not None  # the fast path, not s3fs
    assert_reads_exact(reader, info, data)
    # one signature per shard object (2 here), shared by all of its ranged GETs
    signed = reader._client._rt().signer._cache
    assert len(signed) == 2 < reader.stats.requests + reader.stats.index_requests
    # the same bytes as s3fs returns for the same ranges
    via_fsspec = ShardReader(
        url, {"key": key, "secret": secret, "endpoint_url": endpoint}, transport="fsspec"
    )
    assert via_fsspec._client is None
    assert_reads_exact(via_fsspec, info, data)

    wrong = ShardReader(url, {"key": key, "secret": "not-the-secret", "endpoint_url": endpoint})
    with pytest.raises(RemoteAccessDeniedError, match="SignatureDoesNotMatch") as exc:
        wrong.read(info, (0, 0, 0), (4, 4, 4))
    assert isinstance(exc.value, PermissionError)  # as fsspec reports a refused read
    assert f"{bucket}/store/img/c/0/0/0" in str(exc.value)  # names the object
    anonymous = ShardReader(url, {"anon": True, "endpoint_url": endpoint})
    with pytest.raises(RemoteAccessDeniedError, match="HTTP 403"):
        anonymous.read(info, (0, 0, 0), (4, 4, 4))


@pytest.mark.slow
def test_forked_worker_reads_after_the_parent_read(signed_s3, array_dir):
    """A DataLoader worker forked after the parent read a patch must not hang or share sockets,
    and the parent keeps reading through its own connections afterwards."""
    endpoint, key, secret, bucket = signed_s3
    _, info, data = array_dir
    reader = ShardReader(
        f"s3://{bucket}/store", {"key": key, "secret": secret, "endpoint_url": endpoint}
    )
    start, size = (1, 2, 3), (8, 20, 20)
    parent = reader.read(info, start, size)
    with mp.get_context("fork").Pool(1) as pool:
        child = pool.apply_async(reader.read, (info, start, size)).get(timeout=60)
    np.testing.assert_array_equal(child, parent)
    np.testing.assert_array_equal(parent, expected_box(data, start, size, 0))
    again = (2, 1, 0)
    np.testing.assert_array_equal(
        reader.read(info, again, size), expected_box(data, again, size, 0)
    )


# -- plain HTTP --------------------------------------------------------------------------------
def test_http_reads_are_exact_with_either_transport(array_dir):
    root, info, data = array_dir
    with LoopbackHttp(static_app(str(root))) as server:
        assert ShardReader(server.url)._client is None  # fsspec unless asked: see TRANSPORTS
        fast = ShardReader(server.url, transport="client")
        assert fast._client is not None
        assert_reads_exact(fast, info, data)
        slow = ShardReader(server.url, transport="fsspec")
        assert slow._client is None
        assert_reads_exact(slow, info, data)
        client = client_for(StoreLocation.of(server.url))
        whole = (root / "img" / "zarr.json").read_bytes()
        got = client.fetch(
            [ByteRange("img/zarr.json"), ByteRange("img/zarr.json", -10), ByteRange("nope")]
        )
        assert got == [whole, whole[-10:], None]


def test_a_connection_the_server_closed_while_idle_is_replaced(array_dir):
    root, info, data = array_dir
    with LoopbackHttp(static_app(str(root)), keepalive_timeout=0.2) as server:
        reader = ShardReader(server.url, transport="client")
        start, size = (0, 0, 0), (8, 16, 16)
        first = reader.read(info, start, size)
        time.sleep(0.6)  # every kept-alive connection is closed by the server now
        np.testing.assert_array_equal(
            reader.read(info, (0, 1, 1), size), expected_box(data, (0, 1, 1), size, 0)
        )
        np.testing.assert_array_equal(first, expected_box(data, start, size, 0))


# -- throttling and failures -------------------------------------------------------------------
@pytest.mark.slow
def test_throttled_bucket_is_retried_and_reads_stay_exact(s3_endpoint, array_dir):
    import s3fs
    from faulty_proxy import FaultyProxy

    root, info, data = array_dir
    opts = {"key": "testing", "secret": "testing", "endpoint_url": s3_endpoint}
    fs = s3fs.S3FileSystem(**opts, skip_instance_cache=True)
    bucket = f"lc-{time.monotonic_ns()}"
    fs.mkdir(bucket)
    fs.put(str(root), f"{bucket}/store.zarr", recursive=True)
    with FaultyProxy(s3_endpoint, fail_every=3, delay=0.0) as proxy:
        reader = ShardReader(f"s3://{bucket}/store.zarr", {**opts, "endpoint_url": proxy.url})
        assert reader._client is not None
        assert_reads_exact(reader, info, data)
        assert proxy.injected > 0  # the 503s happened and were absorbed
        hopeless = ShardReader(
            f"s3://{bucket}/store.zarr",
            {
                **opts,
                "endpoint_url": proxy.url,
                "config_kwargs": {"retries": {"max_attempts": 1}},
            },
        )
        proxy.fail_every = 1
        with pytest.raises(RemoteReadError, match=r"after 1 attempts .*503 SlowDown") as exc:
            hopeless.read(info, (0, 0, 0), (4, 4, 4))
        assert "store.zarr/img/c/0/0/0" in str(exc.value)


def test_a_redirect_to_the_buckets_region_is_followed_once():
    """AWS answers a request signed for the wrong region with the bucket's region."""
    seen: list[str] = []

    def make() -> web.Application:
        async def handle(request: web.Request) -> web.Response:
            auth = request.headers.get("Authorization", "")
            seen.append(auth)
            if "/eu-west-1/s3/" not in auth:
                return web.Response(status=400, headers={"x-amz-bucket-region": "eu-west-1"})
            return web.Response(status=206, body=b"abcd")

        app = web.Application()
        app.router.add_get("/{tail:.*}", handle)
        return app

    with LoopbackHttp(make) as server:
        loc = StoreLocation.of(
            "s3://bucket/prefix",
            {
                "key": "k",
                "secret": "s",
                "endpoint_url": server.url,
                "client_kwargs": {"region_name": "us-east-1"},
            },
        )
        client = client_for(loc)
        assert client.fetch([ByteRange("obj", 0, 4)]) == [b"abcd"]
        assert client.fetch([ByteRange("obj", 0, 4)]) == [b"abcd"]  # the region is remembered
    assert ["/us-east-1/s3/" in a for a in seen] == [True, False, False]


# -- what the client takes on, and what it leaves to fsspec ------------------------------------
def test_the_client_takes_only_what_it_understands(monkeypatch):
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    ok = {"key": "k", "secret": "s", "endpoint_url": "http://127.0.0.1:9"}
    assert client_for(StoreLocation.of("s3://b/p", ok)) is not None
    assert client_for(StoreLocation.of("s3://b/p", {"anon": True})) is not None
    assert client_for(StoreLocation.of("https://example.org/store.zarr")) is not None
    for url, opts in [
        ("s3://b/p", {**ok, "requester_pays": True}),
        ("s3://b/p", {**ok, "client_kwargs": {"verify": False}}),
        ("s3://b/p", {**ok, "config_kwargs": {"signature_version": "s3"}}),
        ("https://example.org/s", {"client_kwargs": {"auth": ("u", "p")}}),
        ("gs://bucket/store.zarr", {}),
        ("memory://store.zarr", {}),
        ("/local/store.zarr", {}),
    ]:
        assert client_for(StoreLocation.of(url, opts)) is None, (url, opts)
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    assert client_for(StoreLocation.of("https://example.org/store.zarr")) is None


def test_s3_addressing_follows_botocore():
    def target(bucket: str, endpoint: str | None = None, virtual: bool | None = None) -> _S3Target:
        opts: dict = {"anon": True, "client_kwargs": {"region_name": "eu-west-1"}}
        if endpoint:
            opts["endpoint_url"] = endpoint
        if virtual is not None:
            opts["config_kwargs"] = {"s3": {"addressing_style": "virtual" if virtual else "path"}}
        client = client_for(StoreLocation.of(f"s3://{bucket}/pre fix", opts))
        return client._s3

    assert target("idc-open-data").object_url("eu-west-1", "a/b") == (
        "https://idc-open-data.s3.eu-west-1.amazonaws.com/pre%20fix/a/b"
    )
    assert target("my.dotted.bucket").object_url("eu-west-1", "k") == (
        "https://s3.eu-west-1.amazonaws.com/my.dotted.bucket/pre%20fix/k"
    )
    assert target("lc", "http://127.0.0.1:9000").object_url("x", "k") == (
        "http://127.0.0.1:9000/lc/pre%20fix/k"
    )
    assert target("lc", "https://minio.example", virtual=True).object_url("x", "k") == (
        "https://lc.minio.example/pre%20fix/k"
    )
    assert target("idc-open-data", virtual=False).object_url("us-east-1", "k") == (
        "https://s3.us-east-1.amazonaws.com/idc-open-data/pre%20fix/k"
    )


def _s3_location(endpoint: str, **config) -> StoreLocation:
    return StoreLocation.of(
        "s3://bucket/prefix",
        {"key": "k", "secret": "s", "endpoint_url": endpoint, "config_kwargs": config},
    )


def test_an_unreachable_endpoint_fails_with_the_cause_after_the_attempts():
    """Connection refused is a transport failure: retried, then reported with its cause and
    the object's name."""
    from servers import free_port

    loc = _s3_location(f"http://127.0.0.1:{free_port()}", retries={"max_attempts": 2})
    client = client_for(loc)
    with pytest.raises(RemoteReadError, match=r"after 2 attempts") as exc:
        client.fetch([ByteRange("obj", 0, 4), ByteRange("other", 0, 4)])
    assert "prefix/obj" in str(exc.value)
    assert "ConnectionRefusedError" in str(exc.value)


def test_a_server_that_stops_sending_times_out():
    """A response that stalls mid-body fails after the read timeout instead of hanging."""
    import asyncio
    import contextlib

    release = asyncio.Event()  # lets the stalled handler end once the client gave up

    def make() -> web.Application:
        async def handle(request: web.Request) -> web.StreamResponse:
            resp = web.StreamResponse(status=206, headers={"Content-Length": "8"})
            await resp.prepare(request)
            await resp.write(b"abcd")
            with contextlib.suppress(TimeoutError):  # the other 4 bytes never come
                await asyncio.wait_for(release.wait(), 30)
            return resp

        app = web.Application()
        app.router.add_get("/{tail:.*}", handle)
        return app

    with LoopbackHttp(make) as server:
        loc = _s3_location(server.url, retries={"max_attempts": 1}, read_timeout=1)
        t0 = time.monotonic()
        with pytest.raises(RemoteReadError, match="after 1 attempts"):
            client_for(loc).fetch([ByteRange("obj", 0, 8)])
        assert time.monotonic() - t0 < 15
        server._loop.call_soon_threadsafe(release.set)


def test_many_concurrent_reads_from_many_threads_stay_exact(array_dir):
    """16 threads × 12 boxes through one client's shared pool: every voxel right."""
    from concurrent.futures import ThreadPoolExecutor

    root, info, data = array_dir
    with LoopbackHttp(static_app(str(root))) as server:
        reader = ShardReader(server.url, transport="client")
        work = [b for seed in range(16) for b in boxes(12, seed)]
        with ThreadPoolExecutor(16) as pool:
            got = list(pool.map(lambda b: reader.read(info, *b, fill=-7), work))
    for (start, size), arr in zip(work, got, strict=True):
        np.testing.assert_array_equal(arr, expected_box(data, start, size, -7))
