"""Conversion as a Dask graph: plan from headers/file names, one task per volume, catalog last.

Each task reads one volume's sources, writes only its own group and returns a small record;
no task holds more than one volume and nothing big travels back to the client.  The catalog
and consolidated metadata are rebuilt at the end from the volumes' own metadata.
"""

from __future__ import annotations

import datetime as dt
import json
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from livercube.errors import SourceError, UsageError
from livercube.faults import fault_point
from livercube.schema import COLLECTIONS, STORE_SCHEMA_VERSION
from livercube.store.catalog import write_catalog
from livercube.store.layout import filesystem, open_root, with_retries
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

    @property
    def exit_code(self) -> int:
        return EXIT_PARTIAL if (self.skipped or self.failed) else EXIT_OK

    def to_json(self) -> str:
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
            )
        }
        body["exit_code"] = self.exit_code
        return json.dumps(body, indent=2, default=str)

    def summary(self) -> str:
        lines = [
            f"{self.collection}: {len(self.converted)} volumes converted, "
            f"{len(self.unchanged)} unchanged, {len(self.skipped)} inputs skipped, "
            f"{len(self.failed)} failed -> {self.dest}"
        ]
        lines += [f"  SKIPPED {s['input']}: {s['reason']}" for s in self.skipped]
        lines += [f"  FAILED  {f['input']}: {f['reason']}" for f in self.failed]
        lines += [f"  warning {w}" for w in self.warnings]
        return "\n".join(lines)


def _existing_fingerprint(dest: str, storage_options: dict | None, path: str) -> str | None:
    """Fingerprint of a complete volume already at ``path`` (None: absent or partial)."""
    import zarr

    try:
        group = open_root(dest, storage_options, mode="r", consolidated=False)[path]
    except (KeyError, FileNotFoundError, zarr.errors.GroupNotFoundError):
        return None
    meta = group.attrs.get("livercube", {}) if isinstance(group, zarr.Group) else {}
    if meta.get("status") != "complete":
        return None
    return (meta.get("complete") or {}).get("fingerprint")


def _volume_task(
    task: Any,
    dest: str,
    storage_options: dict | None,
    source_options: dict | None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """One volume on a worker: skip if already complete and unchanged, else decode and write.

    Input problems (:class:`SourceError`) come back as a ``skipped`` record.  Anything else
    propagates, so Dask retries the task (transient storage errors) and, if it keeps failing,
    the client quarantines this input with its traceback while the rest completes.
    """
    fingerprint = task.fingerprint
    if (
        not overwrite
        and _existing_fingerprint(dest, storage_options, task.store_path) == fingerprint
    ):
        return {"status": "unchanged", "input": task.key, "path": task.store_path}
    try:
        volume, skipped = task.read(source_options)
    except SourceError as exc:
        return {"status": "skipped", "input": exc.source, "reason": exc.reason}
    record = write_volume(dest, volume, storage_options=storage_options, fingerprint=fingerprint)
    fault_point("volume-written")
    return {
        "status": "converted",
        "input": task.key,
        **record,
        "skipped": skipped,
        "notes": volume.meta.get("notes", []),
    }


def _client(scheduler: str, workers: int | None):
    """A distributed Client: embedded threads, an embedded process cluster, or a remote one."""
    import logging

    from distributed import Client, LocalCluster

    # the embedded cluster's INFO chatter (worker start/stop) is not for a converter's user
    logging.getLogger("distributed").setLevel(logging.WARNING)
    if scheduler.startswith(("tcp://", "tls://", "ws://")):
        return Client(scheduler)
    n = workers or 2
    if scheduler == "threads":
        cluster = LocalCluster(
            n_workers=1, threads_per_worker=n, processes=False, dashboard_address=":0"
        )
    elif scheduler == "local":
        cluster = LocalCluster(
            n_workers=n, threads_per_worker=1, processes=True, dashboard_address=":0"
        )
    else:
        raise UsageError(f"unknown scheduler {scheduler!r}: use threads, local or tcp://HOST:PORT")
    return Client(cluster)


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
) -> Iterable[tuple[Any, dict[str, Any]]]:
    """Map ``fn(task, *args)`` over tasks on a Dask cluster; yields (task, record) as they end.

    A task that raised after its retries (or whose workers kept dying) yields a ``failed``
    record with the error and traceback: one bad input never stops the others.
    """
    import sys

    from distributed import as_completed
    from tqdm import tqdm

    if not tasks:
        return
    with _client(scheduler, workers) as client:
        if scheduler != "threads":  # worker processes: cap their encode threads
            from livercube.dask_plugins import EncodeThreads

            client.register_plugin(EncodeThreads(), name=EncodeThreads.name)
        if progress and client.dashboard_link and scheduler.startswith(("tcp://", "tls://")):
            print(f"Dask dashboard: {client.dashboard_link}", file=sys.stderr)
        futures = client.map(
            fn,
            tasks,
            *[[a] * len(tasks) for a in args],
            key=[f"livercube-{t.store_path}" for t in tasks],
            retries=TASK_RETRIES,
            pure=False,
        )
        task_of = {f.key: t for f, t in zip(futures, tasks, strict=True)}
        bar = tqdm(total=len(futures), desc="convert", unit="vol", disable=not progress)
        for fut in as_completed(futures):
            bar.update(1)
            task = task_of[fut.key]
            if fut.status == "finished":
                yield task, fut.result()
            else:
                exc = fut.exception()
                tb = "".join(traceback.format_tb(fut.traceback())) if fut.traceback() else ""
                yield (
                    task,
                    {
                        "status": "failed",
                        "input": task.key,
                        "reason": f"{type(exc).__name__}: {exc}",
                        "traceback": tb,
                    },
                )
            fut.release()
        bar.close()


