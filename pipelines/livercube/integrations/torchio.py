"""A TorchIO ``Subject`` from a store volume: ``image`` (ScalarImage, HU) and ``label``
(LabelMap, unified labels) with the store's geometry as a RAS affine, data (1, x, y, z) —
the same tensors and affine TorchIO reads from ``livercube export --format nifti``'s files.
"""

from __future__ import annotations

from typing import Any

import torch
import torchio as tio

from livercube.integrations.volumes import load_array
from livercube.store.reader import Store


def subject(
    store: Store | str, path: str | int, *, storage_options: dict[str, Any] | None = None
) -> tio.Subject:
    """``tio.Subject(image=…, label=…)`` of one volume (``label`` only when annotated).

    ``store`` is a :class:`livercube.Store` or a URL; ``path`` a volume path or catalog index.
    The subject also carries ``path``, ``collection``, ``patient_id`` and ``phase``.
    """
    if not isinstance(store, Store):
        store = Store(str(store), **(storage_options or {}))
    if not isinstance(path, str):
        path = store.paths()[int(path)]
    img = load_array(store, path, "image")
    fields: dict[str, Any] = {
        "image": tio.ScalarImage(tensor=torch.from_numpy(img.data[None]), affine=img.affine),
        **{k: img.meta[k] for k in ("collection", "patient_id", "phase")},
        "path": path,
    }
    if "label" in store.volume(path):
        lab = load_array(store, path, "label")
        fields["label"] = tio.LabelMap(tensor=torch.from_numpy(lab.data[None]), affine=lab.affine)
    return tio.Subject(**fields)


__all__ = ["subject"]
