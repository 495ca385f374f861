"""Real servers on loopback for tests: moto's S3 server, and any aiohttp application.

Real sockets and real HTTP (keep-alive, ``Range`` on static files, signatures, timeouts), so
the code under test speaks to them exactly as it would to a bucket or a web server.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from aiohttp import web


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def moto_server(env: dict[str, str] | None = None) -> Iterator[str]:
    """A real moto S3 server process on a free loopback port; yields its URL.

    ``env``: extra environment for the server (``INITIAL_NO_AUTH_ACTION_COUNT`` turns on its
    authentication: it then recomputes and checks every request's signature).
    """
    port = free_port()
    env = {
        **os.environ,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        **(env or {}),
    }
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail("moto_server did not start")
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


class LoopbackHttp:
    """``with LoopbackHttp(make_app) as server: server.url``; ``make_app`` runs on the loop.

    ``keepalive_timeout``: seconds an idle kept-alive connection stays open on the server.
    """

    def __init__(
        self, make_app: Callable[[], web.Application], *, keepalive_timeout: float = 75.0
    ) -> None:
        self._make_app = make_app
        self._keepalive = keepalive_timeout
        self.port = free_port()
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
