"""Rebuild the catalog (an xarray Dataset, dim ``volume``) from the volumes' own metadata.

The catalog is derived data: it is recomputed at the end of every conversion from the
``livercube`` attributes of all *complete* volume groups, so the store's truth lives in the
volumes and a lost or stale catalog can always be rebuilt (``livercube catalog URL``).
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import shutil
import uuid
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr
import zarr
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import MemoryStore

from livercube import registry
from livercube.errors import StoreError, StoreFullError
from livercube.schema import CATALOG_GROUP, STORE_SCHEMA_VERSION
from livercube.store.completion import is_complete
from livercube.store.layout import in_collection_tree
from livercube.store.location import StoreLocation

#: Prefix of clinical variables per collection (columns keep their names in ``source_column``).


def _collection_groups(root: zarr.Group) -> list[tuple[str, zarr.Group]]:
    """The top-level collection groups, without tripping over the store's other objects.

    With consolidated metadata zarr answers from memory (no listing: plain HTTP has none);
    otherwise the top level is listed and only names that are groups are opened, so the
    report, README and parquet beside them are not "unrecognized components".
    """
    if root.metadata.consolidated_metadata is not None:
        return [(k, g) for k, g in root.groups() if in_collection_tree(f"{k}/")]

    async def names() -> list[str]:
        return [k async for k in root.store.list_dir(root.path)]

    out = []
    for name in sorted(sync(names())):
        if in_collection_tree(f"{name}/"):
            try:
                node = root[name]
            except KeyError:
                continue
            if isinstance(node, zarr.Group):
                out.append((name, node))
    return out


def complete_volumes(root: zarr.Group) -> list[tuple[str, dict[str, Any]]]:
    """(path, livercube attrs) of every complete volume group, sorted by path."""
    found = []
    for collection, group in _collection_groups(root):
        for path, node in group.members(max_depth=None):
            if not isinstance(node, zarr.Group):
                continue
            meta = node.attrs.get("livercube")
            if is_complete(meta):
                found.append((f"{collection}/{path}", meta))
    return sorted(found, key=lambda item: item[0])


def _snake(name: str) -> str:
    out = "".join(ch.lower() if ch.isalnum() else "_" for ch in str(name)).strip("_")
    while "__" in out:
        out = out.replace("__", "_")
    return out or "column"


def _clinical_variables(
    metas: list[dict[str, Any]], columns: dict[str, dict[str, dict[str, Any]]]
) -> dict[str, tuple[np.ndarray, dict[str, Any]]]:
    """Typed clinical variables, one per (collection, column), NaN/'' where not applicable."""
    out: dict[str, tuple[np.ndarray, dict[str, Any]]] = {}
    n = len(metas)
    for collection, cols in columns.items():
        known = registry.canonical(collection)
        prefix = registry.get(known).catalog_prefix if known else _snake(collection) + "_"
        for col, spec in cols.items():
            name = prefix + _snake(col)
            kind = spec.get("dtype", "str")
            if kind == "float":
                values = np.full(n, np.nan)
            elif kind == "bool":
                values = np.zeros(n, dtype=bool)
            else:
                values = np.full(n, "", dtype=object)
            for i, m in enumerate(metas):
                if m["collection"] != collection:
                    continue
                v = (m.get("clinical") or {}).get(col)
                if v is None:
                    continue
                values[i] = bool(v) if kind == "bool" else (float(v) if kind == "float" else str(v))
            attrs = {"source_column": col, "collection": collection, "dtype": kind}
            attrs.update({k: v for k, v in spec.items() if k not in ("dtype",) and v is not None})
            out[name] = (values, attrs)
    return out


def build_catalog(vols: list[tuple[str, dict[str, Any]]], root_attrs: dict[str, Any]) -> xr.Dataset:
    """The catalog Dataset for complete volumes given as (path, livercube attrs)."""
    metas = [m for _, m in vols]
    n = len(metas)

    def col(key: str, default: Any = "", kind: type = str) -> np.ndarray:
        vals = [m.get(key) for m in metas]
        if kind is str:
            return np.array(["" if v is None else str(v) for v in vals], dtype=object)
        if kind is int:
            return np.array([-1 if v is None else int(v) for v in vals], dtype=np.int64)
        if kind is float:
            return np.array([np.nan if v is None else float(v) for v in vals], dtype=np.float64)
        return np.array([bool(v) for v in vals], dtype=bool)

    def triple(key: str, dtype: type) -> np.ndarray:
        return np.array([m[key] for m in metas], dtype=dtype).reshape(n, 3)

    dates = pd.to_datetime(
        pd.Series([m.get("study_date") or None for m in metas], dtype=object),
        errors="coerce",
        format="mixed",
    ).to_numpy(dtype="datetime64[ns]")
    data: dict[str, Any] = {
        "path": ("volume", np.array([p for p, _ in vols], dtype=object)),
        "collection": ("volume", col("collection")),
        "patient_id": ("volume", col("patient_id")),
        "study": ("volume", col("study")),
        "study_uid": ("volume", col("study_uid")),
        "study_date": ("volume", dates),
        "series": ("volume", col("series")),
        "series_uid": ("volume", col("series_uid")),
        "series_number": ("volume", col("series_number", kind=int)),
        "series_description": ("volume", col("series_description")),
        "acquisition_number": ("volume", col("acquisition_number", kind=int)),
        "phase": ("volume", col("phase")),
        "phase_evidence": ("volume", col("phase_evidence")),
        "spacing": (
            ("volume", "axis"),
            triple("spacing_zyx", np.float64),
            {"units": "mm", "long_name": "voxel spacing (z, y, x)"},
        ),
        "origin": (
            ("volume", "axis"),
            triple("origin_zyx", np.float64),
            {"units": "mm", "long_name": "LPS position of voxel (0, 0, 0)"},
        ),
        "extent": (("volume", "axis"), triple("shape_zyx", np.int64), {"units": "voxels"}),
        "annotated": ("volume", col("annotated", kind=bool)),
        "annotation_complete": (
            "volume",
            np.array(
                [bool(m.get("annotation_complete", m.get("annotated"))) for m in metas], dtype=bool
            ),
        ),
        "n_segments": (
            "volume",
            np.array([len(m.get("segments", [])) for m in metas], dtype=np.int64),
        ),
        "segment_labels": (
            "volume",
            np.array(
                ["|".join(s["label"] for s in m.get("segments", [])) for m in metas], dtype=object
            ),
        ),
        "intensity_exact": (
            "volume",
            np.array(
                [bool((m.get("intensity") or {}).get("exact", True)) for m in metas], dtype=bool
            ),
        ),
        "spacing_trusted": (
            "volume",
            np.array(
                [bool((m.get("geometry_flags") or {}).get("spacing_trusted", True)) for m in metas],
                dtype=bool,
            ),
        ),
        "checksum": ("volume", col("checksum")),
        "age": (
            "volume",
            np.array([np.nan if m.get("age") is None else float(m["age"]) for m in metas]),
            {"units": "years"},
        ),
        "sex": (
            "volume",
            np.array([m.get("sex") or "" for m in metas], dtype=object),
            {"coding": "male | female | '' unknown"},
        ),
    }
    columns = dict(root_attrs.get("livercube", {}).get("clinical_columns", {}))
    for name, (values, attrs) in _clinical_variables(metas, columns).items():
        data[name] = ("volume", values, attrs)
    coords = {"axis": (("axis",), np.array(["z", "y", "x"], dtype=object))}
    ds = xr.Dataset(_variables(data), coords=_variables(coords))
    ds.attrs = {"livercube_schema_version": STORE_SCHEMA_VERSION, "n_volumes": n}
    return ds


def _variables(spec: dict[str, tuple]) -> dict[str, xr.Variable]:
    """``(dims, numpy array[, attrs])`` entries as ready-made xarray Variables.

    Handed plain tuples, xarray checks every column for a dask array, which imports
    ``dask.array`` (and scipy) on first use: ~0.4 CPU s, a tenth of a one-volume ``convert``
    run.  The columns here are numpy arrays of their final dtype already, so the conversion
    that check guards has nothing to do.
    """
    out = {}
    for name, (dims, values, *attrs) in spec.items():
        if not isinstance(values, np.ndarray):
            raise TypeError(f"catalog column {name!r} must be a numpy array")
        dims = (dims,) if isinstance(dims, str) else tuple(dims)
        out[name] = xr.Variable(dims, values, attrs[0] if attrs else None, fastpath=True)
    return out


async def _metadata_documents(store: zarr.abc.store.Store) -> dict[str, Any]:
    """Every ``zarr.json`` in the store, fetched concurrently after one recursive listing."""
    fs = getattr(store, "fs", None)
    if fs is not None:  # fsspec caches listings per instance: a second rebuild must see now
        fs.invalidate_cache()
    keys = [k async for k in store.list() if k == "zarr.json" or k.endswith("/zarr.json")]
    proto = default_buffer_prototype()
    sem = asyncio.Semaphore(32)

    async def get(key: str):
        async with sem:
            return key, await store.get(key, prototype=proto)

    return {k: v for k, v in await asyncio.gather(*(get(k) for k in keys)) if v is not None}


def volumes_from_documents(docs: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(path, livercube attrs) of every complete volume group among metadata documents."""
    found = []
    for key, buf in docs.items():
        path = key.removesuffix("zarr.json").rstrip("/")
        if not in_collection_tree(key):
            continue
        doc = json.loads(buf.to_bytes())
        meta = (
            doc.get("attributes", {}).get("livercube") if doc.get("node_type") == "group" else None
        )
        if is_complete(meta):
            found.append((path, meta))
    return sorted(found, key=lambda item: item[0])


