"""Ranged GETs over HTTP(S) and S3 on per-thread keep-alive connections: the reader's remote path.

Why not fsspec on the hot path: a patch costs about five ranged GETs, and over S3 the client's
CPU per GET — not the network — capped patches/s.  Measured here
(``benchmarks/bench_s3_clients.py``): s3fs/aiobotocore spends 4–7 ms of CPU per signed GET;
obstore (Rust) about 1 ms, but its tokio runtime does not survive ``fork``, so a ``DataLoader``
worker forked after the parent read one patch hangs forever.  Here a GET is a keep-alive
``http.client`` connection of the calling thread plus, for S3, botocore's own SigV4 signer (the
same code s3fs signs with; one signature per object, reused for minutes), run in a small
thread pool so that one read's ranges are
all in flight at once; throttling, 5xx and dropped connections are retried with jittered
backoff as botocore's "standard" mode does.  Plain HTTP(S) works the same way, but the reader
uses it there only when asked (``transport="client"``): fsspec's aiohttp is as cheap per
unsigned GET, and with many patches in flight more of their overlapping chunk fetches were
shared through it (``benchmarks/bench_remote.py``).

Nothing survives ``fork`` or ``pickle``: the pool and threads belong to the process that made
them and are rebuilt lazily in a new one.  Credentials resolve once per process through
botocore's chain (explicit ``key``/``secret``/``token``, ``profile``, environment, shared
files, instance metadata), as s3fs resolves them.

A CA bundle named in the environment is used as botocore (``AWS_CA_BUNDLE``) and requests
(``REQUESTS_CA_BUNDLE``, ``SSL_CERT_FILE``) use it.  Only the storage options spelled out below
are understood here; for any other option (a proxy, requester-pays, a session object …)
:func:`client_for` returns ``None`` and the reader keeps fsspec, which knows them all — slower,
never wrong.
"""

from __future__ import annotations

import http.client
import os
import random
import re
import ssl
import threading
import time
import urllib.parse
import urllib.request
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from livercube.errors import RemoteAccessDeniedError, RemoteReadError
from livercube.sampling.ranges import ByteRange
from livercube.store.location import S3_RETRIES, StoreLocation, is_s3

#: Ranged GETs of one process in flight at once (threads and pooled keep-alive connections).
#: A patch needs ~5; prefetching patches overlap, and S3 serves thousands per second per prefix.
MAX_INFLIGHT = 64

#: HTTP statuses retried with backoff: throttling and server-side failures, as botocore does.
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 60.0

#: fsspec/s3fs options this client honours (the rest make :func:`client_for` decline).
_S3_OPTIONS = frozenset(
    {
        "anon",
        "key",
        "secret",
        "token",
        "profile",
        "endpoint_url",
        "client_kwargs",
        "config_kwargs",
        # fsspec's own bookkeeping, meaningless for ranged GETs
        "skip_instance_cache",
        "use_listings_cache",
        "listings_expiry_time",
        "max_concurrency",
        "default_block_size",
        "default_fill_cache",
        "default_cache_type",
        "cache_regions",
    }
)
_S3_CLIENT_KWARGS = frozenset({"region_name", "endpoint_url"})
_S3_CONFIG_KWARGS = frozenset(
    {"retries", "connect_timeout", "read_timeout", "max_pool_connections", "s3"}
)
_HTTP_OPTIONS = frozenset({"headers", "skip_instance_cache"})
#: DNS-compatible bucket names without dots can be virtual-hosted on AWS (what botocore does).
_VIRTUAL_BUCKET = re.compile(r"^[a-z0-9][a-z0-9-]{1,61}[a-z0-9]$")
_XML_CODE = re.compile(rb"<Code>([^<]*)</Code>")
_XML_MESSAGE = re.compile(rb"<Message>([^<]*)</Message>")


