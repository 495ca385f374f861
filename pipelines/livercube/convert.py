"""Conversion as a Dask graph: plan from headers/file names, one task per volume, catalog last.

Each task reads one volume's sources, writes only its own group and returns a small record;
no task holds more than one volume and nothing big travels back to the client.  The catalog
and consolidated metadata are rebuilt at the end from the volumes' own metadata.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import json
import os
import traceback
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from livercube.errors import (
    ForeignFilesError,
    SourceError,
    StoreError,
    StoreFullError,
    UsageError,
)
from livercube.fanout import Mapper, dask_map
from livercube.faults import fault_point
from livercube.schema import STORE_SCHEMA_VERSION
from livercube.sources.planning import check_collection, plan_collection
from livercube.store import lease
from livercube.store.catalog import stored_volumes, write_catalog
from livercube.store.chunking import DEFAULT_CHUNKING, Chunking
from livercube.store.completion import CompletionRecord
from livercube.store.layout import task_path
from livercube.store.location import StoreLocation, with_retries
from livercube.store.writer import write_volume

EXIT_OK, EXIT_FATAL, EXIT_USAGE, EXIT_PARTIAL = 0, 1, 2, 3


@dataclass
class ConvertReport:
    """What happened to every input; serialised as ``livercube-report.json`` in the store."""

    collection: str
    source: str
    dest: str
    started_at: str
    finished_at: str = ""
    converted: list[dict[str, Any]] = field(default_factory=list)
    unchanged: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    failed: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    #: How free-text DICOM descriptors were stored (cleaned or kept), and by which rule.
    deidentification: dict[str, Any] = field(default_factory=dict)
    #: why the run could not finish its job (e.g. the disk filled up); exit status 1
    fatal: str = ""

    @property
    def exit_code(self) -> int:
        if self.fatal:
            return EXIT_FATAL
        return EXIT_PARTIAL if (self.skipped or self.failed) else EXIT_OK

    def to_json(self, *, compact: bool = False) -> str:
        """The report as JSON; ``compact`` drops tracebacks and per-volume details."""
        body = {
            k: getattr(self, k)
            for k in (
                "collection",
                "source",
                "dest",
                "started_at",
                "finished_at",
                "converted",
                "unchanged",
                "skipped",
                "failed",
                "warnings",
                "deidentification",
                "fatal",
            )
        }
        body["exit_code"] = self.exit_code
        if compact:
            body["converted"] = [r.get("path") for r in self.converted]
            body["unchanged"] = [r.get("path") for r in self.unchanged]
            for kind in ("skipped", "failed"):
                body[kind] = [{k: v for k, v in r.items() if k != "traceback"} for r in body[kind]]
            body["warnings"] = body["warnings"][:50]
            text = json.dumps(body, default=str)
            if len(text) > REPORT_RESERVE // 2:  # keep the counts and the first reasons
                for kind in ("converted", "unchanged", "skipped", "failed", "warnings"):
                    body[f"n_{kind}"] = len(body[kind])
                    body[kind] = body[kind][:10]
                text = json.dumps(body, default=str)[: REPORT_RESERVE - 1]
            return text
        return json.dumps(body, indent=2, default=str)

    def summary(self) -> str:
        lines = [
            f"{self.collection}: {len(self.converted)} volumes converted, "
            f"{len(self.unchanged)} unchanged, {len(self.skipped)} inputs skipped, "
            f"{len(self.failed)} failed -> {self.dest}"
        ]
        lines += [f"  SKIPPED {s['input']}: {s['reason']}" for s in self.skipped]
        lines += [f"  FAILED  {f['input']}: {f['reason']}" for f in self.failed]
        if self.deidentification:
            lines.append(f"  descriptions {self.deidentification.get('descriptions')}")
        lines += [f"  warning {w}" for w in self.warnings]
        if self.fatal:
            lines.append(f"  FATAL   {self.fatal}")
        return "\n".join(lines)


#: Report file at the store root, and the space it reserves at the start of a run so that a
#: run that fills the disk can still say so.
REPORT_NAME = "livercube-report.json"
REPORT_RESERVE = 64 * 1024


def _existing_fingerprint(store: StoreLocation, path: str) -> str | None:
    """Fingerprint of a complete volume already at ``path`` (None: absent or partial)."""
    import zarr

    try:
        group = store.open_root(mode="r", consolidated=False)[path]
    except (KeyError, FileNotFoundError, zarr.errors.GroupNotFoundError):
        return None
    meta = group.attrs.get("livercube", {}) if isinstance(group, zarr.Group) else {}
    record = CompletionRecord.of(meta)
    if record is None or meta.get("schema_version") != STORE_SCHEMA_VERSION:
        return None  # partial, or written to an older layout: convert again
    return record.fingerprint


def _volume_task(
    task: Any,
    store: StoreLocation,
    source_options: dict | None,
    overwrite: bool = False,
    chunking: Chunking = DEFAULT_CHUNKING,
) -> dict[str, Any]:
    """One volume on a worker: skip if already complete and unchanged, else decode and write.

    Input problems (:class:`SourceError`) come back as a ``skipped`` record.  Anything else
    propagates, so Dask retries the task (transient storage errors) and, if it keeps failing,
    the client quarantines this input with its traceback while the rest completes.
    """
    fingerprint = task.fingerprint
    path = task_path(task)
    if not overwrite and _existing_fingerprint(store, path) == fingerprint:
        return {"status": "unchanged", "input": task.key, "path": path}
    try:
        volume, skipped = task.read(source_options)
    except SourceError as exc:
        return {"status": "skipped", "input": exc.source, "reason": exc.reason}
    try:
        record = write_volume(store, volume, fingerprint=fingerprint, chunking=chunking)
    except ForeignFilesError as exc:
        return {"status": "skipped", "input": task.key, "reason": str(exc)}
    fault_point("volume-written")
    return {
        "status": "converted",
        "input": task.key,
        **record,
        "skipped": skipped,
        "notes": volume.meta.get("notes", []),
    }


def _client(scheduler: str, workers: int | None):
    """A distributed Client: an embedded process cluster (``local``) or a remote one.

    ``threads`` needs no cluster: :func:`run_tasks` runs its graph on Dask's threaded
    scheduler in this process.
    """
    import logging

    from distributed import Client, LocalCluster

    # the embedded cluster's INFO chatter (worker start/stop) is not for a converter's user
    logging.getLogger("distributed").setLevel(logging.WARNING)
    check_scheduler(scheduler)
    if scheduler.startswith(REMOTE_SCHEDULERS):
        return Client(scheduler)
    if scheduler != "local":
        raise UsageError(f"scheduler {scheduler!r} runs without a cluster")
    cluster = LocalCluster(
        n_workers=workers or 2, threads_per_worker=1, processes=True, dashboard_address=":0"
    )
    return Client(cluster)


REMOTE_SCHEDULERS = ("tcp://", "tls://", "ws://", "wss://")


@contextlib.contextmanager
def shared_client(scheduler: str, workers: int | None) -> Iterator[Any]:
    """The cluster a whole run uses for planning and volumes; ``None`` for ``threads``.

    With a process cluster or a remote one, header reading runs on its workers too and the
    cluster is started (or reached) once.  ``threads`` plans in this process (the same
    header tasks, run here) and runs the volume tasks on Dask's threaded scheduler.
    """
    if scheduler == "threads":
        yield None
        return
    with _client(scheduler, workers) as client:
        yield client


def planning_mapper(client: Any, *, progress: bool) -> Mapper | None:
    """Where planners run their per-file work: on ``client``'s workers, else here."""
    if client is None:
        return None
    return dask_map(client, name="headers", retries=TASK_RETRIES, progress=progress)


