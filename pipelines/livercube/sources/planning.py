"""Planning a conversion: which collection, which tasks — one entry point for every caller.

``convert`` and ``verify --source`` must see exactly the same tasks, so both plan here; the
collection's own planner comes from the registry.
"""

from __future__ import annotations

from livercube import registry
from livercube.errors import UsageError
from livercube.fanout import Mapper
from livercube.sources.plan import Plan
from livercube.store.location import StoreLocation, is_remote


def check_input_file(path: str | None, option: str, storage_options: dict | None) -> None:
    if not path:
        return
    fs, p = StoreLocation.of(path, storage_options if is_remote(path) else None).filesystem()
    if not fs.isfile(p):
        raise UsageError(f"{option} {path}: no such file")


def check_collection(collection: str) -> None:
    """Reject an unknown collection name before any I/O, naming the valid ones."""
    if collection not in registry.ids():
        raise UsageError(
            f"unknown collection {collection!r}; choose one of {', '.join(registry.ids())}"
        )


def plan_collection(
    source: str,
    collection: str,
    *,
    clinical: str | None = None,
    overrides: str | None = None,
    source_options: dict | None = None,
    where: str | None = None,
    keep_descriptions: bool = False,
    clinical_columns: list[str] | None = None,
    mapper: Mapper | None = None,
) -> Plan:
    """Plan a collection from headers and file names only: tasks, skipped inputs, warnings.

    One entry point so that ``convert`` and ``verify --source`` see exactly the same tasks.
    ``where`` selects series of an ``idc://`` source from the IDC index; ``mapper`` runs
    the per-file work (header reads) on a cluster (``convert.planning_mapper``), else here.
    """
    check_collection(collection)
    check_input_file(overrides, "--overrides", source_options)
    return registry.get(collection).plan(
        source,
        clinical=clinical,
        overrides=overrides,
        storage_options=source_options,
        where=where,
        keep_descriptions=keep_descriptions,
        clinical_columns=tuple(clinical_columns or ()),
        mapper=mapper,
    )
