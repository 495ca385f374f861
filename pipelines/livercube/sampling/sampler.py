"""Reproducible random 3-D patches (image + label) from a livercube store.

Every patch is a pure function of ``(seed, index)``: its random generator is
``numpy.random.default_rng([seed, index])``.  A *stream* is a sequence of positions
``p = 0, 1, 2, …``; the patch at position ``p`` of rank ``r`` of ``W`` ranks has global index
``p·W + r``, so ranks never share a patch, and DataLoader workers split a rank's positions in
blocks (worker ``w`` of ``N`` takes the blocks ``b`` with ``b mod N == w``; with
``block = batch_size`` the DataLoader's round-robin returns positions in order).  The state of a
stream is ``{seed, position}``: resuming at a position continues identically, with any number
of workers.

Geometry: stored volumes are canonical LPS grids (``coord = origin + index · spacing`` per
axis, no rotation), so physical resampling is separable per axis.  Multi-phase patches
resample the other phases of the same study (nearest or linear, geometry only, no
registration) onto the annotated reference volume's patch grid; voxels outside a volume get
``pad_value`` (image, default −1024 HU — air) and 0 (label).  With linear interpolation the
samples within one voxel of a border blend with ``pad_value``.
"""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from livercube.errors import StoreError, VolumeIncompleteError
from livercube.sampling.arrays import ArrayInfo
from livercube.sampling.plan import Box
from livercube.sampling.reader import ShardReader
from livercube.store.completion import is_complete
from livercube.store.layout import data_path
from livercube.store.query import catalog_frame, select

MODES = ("uniform", "foreground", "class_weighted")
PAD_VALUE = -1024


