"""Check a store against the written contract in ``schemas/`` (used by tests and ``verify``).

Returns a list of human-readable problems instead of raising on the first, so one run shows
everything that is wrong with a store.
"""

from __future__ import annotations

import json
from functools import cache
from typing import Any

import jsonschema
import numpy as np
import zarr

from livercube.schema import schemas_dir
from livercube.store.catalog import complete_volumes
from livercube.store.layout import open_root, volume_path


@cache
def _volume_schema() -> dict[str, Any]:
    return json.loads((schemas_dir() / "volume.schema.json").read_text())


@cache
def _catalog_spec() -> dict[str, Any]:
    return json.loads((schemas_dir() / "catalog.json").read_text())


def check_volume_group(path: str, group: zarr.Group) -> list[str]:
    """Problems with one complete volume group (metadata, arrays, coordinates)."""
    problems: list[str] = []
    meta = group.attrs.get("livercube", {})
    for err in jsonschema.Draft202012Validator(_volume_schema()).iter_errors(meta):
        where = "/".join(str(p) for p in err.absolute_path) or "(root)"
        problems.append(f"{path}: livercube.{where}: {err.message}")
    if problems:
        return problems
    expected = volume_path(meta["collection"], meta["patient_id"], meta["study"], meta["series"])
    if expected != path:
        problems.append(f"{path}: group path should be {expected}")
    shape = tuple(meta["shape_zyx"])
    arrays = {"image": np.dtype("int16")}
    if meta["annotated"]:
        arrays["label"] = np.dtype("uint8")
    for name, dtype in arrays.items():
        if name not in group:
            problems.append(f"{path}: array {name!r} missing")
            continue
        arr = group[name]
        if arr.shape != shape or arr.dtype != dtype:
            problems.append(f"{path}/{name}: {arr.dtype}{arr.shape}, expected {dtype}{shape}")
        if tuple(arr.metadata.dimension_names or ()) != ("z", "y", "x"):
            problems.append(f"{path}/{name}: dimension_names must be (z, y, x)")
        if arr.shards is None:
            problems.append(f"{path}/{name}: not sharded")
    if meta["annotated"] and "segments" not in group:
        problems.append(f"{path}: annotated but the segments bit field is missing")
    for axis, name in enumerate(("z", "y", "x")):
        if name not in group:
            problems.append(f"{path}: coordinate {name!r} missing")
            continue
        coord = np.asarray(group[name][...])
        want = meta["origin_zyx"][axis] + meta["spacing_zyx"][axis] * np.arange(shape[axis])
        if coord.shape != want.shape or not np.allclose(coord, want, atol=1e-6):
            problems.append(f"{path}: coordinate {name} disagrees with origin/spacing")
    ome = group.attrs.get("ome", {})
    if ome.get("version") != "0.5" or not ome.get("multiscales"):
        problems.append(f"{path}: missing OME-Zarr 0.5 multiscales metadata")
    return problems


def check_catalog(root: zarr.Group, n_volumes: int, url: str, storage_options=None) -> list[str]:
    import xarray as xr

    from livercube.store.layout import open_zarr_store

    spec = _catalog_spec()
    if spec["group"] not in root:
        return ["catalog group missing"]
    cat = xr.open_zarr(
        open_zarr_store(url, storage_options, read_only=True),
        group=spec["group"],
        zarr_format=3,
        consolidated=False,
    )
    problems = []
    if cat.sizes.get("volume", 0) != n_volumes:
        problems.append(
            f"catalog lists {cat.sizes.get('volume', 0)} volumes, store has {n_volumes}"
        )
    for name, (dims, kinds) in spec["variables"].items():
        if name not in cat:
            problems.append(f"catalog variable {name!r} missing")
        elif list(cat[name].dims) != dims or cat[name].dtype.kind not in kinds:
            problems.append(
                f"catalog {name}: {cat[name].dims} {cat[name].dtype}, expected {dims} {kinds}"
            )
    return problems


def check_store(url: str, storage_options: dict | None = None) -> list[str]:
    """Every contract problem of the store at ``url`` (empty list: the store conforms)."""
    root = open_root(url, storage_options, mode="r", consolidated=False)
    vols = complete_volumes(root)
    problems: list[str] = []
    for path, _ in vols:
        problems += check_volume_group(path, root[path])
    problems += check_catalog(root, len(vols), url, storage_options)
    return problems
