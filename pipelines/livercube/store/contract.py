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
from livercube.store.layout import FULL_RES, volume_path
from livercube.store.location import StoreLocation
from livercube.store.pyramid import image_level_path


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
    if FULL_RES not in group or not isinstance(group[FULL_RES], zarr.Group):
        return [*problems, f"{path}: full-resolution group {FULL_RES!r} missing"]
    data = group[FULL_RES]
    arrays = {"image": np.dtype("int16")}
    if meta["annotated"]:
        arrays["label"] = np.dtype("uint8")
    for name, dtype in arrays.items():
        if name not in data:
            problems.append(f"{path}: array {FULL_RES}/{name} missing")
            continue
        arr = data[name]
        if arr.shape != shape or arr.dtype != dtype:
            problems.append(
                f"{path}/{FULL_RES}/{name}: {arr.dtype}{arr.shape}, expected {dtype}{shape}"
            )
        if tuple(arr.metadata.dimension_names or ()) != ("z", "y", "x"):
            problems.append(f"{path}/{FULL_RES}/{name}: dimension_names must be (z, y, x)")
        if arr.shards is None:
            problems.append(f"{path}/{FULL_RES}/{name}: not sharded")
    if meta["annotated"] and "segments" not in data:
        problems.append(f"{path}: annotated but the segments bit field is missing")
    for axis, name in enumerate(("z", "y", "x")):
        if name not in data:
            problems.append(f"{path}: coordinate {name!r} missing")
            continue
        coord = np.asarray(data[name][...])
        want = meta["origin_zyx"][axis] + meta["spacing_zyx"][axis] * np.arange(shape[axis])
        if coord.shape != want.shape or not np.allclose(coord, want, atol=1e-6):
            problems.append(f"{path}: coordinate {name} disagrees with origin/spacing")
    problems += _check_ome(path, group)
    problems += [f"{path}{p}" for p in dimension_conflicts(group)]
    return problems


def _check_ome(path: str, group: zarr.Group) -> list[str]:
    """OME-Zarr 0.5 image: multiscales whose level 0 is the data, every level present."""
    ome = group.attrs.get("ome", {})
    if ome.get("version") != "0.5" or not ome.get("multiscales"):
        return [f"{path}: missing OME-Zarr 0.5 multiscales metadata"]
    problems = []
    datasets = [d["path"] for d in ome["multiscales"][0].get("datasets", [])]
    if not datasets or datasets[0] != image_level_path(0):
        problems.append(f"{path}: OME level 0 must be {image_level_path(0)!r}, not {datasets[:1]}")
    for p in datasets:
        if p not in group or not isinstance(group[p], zarr.Array):
            problems.append(f"{path}: OME level {p!r} missing")
    channels = (ome.get("omero") or {}).get("channels") or [{}]
    if "window" not in channels[0]:
        problems.append(f"{path}: no omero display window")
    return problems


def dimension_conflicts(group: zarr.Group, inherited: dict[str, int] | None = None) -> list[str]:
    """Where ``group``'s tree breaks ``xarray.open_datatree`` (sub-paths with a leading ``/``).

    A DataTree node is one Dataset: every array in a group, and every array below it, must
    give a dimension name the same length.  Levels of different sizes may only be siblings.
    """
    dims = dict(inherited or {})
    problems = []
    for name, arr in group.arrays():
        for dim, size in zip(arr.metadata.dimension_names or (), arr.shape, strict=False):
            if dims.setdefault(dim, size) != size:
                problems.append(f"/{name}: {dim}={size} conflicts with {dim}={dims[dim]} above")
    for name, child in group.groups():
        problems += [f"/{name}{p}" for p in dimension_conflicts(child, dims)]
    return problems


def check_catalog(root: zarr.Group, n_volumes: int, loc: StoreLocation) -> list[str]:
    import xarray as xr

    spec = _catalog_spec()
    if spec["group"] not in root:
        return ["catalog group missing"]
    cat = xr.open_zarr(
        loc.zarr_store(read_only=True),
        group=spec["group"],
        zarr_format=3,
        consolidated=False,
    )
    problems = catalog_consolidation(loc, spec["group"], {str(k) for k in cat.variables})
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


def catalog_consolidation(loc: StoreLocation, group: str, arrays: set[str]) -> list[str]:
    """Whether the catalog group's own document consolidates exactly the catalog's arrays.

    Readers open the catalog from that document alone (one small request); without it they
    fall back to the root document, whose size grows with every volume in the store.
    """
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync

    raw = sync(loc.zarr_store(read_only=True).get(f"{group}/zarr.json", default_buffer_prototype()))
    own = json.loads(raw.to_bytes()).get("consolidated_metadata") if raw is not None else None
    if not own:
        return ["catalog group has no consolidated metadata of its own"]
    listed = set((own.get("metadata") or {}).keys())
    if listed != arrays:
        return [
            f"catalog consolidated metadata is stale: lists {sorted(listed ^ arrays)} "
            "differently from the group"
        ]
    return []


def check_store(
    where: str | StoreLocation, storage_options: dict | None = None
) -> list[str]:
    """Every contract problem of the store at ``where`` (empty list: the store conforms)."""
    loc = StoreLocation.of(where, storage_options)
    root = loc.open_root(mode="r", consolidated=False)
    vols = complete_volumes(root)
    problems: list[str] = []
    for path, _ in vols:
        problems += check_volume_group(path, root[path])
    problems += check_catalog(root, len(vols), loc)
    return problems
