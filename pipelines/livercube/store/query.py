"""The one catalog query language: pandas ``query`` expressions over the flat catalog table.

``livercube info --where``, ``livercube ls --where``, ``preview --where``, the Parquet
catalog of ``publish`` and ``PatchSampler(where=…)`` all see the same table, so an expression
that works in one works everywhere: 1-D catalog variables by name (``phase``, ``annotated``,
``age``, ``hcc_*`` …) and (volume, axis) variables split per axis (``spacing_z``,
``origin_y``, ``extent_x`` …), e.g. ``"annotated and spacing_z < 5"``.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

from livercube.errors import UsageError

_UNDEFINED = re.compile(r"name '([^']+)' is not defined")


class QueryError(UsageError):
    """A ``--where`` / ``where=`` expression cannot be evaluated on the catalog."""


def catalog_frame(catalog: xr.Dataset) -> pd.DataFrame:
    """The catalog as a flat table: one row per volume, in catalog order (RangeIndex).

    (volume, axis) variables become ``<name>_z``, ``<name>_y``, ``<name>_x`` columns; text
    columns are ``str``.  ``path``, ``collection``, ``patient_id`` come first.
    """
    columns: dict[str, Any] = {}
    for name, var in catalog.data_vars.items():
        if var.dims == ("volume",):
            columns[str(name)] = var.values
        elif var.dims == ("volume", "axis"):
            for i, axis in enumerate(catalog["axis"].values):
                columns[f"{name}_{axis}"] = var.values[:, i]
    frame = pd.DataFrame(columns)
    for col in frame.columns:
        if frame[col].dtype == object:
            frame[col] = frame[col].astype(str)
    first = [c for c in ("path", "collection", "patient_id") if c in frame.columns]
    return frame[first + [c for c in frame.columns if c not in first]]


def select(frame: pd.DataFrame, where: str | None) -> pd.DataFrame:
    """Rows of ``frame`` matching ``where`` (all rows when empty), index kept.

    Raises :class:`QueryError` naming the unknown column and listing the available ones, or
    quoting pandas' complaint for any other invalid expression.
    """
    if not where or not where.strip():
        return frame
    try:
        mask = frame.eval(where, engine="python")
    except Exception as exc:
        match = _UNDEFINED.search(str(exc))
        if match:
            raise QueryError(
                f"where {where!r}: the catalog has no column {match.group(1)!r}; "
                f"available: {', '.join(map(str, frame.columns))}"
            ) from exc
        reason = " ".join(str(exc).split())  # one line, whatever pandas says
        raise QueryError(f"where {where!r}: {type(exc).__name__}: {reason}") from exc
    if not (isinstance(mask, pd.Series) and pd.api.types.is_bool_dtype(mask)):
        # e.g. where="spacing_z": a value per row, not a yes/no per row
        raise QueryError(f"where {where!r}: not a condition on catalog rows (true/false)")
    return frame[mask].copy()  # callers add display columns


def select_indices(catalog: xr.Dataset, where: str | None) -> np.ndarray:
    """Catalog positions (``volume`` indices) of the volumes matching ``where``."""
    frame = catalog_frame(catalog)
    return select(frame, where).index.to_numpy()