def check_scheduler(scheduler: str) -> None:
    """Reject a scheduler we cannot start or reach before anything is written."""
    if scheduler in ("threads", "local") or (
        scheduler.startswith(REMOTE_SCHEDULERS) and len(scheduler.split("://", 1)[1]) > 0
    ):
        return
    raise UsageError(f"unknown scheduler {scheduler!r}: use threads, local or tcp://HOST:PORT")


#: Dask retries per task: absorbs transient storage errors and lost workers.
TASK_RETRIES = 2


def run_tasks(
    fn: Callable,
    tasks: list[Any],
    args: tuple,
    *,
    scheduler: str,
    workers: int | None,
    progress: bool,
    client: Any = None,
) -> Generator[tuple[Any, dict[str, Any]], None, None]:
    """Map ``fn(task, *args)`` over tasks as a Dask graph; yields (task, record) as they end.

    ``threads``: Dask's threaded scheduler in this process (``workers`` threads); otherwise
    a distributed cluster, ``client`` if the run already holds one (:func:`shared_client`),
    else one started here.  A task that raised after its retries (or whose workers kept
    dying) yields a ``failed`` record with the error and traceback: one bad input never
    stops the others.
    """
    import sys

    from tqdm import tqdm

    if not tasks:
        return
    bar = tqdm(total=len(tasks), desc="convert", unit="vol", disable=not progress)
    if client is None and scheduler == "threads":
        # this process's threads: Dask's threaded scheduler, no cluster to start
        from livercube.local_graph import TaskFailure, run_threaded

        for i, result in run_threaded(
            fn, tasks, args, threads=workers or 2, retries=TASK_RETRIES, name="livercube"
        ):
            bar.update(1)
            if isinstance(result, TaskFailure):
                yield tasks[i], _failed(tasks[i], result.error, result.traceback)
            else:
                yield tasks[i], result
        bar.close()
        return

    from distributed import as_completed

    held = contextlib.nullcontext(client) if client is not None else _client(scheduler, workers)
    with held as client:
        # worker processes: cap their encode threads, let them recycle freed buffers
        from livercube.dask_plugins import EncodeThreads, ReuseFreedMemory

        for plugin in (EncodeThreads(), ReuseFreedMemory()):
            client.register_plugin(plugin, name=plugin.name)
        if progress and client.dashboard_link and scheduler.startswith(("tcp://", "tls://")):
            print(f"Dask dashboard: {client.dashboard_link}", file=sys.stderr)
        futures = client.map(
            fn,
            tasks,
            *[[a] * len(tasks) for a in args],
            key=[f"livercube-{task_path(t)}" for t in tasks],
            retries=TASK_RETRIES,
            pure=False,
        )
        task_of = {f.key: t for f, t in zip(futures, tasks, strict=True)}
        for fut in as_completed(futures):
            bar.update(1)
            task = task_of[fut.key]
            if fut.status == "finished":
                yield task, fut.result()
            else:
                tb = "".join(traceback.format_tb(fut.traceback())) if fut.traceback() else ""
                yield task, _failed(task, fut.exception(), tb)
            fut.release()
        bar.close()


