"""One writer per store: a lease object at the store root, taken atomically, renewed, released.

Two ``convert`` runs into the same store used to interleave their deletes and uploads of the
same group and could leave a volume marked complete without its ``image``.  A writer now
holds ``livercube-lease.json`` for the whole run; a second writer finds it and refuses,
naming the holder.  The lease records owner, host, pid, what the run does and an expiry
that a background thread renews; a lease whose expiry passed, or whose process is gone
(same host, pid not alive), is stale and is taken over.

Atomic on each backend, without a lock server:

* **local disk** — the check-and-create runs under ``flock`` on the store directory, so
  two processes on one machine never both see "no lease";
* **S3** — the lease is created with a conditional write (``If-None-Match: *``) and taken
  over / renewed / released with ``If-Match: <ETag>`` of the lease that was read, so of two
  racing writers exactly one wins (AWS S3 since 2024, MinIO, moto);
* any other fsspec backend — check-then-write: fine for one process (``memory://``), not a
  guarantee between machines.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import getpass
import json
import os
import socket
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from livercube.errors import StoreBusyError
from livercube.store.location import StoreLocation

#: Object name of the lease at the store root.
LEASE_NAME = "livercube-lease.json"
#: Seconds a lease stays valid without renewal; renewed every third of it while the run lives.
LEASE_TTL_S = 300.0


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _iso(t: dt.datetime) -> str:
    return t.isoformat(timespec="seconds")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def is_stale(body: dict[str, Any], now: dt.datetime | None = None) -> bool:
    """A lease nobody holds any more: expired, or its process on this host is gone."""
    now = now or _now()
    try:
        if dt.datetime.fromisoformat(body["expires_at"]) <= now:
            return True
    except (KeyError, TypeError, ValueError):
        return True  # unreadable lease: no valid holder
    if body.get("host") == socket.gethostname() and isinstance(body.get("pid"), int):
        return not _pid_alive(body["pid"])
    return False


def describe(body: dict[str, Any]) -> str:
    """Who holds a lease, for the refusal message."""
    return (
        f"{body.get('purpose', 'a livercube run')} by {body.get('owner', '?')}@"
        f"{body.get('host', '?')} (pid {body.get('pid', '?')}) since "
        f"{body.get('acquired_at', '?')}, lease valid until {body.get('expires_at', '?')}"
    )


class _Backend:
    """Atomic primitives on the lease object; ``tag`` identifies the version that was read."""

    def read(self) -> tuple[dict[str, Any], str] | None:
        raise NotImplementedError

    def create(self, body: bytes) -> str | None:
        """Create if absent; the new tag, or None when a lease exists."""
        raise NotImplementedError

    def replace(self, body: bytes, tag: str) -> str | None:
        """Replace if still at ``tag``; the new tag, or None when it changed meanwhile."""
        raise NotImplementedError

    def delete(self, tag: str) -> None:
        raise NotImplementedError


class _LocalBackend(_Backend):
    def __init__(self, root: str) -> None:
        self.root = root
        self.path = os.path.join(root, LEASE_NAME)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        import fcntl

        fd = os.open(self.root, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _read(self) -> tuple[dict[str, Any], str] | None:
        try:
            with open(self.path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return None
        try:
            body = json.loads(raw)
        except ValueError:
            body = {}
        return body, str(body.get("run_id", "")) if isinstance(body, dict) else ""

    def read(self):
        with self._locked():
            return self._read()

    def _write(self, body: bytes) -> None:
        tmp = f"{self.path}.{uuid.uuid4().hex}.tmp"
        with open(tmp, "wb") as f:
            f.write(body)
        os.replace(tmp, self.path)

    def create(self, body):
        with self._locked():
            if self._read() is not None:
                return None
            self._write(body)
        return json.loads(body)["run_id"]

    def replace(self, body, tag):
        with self._locked():
            cur = self._read()
            if cur is None or cur[1] != tag:
                return None
            self._write(body)
        return json.loads(body)["run_id"]

    def delete(self, tag):
        with self._locked():
            cur = self._read()
            if cur is not None and cur[1] == tag:
                os.unlink(self.path)


def _precondition_failed(exc: BaseException) -> bool:
    if isinstance(exc, FileExistsError):
        return True
    text = f"{exc} {exc.__cause__ or ''}"
    return "PreconditionFailed" in text or "Precondition" in text or "412" in text


class _S3Backend(_Backend):
    def __init__(self, fs: Any, path: str) -> None:
        self.fs = fs
        self.bucket, self.key = f"{path.rstrip('/')}/{LEASE_NAME}".split("/", 1)

    def _call(self, op: str, **kw: Any) -> Any:
        from fsspec.asyn import sync

        return sync(self.fs.loop, self.fs._call_s3, op, Bucket=self.bucket, Key=self.key, **kw)

    def read(self):
        try:
            out = self._call("get_object")
        except FileNotFoundError:
            return None
        from fsspec.asyn import sync

        raw = sync(self.fs.loop, out["Body"].read)
        try:
            body = json.loads(raw)
        except ValueError:
            body = {}
        return body, out["ETag"]

    def _put(self, body: bytes, **cond: str) -> str | None:
        try:
            return self._call("put_object", Body=body, **cond)["ETag"]
        except (OSError, FileExistsError) as exc:
            if _precondition_failed(exc):
                return None
            raise

    def create(self, body):
        return self._put(body, IfNoneMatch="*")

    def replace(self, body, tag):
        return self._put(body, IfMatch=tag)

    def delete(self, tag):
        try:
            self._call("delete_object", IfMatch=tag)
        except (OSError, FileNotFoundError) as exc:
            if not (_precondition_failed(exc) or isinstance(exc, FileNotFoundError)):
                raise


class _FsspecBackend(_Backend):
    """Check-then-write: atomic only within one process (``memory://``)."""

    def __init__(self, fs: Any, path: str) -> None:
        self.fs, self.path = fs, f"{path.rstrip('/')}/{LEASE_NAME}"

    def read(self):
        try:
            body = json.loads(self.fs.cat_file(self.path))
        except FileNotFoundError:
            return None
        except ValueError:
            body = {}
        return body, str(body.get("run_id", ""))

    def create(self, body):
        if self.read() is not None:
            return None
        self.fs.pipe_file(self.path, body)
        return json.loads(body)["run_id"]

    def replace(self, body, tag):
        cur = self.read()
        if cur is None or cur[1] != tag:
            return None
        self.fs.pipe_file(self.path, body)
        return json.loads(body)["run_id"]

    def delete(self, tag):
        cur = self.read()
        if cur is not None and cur[1] == tag:
            self.fs.rm_file(self.path)


def _backend(loc: StoreLocation) -> _Backend:
    if not loc.is_remote:
        os.makedirs(loc.url, exist_ok=True)
        return _LocalBackend(loc.url)
    fs, path = loc.filesystem()
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    if protocol in ("s3", "s3a"):
        return _S3Backend(fs, path)
    return _FsspecBackend(fs, path)


@dataclass
class Lease:
    """A held lease; renewed in the background until :meth:`release`."""

    url: str
    backend: _Backend
    body: dict[str, Any]
    tag: str
    ttl: float
    lost: str = ""
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def _encoded(self) -> bytes:
        return json.dumps(self.body, indent=2).encode()

    def renew(self) -> None:
        now = _now()
        self.body["renewed_at"] = _iso(now)
        self.body["expires_at"] = _iso(now + dt.timedelta(seconds=self.ttl))
        tag = self.backend.replace(self._encoded(), self.tag)
        if tag is None:
            cur = self.backend.read()
            self.lost = (
                f"another run took over the lease of {self.url}: {describe(cur[0])}"
                if cur
                else f"the lease of {self.url} was removed by someone else"
            )
            self._stop.set()
        else:
            self.tag = tag

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            with contextlib.suppress(Exception):  # a storage hiccup: next beat retries
                self.renew()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._heartbeat, name="livercube-lease", daemon=True)
        self._thread.start()

    def check(self) -> None:
        """Raise if the lease was lost (taken over after an expiry): stop before writing more."""
        if self.lost:
            raise StoreBusyError(self.lost)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if not self.lost:
            self.backend.delete(self.tag)


