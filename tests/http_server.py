"""An aiohttp application served on a free loopback port from a background thread, for tests.

Real sockets and a real HTTP server (keep-alive, ``Range`` on static files, timeouts), so the
readers under test speak to it exactly as they would to a bucket or a web server.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Callable

from aiohttp import web


class LoopbackHttp:
    """``with LoopbackHttp(make_app) as server: server.url``; ``make_app`` runs on the loop.

    ``keepalive_timeout``: seconds an idle kept-alive connection stays open on the server.
    """

    def __init__(
        self, make_app: Callable[[], web.Application], *, keepalive_timeout: float = 75.0
    ) -> None:
        self._make_app = make_app
        self._keepalive = keepalive_timeout
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)

        async def start() -> None:
            self._runner = web.AppRunner(self._make_app(), keepalive_timeout=self._keepalive)
            await self._runner.setup()
            await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
            self._ready.set()

        self._loop.run_until_complete(start())
        self._loop.run_forever()

    def __enter__(self) -> LoopbackHttp:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("loopback HTTP server did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


def static_app(root: str) -> Callable[[], web.Application]:
    """Files under ``root`` as a web server holds a store (aiohttp answers ``Range``: 206)."""

    def make() -> web.Application:
        app = web.Application()
        app.router.add_static("/", root)
        return app

    return make
