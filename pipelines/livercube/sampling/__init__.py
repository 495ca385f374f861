"""Patch sampling and streaming: reproducible random 3-D patches from any store.

* :class:`PatchSampler` — chooses volumes by a catalog expression, samples uniform,
  foreground-oversampled or class-weighted patches, multi-phase channels and optional target
  spacing; a torch-free NumPy iterator (``for sample in sampler``, ``sampler.batches(n)``).
* :class:`ShardReader` — the engine under it: cached shard indexes, coalesced concurrent
  ranged reads, threaded decode, optional chunk cache.
* ``PatchIterableDataset`` / ``PatchDataset`` — PyTorch datasets (torch imported only when
  these names are used).
"""

from livercube.sampling.arrays import ArrayInfo
from livercube.sampling.plan import Box
from livercube.sampling.reader import ShardReader
from livercube.sampling.sampler import PAD_VALUE, PatchSampler, PatchSpec, catalog_frame, collate

__all__ = [
    "PAD_VALUE",
    "ArrayInfo",
    "Box",
    "PatchDataset",
    "PatchIterableDataset",
    "PatchSampler",
    "PatchSpec",
    "ShardReader",
    "catalog_frame",
    "collate",
]


def __getattr__(name: str):
    if name in ("PatchIterableDataset", "PatchDataset"):
        from livercube.sampling import datasets

        return getattr(datasets, name)
    raise AttributeError(f"module 'livercube.sampling' has no attribute {name!r}")