def _prepare_root(
    dest: str, storage_options: dict | None, collection: str, clinical_columns: dict[str, Any]
) -> None:
    root = open_root(dest, storage_options, mode="a")
    meta = dict(root.attrs.get("livercube", {}))
    meta["schema_version"] = STORE_SCHEMA_VERSION
    columns = dict(meta.get("clinical_columns", {}))
    columns[collection] = clinical_columns
    meta["clinical_columns"] = columns
    root.attrs["livercube"] = meta


def write_report(dest: str, storage_options: dict | None, report: ConvertReport) -> str:
    fs, path = filesystem(dest, storage_options)
    target = f"{path.rstrip('/')}/livercube-report.json"
    with fs.open(target, "w") as f:
        f.write(report.to_json())
    return target


def check_collection(collection: str) -> None:
    """Reject an unknown collection name before any I/O, naming the valid ones."""
    if collection not in COLLECTIONS:
        raise UsageError(
            f"unknown collection {collection!r}; choose one of {', '.join(COLLECTIONS)}"
        )


def plan_collection(
    source: str,
    collection: str,
    *,
    clinical: str | None = None,
    overrides: str | None = None,
    source_options: dict | None = None,
) -> Any:
    """Plan a collection from headers and file names only: tasks, skipped inputs, warnings.

    One entry point so that ``convert`` and ``verify --source`` see exactly the same tasks.
    """
    check_collection(collection)
    if collection == "plc-cect":
        from livercube.sources import plc_cect

        return plc_cect.plan(
            source, clinical=clinical, overrides=overrides, storage_options=source_options
        )
    from livercube.sources import dicom_collection

    return dicom_collection.plan(
        source, collection, clinical=clinical, overrides=overrides, storage_options=source_options
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
) -> ConvertReport:
    """Convert one collection at ``source`` into the store at ``dest``; returns the report.

    Re-runs are cheap and safe: a volume whose group is complete and whose source fingerprint
    is unchanged is left alone (``unchanged`` in the report); partial groups are redone.
    ``overwrite`` rewrites everything; ``only`` restricts the run to some patient ids.
    """
    check_collection(collection)
    # retries for flaky object storage on both ends; local paths are unaffected
    storage_options = with_retries(dest, storage_options) or None
    source_options = with_retries(source, source_options) or None
    report = ConvertReport(
        collection, str(source), str(dest), dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    )
    plan = plan_collection(
        source, collection, clinical=clinical, overrides=overrides, source_options=source_options
    )
    report.skipped.extend(plan.skipped)
    report.warnings.extend(plan.warnings)
    tasks, columns = plan.tasks, plan.clinical_columns
    if only:
        wanted = set(only)
        unknown = wanted - {t.patient_id for t in tasks}
        if unknown:
            raise UsageError(f"--only: no such patient in {source}: {', '.join(sorted(unknown))}")
        tasks = [t for t in tasks if t.patient_id in wanted]

    _prepare_root(dest, storage_options, collection, columns)
    for _task, rec in run_tasks(
        _volume_task,
        tasks,
        (dest, storage_options, source_options, overwrite),
        scheduler=scheduler,
        workers=workers,
        progress=progress,
    ):
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
    report.converted.sort(key=lambda r: r["path"])
    write_catalog(dest, storage_options)
    report.finished_at = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    write_report(dest, storage_options, report)
    return report