@dataclass(frozen=True)
class _S3Target:
    """How to reach the objects of one ``s3://bucket/prefix`` and sign for them."""

    bucket: str
    prefix: str
    endpoint_url: str | None  # None: AWS, addressed by region
    region: str
    virtual_hosted: bool
    anon: bool
    key: str | None
    secret: str | None
    token: str | None
    profile: str | None

    def object_url(self, region: str, key: str) -> str:
        path = urllib.parse.quote(f"{self.prefix}/{key}".lstrip("/"), safe="/~")
        if self.endpoint_url is not None:
            base = self.endpoint_url.rstrip("/")
            if self.virtual_hosted:
                scheme, _, host = base.partition("://")
                return f"{scheme}://{self.bucket}.{host}/{path}"
            return f"{base}/{self.bucket}/{path}"
        if self.virtual_hosted:
            return f"https://{self.bucket}.s3.{region}.amazonaws.com/{path}"
        return f"https://s3.{region}.amazonaws.com/{self.bucket}/{path}"


def _proxied(url: str) -> bool:
    """Whether the environment routes ``url`` through a proxy (then fsspec handles it)."""
    parts = urllib.parse.urlsplit(url)
    return bool(urllib.request.getproxies().get(parts.scheme)) and not urllib.request.proxy_bypass(
        parts.hostname or ""
    )


def _s3_target(url: str, opts: Mapping[str, Any]) -> _S3Target | None:
    if set(opts) - _S3_OPTIONS:
        return None
    client_kwargs = dict(opts.get("client_kwargs") or {})
    config = dict(opts.get("config_kwargs") or {})
    if set(client_kwargs) - _S3_CLIENT_KWARGS or set(config) - _S3_CONFIG_KWARGS:
        return None
    s3_config = dict(config.get("s3") or {})
    if set(s3_config) - {"addressing_style"}:
        return None
    bucket, _, prefix = url.split("://", 1)[1].partition("/")
    endpoint = (
        opts.get("endpoint_url")
        or client_kwargs.get("endpoint_url")
        or os.environ.get("AWS_ENDPOINT_URL_S3")
        or os.environ.get("AWS_ENDPOINT_URL")
    )
    profile = opts.get("profile")
    region = client_kwargs.get("region_name") or _configured_region(profile)
    style = s3_config.get("addressing_style", "auto")
    virtual = style == "virtual" or (
        style == "auto" and endpoint is None and bool(_VIRTUAL_BUCKET.match(bucket))
    )
    target = _S3Target(
        bucket=bucket,
        prefix=prefix.strip("/"),
        endpoint_url=endpoint,
        region=region,
        virtual_hosted=virtual,
        anon=bool(opts.get("anon", False)),
        key=opts.get("key"),
        secret=opts.get("secret"),
        token=opts.get("token"),
        profile=profile,
    )
    if _proxied(target.object_url(region, "")):
        return None
    return target


def _configured_region(profile: str | None) -> str:
    """The region botocore would sign for: environment, then the profile's config file."""
    for var in ("AWS_REGION", "AWS_DEFAULT_REGION"):
        if os.environ.get(var):
            return os.environ[var]
    import botocore.session

    try:
        region = botocore.session.Session(profile=profile).get_config_variable("region")
    except Exception:  # unknown profile etc.: signing will say so on the first GET
        region = None
    return region or "us-east-1"


@dataclass(frozen=True)
class _Policy:
    """Attempts, backoff and timeouts of every GET (botocore's "standard" retry mode)."""

    attempts: int
    connect_timeout: float
    read_timeout: float
    backoff_s: float = 0.1
    backoff_max_s: float = 20.0

    @classmethod
    def of(cls, opts: Mapping[str, Any]) -> _Policy:
        config = opts.get("config_kwargs") or {}
        retries = dict(config.get("retries") or S3_RETRIES)
        return cls(
            attempts=max(1, int(retries.get("max_attempts", retries.get("total_max_attempts", 3)))),
            connect_timeout=float(config.get("connect_timeout", CONNECT_TIMEOUT_S)),
            read_timeout=float(config.get("read_timeout", READ_TIMEOUT_S)),
        )

    def pause(self, attempt: int, retry_after: str | None) -> None:
        """Sleep before attempt ``attempt + 1``: the server's ``Retry-After``, else full jitter."""
        try:
            wait = float(retry_after) if retry_after else None
        except ValueError:
            wait = None
        if wait is None:
            wait = random.uniform(0, min(self.backoff_max_s, self.backoff_s * 2**attempt))
        time.sleep(min(wait, self.backoff_max_s))


