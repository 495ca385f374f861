"""PyTorch datasets over a :class:`~livercube.sampling.PatchSampler` (torch imported lazily).

``PatchIterableDataset`` — endless (or ``samples_per_epoch``) stream for
``DataLoader(num_workers=N, persistent_workers=…)`` and DDP: each worker reads the blocks of
``block`` positions with ``block_index % N == worker`` of its rank's stream, so with
``block = batch_size`` the DataLoader returns positions 0, 1, 2, … in order and
``dataset.load_state_dict({"position": consumed})`` resumes with the identical continuation
(with any number of workers).

``PatchDataset`` — map-style: item ``i`` is the patch at position ``i`` (use with any sampler,
e.g. ``DistributedSampler``; prefetching is then the DataLoader's job).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from livercube.sampling.sampler import PatchSampler


def _to_torch(sample: dict[str, Any]) -> dict[str, Any]:
    import torch

    return {
        k: torch.from_numpy(np.ascontiguousarray(v)) if isinstance(v, np.ndarray) else v
        for k, v in sample.items()
    }


def _torch_data():
    import torch.utils.data as tud

    return tud


def _make_iterable():
    tud = _torch_data()

    class PatchIterableDataset(tud.IterableDataset):
        """Patches of ``sampler`` as a torch ``IterableDataset`` (see the module docstring)."""

        def __init__(
            self,
            sampler: PatchSampler,
            *,
            block: int = 1,
            samples_per_epoch: int | None = None,
        ) -> None:
            super().__init__()
            self.sampler = sampler
            self.block = max(1, int(block))
            self.samples_per_epoch = samples_per_epoch
            self.position = sampler.position
            self.epoch = 0

        def set_epoch(self, epoch: int) -> None:
            """Epoch of the next ``iter()`` (each ``iter()`` then advances it by one)."""
            self.epoch = int(epoch)

        def state_dict(self) -> dict[str, int]:
            return {"seed": self.sampler.seed, "position": self.position, "epoch": self.epoch}

        def load_state_dict(self, state: dict[str, int]) -> None:
            self.sampler.seed = int(state.get("seed", self.sampler.seed))
            self.position = int(state["position"])
            self.epoch = int(state.get("epoch", self.epoch))

        def __iter__(self):
            info = tud.get_worker_info()
            worker, n = (0, 1) if info is None else (info.id, info.num_workers)
            start, stop = self.position, None
            if self.samples_per_epoch:
                start = max(start, self.epoch * self.samples_per_epoch)
                stop = (self.epoch + 1) * self.samples_per_epoch
            self.epoch += 1
            positions = self.sampler.positions(
                start, stop, worker=worker, num_workers=n, block=self.block
            )
            for sample in self.sampler.iter_positions(positions):
                yield _to_torch(sample)

    return PatchIterableDataset


def _make_map():
    tud = _torch_data()

    class PatchDataset(tud.Dataset):
        """Map-style: item ``i`` is the patch at position ``i`` of the sampler's stream."""

        def __init__(self, sampler: PatchSampler, length: int) -> None:
            self.sampler = sampler
            self.length = int(length)

        def __len__(self) -> int:
            return self.length

        def __getitem__(self, i: int) -> dict[str, Any]:
            if not 0 <= i < self.length:
                raise IndexError(i)
            return _to_torch(self.sampler.patch(int(i)))

    return PatchDataset


_CLASSES: dict[str, type] = {}


def __getattr__(name: str):
    makers = {"PatchIterableDataset": _make_iterable, "PatchDataset": _make_map}
    if name in makers:
        if name not in _CLASSES:
            cls = makers[name]()
            cls.__module__ = __name__
            cls.__qualname__ = name
            _CLASSES[name] = cls
        return _CLASSES[name]
    raise AttributeError(name)
