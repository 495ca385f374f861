"""A misbehaving object store for tests: an HTTP proxy on loopback in front of moto.

It forwards every request to the real S3 endpoint, but answers a deterministic fraction of
them with ``503 SlowDown`` (without forwarding) and delays every response, the way a
throttled or distant bucket behaves.  Runs in a background thread with its own event loop.
"""

from __future__ import annotations

import asyncio

import aiohttp
from aiohttp import web
from servers import LoopbackHttp

SLOWDOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message></Error>"
)
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "host"}


class FaultyProxy:
    """``FaultyProxy(upstream, fail_every=7, delay=0.02)``; use ``.url`` as the endpoint."""

    def __init__(self, upstream: str, *, fail_every: int = 7, delay: float = 0.02) -> None:
        self.upstream = upstream.rstrip("/")
        self.fail_every = fail_every
        self.delay = delay
        self.requests = 0
        self.injected = 0
        self._server = LoopbackHttp(self._app)
        self.url = self._server.url

    def _app(self) -> web.Application:
        app = web.Application(client_max_size=1024**3)
        app.router.add_route("*", "/{tail:.*}", self._handle)

        async def session(app: web.Application):
            self._session = aiohttp.ClientSession(auto_decompress=False)
            yield
            await self._session.close()

        app.cleanup_ctx.append(session)
        return app

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        await asyncio.sleep(self.delay)
        if self.fail_every and self.requests % self.fail_every == 0:
            self.injected += 1
            return web.Response(status=503, body=SLOWDOWN, content_type="application/xml")
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        headers["Host"] = self.upstream.split("://", 1)[1]
        async with self._session.request(
            request.method,
            self.upstream + request.raw_path,
            headers=headers,
            data=body,
            allow_redirects=False,
        ) as up:
            payload = await up.read()
            out = {k: v for k, v in up.headers.items() if k.lower() not in HOP_BY_HOP}
            if request.method == "HEAD":  # no body, but the size must reach the client
                out["Content-Length"] = up.headers.get("Content-Length", "0")
                return web.Response(status=up.status, headers=out)
            return web.Response(status=up.status, body=payload, headers=out)

    def __enter__(self) -> FaultyProxy:
        self._server.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.__exit__(*exc)