class VolumeArrays:
    """Array metadata of the selected volumes, read on first use of each volume.

    Start-up reads the catalog only: with thousands of volumes, reading every volume's
    ``zarr.json`` files (and checking its completion record) before the first patch would
    cost a request per file over HTTP or S3 and seconds of parsing.  A volume's group and
    array metadata are fetched together in one concurrent round when a patch first needs it.
    """

    def __init__(self, reader: ShardReader) -> None:
        self.reader = reader
        self._cache: dict[str, dict[str, ArrayInfo | None]] = {}
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        return {"reader": self.reader, "_cache": dict(self._cache)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def get(self, vol: VolumeInfo) -> dict[str, ArrayInfo | None]:
        hit = self._cache.get(vol.path)
        if hit is None:
            hit = self._load(vol)
            with self._lock:
                self._cache[vol.path] = hit
        return hit

    def _load(self, vol: VolumeInfo) -> dict[str, ArrayInfo | None]:
        url, arrays = self.reader.url, data_path(vol.path)
        keys = [f"{vol.path}/zarr.json"] + [f"{arrays}/{n}/zarr.json" for n in ARRAYS]
        group, *metas = self.reader.fetch_objects(keys)
        if group is None:
            raise VolumeIncompleteError(
                f"{url}: the catalog lists {vol.path!r} but the store has no such volume "
                f"group; rebuild the catalog with `livercube catalog {url}`"
            )
        record = (json.loads(group).get("attributes") or {}).get("livercube") or {}
        if not is_complete(record):
            raise VolumeIncompleteError(
                f"{url}: volume {vol.path!r} has no completion record (status "
                f"{record.get('status', 'missing')!r}): its write never finished; re-convert it"
            )
        out: dict[str, ArrayInfo | None] = {
            name: None
            if raw is None
            else ArrayInfo.from_metadata(f"{arrays}/{name}", json.loads(raw))
            for name, raw in zip(ARRAYS, metas, strict=True)
        }
        image = out["image"]
        if image is None or image.shape != vol.shape:
            raise StoreError(
                f"{url}: the catalog says volume {vol.path!r} is {vol.shape} voxels but its "
                f"image array is {None if image is None else image.shape}: the catalog is "
                f"stale; rebuild it with `livercube catalog {url}`"
            )
        return out


#: the arrays of a volume's full-resolution group the sampler reads
ARRAYS = ("image", "label", "class_locations")


@dataclass(frozen=True, eq=False)
class VolumeInfo:
    """One selected volume: catalog facts now, array metadata (``image``, ``label``,
    ``locations``) on first access."""

    path: str
    collection: str
    patient_id: str
    study: str
    phase: str
    shape: tuple[int, int, int]
    spacing: np.ndarray  # (3,) mm, z y x
    origin: np.ndarray  # (3,) LPS mm of voxel (0, 0, 0)
    annotated: bool
    arrays: VolumeArrays = field(repr=False)

    @property
    def image(self) -> ArrayInfo:
        return self.arrays.get(self)["image"]  # type: ignore[return-value]

    @property
    def label(self) -> ArrayInfo | None:
        return self.arrays.get(self)["label"]

    @property
    def locations(self) -> ArrayInfo | None:
        return self.arrays.get(self)["class_locations"]


@dataclass(frozen=True)
class PatchSpec:
    """Where one patch comes from (all integers in the reference volume's index space)."""

    index: int  # global index: the patch is a pure function of (seed, index)
    position: int  # position in this rank's stream
    volume: int  # index into PatchSampler.volumes
    start: tuple[int, int, int]  # reference-grid start of the patch (may be negative)
    size: tuple[int, int, int]  # reference-grid size (== patch_size without target spacing)
    cls: int  # class the patch is centred on; -1 = uniform
    anchor: tuple[int, int, int]  # the voxel it is centred on (uniform: patch centre)


def _runtime_rank() -> tuple[int, int]:
    """(rank, world size) from torch.distributed if torch is already imported and initialized."""
    torch = sys.modules.get("torch")
    if torch is not None:
        dist = getattr(torch, "distributed", None)
        if dist is not None and dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
    return 0, 1


class PatchSampler:
    """Endless, reproducible random patches from the volumes a catalog expression selects.

    >>> sampler = PatchSampler(store, where="annotated and phase == 'portal_venous'",
    ...                        patch_size=(64, 96, 96), mode="foreground",
    ...                        foreground_fraction=0.33, seed=0)
    >>> batch = next(sampler.batches(2))        # {"image": (2, C, 64, 96, 96), "label": …}

    ``store``: a :class:`livercube.Store` or URL.  ``where``: a pandas ``query`` over the
    catalog (``spacing_z``/``origin_x``/``extent_y`` for the per-axis columns).  ``mode``:
    ``uniform``; ``foreground`` (a fraction of patches centred on a stored ``class_locations``
    voxel of a randomly chosen present class, nnU-Net style); ``class_weighted``
    (``class_weights={class: weight}``, class 0 = a uniform patch, weights renormalised over
    the classes present in the volume).  ``phases``: channel list, e.g.
    ``["arterial", "portal_venous"]`` — every phase of the same (collection, patient, study)
    resampled onto the reference volume's grid; ``missing_phase="skip"`` drops reference
    volumes whose study lacks one, ``"pad"`` fills that channel with ``pad_value``.
    ``spacing``: optional target voxel size (mm) — patches are then resampled on the fly.
    ``rank``/``world_size``: distributed split (default: torch.distributed if initialised).
    ``prefetch``: patches read concurrently by the iterators.

    Start-up reads the catalog only (its cost does not grow with the number of volumes); a
    volume's metadata and completion record are read when a patch first needs it, so a
    volume whose write never finished raises :class:`VolumeIncompleteError` then.

    Samples are dicts of NumPy arrays: ``image`` (C, z, y, x) — int16 HU when no
    interpolation is involved, float32 otherwise — ``label`` (1, z, y, x) uint8, and
    ``index``, ``position``, ``volume`` (path), ``start``, ``cls``, ``anchor``.
    """

    def __init__(
        self,
        store: Any,
        *,
        where: str | None = None,
        patch_size: Sequence[int] = (64, 96, 96),
        mode: str = "uniform",
        foreground_fraction: float = 0.33,
        class_weights: dict[int, float] | None = None,
        phases: Sequence[str] | None = None,
        missing_phase: str = "skip",
        spacing: Sequence[float] | None = None,
        interpolation: str = "linear",
        pad_value: float = PAD_VALUE,
        labels: bool = True,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        prefetch: int = 8,
        reader: ShardReader | None = None,
        storage_options: dict[str, Any] | None = None,
        **reader_options: Any,
    ) -> None:
        from livercube.store.reader import Store

        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
        if mode == "class_weighted" and not class_weights:
            raise ValueError("mode='class_weighted' needs class_weights={class: weight}")
        if interpolation not in ("nearest", "linear"):
            raise ValueError("interpolation must be 'nearest' or 'linear'")
        if missing_phase not in ("skip", "pad"):
            raise ValueError("missing_phase must be 'skip' or 'pad'")
        if not isinstance(store, Store):
            store = Store(store, **(storage_options or {}))  # a URL or a StoreLocation
        self.location = store.location
        self.url, self.storage_options = store.url, dict(store.storage_options)
        self.patch_size = tuple(int(s) for s in patch_size)
        if len(self.patch_size) != 3 or min(self.patch_size) < 1:
            raise ValueError("patch_size must be three positive integers (z, y, x)")
        self.mode = mode
        self.foreground_fraction = float(foreground_fraction)
        self.class_weights = {int(k): float(v) for k, v in (class_weights or {}).items()}
        self.phases = list(phases) if phases else None
        self.missing_phase = missing_phase
        self.spacing = None if spacing is None else np.asarray(spacing, dtype=float)
        self.interpolation = interpolation
        self.pad_value = pad_value
        self.labels = labels
        self.seed = int(seed)
        if rank is None or world_size is None:
            r, w = _runtime_rank()
            rank = r if rank is None else rank
            world_size = w if world_size is None else world_size
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.rank, self.world_size = int(rank), int(world_size)
        self.prefetch = max(1, int(prefetch))
        self.position = 0
        self.reader = reader or ShardReader(self.location, **reader_options)
        self._locations: dict[int, tuple[np.ndarray, dict[int, np.ndarray]]] = {}
        self._pool: ThreadPoolExecutor | None = None
        self._select(store, where)
        resampled = self.spacing is not None or self.phases is not None
        self.image_dtype = np.dtype(
            np.float32 if resampled and interpolation == "linear" else np.int16
        )

    # -- selection ------------------------------------------------------------------------------
    def _select(self, store, where: str | None) -> None:
        """Volumes and channels from the catalog alone (no volume metadata is read here).

        The catalog's columns are turned into plain arrays once and a :class:`VolumeInfo` is
        made only for a volume the sampler uses: per-row ``DataFrame.iloc`` cost ~0.7 ms a
        volume, seconds for a catalog of thousands.
        """
        df = catalog_frame(store.catalog)
        chosen = select(df, where)
        if not len(chosen):
            raise ValueError(f"no volume matches where={where!r}")
        arrays = VolumeArrays(self.reader)
        text = {
            k: [str(v) for v in df[k].tolist()]
            for k in ("path", "collection", "patient_id", "study", "phase")
        }
        extent = df[[f"extent_{a}" for a in "zyx"]].to_numpy(dtype=np.int64)
        spacing = df[[f"spacing_{a}" for a in "zyx"]].to_numpy(dtype=float)
        origin = df[[f"origin_{a}" for a in "zyx"]].to_numpy(dtype=float)
        annotated = df["annotated"].to_numpy(dtype=bool)
        infos: dict[int, VolumeInfo] = {}

        def info(row: int) -> VolumeInfo:
            if row not in infos:
                infos[row] = VolumeInfo(
                    path=text["path"][row],
                    collection=text["collection"][row],
                    patient_id=text["patient_id"][row],
                    study=text["study"][row],
                    phase=text["phase"][row],
                    shape=tuple(int(e) for e in extent[row]),  # type: ignore[arg-type]
                    spacing=spacing[row].copy(),
                    origin=origin[row].copy(),
                    annotated=bool(annotated[row]),
                    arrays=arrays,
                )
            return infos[row]

        self.volumes: list[VolumeInfo] = []
        self.channels: list[list[VolumeInfo | None]] = []
        studies: dict[tuple[str, str, str], list[int]] = {}
        if self.phases is not None:
            keys = zip(text["collection"], text["patient_id"], text["study"], strict=True)
            for i, key in enumerate(keys):
                studies.setdefault(tuple(key), []).append(i)  # type: ignore[arg-type]
        for row in df.index.get_indexer(chosen.index):
            row = int(row)
            if self.labels and not annotated[row] and self.mode != "uniform":
                continue  # foreground sampling needs an annotated reference
            ref = info(row)
            if self.phases is None:
                chans: list[VolumeInfo | None] = [ref]
            else:
                same = studies[(ref.collection, ref.patient_id, ref.study)]
                chans = []
                for ph in self.phases:
                    if ph == ref.phase:
                        chans.append(ref)
                        continue
                    cands = sorted((i for i in same if text["phase"][i] == ph), key=str)
                    chans.append(info(cands[0]) if cands else None)
                if None in chans and self.missing_phase == "skip":
                    continue
            self.volumes.append(ref)
            self.channels.append(chans)
        if not self.volumes:
            raise ValueError(f"no usable volume matches where={where!r} for mode={self.mode!r}")

    # -- state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, int]:
        return {
            "seed": self.seed,
            "position": self.position,
            "rank": self.rank,
            "world_size": self.world_size,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.seed = int(state.get("seed", self.seed))
        self.position = int(state["position"])

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_pool"] = None
        return state

    # -- patch geometry -------------------------------------------------------------------------
    def global_index(self, position: int) -> int:
        return position * self.world_size + self.rank

    def _ref_size(self, vol: VolumeInfo) -> tuple[int, int, int]:
        if self.spacing is None:
            return self.patch_size  # type: ignore[return-value]
        eff = np.maximum(1, np.round(np.array(self.patch_size) * self.spacing / vol.spacing))
        return tuple(int(e) for e in eff)  # type: ignore[return-value]

    def class_locations(self, volume: int) -> tuple[np.ndarray, dict[int, np.ndarray]]:
        """(present foreground classes, {class: (n, 3) z y x}) of one selected volume."""
        if volume not in self._locations:
            vol = self.volumes[volume]
            if vol.locations is None or vol.locations.shape[0] == 0:
                rows = np.zeros((0, 4), dtype=np.int32)
            else:
                rows = self.reader.read(vol.locations, (0, 0), vol.locations.shape)
            by = {int(c): rows[rows[:, 0] == c, 1:] for c in np.unique(rows[:, 0]) if c > 0}
            self._locations[volume] = (np.array(sorted(by), dtype=int), by)
        return self._locations[volume]

    def spec(self, position: int) -> PatchSpec:
        """The patch at ``position`` of this rank's stream (no data read)."""
        index = self.global_index(position)
        rng = np.random.default_rng([self.seed, index])
        v = int(rng.integers(len(self.volumes)))
        vol = self.volumes[v]
        size = self._ref_size(vol)
        cls = -1
        if self.mode != "uniform":
            present, by = self.class_locations(v)
            if self.mode == "foreground":
                if len(present) and rng.random() < self.foreground_fraction:
                    cls = int(present[rng.integers(len(present))])
            else:
                cands = [0, *present.tolist()]
                w = np.array([self.class_weights.get(c, 0.0) for c in cands])
                if w.sum() > 0:
                    c = cands[int(rng.choice(len(cands), p=w / w.sum()))]
                    cls = -1 if c == 0 else c
        shape = np.array(vol.shape)
        sz = np.array(size)
        lo, hi = np.minimum(0, shape - sz), np.maximum(0, shape - sz)
        if cls < 0:
            start = np.array([rng.integers(a, b + 1) for a, b in zip(lo, hi, strict=True)])
            anchor = start + sz // 2
        else:
            locs = by[cls]
            anchor = locs[rng.integers(len(locs))].astype(int)
            start = np.clip(anchor - sz // 2, lo, hi)
        return PatchSpec(
            index=index,
            position=position,
            volume=v,
            start=tuple(int(s) for s in start),  # type: ignore[arg-type]
            size=tuple(int(s) for s in size),  # type: ignore[arg-type]
            cls=cls,
            anchor=tuple(int(a) for a in anchor),  # type: ignore[arg-type]
        )

    def _grid_mm(self, spec: PatchSpec) -> list[np.ndarray]:
        """Physical (LPS mm) coordinates of the output patch's voxel centres, per axis."""
        vol = self.volumes[spec.volume]
        out = []
        for d in range(3):
            if self.spacing is None:
                idx = spec.start[d] + np.arange(self.patch_size[d])
                out.append(vol.origin[d] + idx * vol.spacing[d])
            else:
                centre = vol.origin[d] + (spec.start[d] + (spec.size[d] - 1) / 2) * vol.spacing[d]
                k = np.arange(self.patch_size[d]) - (self.patch_size[d] - 1) / 2
                out.append(centre + k * self.spacing[d])
        return out

    # -- reading --------------------------------------------------------------------------------
    def read(self, spec: PatchSpec) -> dict[str, Any]:
        """Read the patch a spec describes."""
        vol = self.volumes[spec.volume]
        plans: list[tuple[str, Any]] = []  # ("direct", None) | ("resample", axis plans)
        boxes: list[Box] = []
        n_img = len(self.channels[spec.volume])
        # the image channels are read straight into the batch array (cast there when float)
        image = np.empty((n_img, *self.patch_size), self.image_dtype)
        direct = self.spacing is None
        grid = None if direct else self._grid_mm(spec)
        targets: list[tuple[VolumeInfo | None, ArrayInfo | None, Any, str]] = [
            (ch, None if ch is None else ch.image, self.pad_value, self.interpolation)
            for ch in self.channels[spec.volume]
        ]
        if self.labels:
            targets.append((vol, vol.label, 0, "nearest"))
        for ch, arr, fill, order in targets:
            if ch is None or arr is None:
                plans.append(("missing", fill))
                continue
            if ch is vol and direct:
                out = image[len(plans)] if len(plans) < n_img else None
                boxes.append(Box(arr, spec.start, self.patch_size, fill, out))
                plans.append(("direct", None))
                continue
            if grid is None:
                grid = self._grid_mm(spec)
            axes = [_axis_plan(grid[d], ch.origin[d], ch.spacing[d], order) for d in range(3)]
            start = tuple(a[0] for a in axes)
            size = tuple(a[1] for a in axes)
            boxes.append(Box(arr, start, size, fill))
            plans.append(("resample", axes))
        data = iter(self.reader.read_boxes(boxes))
        results = []
        for i, (kind, extra) in enumerate(plans):
            if kind == "missing":
                results.append(np.full(self.patch_size, extra, dtype=np.float32))
            elif kind == "direct":
                results.append(next(data))
            else:
                results.append(_apply_plan(next(data), extra))
            if i < n_img and kind != "direct":
                image[i] = results[i]
        sample: dict[str, Any] = {
            "image": image,
            "index": spec.index,
            "position": spec.position,
            "volume": vol.path,
            "start": np.array(spec.start),
            "cls": spec.cls,
            "anchor": np.array(spec.anchor),
        }
        if self.labels:
            lab = results[n_img]
            sample["label"] = (
                np.zeros((1, *self.patch_size), np.uint8)
                if vol.label is None
                else lab.astype(np.uint8, copy=False)[None]
            )
        return sample

    def patch(self, position: int) -> dict[str, Any]:
        """The patch at ``position`` of this rank's stream."""
        return self.read(self.spec(position))

    def positions(
        self,
        start: int = 0,
        stop: int | None = None,
        *,
        worker: int = 0,
        num_workers: int = 1,
        block: int = 1,
    ) -> Iterator[int]:
        """This worker's positions ≥ ``start`` (and < ``stop``): blocks of ``block`` round-robin."""
        b = start // block
        while True:
            if b % num_workers == worker:
                for p in range(max(start, b * block), (b + 1) * block):
                    if stop is not None and p >= stop:
                        return
                    yield p
            elif stop is not None and b * block >= stop:
                return
            b += 1

    def iter_positions(self, positions: Iterator[int]) -> Iterator[dict[str, Any]]:
        """Read the patches at ``positions`` with ``prefetch`` in flight, in order."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.prefetch, thread_name_prefix="lc-patch")
        pending = []
        positions = iter(positions)
        for p in positions:
            pending.append(self._pool.submit(self.patch, p))
            if len(pending) >= self.prefetch:
                break
        while pending:
            fut = pending.pop(0)
            nxt = next(positions, None)
            if nxt is not None:
                pending.append(self._pool.submit(self.patch, nxt))
            yield fut.result()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """Endless patches from :attr:`position` on; consuming one advances the state."""
        for sample in self.iter_positions(self.positions(self.position)):
            self.position = sample["position"] + 1
            yield sample

    def take(self, n: int) -> list[dict[str, Any]]:
        out = []
        for s in self:
            out.append(s)
            if len(out) == n:
                break
        return out

    def batches(self, batch_size: int) -> Iterator[dict[str, Any]]:
        """Endless stacked NumPy batches (a torch-free data loader)."""
        buf: list[dict[str, Any]] = []
        for s in self:
            buf.append(s)
            if len(buf) == batch_size:
                yield collate(buf)
                buf = []


def collate(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack a list of samples into a batch of NumPy arrays (strings become lists)."""
    out: dict[str, Any] = {}
    for k in samples[0]:
        vals = [s[k] for s in samples]
        out[k] = vals if isinstance(vals[0], str) else np.stack([np.asarray(v) for v in vals])
    return out


def _axis_plan(coords: np.ndarray, origin: float, spacing: float, order: str):
    """How to sample one axis of a volume at physical ``coords``: (box start, size, plan)."""
    cont = np.round((coords - origin) / spacing, 6)
    if order == "nearest":
        idx = np.floor(cont + 0.5).astype(int)
        start, stop = int(idx.min()), int(idx.max()) + 1
        return start, stop - start, ("nearest", idx - start)
    i0 = np.floor(cont).astype(int)
    w = (cont - i0).astype(np.float32)
    start, stop = int(i0.min()), int(i0.max()) + 2
    return start, stop - start, ("linear", i0 - start, w)


def _apply_plan(data: np.ndarray, axes) -> np.ndarray:
    out = data
    for d, (_, _, plan) in enumerate(axes):
        if plan[0] == "nearest":
            out = np.take(out, plan[1], axis=d)
        else:
            _, i0, w = plan
            shape = [1, 1, 1]
            shape[d] = len(w)
            w = w.reshape(shape)
            a = np.take(out, i0, axis=d).astype(np.float32, copy=False)
            if not np.any(w):
                out = a
                continue
            b = np.take(out, np.minimum(i0 + 1, out.shape[d] - 1), axis=d)
            out = a * (1 - w) + b.astype(np.float32) * w
    return out


__all__ = ["PAD_VALUE", "PatchSampler", "PatchSpec", "catalog_frame", "collate"]
