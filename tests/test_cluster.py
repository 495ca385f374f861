"""A real Dask cluster on loopback: `dask scheduler` + two `dask worker` processes, one killed."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from dask_cluster import dask_cluster
from store_checks import fingerprint_of_store

from livercube.store.contract import check_store

BIN = Path(sys.executable).parent


@pytest.fixture()
def cluster(request, tmp_path):
    """A scheduler and two single-threaded workers; worker 0 runs with ``request.param`` as
    its ``LIVERCUBE_FAULT`` (see :mod:`livercube.faults`): it kills itself at a known point."""
    with dask_cluster(tmp_path / "logs", fault=getattr(request, "param", None)) as c:
        yield c.address, c.workers, c.logs


@pytest.fixture(scope="module")
def release_and_reference(tmp_path_factory):
    """24 small PLC-CECT volumes and their store converted without any fault."""
    from livercube.synth.plc_cect import write_plc_cect

    tmp = tmp_path_factory.mktemp("cluster-release")
    root = tmp / "PLC"
    truth = write_plc_cect(root, n_subjects=6, size="small", seed=11)
    overrides = tmp / "ov.csv"
    overrides.write_text(truth.overrides_csv)
    reference = tmp / "ref.zarr"
    res = subprocess.run(
        [*_convert_cmd(root, reference, overrides), "--quiet"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    return root, overrides, reference


def _convert_cmd(root: Path, dest: Path, overrides: Path) -> list[str]:
    return [
        str(BIN / "livercube"),
        "convert",
        str(root),
        str(dest),
        "--collection",
        "plc-cect",
        "--overrides",
        str(overrides),
    ]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("cluster", "redone_as"),
    [
        # dies after its first volume is complete in the store, before the task returns:
        # the scheduler reruns the task, which finds the volume whole and says "unchanged"
        ("volume-written:1", "unchanged"),
        # dies after uploading a volume's arrays, before its completion record: the rerun
        # finds a partial group and rewrites it
        ("before-group-doc:1", "converted"),
    ],
    indirect=["cluster"],
)
def test_worker_killed_mid_run_store_identical(cluster, release_and_reference, tmp_path, redone_as):

    address, workers, logs = cluster
    root, overrides, reference = release_and_reference
    dest = tmp_path / "cluster.zarr"
    res = subprocess.run(
        [*_convert_cmd(root, dest, overrides), "--scheduler", address, "--quiet"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    # the worker really died at the fault point, while it held work; the other survived
    assert workers[0].wait(timeout=30) == -signal.SIGKILL
    assert workers[1].poll() is None
    assert "Remove worker" in (logs / "scheduler.log").read_text()
    from distributed import Client

    with Client(address, timeout=60) as c:  # every worker's zarr codec pool = its 1 thread
        caps = c.run(lambda: __import__("zarr").config.get("threading.max_workers"))
    assert caps and set(caps.values()) == {1}, caps

    report = json.loads((dest / "livercube-report.json").read_text())
    assert not report["failed"] and not report["skipped"]
    assert len(report["converted"]) + len(report["unchanged"]) == 24
    # exactly the one volume the killed worker was writing was redone, and how it was redone
    # is what the fault point predicts
    assert len(report["unchanged"]) == (1 if redone_as == "unchanged" else 0)
    # the whole store, not just the report: same volumes and checksums as the clean run,
    # contract-valid, and `verify` re-reads every chunk
    assert fingerprint_of_store(str(dest)) == fingerprint_of_store(str(reference))
    assert check_store(str(dest)) == []
    ver = subprocess.run(
        [str(BIN / "livercube"), "verify", str(dest)], capture_output=True, text=True, timeout=300
    )
    assert ver.returncode == 0, ver.stdout + ver.stderr
