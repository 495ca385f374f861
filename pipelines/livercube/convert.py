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
from livercube.schema import COLLECTIONS, STORE_SCHEMA_VERSION
from livercube.store.catalog import write_catalog
from livercube.store.layout import filesystem, open_root
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
            f"{len(self.skipped)} inputs skipped, {len(self.failed)} failed -> {self.dest}"
        ]
        lines += [f"  SKIPPED {s['input']}: {s['reason']}" for s in self.skipped]
        lines += [f"  FAILED  {f['input']}: {f['reason']}" for f in self.failed]
        lines += [f"  warning {w}" for w in self.warnings]
        return "\n".join(lines)


def _volume_task(
    task: Any, dest: str, storage_options: dict | None, source_options: dict | None
) -> dict[str, Any]:
    """One volume: decode its sources, write its group, return a small record (on a worker)."""
    try:
        if hasattr(task, "acquisition"):
            from livercube.sources.dicom_collection import read_volume

            volume, skipped = read_volume(task, source_options)
            fingerprint, source = task.fingerprint, task.key
        else:
            from livercube.sources.plc_cect import read_volume

            volume, skipped = read_volume(task, source_options)
            fingerprint, source = f"plc-cect:{task.ct}", task.ct
        record = write_volume(
            dest, volume, storage_options=storage_options, fingerprint=fingerprint
        )
        return {
            "status": "converted",
            "input": source,
            **record,
            "skipped": skipped,
            "notes": volume.meta.get("notes", []),
        }
    except SourceError as exc:
        return {"status": "skipped", "input": exc.source, "reason": exc.reason}
    except Exception as exc:  # a bug or an unforeseen file: quarantine this input only
        return {
            "status": "failed",
            "input": getattr(task, "key", str(task)),
            "reason": f"{type(exc).__name__}: {exc}",
            "traceback": traceback.format_exc(),
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


def run_tasks(
    fn: Callable,
    tasks: list[Any],
    keys: list[str],
    args: tuple,
    *,
    scheduler: str,
    workers: int | None,
    progress: bool,
) -> Iterable[dict[str, Any]]:
    """Map ``fn(task, *args)`` over tasks on a Dask cluster; yields records as they finish."""
    from distributed import as_completed
    from tqdm import tqdm

    if not tasks:
        return
    with _client(scheduler, workers) as client:
        futures = client.map(fn, tasks, *[[a] * len(tasks) for a in args], key=keys, pure=False)
        bar = tqdm(total=len(futures), desc="convert", unit="vol", disable=not progress)
        for fut in as_completed(futures):
            bar.update(1)
            yield fut.result()
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
) -> ConvertReport:
    """Convert one collection at ``source`` into the store at ``dest``; returns the report."""
    if collection not in COLLECTIONS:
        raise UsageError(
            f"unknown collection {collection!r}; choose one of {', '.join(COLLECTIONS)}"
        )
    report = ConvertReport(
        collection, str(source), str(dest), dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    )
    if collection == "plc-cect":
        from livercube.sources import plc_cect

        plan = plc_cect.plan(
            source, clinical=clinical, overrides=overrides, storage_options=source_options
        )
    else:
        from livercube.sources import dicom_collection

        plan = dicom_collection.plan(
            source,
            collection,
            clinical=clinical,
            overrides=overrides,
            storage_options=source_options,
        )
    report.skipped.extend(plan.skipped)
    report.warnings.extend(plan.warnings)
    fn, tasks, columns = _volume_task, plan.tasks, plan.clinical_columns
    keys = [f"{collection}-{t.key}" for t in tasks]

    _prepare_root(dest, storage_options, collection, columns)
    for rec in run_tasks(
        fn,
        tasks,
        keys,
        (dest, storage_options, source_options),
        scheduler=scheduler,
        workers=workers,
        progress=progress,
    ):
        status = rec.pop("status")
        if status == "converted":
            report.skipped.extend(rec.pop("skipped", []))
            report.warnings.extend(f"{rec['path']}: {n}" for n in rec.get("notes", []))
            report.converted.append(rec)
        elif status == "skipped":
            report.skipped.append(rec)
        else:
            report.failed.append(rec)
    report.converted.sort(key=lambda r: r["path"])
    write_catalog(dest, storage_options)
    report.finished_at = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    write_report(dest, storage_options, report)
    return report