def _range_header(rng: ByteRange) -> str | None:
    if rng.start is None:
        return None
    if rng.start < 0:
        return f"bytes={rng.start}"  # suffix: the last -start bytes
    return f"bytes={rng.start}-{rng.end - 1}" if rng.end is not None else f"bytes={rng.start}-"


def _ignored_range(body: bytes, rng: ByteRange) -> bytes:
    """The wanted part of a whole-object ``200`` from a server that ignored ``Range``."""
    if rng.start is None:
        return body
    if rng.start < 0:
        return body[rng.start :]
    return body[rng.start : rng.end]


def _error_detail(body: bytes) -> str:
    code, msg = _XML_CODE.search(body or b""), _XML_MESSAGE.search(body or b"")
    parts = [m.group(1).decode(errors="replace") for m in (code, msg) if m]
    return ": ".join(parts)


class RangeClient:
    """Concurrent ranged GETs of one remote store (``https://``, ``http://`` or ``s3://``).

    Build it with :func:`client_for`.  :meth:`fetch` returns the bytes of each range, ``None``
    for an object that does not exist (404), and raises :class:`RemoteAccessDeniedError` for a
    refused read and :class:`RemoteReadError` once retries are spent.
    """

    def __init__(
        self,
        url: str,
        *,
        s3: _S3Target | None,
        headers: Mapping[str, str],
        policy: _Policy,
        ca_certs: str | None = None,
        max_inflight: int = MAX_INFLIGHT,
    ) -> None:
        self.url = url.rstrip("/")
        self.ca_certs = ca_certs
        self.policy = policy
        self.max_inflight = max_inflight
        self._s3 = s3
        self._headers = dict(headers)
        self._runtime: _Runtime | None = None
        self._lock = threading.Lock()

    # -- process-local state ---------------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in ("_runtime", "_lock")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._runtime = None
        self._lock = threading.Lock()

    def _rt(self) -> _Runtime:
        rt = self._runtime
        if rt is None or rt.pid != os.getpid():
            with self._lock:
                rt = self._runtime
                if rt is None or rt.pid != os.getpid():  # new, or forked: start afresh
                    rt = self._runtime = _Runtime.start(self)
        return rt

    def close(self) -> None:
        rt, self._runtime = self._runtime, None
        if rt is not None and rt.pid == os.getpid():
            rt.pool.shutdown(wait=False)

    # -- requests --------------------------------------------------------------------------
    def fetch(self, ranges: Sequence[ByteRange]) -> list[bytes | None]:
        """The bytes of every range (``None``: object absent), all requests in flight at once."""
        if not ranges:
            return []
        rt = self._rt()
        if len(ranges) == 1:
            return [self._get(rt, ranges[0])]
        futures = [rt.pool.submit(self._get, rt, r) for r in ranges[1:]]
        first = self._get(rt, ranges[0])  # the calling thread does one itself
        return [first, *(f.result() for f in futures)]

    def _object_url(self, rt: _Runtime, key: str) -> str:
        if self._s3 is not None:
            return self._s3.object_url(rt.region, key)
        return f"{self.url}/{urllib.parse.quote(key, safe='/~')}"

    def _get(self, rt: _Runtime, rng: ByteRange) -> bytes | None:
        headers = dict(self._headers)
        wanted = _range_header(rng)
        if wanted is not None:
            headers["Range"] = wanted
        redirected = False
        failure = ""
        pause: str | bool | None = False  # False: go at once; else the Retry-After (or None)
        for attempt in range(self.policy.attempts):
            if pause is not False:
                self.policy.pause(attempt - 1, pause)
            pause = None
            url = self._object_url(rt, rng.key)
            send = headers if rt.signer is None else rt.signer.sign(url, headers, rt.region)
            try:
                status, head, body = rt.connections.get(url, send)
            except (OSError, http.client.HTTPException) as exc:
                failure = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                continue  # connection refused/reset, timeout, truncated response: retried
            if status in (200, 206):
                return _ignored_range(body, rng) if status == 200 and wanted else body
            if status == 404:
                return None
            region = head.get("x-amz-bucket-region")
            if self._s3 is not None and region and region != rt.region and not redirected:
                rt.region, redirected = region, True  # AWS names the bucket's region: re-sign
                pause = False
                continue
            detail = f"HTTP {status} {_error_detail(body)}".strip()
            if status in RETRY_STATUSES:
                failure, pause = detail, head.get("Retry-After")
                continue
            if status in (401, 403):
                raise RemoteAccessDeniedError(url, detail)
            raise RemoteReadError(url, detail)
        raise RemoteReadError(
            self._object_url(rt, rng.key),
            f"no answer after {self.policy.attempts} attempts (last: {failure})",
        )


