"""A store volume as NIfTI-convention arrays: ``(i, j, k)`` data and a RAS affine.

What the MONAI reader and the TorchIO subject share: parsing ``"URL#path[:array]"``
references, keeping one opened store per URL, and reading an array with its geometry
(the same convention and affine as ``livercube export --format nifti``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from livercube.errors import UsageError
from livercube.export.geometry import ras_affine, to_ijk, volume_grid
from livercube.store.reader import Store

ARRAYS = ("image", "label")
_COLLAPSED_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):/(?!/)")


@dataclass
class LoadedVolume:
    """One array of one volume: ``data`` (i, j, k) = (x, y, z), ``affine`` to RAS mm."""

    data: np.ndarray
    affine: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)


def repair_url(url: str) -> str:
    """Undo ``pathlib.Path``'s collapsing of ``s3://b`` to ``s3:/b`` (MONAI's LoadImage passes
    file names through ``Path(...).expanduser()``)."""
    m = _COLLAPSED_SCHEME.match(url)
    if not m or len(m.group(1)) == 1:  # "C:/..." is a Windows drive, not a scheme
        return url
    rest = url[m.end() :]
    return f"{m.group(1)}:///{rest}" if m.group(1) == "file" else f"{m.group(1)}://{rest}"


def parse_ref(ref: Any, url: str | None, array: str) -> tuple[str, str, str]:
    """(store URL, volume path, array) of ``"URL#path"``, ``"URL#path:label"`` or ``"path"``
    (relative to ``url``).  Sanitized volume paths never contain ``#`` or ``:``."""
    text = str(ref)
    if "#" in text:
        base, _, frag = text.rpartition("#")
        base = repair_url(base)
    else:
        if url is None:
            raise UsageError(
                f"{text!r}: give 'STORE_URL#collection/patient/study/series' or open the "
                "reader with the store URL"
            )
        base, frag = str(url), text
    path, _, name = frag.partition(":")
    name = name or array
    if name not in ARRAYS:
        raise UsageError(f"{text!r}: array must be one of {', '.join(ARRAYS)}, not {name!r}")
    return base, path.strip("/"), name


class StoreCache:
    """One :class:`Store` per URL (opening one reads its catalog), dropped when pickled so a
    DataLoader worker opens its own."""

    def __init__(self, storage_options: dict[str, Any] | None = None) -> None:
        self.storage_options = dict(storage_options or {})
        self._stores: dict[str, Store] = {}

    def get(self, url: str) -> Store:
        if url not in self._stores:
            self._stores[url] = Store(url, **self.storage_options)
        return self._stores[url]

    def __getstate__(self) -> dict[str, Any]:
        return {"storage_options": self.storage_options, "_stores": {}}


def load_array(store: Store, path: str, array: str = "image") -> LoadedVolume:
    """Read ``array`` of the volume at ``path`` in NIfTI convention, with its RAS affine."""
    meta = store.volume_attrs(path)
    ds = store.volume(path)
    if array not in ds:
        raise UsageError(f"{path} has no {array!r} array (annotated: {meta.get('annotated')})")
    grid = volume_grid(meta)
    info = {
        "livercube_store": store.url,
        "livercube_path": path,
        "livercube_array": array,
        "collection": meta.get("collection"),
        "patient_id": meta.get("patient_id"),
        "phase": meta.get("phase"),
    }
    data = np.ascontiguousarray(to_ijk(ds[array].values))
    return LoadedVolume(data, ras_affine(grid), info)


__all__ = ["ARRAYS", "LoadedVolume", "StoreCache", "load_array", "parse_ref", "repair_url"]