def _failed(task: Any, exc: BaseException, tb: str) -> dict[str, Any]:
    """The report record of a task that raised after its retries."""
    return {
        "status": "failed",
        "input": task.key,
        "reason": f"{type(exc).__name__}: {exc}",
        "traceback": tb,
    }


def _prepare_root(store: StoreLocation, collection: str, clinical_columns: dict[str, Any]) -> None:
    root = store.open_root(mode="a")
    meta = dict(root.attrs.get("livercube", {}))
    meta["schema_version"] = STORE_SCHEMA_VERSION
    columns = dict(meta.get("clinical_columns", {}))
    columns[collection] = clinical_columns
    meta["clinical_columns"] = columns
    root.attrs["livercube"] = meta


def write_report(store: StoreLocation, report: ConvertReport, *, reserve: bool = False) -> str:
    """Write ``livercube-report.json``; ``reserve``: the placeholder at the start of a run.

    On local disk the placeholder is padded to :data:`REPORT_RESERVE` bytes, and the final
    report goes beside it and is swapped in; if the disk is full by then, a compact report
    overwrites the placeholder in place (no new blocks needed), so the report survives.
    """
    fs, path = store.filesystem()
    target = f"{path.rstrip('/')}/{REPORT_NAME}"
    if store.is_remote:
        with fs.open(target, "w") as f:
            f.write(report.to_json())
        return target
    if reserve:
        text = report.to_json(compact=True)
        with open(target, "w", encoding="utf-8") as f:
            f.write(text + " " * max(0, REPORT_RESERVE - len(text)))
        return target
    tmp = f"{target}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(report.to_json())
        os.replace(tmp, target)
    except OSError as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT) or not os.path.exists(target):
            raise
        size = os.path.getsize(target)
        text = report.to_json(compact=True)[:size]
        with open(target, "r+", encoding="utf-8") as f:
            f.write(text + " " * (size - len(text)))
    return target


