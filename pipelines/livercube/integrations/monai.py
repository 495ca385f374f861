"""A MONAI ``ImageReader`` for store volumes.

>>> from monai.transforms import LoadImaged
>>> from livercube.integrations.monai import LivercubeReader
>>> load = LoadImaged(["image", "label"], reader=LivercubeReader())
>>> item = load({"image": "s3://bucket/lc#plc-cect/P0001/CECT/C1",
...              "label": "s3://bucket/lc#plc-cect/P0001/CECT/C1:label"})

A reference is ``"URL#path"`` (``:label`` picks the label; default the reader's ``array``), or
a bare volume path when the reader was given ``url``.  The MetaTensor is what MONAI's
NibabelReader makes of ``livercube export --format nifti``'s file: data in (i, j, k) = (x, y, z)
order, ``affine`` to RAS millimetres, ``space`` RAS, the stored dtype before LoadImage's cast.
A list of references stacks as channels (first dim), like the other MONAI readers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from monai.data import ImageReader
from monai.utils import MetaKeys, SpaceKeys, ensure_tuple

from livercube.integrations.volumes import ARRAYS, LoadedVolume, StoreCache, load_array, parse_ref


class LivercubeReader(ImageReader):
    """Reads ``image`` or ``label`` of a livercube store volume (local, s3://, https://)."""

    def __init__(
        self,
        url: str | None = None,
        array: str = "image",
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if array not in ARRAYS:
            raise ValueError(f"array must be one of {ARRAYS}, not {array!r}")
        self.url, self.array = url, array
        self._stores = StoreCache(storage_options)

    def verify_suffix(self, filename: Sequence[Any] | Any) -> bool:
        """Store references carry ``#`` (or are paths into the reader's own store)."""
        return all(self.url is not None or "#" in str(f) for f in ensure_tuple(filename))

    def read(self, data: Sequence[Any] | Any, **kwargs: Any) -> list[LoadedVolume]:
        out = []
        for ref in ensure_tuple(data):
            url, path, array = parse_ref(ref, self.url, self.array)
            out.append(load_array(self._stores.get(url), path, array))
        return out

    def get_data(self, img: Any) -> tuple[np.ndarray, dict]:
        vols = list(ensure_tuple(img))
        first = vols[0]
        meta: dict[str, Any] = dict(first.meta)
        meta[MetaKeys.AFFINE] = first.affine.copy()
        meta[MetaKeys.ORIGINAL_AFFINE] = first.affine.copy()
        meta[MetaKeys.SPATIAL_SHAPE] = np.asarray(first.data.shape)
        meta[MetaKeys.SPACE] = SpaceKeys.RAS
        if len(vols) == 1:
            meta[MetaKeys.ORIGINAL_CHANNEL_DIM] = float("nan")  # MONAI's "no channel"
            return first.data, meta
        for v in vols[1:]:
            if v.data.shape != first.data.shape or not np.allclose(v.affine, first.affine):
                raise ValueError(
                    f"{v.meta['livercube_path']} is not on the grid of "
                    f"{first.meta['livercube_path']}: stack phases resampled onto one grid "
                    "(livercube export --format nnunet --phases, or the PatchSampler)"
                )
        meta[MetaKeys.ORIGINAL_CHANNEL_DIM] = 0
        return np.stack([v.data for v in vols]), meta


__all__ = ["LivercubeReader"]
