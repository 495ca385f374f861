"""Read side of the store contract: ``livercube.open(url).catalog / .volume() / .segments()``."""

from __future__ import annotations

import warnings
from functools import cached_property
from typing import Any

import numpy as np
import xarray as xr
import zarr
from zarr.core.sync import sync

from livercube.errors import StoreError, VolumeNotFoundError
from livercube.schema import CATALOG_GROUP
from livercube.store.layout import data_path
from livercube.store.location import StoreLocation
from livercube.volumes.volume import segment_mask, unique_segment_names


class Store:
    """A livercube store at a local path or fsspec URL (opened read-only).

    ``Store(url, **storage_options)`` or ``Store(location)``; the zarr store is opened once.
    The root group (consolidated when it can be) is read on first use: its document describes
    every volume of the store — megabytes and seconds of parsing with thousands of volumes —
    while the catalog has its own consolidated document, so ``store.catalog`` (and a sampler's
    start-up) reads neither the root nor any volume's metadata.
    """

    def __init__(self, where: str | StoreLocation, **storage_options: Any) -> None:
        self.location = StoreLocation.of(where, storage_options)
        self.url = self.location.url
        self._zstore = self.location.zarr_store(read_only=True)
        self._catalog_group = self._open_catalog_group()
        if self._catalog_group is None:
            self.root  # noqa: B018  (no catalog of its own: is there a store at all?)

    @property
    def storage_options(self) -> dict[str, Any]:
        """The options this store was opened with (livercube's retry policy included)."""
        return self.location.options

    def __repr__(self) -> str:
        return f"<livercube.Store {self.url} ({self.catalog.sizes.get('volume', 0)} volumes)>"

    @cached_property
    def root(self) -> zarr.Group:
        """The root group, from its consolidated metadata when it has some."""
        try:
            return self.location.open_root(mode="r", store=self._zstore)
        except (FileNotFoundError, zarr.errors.GroupNotFoundError) as exc:
            raise StoreError(f"no livercube store at {self.url}: {exc}") from exc

    def _open_catalog_group(self) -> zarr.Group | None:
        """The catalog group from its own consolidated document (one small request), or
        ``None`` when it has none (a store whose catalog predates it, or no catalog)."""
        try:
            return zarr.open_consolidated(self._zstore, path=CATALOG_GROUP, zarr_format=3, mode="r")
        except (FileNotFoundError, KeyError, ValueError, zarr.errors.GroupNotFoundError):
            return None

    @cached_property
    def catalog(self) -> xr.Dataset:
        """The catalog Dataset (dim ``volume``), loaded into memory (it is small).

        Its arrays are fetched concurrently: one round trip for all of them, not one each.
        """
        group = self._catalog_group
        if group is None:
            if CATALOG_GROUP not in self.root:
                raise StoreError(
                    f"{self.url} has no catalog group; run `livercube catalog {self.url}` to "
                    "rebuild it"
                )
            group = self.root[CATALOG_GROUP]
        # times are decoded after the load: decoding a lazy variable reads its first and last
        # element first, two more round trips before the concurrent one
        ds = xr.decode_cf(_load_concurrently(_dataset(group, chunks=None, decode_times=False)))
        # numpy StringDType -> object, so pandas, .astype(str) and older numpy code just work
        return ds.map(
            lambda v: v.astype(object) if v.dtype.kind == "T" else v, keep_attrs=True
        ).assign_coords({k: c.astype(object) for k, c in ds.coords.items() if c.dtype.kind == "T"})

    def paths(self) -> list[str]:
        return [str(p) for p in self.catalog["path"].values]

    def _path(self, key: str | int) -> str:
        paths = self.paths()
        if isinstance(key, (int, np.integer)):
            if not -len(paths) <= int(key) < len(paths):
                raise VolumeNotFoundError(
                    f"volume index {key} out of range (store has {len(paths)})"
                )
            return paths[int(key)]
        key = str(key).strip("/")
        if key not in paths:
            raise VolumeNotFoundError(f"no complete volume {key!r} in {self.url}")
        return key

    def volume(self, key: str | int) -> xr.Dataset:
        """One volume as a lazy xarray Dataset (``image``, ``label``, ``segments``, z/y/x in mm)."""
        return self._open_dataset(data_path(self._path(key)))

    @property
    def consolidated(self) -> bool:
        """Whether the root was opened from consolidated metadata (no listing needed)."""
        return self.root.metadata.consolidated_metadata is not None

    def _open_dataset(self, path: str) -> xr.Dataset:
        """The group at ``path`` as a lazy Dataset.

        With consolidated root metadata the group's array metadata is already in memory, so
        this costs no metadata request and needs no listing (plain HTTP hosting has none).
        Without it, the group is read as it is now (one document per array).
        """
        if self.consolidated:
            return _dataset(self.root[path], chunks={})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return xr.open_zarr(self._zstore, group=path, zarr_format=3, consolidated=False)

    def volume_attrs(self, key: str | int) -> dict[str, Any]:
        """The ``livercube`` metadata of one volume (provenance, flags, segment table)."""
        return dict(self.root[self._path(key)].attrs["livercube"])

    def segments(self, key: str | int) -> dict[str, np.ndarray]:
        """Every source segment of a volume as a boolean (z, y, x) mask, keyed by its label.

        Overlaps and separate tumour instances survive: each segment is its own bit.  Two
        segments with the same label get `` (2)``, `` (3)`` … suffixes in source order.
        """
        path = self._path(key)
        meta = self.root[path].attrs["livercube"]
        if not meta.get("segments"):
            return {}
        bits = np.asarray(self.root[data_path(path)]["segments"][...])
        names = unique_segment_names([seg["label"] for seg in meta["segments"]])
        return {
            name: segment_mask(bits, int(seg["bit"]))
            for name, seg in zip(names, meta["segments"], strict=True)
        }


def _dataset(group: zarr.Group, *, chunks: dict[str, Any] | None, **decode: Any) -> xr.Dataset:
    """An opened zarr group as a lazy Dataset (no metadata request: the group has it)."""
    from xarray.backends import ZarrStore

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        source = ZarrStore(group, mode="r", use_zarr_fill_value_as_mask=False)
        return xr.open_dataset(source, chunks=chunks, **decode)


def _load_concurrently(ds: xr.Dataset) -> xr.Dataset:
    """Load every variable of a lazily opened Dataset with all its reads in flight at once.

    ``Dataset.load`` reads the variables one after the other: over HTTP or S3 that is a round
    trip per array (the catalog has ~30).  ``load_async`` on zarr's own event loop gathers
    them; xarray releases without it fall back to the sequential load.
    """
    if not hasattr(ds, "load_async"):
        return ds.load()
    return sync(ds.load_async())


def open(where: str | StoreLocation, **storage_options: Any) -> Store:
    """Open a livercube store: ``livercube.open("s3://bucket/prefix", anon=True)``."""
    return Store(where, **storage_options)