def check_destination(store: StoreLocation) -> None:
    """Refuse destinations livercube must not write into, before writing anything.

    A regular file, or a folder (prefix) that holds files but is not a livercube store, is a
    usage error: livercube never deletes or overwrites what it did not write.  An object
    store that cannot be reached is named in one line instead of a client traceback.
    """
    dest = store.url
    if not store.is_remote:
        root = dest
        if os.path.exists(root) and not os.path.isdir(root):
            raise UsageError(f"destination {dest} is a file, not a store folder")
        if os.path.isdir(root):
            entries = sorted(e for e in os.listdir(root) if e != lease.LEASE_NAME)
            doc = os.path.join(root, "zarr.json")
            body = open(doc, "rb").read() if os.path.isfile(doc) else None  # noqa: SIM115
            _refuse_foreign(dest, entries, body)
        return
    fs, path = store.first_contact().filesystem()
    try:
        try:
            listed = fs.ls(path, detail=False, refresh=True)
        except FileNotFoundError:
            listed = []
            if store.is_s3:
                bucket = path.split("/", 1)[0]
                try:
                    fs.ls(bucket, detail=False, refresh=True)
                except FileNotFoundError:
                    raise UsageError(f"destination {dest}: no such bucket {bucket!r}") from None
        if not listed and fs.isfile(path):
            raise UsageError(f"destination {dest} is an object, not a store prefix")
        entries = sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in listed)
        entries = [e for e in entries if e != lease.LEASE_NAME]
        body = fs.cat_file(f"{path.rstrip('/')}/zarr.json") if "zarr.json" in entries else None
    except (UsageError, PermissionError):
        raise
    except Exception as exc:  # connection refused, DNS, TLS, auth: one line, not botocore's
        raise StoreError(f"cannot reach the object store at {store.endpoint}: {exc}") from exc
    _refuse_foreign(dest, entries, body)


def _refuse_foreign(dest: str, entries: list[str], root_doc: bytes | None) -> None:
    if not entries:
        return
    try:
        attrs = json.loads(root_doc).get("attributes", {}) if root_doc else {}
    except ValueError:
        attrs = {}
    if "livercube" in attrs:
        return
    shown = ", ".join(entries[:3]) + (", …" if len(entries) > 3 else "")
    raise UsageError(
        f"destination {dest} is not empty and not a livercube store (it holds {shown}); "
        "livercube does not write into folders it did not create: choose a new or empty one"
    )


def _hide_rewrites(store: StoreLocation, tasks: list[Any], overwrite: bool) -> set[str]:
    """Take volumes this run will replace out of the catalog before touching them.

    Replacing a volume deletes its group document first; a catalog that still listed it
    would send readers to a group without ``zarr.json`` until the run ends (or forever, if it
    is interrupted).  The catalog always lists complete volumes only.
    """
    existing, has_catalog = stored_volumes(store)
    current = {p: getattr(CompletionRecord.of(m), "fingerprint", None) for p, m in existing}
    paths = {task_path(t): t for t in tasks}
    doomed = {
        p for p, t in paths.items() if p in current and (overwrite or current[p] != t.fingerprint)
    }
    if doomed and has_catalog:
        write_catalog(store, exclude=doomed)
    return doomed


def _ran_out_of_space(rec: dict[str, Any]) -> bool:
    reason = str(rec.get("reason", ""))
    return (
        any(f"[Errno {n}]" in reason for n in (errno.ENOSPC, errno.EDQUOT))
        or "No space left on device" in reason
    )


def convert(
    source: str,
    dest: str,
    collection: str,
    *,
    clinical: str | None = None,
    overrides: str | None = None,
    storage_options: dict | None = None,
    source_options: dict | None = None,
    scheduler: str = "threads",
    workers: int | None = None,
    progress: bool = True,
    overwrite: bool = False,
    only: list[str] | None = None,
    where: str | None = None,
    keep_descriptions: bool = False,
    clinical_columns: list[str] | None = None,
    chunking: Chunking = DEFAULT_CHUNKING,
) -> ConvertReport:
    """Convert one collection at ``source`` into the store at ``dest``; returns the report.

    Re-runs are cheap and safe: a volume whose group is complete and whose source fingerprint
    is unchanged is left alone (``unchanged`` in the report); partial groups are redone.
    ``overwrite`` rewrites everything; ``only`` restricts the run to some patient ids.
    DICOM free-text descriptors are stored cleaned unless ``keep_descriptions``; clinical
    columns beyond the documented ones are stored only when named in ``clinical_columns``.
    ``chunking``: chunk and shard shapes of the volume arrays (the contract's by default).
    """
    check_collection(collection)
    check_scheduler(scheduler)
    # retries for flaky object storage on both ends; local paths are unaffected
    store = StoreLocation.of(dest, storage_options)
    source_options = with_retries(source, source_options) or None
    report = ConvertReport(
        collection, str(source), store.url, dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    )
    with shared_client(scheduler, workers) as client:
        return _plan_and_convert(
            report,
            store,
            clinical=clinical,
            overrides=overrides,
            source_options=source_options,
            scheduler=scheduler,
            workers=workers,
            progress=progress,
            overwrite=overwrite,
            only=only,
            where=where,
            keep_descriptions=keep_descriptions,
            clinical_columns=clinical_columns,
            client=client,
            chunking=chunking,
        )