def stored_volumes(
    where: str | StoreLocation, storage_options: dict[str, Any] | None = None
) -> tuple[list[tuple[str, dict[str, Any]]], bool]:
    """Complete volumes now in the store (path, livercube attrs), and whether it has a catalog."""
    docs = sync(_metadata_documents(StoreLocation.of(where, storage_options).zarr_store()))
    return volumes_from_documents(docs), f"{CATALOG_GROUP}/zarr.json" in docs


async def _replace_catalog_remote(store, objects: dict[str, Any], root_doc, old: set[str]) -> None:
    """Object storage: overwrite in place, metadata after data, root last, stale keys after.

    Each PUT is atomic and nothing is deleted before the new catalog is whole, so an
    interrupted rebuild leaves a catalog (old or new rows), never none.
    """
    sem = asyncio.Semaphore(16)

    async def put(key: str, value) -> None:
        async with sem:
            await store.set(key, value)

    def is_meta(key: str) -> bool:
        return key == "zarr.json" or key.endswith("/zarr.json")

    await asyncio.gather(
        *(put(f"{CATALOG_GROUP}/{k}", v) for k, v in objects.items() if not is_meta(k))
    )
    await asyncio.gather(
        *(put(f"{CATALOG_GROUP}/{k}", v) for k, v in objects.items() if is_meta(k))
    )
    await store.set("zarr.json", root_doc)
    new = {f"{CATALOG_GROUP}/{k}" for k in objects}
    for key in sorted(old - new):
        await store.delete(key)


