"""Real Dask clusters on loopback for tests: a `dask scheduler` and `dask worker` processes.

Shared by the cluster tests (volumes while a worker is killed, planning on workers); the
processes inherit this environment (PYTHONPATH included), so workers import the tree under
test.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from servers import free_port

from livercube.faults import ENV

BIN = Path(sys.executable).parent


def wait_port(port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listening on {port}")


@dataclass
class Cluster:
    address: str
    workers: list[subprocess.Popen]
    logs: Path


@contextlib.contextmanager
def dask_cluster(logs: Path, *, n_workers: int = 2, fault: str | None = None) -> Iterator[Cluster]:
    """A scheduler and ``n_workers`` single-threaded workers without nannies; worker 0 runs
    with ``fault`` as its ``LIVERCUBE_FAULT`` (:mod:`livercube.faults`) when given."""
    port = free_port()
    logs.mkdir(parents=True, exist_ok=True)
    procs: list[subprocess.Popen] = []

    def start(name: str, *args: str, env: dict | None = None) -> subprocess.Popen:
        out = open(logs / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
        p = subprocess.Popen(
            [str(BIN / "dask"), *args], stdout=out, stderr=subprocess.STDOUT, env=env
        )
        procs.append(p)
        return p

    try:
        start(
            "scheduler", "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"
        )
        wait_port(port)
        address = f"tcp://127.0.0.1:{port}"
        base_env = {k: v for k, v in os.environ.items() if k != ENV}
        workers = [
            start(
                f"worker{i}",
                "worker",
                address,
                "--nworkers",
                "1",
                "--nthreads",
                "1",
                "--no-dashboard",
                "--host",
                "127.0.0.1",
                "--memory-limit",
                "2GiB",
                # no nanny: the worker is this process, so a self-kill is a death, not a restart
                "--no-nanny",
                env={**base_env, ENV: fault} if (i == 0 and fault) else base_env,
            )
            for i in range(n_workers)
        ]
        from distributed import Client

        with Client(address, timeout=60) as c:
            c.wait_for_workers(n_workers, timeout=60)
        yield Cluster(address, workers, logs)
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