class _Connections:
    """Keep-alive connections, one per (thread, host): ``http.client`` is not thread-safe, and a
    connection per thread needs no locking.  urllib3 does the same job at ~1.6× the CPU per
    GET here (its pool bookkeeping and header objects), which is why the stdlib is used."""

    def __init__(self, policy: _Policy, ca_certs: str | None) -> None:
        self._local = threading.local()
        self._policy = policy
        self._tls = ssl.create_default_context(cafile=ca_certs)

    def _connection(self, scheme: str, netloc: str) -> http.client.HTTPConnection:
        conns: dict[tuple[str, str], http.client.HTTPConnection] = self._local.__dict__.setdefault(
            "conns", {}
        )
        conn = conns.get((scheme, netloc))
        if conn is None:
            if scheme == "https":
                conn = http.client.HTTPSConnection(
                    netloc, timeout=self._policy.connect_timeout, context=self._tls
                )
            else:
                conn = http.client.HTTPConnection(netloc, timeout=self._policy.connect_timeout)
            conns[(scheme, netloc)] = conn
        return conn

    def get(self, url: str, headers: Mapping[str, str]) -> tuple[int, Any, bytes]:
        """One GET on this thread's connection: (status, headers, body).

        A kept-alive connection the server has meanwhile closed fails on first use; that one
        failure is retried at once on a fresh connection (not counted as an attempt).
        """
        scheme, netloc, path, query, _ = urllib.parse.urlsplit(url)
        target = f"{path}?{query}" if query else path
        conn = self._connection(scheme, netloc)
        for fresh in (conn.sock is None, True):
            try:
                if conn.sock is None:
                    conn.connect()
                    conn.sock.settimeout(self._policy.read_timeout)
                conn.request("GET", target, headers=headers)
                resp = conn.getresponse()
                body = resp.read()
            except (OSError, http.client.HTTPException):
                conn.close()
                if fresh:
                    raise
                continue
            if resp.will_close:
                conn.close()
            return resp.status, resp.headers, body
        raise AssertionError("unreachable")


#: A signed request stays valid for 15 minutes after its ``X-Amz-Date``; a signature is reused
#: for this long, then made afresh (so are credentials that expire).
SIGNATURE_REUSE_S = 300.0
#: Objects whose signatures are kept (one signature per shard object, shared by its ranges).
SIGNATURE_CACHE = 4096