def acquire(
    where: str | StoreLocation,
    storage_options: dict[str, Any] | None = None,
    *,
    purpose: str = "livercube convert",
    ttl: float = LEASE_TTL_S,
) -> Lease:
    """Take the store's lease or raise :class:`StoreBusyError` naming the live holder."""
    loc = StoreLocation.of(where, storage_options)
    url = loc.url
    backend = _backend(loc)
    now = _now()
    body = {
        "owner": getpass.getuser(),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "run_id": uuid.uuid4().hex,
        "purpose": purpose,
        "acquired_at": _iso(now),
        "renewed_at": _iso(now),
        "expires_at": _iso(now + dt.timedelta(seconds=ttl)),
    }
    raw = json.dumps(body, indent=2).encode()
    for _ in range(3):
        tag = backend.create(raw)
        if tag is not None:
            break
        cur = backend.read()
        if cur is None:  # released between our create and read: try again
            continue
        held, held_tag = cur
        if not is_stale(held):
            raise StoreBusyError(
                f"{url} is being written by {describe(held)}; wait for it to finish "
                f"(or, if that run is gone, remove {LEASE_NAME} from the store)"
            )
        tag = backend.replace(raw, held_tag)  # take over a stale lease, atomically
        if tag is not None:
            break
    else:
        raise StoreBusyError(f"{url}: could not take the writer lease (contended)")
    lease = Lease(url, backend, body, tag, ttl)
    lease.start()
    return lease


@contextlib.contextmanager
def held(
    where: str | StoreLocation,
    storage_options: dict[str, Any] | None = None,
    *,
    purpose: str = "livercube convert",
    ttl: float = LEASE_TTL_S,
) -> Iterator[Lease]:
    """``with held(url): ...`` — the store's lease for the duration of the block."""
    lease = acquire(where, storage_options, purpose=purpose, ttl=ttl)
    try:
        yield lease
    finally:
        lease.release()
