"""A real Dask cluster on loopback: `dask scheduler` + two `dask worker` processes, one killed."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from livercube.store.contract import check_store

BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listening on {port}")


@pytest.fixture()
def cluster(tmp_path):
    port = _free_port()
    logs = tmp_path / "logs"
    logs.mkdir()
    procs = []

    def start(name: str, *args: str) -> subprocess.Popen:
        out = open(logs / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
        p = subprocess.Popen([str(BIN / "dask"), *args], stdout=out, stderr=subprocess.STDOUT)
        procs.append(p)
        return p

    start("scheduler", "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard")
    _wait_port(port)
    address = f"tcp://127.0.0.1:{port}"
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
        )
        for i in range(2)
    ]
    from distributed import Client

    with Client(address, timeout=60) as c:
        c.wait_for_workers(2, timeout=60)
    yield address, workers, logs
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            p.kill()


def test_worker_killed_mid_run_store_identical(cluster, tmp_path):
    from test_faults import complete_count, fingerprint_of_store

    from livercube.synth.plc_cect import write_plc_cect

    address, workers, logs = cluster
    root = tmp_path / "PLC"
    truth = write_plc_cect(root, n_subjects=6, size="small", seed=11)
    overrides = tmp_path / "ov.csv"
    overrides.write_text(truth.overrides_csv)

    reference = tmp_path / "ref.zarr"
    res = subprocess.run(
        [
            str(BIN / "livercube"),
            "convert",
            str(root),
            str(reference),
            "--collection",
            "plc-cect",
            "--overrides",
            str(overrides),
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stdout + res.stderr

    dest = tmp_path / "cluster.zarr"
    client = subprocess.Popen(
        [
            str(BIN / "livercube"),
            "convert",
            str(root),
            str(dest),
            "--collection",
            "plc-cect",
            "--overrides",
            str(overrides),
            "--scheduler",
            address,
            "--quiet",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 180
    while complete_count(dest) < 4 and time.monotonic() < deadline and client.poll() is None:
        time.sleep(0.02)
    assert client.poll() is None, "conversion finished before the worker could be killed"
    workers[0].send_signal(signal.SIGKILL)
    killed_at = complete_count(dest)
    out, err = client.communicate(timeout=300)
    from distributed import Client

    with Client(address, timeout=60) as c:  # every worker's zarr codec pool = its 1 thread
        caps = c.run(lambda: __import__("zarr").config.get("threading.max_workers"))
    assert caps and set(caps.values()) == {1}, caps
    assert client.returncode == 0, out + err
    assert killed_at < 24
    assert workers[0].poll() is not None and workers[1].poll() is None
    report = json.loads((dest / "livercube-report.json").read_text())
    assert len(report["converted"]) == 24 and not report["failed"]
    assert fingerprint_of_store(str(dest)) == fingerprint_of_store(str(reference))
    assert check_store(str(dest)) == []
    # the scheduler saw the worker die while it held work, and rescheduled it
    assert "Remove worker" in (logs / "scheduler.log").read_text()