def _plan_and_convert(
    report: ConvertReport,
    store: StoreLocation,
    *,
    clinical: str | None,
    overrides: str | None,
    source_options: dict | None,
    scheduler: str,
    workers: int | None,
    progress: bool,
    overwrite: bool,
    only: list[str] | None,
    where: str | None,
    keep_descriptions: bool,
    clinical_columns: list[str] | None,
    client: Any,
    chunking: Chunking,
) -> ConvertReport:
    """Plan (header reads on ``client``'s workers when there is one), then convert."""
    source, dest, collection = report.source, store.url, report.collection
    plan = plan_collection(
        source,
        collection,
        clinical=clinical,
        overrides=overrides,
        source_options=source_options,
        where=where,
        keep_descriptions=keep_descriptions,
        clinical_columns=clinical_columns,
        mapper=planning_mapper(client, progress=progress),
    )
    report.deidentification = dict(getattr(plan, "deidentification", None) or {})
    report.skipped.extend(plan.skipped)
    report.warnings.extend(plan.warnings)
    tasks = plan.tasks
    if only:
        wanted = set(only)
        unknown = wanted - {t.patient_id for t in tasks}
        if unknown:
            raise UsageError(f"--only: no such patient in {source}: {', '.join(sorted(unknown))}")
        tasks = [t for t in tasks if t.patient_id in wanted]

    check_destination(store)
    run = ConvertRun(
        report=report,
        tasks=tasks,
        clinical_columns=plan.clinical_columns,
        store=store,
        source_options=source_options,
        overwrite=overwrite,
        scheduler=scheduler,
        workers=workers,
        progress=progress,
        client=client,
        chunking=chunking,
    )
    try:
        return _convert_holding_lease(run)
    except OSError as exc:  # the disk filled up before the report or catalog could say so
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise StoreFullError(f"no space left on the device of {dest}: {exc.strerror}") from exc


@dataclass
class ConvertRun:
    """Everything one ``convert`` run writes with, decided before the lease is taken."""

    report: ConvertReport
    tasks: list[Any]
    clinical_columns: dict[str, Any]
    store: StoreLocation
    source_options: dict | None
    overwrite: bool
    scheduler: str
    workers: int | None
    progress: bool
    #: the cluster the plan was made on, reused for the volumes (None: threads)
    client: Any = None
    chunking: Chunking = DEFAULT_CHUNKING


def _convert_holding_lease(run: ConvertRun) -> ConvertReport:
    """Everything that writes: under the store's lease, report first, catalog last."""
    report, store = run.report, run.store
    with lease.held(store, purpose=f"livercube convert {report.collection}") as held:
        _prepare_root(store, report.collection, run.clinical_columns)
        write_report(store, report, reserve=True)
        _hide_rewrites(store, run.tasks, run.overwrite)
        _run(run)
        held.check()  # never rebuild the catalog over a run that took the store over
        fault_point("before-catalog")
        full = [r for r in report.failed if _ran_out_of_space(r)]
        try:
            write_catalog(store)
        except StoreFullError as exc:
            report.fatal = str(exc)
        if full and not report.fatal:
            report.fatal = (
                f"no space left on the device of {store}: {len(full)} volume(s) could not be "
                "written"
            )
        report.finished_at = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        write_report(store, report)
    return report


def _run(run: ConvertRun) -> None:
    """Run the volume tasks and sort their records into the report."""
    report = run.report
    records = run_tasks(
        _volume_task,
        run.tasks,
        (run.store, run.source_options, run.overwrite, run.chunking),
        scheduler=run.scheduler,
        workers=run.workers,
        progress=run.progress,
        client=run.client,
    )
    # closed on the way out, error or not: no task is left running after the run has let go
    # of its lease
    with contextlib.closing(records):
        _sort_records(report, records)
    report.converted.sort(key=lambda r: r["path"])


def _sort_records(report: ConvertReport, records: Iterable[tuple[Any, dict[str, Any]]]) -> None:
    """File each volume task's record under its outcome in the report."""
    for _task, rec in records:
        descriptors = getattr(_task, "descriptors", None)  # DICOM: messages may quote them
        if descriptors is not None:
            rec = descriptors.scrub_record(rec)
        status = rec.pop("status")
        if status == "converted":
            report.skipped.extend(rec.pop("skipped", []))
            report.warnings.extend(f"{rec['path']}: {n}" for n in rec.get("notes", []))
            report.converted.append(rec)
        elif status == "unchanged":
            report.unchanged.append(rec)
        elif status == "skipped":
            report.skipped.append(rec)
        else:
            report.failed.append(rec)