@dataclass
class _Signer:
    """botocore's S3 SigV4 signer, one signature per object reused for a few minutes.

    ``Range`` is left out of the signed headers (SigV4 signs ``host`` and the ``x-amz-*``
    headers; others are optional — a presigned URL is used with any ``Range`` the same way), so
    every range of a shard object shares one signature and
    signing — 0.15–0.2 ms of CPU in botocore — is paid per object every few minutes instead of
    per GET.  Credentials (possibly refreshable) resolve once per process.
    """

    credentials: Any  # botocore Credentials
    _cache: OrderedDict[tuple[str, str], tuple[float, dict[str, str]]] = field(
        default_factory=OrderedDict
    )
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def sign(self, url: str, headers: dict[str, str], region: str) -> dict[str, str]:
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get((url, region))
            if hit is not None and now - hit[0] < SIGNATURE_REUSE_S:
                self._cache.move_to_end((url, region))
                return {**headers, **hit[1]}
        signed = self._sign(url, region)
        with self._lock:
            self._cache[(url, region)] = (now, signed)
            while len(self._cache) > SIGNATURE_CACHE:
                self._cache.popitem(last=False)
        return {**headers, **signed}

    def _sign(self, url: str, region: str) -> dict[str, str]:
        from botocore.auth import S3SigV4Auth
        from botocore.awsrequest import AWSRequest

        req = AWSRequest(method="GET", url=url, headers={})
        S3SigV4Auth(self.credentials.get_frozen_credentials(), "s3", region).add_auth(req)
        return dict(req.headers.items())


@dataclass
class _Runtime:
    """What one process owns: its connections, its threads and the signer."""

    pid: int
    connections: _Connections
    pool: ThreadPoolExecutor
    signer: _Signer | None
    region: str

    @classmethod
    def start(cls, client: RangeClient) -> _Runtime:
        s3 = client._s3
        signer = None
        if s3 is not None and not s3.anon:
            signer = _Signer(_credentials(s3))
        return cls(
            pid=os.getpid(),
            connections=_Connections(client.policy, client.ca_certs),
            pool=ThreadPoolExecutor(max(1, client.max_inflight - 1), thread_name_prefix="lc-get"),
            signer=signer,
            region=s3.region if s3 is not None else "",
        )


def _credentials(s3: _S3Target) -> Any:
    from botocore.credentials import Credentials

    if s3.key or s3.secret:
        return Credentials(s3.key, s3.secret, s3.token)
    import botocore.session

    creds = botocore.session.Session(profile=s3.profile).get_credentials()
    if creds is None:
        raise RemoteAccessDeniedError(
            f"s3://{s3.bucket}/{s3.prefix}",
            "no AWS credentials found (environment, profile, instance role); "
            "pass storage_options={'anon': True} for a public bucket",
        )
    return creds


def _ca_bundle(variables: Sequence[str]) -> str | None:
    return next((os.environ[v] for v in variables if os.environ.get(v)), None)


def client_for(location: StoreLocation, *, max_inflight: int = MAX_INFLIGHT) -> RangeClient | None:
    """The fast ranged-GET client for ``location``, or ``None`` where fsspec must stay.

    ``s3://`` and ``http(s)://`` with the options this module understands; everything else
    (``gs://``, ``memory://``, unknown options, a proxy from the environment) → ``None``.
    """
    url, opts = location.url, dict(location.storage_options)
    if is_s3(url):
        target = _s3_target(url, opts)
        if target is None:
            return None
        return RangeClient(
            url,
            s3=target,
            headers={},
            policy=_Policy.of(opts),
            ca_certs=_ca_bundle(("AWS_CA_BUNDLE",)),
            max_inflight=max_inflight,
        )
    if url.startswith(("http://", "https://")):
        if set(opts) - _HTTP_OPTIONS or _proxied(url):
            return None
        return RangeClient(
            url,
            s3=None,
            headers=dict(opts.get("headers") or {}),
            policy=_Policy.of({}),
            ca_certs=_ca_bundle(("REQUESTS_CA_BUNDLE", "SSL_CERT_FILE")),
            max_inflight=max_inflight,
        )
    return None


__all__ = ["MAX_INFLIGHT", "RangeClient", "client_for"]
