"""Writers: concurrent runs, full disks, hostile destinations, interrupted overwrites, and
one-line errors — each with real `livercube convert` processes, frozen or killed at named
points (``LIVERCUBE_FAULT``, see :mod:`livercube.faults`) instead of by timing."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import livercube
from livercube.faults import ENV
from livercube.store.contract import check_store
from livercube.store.lease import LEASE_NAME

BIN = Path(sys.executable).parent
LIVERCUBE = str(BIN / "livercube")


def fingerprint_of_store(url: str, **opts) -> dict[str, str]:
    cat = livercube.open(url, **opts).catalog
    return dict(zip(cat.path.values.astype(str), cat.checksum.values.astype(str), strict=True))


def _cmd(root: Path, dest: str, overrides: Path, *extra: str, opts: dict | None = None):
    cmd = [LIVERCUBE, "convert", str(root), dest, "--collection", "plc-cect"]
    cmd += ["--overrides", str(overrides), "--quiet", *extra]
    for k, v in (opts or {}).items():
        cmd += ["--storage-option", f"{k}={v}"]
    return cmd


def _env(fault: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != ENV}
    return {**env, ENV: fault} if fault else env


def _wait_stopped(proc: subprocess.Popen, timeout: float = 180) -> None:
    """Until ``proc`` has frozen itself at its fault point (state T), or fail if it ended."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        with open(f"/proc/{proc.pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "T":
                return
        time.sleep(0.05)
    raise TimeoutError("the run never reached its fault point")


def _verify(url: str, opts: dict | None = None) -> None:
    cmd = [LIVERCUBE, "verify", url]
    for k, v in (opts or {}).items():
        cmd += ["--storage-option", f"{k}={v}"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr


def _one_line_error(res: subprocess.CompletedProcess) -> str:
    err = res.stderr.strip()
    assert "Traceback" not in res.stderr and len(err.splitlines()) == 1, res.stderr
    return err


def _complete_listed(url: str, opts: dict | None = None) -> None:
    """Every volume the catalog lists opens and carries its completion record."""
    from livercube.store.location import StoreLocation

    store = livercube.open(url, **(opts or {}))
    root = StoreLocation.of(url, opts).open_root(consolidated=False)  # as the volume is now
    for path in store.paths():
        store.volume(path)  # opens (readers refuse an incomplete group)
        meta = root[path].attrs["livercube"]
        assert meta["status"] == "complete" and meta["complete"]["checksum"], path


S3_FIXTURES = ("local", "s3")


@pytest.fixture(params=S3_FIXTURES)
def dest(request, tmp_path):
    """A fresh destination: a local path, or a prefix in a fresh moto bucket."""
    if request.param == "local":
        return str(tmp_path / "store.zarr"), None
    name, opts = request.getfixturevalue("s3_bucket")
    return f"s3://{name}/store", opts


# --- concurrent writers ------------------------------------------------------------------


@pytest.mark.slow
def test_second_concurrent_convert_refuses_and_first_completes(
    dest, plc_release, plc_overrides, plc_store
):
    url, opts = dest
    root, _ = plc_release
    first = subprocess.Popen(
        _cmd(root, url, plc_overrides, opts=opts),
        env=_env("volume-written:2:stop"),  # frozen mid-run, holding the store
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_stopped(first)
        second = subprocess.run(
            _cmd(root, url, plc_overrides, opts=opts),
            env=_env(),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert second.returncode == 1, second.stdout + second.stderr
        err = _one_line_error(second)
        assert "is being written by" in err and f"pid {first.pid}" in err
    finally:
        with contextlib.suppress(ProcessLookupError):
            first.send_signal(signal.SIGCONT)
    out, errs = first.communicate(timeout=300)
    assert first.returncode == 0, out + errs
    assert fingerprint_of_store(url, **(opts or {})) == fingerprint_of_store(plc_store[0])
    assert check_store(url, opts) == []
    _verify(url, opts)


@pytest.mark.slow
def test_a_killed_writers_lease_is_taken_over(plc_release, plc_overrides, plc_store, tmp_path):
    root, _ = plc_release
    url = str(tmp_path / "store.zarr")
    killed = subprocess.run(
        _cmd(root, url, plc_overrides), env=_env("volume-written:3"), capture_output=True
    )
    assert killed.returncode == -signal.SIGKILL
    assert (tmp_path / "store.zarr" / LEASE_NAME).exists()  # left behind by the dead run
    res = subprocess.run(_cmd(root, url, plc_overrides), capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    assert not (tmp_path / "store.zarr" / LEASE_NAME).exists()
    assert fingerprint_of_store(url) == fingerprint_of_store(plc_store[0])
    _verify(url)


@pytest.mark.slow
def test_s3_lease_is_conditional_and_an_expired_one_is_taken_over(s3_bucket):
    import s3fs

    from livercube.errors import StoreBusyError
    from livercube.store import lease

    name, opts = s3_bucket
    url = f"s3://{name}/store"
    fs = s3fs.S3FileSystem(**opts)
    held = lease.acquire(url, opts)
    with pytest.raises(StoreBusyError, match="is being written by"):
        lease.acquire(url, opts)
    # a run on another machine that died: its lease expired, nobody renews it
    body = json.loads(fs.cat(f"{name}/store/{LEASE_NAME}"))
    body.update(host="elsewhere", expires_at="2000-01-01T00:00:00+00:00")
    fs.pipe(f"{name}/store/{LEASE_NAME}", json.dumps(body).encode())
    taker = lease.acquire(url, opts)
    held.renew()  # the old holder notices on its next renewal and must stop writing
    with pytest.raises(StoreBusyError, match="took over"):
        held.check()
    taker.release()
    fs.invalidate_cache()
    assert not fs.exists(f"{name}/store/{LEASE_NAME}")


# --- disk full ---------------------------------------------------------------------------


@pytest.fixture()
def small_disk(tmp_path):
    mnt = tmp_path / "disk"
    mnt.mkdir()
    res = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)], capture_output=True
    )
    if res.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {res.stderr.decode().strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill(disk: Path) -> Path:
    ballast = disk / "ballast"
    with open(ballast, "wb", buffering=0) as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\0" * 4096)
    return ballast


@pytest.mark.slow
def test_disk_full_keeps_previous_catalog_and_writes_a_report(
    small_disk, plc_release, plc_overrides, plc_store
):
    root, _ = plc_release
    url = str(small_disk / "store.zarr")
    res = subprocess.run(
        _cmd(root, url, plc_overrides, "--only", "P0001"), capture_output=True, text=True
    )
    assert res.returncode == 0, res.stdout + res.stderr
    before = fingerprint_of_store(url)

    run = subprocess.Popen(
        _cmd(root, url, plc_overrides),
        env=_env("before-catalog:1:stop"),  # volumes written, catalog next
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_stopped(run)
        root_doc = (small_disk / "store.zarr" / "zarr.json").read_bytes()
        ballast = _fill(small_disk)  # the disk fills up under it
    finally:
        with contextlib.suppress(ProcessLookupError):
            run.send_signal(signal.SIGCONT)
    out, err = run.communicate(timeout=300)
    assert run.returncode == 1, out + err
    line = _one_line_error(subprocess.CompletedProcess([], 1, out, err))
    assert "no space left" in line and "catalog" in line
    # the previous catalog and consolidated root are untouched, no half-written copy remains
    assert fingerprint_of_store(url) == before
    assert (small_disk / "store.zarr" / "zarr.json").read_bytes() == root_doc
    assert not list((small_disk / "store.zarr").glob(".catalog-*"))
    report = json.loads((small_disk / "store.zarr" / "livercube-report.json").read_text())
    assert "no space left" in report["fatal"] and report["exit_code"] == 1
    assert report["finished_at"]
    assert len(report["converted"]) + len(report["unchanged"]) == 12
    _complete_listed(url)

    ballast.unlink()  # space again: the same command completes the store
    res = subprocess.run(_cmd(root, url, plc_overrides), capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    assert fingerprint_of_store(url) == fingerprint_of_store(plc_store[0])
    _verify(url)


# --- destinations ------------------------------------------------------------------------


@pytest.mark.slow
def test_a_regular_file_as_destination_is_a_usage_error(plc_release, plc_overrides, tmp_path):
    root, _ = plc_release
    target = tmp_path / "store.zarr"
    target.write_text("my notes")
    res = subprocess.run(_cmd(root, str(target), plc_overrides), capture_output=True, text=True)
    assert res.returncode == 2, res.stdout + res.stderr
    assert "is a file" in _one_line_error(res)
    assert target.read_text() == "my notes"


@pytest.mark.slow
def test_a_folder_of_user_files_is_refused_untouched(plc_release, plc_overrides, tmp_path):
    root, _ = plc_release
    target = tmp_path / "mine"
    notes = target / "plc-cect" / "P0001" / "CECT" / "C1" / "notes.txt"
    notes.parent.mkdir(parents=True)
    notes.write_text("keep me")
    (target / "readme.txt").write_text("also mine")
    before = sorted(p.relative_to(target) for p in target.rglob("*"))
    res = subprocess.run(_cmd(root, str(target), plc_overrides), capture_output=True, text=True)
    assert res.returncode == 2, res.stdout + res.stderr
    assert "not a livercube store" in _one_line_error(res)
    assert sorted(p.relative_to(target) for p in target.rglob("*")) == before
    assert notes.read_text() == "keep me"


def test_a_user_file_inside_a_volume_folder_is_not_deleted(
    plc_release, plc_overrides, plc_store, tmp_path
):
    import shutil

    from livercube.convert import convert

    root, _ = plc_release
    dest = tmp_path / "s.zarr"
    shutil.copytree(plc_store[0], dest)
    notes = dest / "plc-cect" / "P0002" / "CECT" / "C2" / "notes.txt"
    notes.write_text("keep me")
    rep = convert(
        str(root),
        str(dest),
        "plc-cect",
        overrides=str(plc_overrides),
        progress=False,
        overwrite=True,
    )
    assert rep.exit_code == 3
    assert [s["input"] for s in rep.skipped if "did not write" in s["reason"]] == ["P0002_C2"]
    assert notes.read_text() == "keep me"
    assert len(rep.converted) == 11
    _complete_listed(str(dest))


# --- interrupted --overwrite -------------------------------------------------------------


@pytest.mark.slow
def test_interrupted_overwrite_on_s3_catalog_lists_only_complete_volumes(
    s3_bucket, plc_release, plc_overrides, plc_store
):
    name, opts = s3_bucket
    url = f"s3://{name}/store"
    root, _ = plc_release
    res = subprocess.run(_cmd(root, url, plc_overrides, opts=opts), capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    # killed with the first rewritten volume's data uploaded and its group document deleted
    killed = subprocess.run(
        _cmd(root, url, plc_overrides, "--overwrite", "--only", "P0002", opts=opts),
        env=_env("before-group-doc:1"),
        capture_output=True,
    )
    assert killed.returncode == -signal.SIGKILL
    store = livercube.open(url, **opts)
    assert not {p for p in store.paths() if p.startswith("plc-cect/P0002/")}  # hidden
    assert len(store.paths()) == 8
    _complete_listed(url, opts)
    from livercube.sampling import PatchSampler

    sampler = PatchSampler(url, patch_size=(8, 16, 16), seed=0, storage_options=opts)
    assert next(iter(sampler.batches(4)))["image"].shape[0] == 4

    res = subprocess.run(_cmd(root, url, plc_overrides, opts=opts), capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    assert fingerprint_of_store(url, **opts) == fingerprint_of_store(plc_store[0])
    _verify(url, opts)


# --- one-line errors ---------------------------------------------------------------------


@pytest.mark.slow
def test_missing_overrides_file_is_a_one_line_usage_error(plc_release, tmp_path):
    root, _ = plc_release
    dest = tmp_path / "s.zarr"
    res = subprocess.run(
        _cmd(root, str(dest), tmp_path / "nope.csv"), capture_output=True, text=True
    )
    assert res.returncode == 2, res.stdout + res.stderr
    assert "nope.csv" in _one_line_error(res)
    assert not dest.exists()


@pytest.mark.slow
def test_bogus_scheduler_is_a_usage_error_and_writes_nothing(plc_release, plc_overrides, tmp_path):
    root, _ = plc_release
    dest = tmp_path / "s.zarr"
    res = subprocess.run(
        _cmd(root, str(dest), plc_overrides, "--scheduler", "bogus"), capture_output=True, text=True
    )
    assert res.returncode == 2, res.stdout + res.stderr
    assert "bogus" in _one_line_error(res)
    assert not dest.exists()


@pytest.mark.slow
def test_unreachable_s3_endpoint_is_one_line_naming_it(plc_release, plc_overrides):
    from servers import free_port

    root, _ = plc_release
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    opts = {"key": "testing", "secret": "testing", "endpoint_url": endpoint}
    res = subprocess.run(
        _cmd(root, "s3://nowhere/store", plc_overrides, opts=opts),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 1, res.stdout + res.stderr
    assert endpoint in _one_line_error(res)


@pytest.mark.slow
def test_missing_bucket_is_a_one_line_usage_error(s3_endpoint, plc_release, plc_overrides):
    root, _ = plc_release
    opts = {"key": "testing", "secret": "testing", "endpoint_url": s3_endpoint}
    res = subprocess.run(
        _cmd(root, "s3://no-such-bucket/store", plc_overrides, opts=opts),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 2, res.stdout + res.stderr
    assert "no such bucket 'no-such-bucket'" in _one_line_error(res)


# --- killed mid-volume -------------------------------------------------------------------


@pytest.mark.slow
def test_a_run_killed_between_shards_leaves_the_volume_invisible_and_resumes(
    dest, plc_release, plc_overrides, plc_store
):
    """Shards are uploaded as they are encoded: a run killed after some of a volume's shards
    (but before its group document) must leave no group a reader would take for a volume."""
    url, opts = dest
    root, _ = plc_release
    killed = subprocess.run(
        _cmd(root, url, plc_overrides, "--workers", "1", opts=opts),
        env=_env("shard-written:2"),
        capture_output=True,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    import fsspec

    from livercube.store.catalog import stored_volumes

    fs, root_path = fsspec.core.url_to_fs(url, **(opts or {}))
    assert fs.glob(f"{root_path}/plc-cect/**/c/0/0/0")  # shards were written …
    assert stored_volumes(url, opts)[0] == []  # … but no volume is visible
    res = subprocess.run(_cmd(root, url, plc_overrides, opts=opts), capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    assert fingerprint_of_store(url, **(opts or {})) == fingerprint_of_store(plc_store[0])
    _verify(url, opts)