#: Errors that mean "the destination is full" (device or quota).
_FULL = (errno.ENOSPC, errno.EDQUOT)


def _swap_local_catalog(root: Path, objects: dict[str, Any], root_doc) -> None:
    """Local disk: write the new catalog beside the old one, then swap it in by renames.

    If the disk fills up (or anything fails) while writing, the half-written copy is removed
    and the previous catalog and root document are untouched.
    """
    tag = uuid.uuid4().hex[:12]
    new, old = root / f".{CATALOG_GROUP}-new-{tag}", root / f".{CATALOG_GROUP}-old-{tag}"
    root_tmp = root / f".zarr.json-{tag}.tmp"
    try:
        for key, value in objects.items():
            target = new / key
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(value.to_bytes())
        root_tmp.write_bytes(root_doc.to_bytes())
    except OSError as exc:
        shutil.rmtree(new, ignore_errors=True)
        root_tmp.unlink(missing_ok=True)
        if exc.errno in _FULL:
            raise StoreFullError(
                f"no space left on the device of {root} while writing the catalog; "
                "the previous catalog is kept"
            ) from exc
        raise
    current = root / CATALOG_GROUP
    if current.exists():
        current.rename(old)
    new.rename(current)
    os.replace(root_tmp, root / "zarr.json")
    shutil.rmtree(old, ignore_errors=True)


def _is_store_document(key: str) -> bool:
    """Metadata that belongs in the consolidated root: root, catalog, collections (no debris)."""
    return key == "zarr.json" or key.startswith(f"{CATALOG_GROUP}/") or in_collection_tree(key)


def write_catalog(
    where: str | StoreLocation,
    storage_options: dict[str, Any] | None = None,
    *,
    exclude: frozenset[str] | set[str] = frozenset(),
) -> xr.Dataset:
    """Rebuild the catalog from the volumes' metadata, write it, consolidate the root.

    ``exclude``: volume paths left out of the catalog and the consolidated metadata although
    complete now — a run about to rewrite them hides them first, so no reader is sent to a
    group that is being replaced.

    Cost on object storage: one recursive listing, one GET per metadata document, one PUT per
    catalog object and one for the root.  The catalog group's ``zarr.json`` consolidates the
    catalog's own arrays, so readers of the catalog need not fetch the root document (whose
    size grows with every volume in the store).  Consolidation runs on an in-memory mirror of the
    metadata documents (public zarr API), so it needs no second walk of the bucket.
    """
    loc = StoreLocation.of(where, storage_options)
    store = loc.zarr_store()
    docs = sync(_metadata_documents(store))
    if "zarr.json" not in docs:
        raise StoreError(f"{loc}: no zarr root group (nothing converted yet?)")
    root_attrs = json.loads(docs["zarr.json"].to_bytes()).get("attributes", {})
    hidden = tuple(f"{p}/" for p in exclude)
    docs = {k: v for k, v in docs.items() if _is_store_document(k) and not k.startswith(hidden)}
    ds = build_catalog(volumes_from_documents(docs), root_attrs)

    catalog_objects: dict[str, Any] = {}
    mirror = {k: v for k, v in docs.items() if not k.startswith(f"{CATALOG_GROUP}/")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # the catalog group carries its own consolidated metadata: a reader opens it with one
        # small request instead of the root document, which describes every volume
        ds.to_zarr(MemoryStore(catalog_objects), mode="w", zarr_format=3, consolidated=True)
        for k, v in catalog_objects.items():
            if k == "zarr.json" or k.endswith("/zarr.json"):
                mirror[f"{CATALOG_GROUP}/{k}"] = v
        zarr.consolidate_metadata(MemoryStore(mirror), zarr_format=3)
    if not loc.is_remote:
        _swap_local_catalog(Path(loc.url), catalog_objects, mirror["zarr.json"])
    else:
        old = sync(_catalog_keys(store))
        sync(_replace_catalog_remote(store, catalog_objects, mirror["zarr.json"], old))
    return ds


async def _catalog_keys(store) -> set[str]:
    return {k async for k in store.list_prefix(f"{CATALOG_GROUP}/")}
