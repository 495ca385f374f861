"""Rebuild the catalog (an xarray Dataset, dim ``volume``) from the volumes' own metadata.

The catalog is derived data: it is recomputed at the end of every conversion from the
``livercube`` attributes of all *complete* volume groups, so the store's truth lives in the
volumes and a lost or stale catalog can always be rebuilt (``livercube catalog URL``).
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr
import zarr

from livercube.schema import CATALOG_GROUP, COLLECTIONS, STORE_SCHEMA_VERSION
from livercube.store.layout import open_root, open_zarr_store

#: Prefix of clinical variables per collection (columns keep their names in ``source_column``).
CLINICAL_PREFIX = {"hcc-tace-seg": "hcc_", "crlm": "crlm_", "plc-cect": "plc_"}


def complete_volumes(root: zarr.Group) -> list[tuple[str, dict[str, Any]]]:
    """(path, livercube attrs) of every complete volume group, sorted by path."""
    found = []
    for collection in COLLECTIONS:
        if collection not in root:
            continue
        for path, node in root[collection].members(max_depth=None):
            if not isinstance(node, zarr.Group):
                continue
            meta = node.attrs.get("livercube")
            if isinstance(meta, dict) and meta.get("status") == "complete":
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
        prefix = CLINICAL_PREFIX.get(collection, _snake(collection) + "_")
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


def build_catalog(root: zarr.Group) -> xr.Dataset:
    """The catalog Dataset for all complete volumes under ``root``."""
    vols = complete_volumes(root)
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
    columns = dict(root.attrs.get("livercube", {}).get("clinical_columns", {}))
    for name, (values, attrs) in _clinical_variables(metas, columns).items():
        data[name] = ("volume", values, attrs)
    ds = xr.Dataset(data, coords={"axis": np.array(["z", "y", "x"], dtype=object)})
    ds.attrs = {"livercube_schema_version": STORE_SCHEMA_VERSION, "n_volumes": n}
    return ds


def write_catalog(url: str, storage_options: dict[str, Any] | None = None) -> xr.Dataset:
    """Rebuild and write the catalog group, then consolidate the root metadata."""
    root = open_root(url, storage_options, mode="a")
    ds = build_catalog(root)
    if CATALOG_GROUP in root:
        del root[CATALOG_GROUP]
    store = open_zarr_store(url, storage_options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.to_zarr(store, group=CATALOG_GROUP, mode="w", zarr_format=3, consolidated=False)
        zarr.consolidate_metadata(store, zarr_format=3)
    return ds
