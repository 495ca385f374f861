"""The in-memory form of one converted volume, shared by every source reader and the writer.

A reader's whole job is to produce a :class:`Volume`: canonical LPS HU array, its grid, the
source segments as a bit field, and the metadata the catalog needs.  The writer never looks at
source files, so every collection is stored the same way.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import blake3
import numpy as np

from livercube.errors import SegmentLimitError
from livercube.schema import PHASES, label_precedence
from livercube.volumes.geometry import Grid

MAX_SEGMENTS = 64


def bits_dtype(n_segments: int) -> np.dtype:
    """Smallest unsigned integer type with one bit per segment (at least uint8)."""
    for dt in (np.uint8, np.uint16, np.uint32, np.uint64):
        if n_segments <= np.dtype(dt).itemsize * 8:
            return np.dtype(dt)
    raise SegmentLimitError(
        f"{n_segments} segments exceed the {MAX_SEGMENTS}-bit segment field of the store contract"
    )


@dataclass
class SegmentInfo:
    """Everything about one source segment except its voxels (which live in the bit field).

    ``label`` is the source SegmentLabel verbatim; ``unified`` the unified label it paints
    (``None``: paints nothing, e.g. CRLM's liver remnant; ``0``: unknown to the schema).
    ``codes`` keeps the source's coded concepts and algorithm information losslessly.
    """

    bit: int
    label: str
    number: int
    unified: int | None
    codes: dict[str, Any] = field(default_factory=dict)
    voxels: int = 0

    def to_attrs(self) -> dict[str, Any]:
        return {
            "bit": self.bit,
            "label": self.label,
            "number": self.number,
            "unified_label": self.unified,
            "codes": self.codes,
            "voxels": self.voxels,
        }


def segment_mask(bits: np.ndarray, bit: int) -> np.ndarray:
    """One segment of a ``segments`` bit field as a boolean mask."""
    dt = bits.dtype.type
    return ((bits >> dt(bit)) & dt(1)).astype(bool)


def unique_segment_names(labels: list[str]) -> list[str]:
    """Segment labels made unique the way readers key them: ``Tumor``, ``Tumor (2)``, …

    A SEG may give two segments the same label; both are kept (each its own bit).
    """
    out: list[str] = []
    for label in labels:
        name, k = label, 2
        while name in out:
            name, k = f"{label} ({k})", k + 1
        out.append(name)
    return out


class Extent:
    """The smallest box holding every box included so far (``None`` until one is).

    A tumour covers a few slices of a volume: knowing where a segment's voxels can be lets
    counting, OR-ing, label painting and encoding touch only those slices instead of the whole
    grid (per segment, and CRLM's SEGs carry up to 40).
    """

    def __init__(self) -> None:
        self._lo: list[int] | None = None
        self._hi: list[int] = []

    def include(self, box: tuple[slice, ...] | None) -> None:
        if box is None:
            return
        lo, hi = [int(s.start) for s in box], [int(s.stop) for s in box]
        if self._lo is None:
            self._lo, self._hi = lo, hi
        else:
            self._lo = [min(a, b) for a, b in zip(self._lo, lo, strict=True)]
            self._hi = [max(a, b) for a, b in zip(self._hi, hi, strict=True)]

    def box(self) -> tuple[slice, ...] | None:
        """The box as slices; ``None`` if nothing was included."""
        if self._lo is None:
            return None
        return tuple(slice(a, b) for a, b in zip(self._lo, self._hi, strict=True))


#: The box of nothing: painting or counting within it reads nothing.
EMPTY_BOX = (slice(0, 0),) * 3


def resolved_box(box: tuple[slice, ...] | None, shape: tuple[int, ...]) -> tuple[slice, ...]:
    """``box`` (``None``: everything) as plain ``start:stop`` slices inside ``shape``."""
    if box is None:
        return tuple(slice(0, n) for n in shape)
    out = []
    for s, n in zip(box, shape, strict=True):
        start, stop, step = s.indices(n)
        if step != 1:
            raise ValueError(f"a box takes contiguous slices, got step {step}")
        out.append(slice(start, max(start, stop)))
    return tuple(out)


class SegmentField:
    """Accumulates binary segment masks into one bit field on a fixed grid.

    Masks are added one at a time so a CRLM SEG with 40 overlapping segments never needs 40
    full-size boolean arrays at once.
    """

    def __init__(self, shape: tuple[int, int, int], n_segments: int) -> None:
        self.dtype = bits_dtype(max(n_segments, 1))
        self.bits = np.zeros(shape, dtype=self.dtype)
        # read-only outside add(): the occupied box (what the writer encodes) is right only
        # if every bit is set there, so a bit written any other way fails loudly instead of
        # being left out of the store
        self.bits.flags.writeable = False
        self.segments: list[SegmentInfo] = []
        self._capacity = n_segments
        self._occupied = Extent()

    @property
    def occupied(self) -> tuple[slice, ...]:
        """The smallest box holding every set bit (:data:`EMPTY_BOX` if none is set).

        Bits change only through :meth:`add`, inside each segment's box, so nothing outside
        this box needs painting, searching or encoding: liver and tumours fill a fraction of
        an abdominal CT's slices and plane.
        """
        return self._occupied.box() or EMPTY_BOX

    def add(
        self,
        mask: np.ndarray,
        *,
        label: str,
        number: int,
        unified: int | None,
        codes: dict[str, Any] | None = None,
        within: tuple[slice, ...] | None = None,
    ) -> SegmentInfo:
        """OR a boolean mask (same grid) into the field as the next segment bit.

        ``within``: a box outside which ``mask`` is all False (a tumour's few slices).  Only
        that box is read and written, so a small segment does not cost whole-volume passes;
        the box must hold every True voxel, or those outside it are lost.
        """
        if len(self.segments) >= self._capacity:
            raise SegmentLimitError(f"segment field was sized for {self._capacity} segments")
        if mask.shape != self.bits.shape:
            raise ValueError(f"mask shape {mask.shape} != grid shape {self.bits.shape}")
        bit = len(self.segments)
        box = resolved_box(within, self.bits.shape)
        m = np.asarray(mask[box], dtype=bool)
        value = self.dtype.type(1 << bit)
        self.bits.flags.writeable = True
        try:
            bits = self.bits[box]
            # bits |= m * value, slab by slab: a where= masked OR branches per voxel (114 ms
            # against 3 ms on a 20 MB mask of scattered voxels); slabs keep the temporary small
            for z0 in range(0, m.shape[0], _SLAB):
                part = bits[z0 : z0 + _SLAB]
                np.bitwise_or(
                    part,
                    np.multiply(m[z0 : z0 + _SLAB].view(np.uint8), value, dtype=self.dtype),
                    out=part,
                )
        finally:
            self.bits.flags.writeable = False
        # count_nonzero: a tenth of bool.sum()'s time on a volume-sized mask
        info = SegmentInfo(bit, label, number, unified, dict(codes or {}), int(np.count_nonzero(m)))
        self.segments.append(info)
        if info.voxels:
            self._occupied.include(box)
        return info

    def mask(self, bit: int) -> np.ndarray:
        return ((self.bits >> self.dtype.type(bit)) & self.dtype.type(1)).astype(bool)


def unified_label_map(
    bits: np.ndarray, segments: list[SegmentInfo], within: tuple[slice, ...] | None = None
) -> np.ndarray:
    """Paint the unified uint8 label volume from the bit field, honouring precedence.

    ``within``: a box outside which no bit is set (:attr:`SegmentField.occupied`); only it is
    painted.  Painted in slabs of slices so the temporaries stay a few MB instead of two extra
    volume-sized arrays (this runs at the memory peak of a conversion task).
    """
    label = np.zeros(bits.shape, dtype=np.uint8)
    dt = bits.dtype.type
    selectors = []
    for value in reversed(label_precedence()):  # lowest precedence first, overwritten later
        selector = dt(0)
        for s in segments:
            if s.unified == value:
                selector |= dt(1) << dt(s.bit)
        if selector:
            selectors.append((value, selector))
    box = resolved_box(within, bits.shape)
    inner, painted = bits[box], label[box]
    for z0 in range(0, inner.shape[0], _SLAB):
        b, out = inner[z0 : z0 + _SLAB], painted[z0 : z0 + _SLAB]
        for value, selector in selectors:
            out[(b & selector) != 0] = value
    return label


#: Slices per slab when painting labels or finding their foreground (a 512² slab of 8 is
#: 2 MB of uint8).
_SLAB = 8


@dataclass
class Volume:
    """One CT volume on its canonical grid, ready to be written.

    ``image`` is int16 HU in (z, y, x) LPS order.  ``meta`` holds the catalog fields and
    provenance (study date, series number, intensity and geometry flags, source fingerprint);
    ``clinical`` the patient's covariates keyed by the original column names.
    """

    collection: str
    patient_id: str
    study: str
    series: str
    image: np.ndarray
    grid: Grid
    phase: str = "unknown"
    source_direction: tuple[tuple[float, float, float], ...] = ((1, 0, 0), (0, 1, 0), (0, 0, 1))
    segments: SegmentField | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    clinical: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.phase not in PHASES:
            raise ValueError(f"phase {self.phase!r} is not in the vocabulary {PHASES}")
        if self.image.dtype != np.int16:
            raise TypeError(f"image must be int16 HU, got {self.image.dtype}")
        if tuple(self.image.shape) != tuple(self.grid.shape):
            raise ValueError(f"image shape {self.image.shape} != grid {self.grid.shape}")

    @property
    def annotated(self) -> bool:
        return self.segments is not None and len(self.segments.segments) > 0

    @property
    def occupied(self) -> tuple[slice, ...] | None:
        """The box holding every segment voxel (:attr:`SegmentField.occupied`); ``None``
        without a segment field."""
        return self.segments.occupied if self.segments is not None else None

    def label(self) -> np.ndarray | None:
        if not self.annotated:
            return None
        assert self.segments is not None
        return unified_label_map(self.segments.bits, self.segments.segments, within=self.occupied)


#: Hashes a content checksum may name, by the prefix it carries (``blake3:…``).  New stores
#: get BLAKE3: 4x SHA-256's speed here (9 vs 37 ms for a 100-slice CT, one thread), which was a
#: seventh of a conversion task's CPU.  SHA-256 stays readable for stores written before 2.2.
CHECKSUM_HASHES: dict[str, Callable[[], Any]] = {"blake3": blake3.blake3, "sha256": hashlib.sha256}
CHECKSUM_ALGORITHM = "blake3"


def content_checksum(arrays: dict[str, np.ndarray], algorithm: str = CHECKSUM_ALGORITHM) -> str:
    """``<algorithm>:<hex>`` over named arrays' shapes, dtypes and C-order bytes, in name order.

    Computed from decoded voxels, so it identifies content independently of codecs and
    chunking: a store re-encoded with other compressors keeps its checksums.
    """
    try:
        h = CHECKSUM_HASHES[algorithm]()
    except KeyError:
        raise ValueError(
            f"unknown content checksum algorithm {algorithm!r} (known: {sorted(CHECKSUM_HASHES)})"
        ) from None
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}:{a.dtype.str}:{a.shape};".encode())
        h.update(memoryview(a).cast("B"))
    return f"{algorithm}:{h.hexdigest()}"


def checksum_algorithm(checksum: str) -> str:
    """The algorithm a stored content checksum names (``blake3:…`` → ``blake3``)."""
    return checksum.split(":", 1)[0] if ":" in checksum else ""


#: Voxel locations kept per unified class for foreground-oversampled patch sampling.
CLASS_LOCATIONS_PER_CLASS = 10_000


def _flat_foreground(label: np.ndarray) -> np.ndarray:
    """``np.flatnonzero(label)``, ten times faster for a uint8 volume.

    numpy's ``nonzero`` has a fast path for booleans only (measured: 43 ms on a 100×512²
    uint8 label, 4 ms on a boolean mask of it), so each slab is compared with 0 first;
    slabs (:data:`_SLAB`) keep the temporary mask small.
    """
    if label.size == 0:
        return np.zeros(0, dtype=np.intp)
    flat = label.reshape(label.shape[0], -1) if label.ndim > 1 else label.reshape(1, -1)
    per = flat.shape[1]
    parts = [
        np.flatnonzero(flat[z : z + _SLAB] != 0) + z * per for z in range(0, flat.shape[0], _SLAB)
    ]
    return np.concatenate(parts)


def class_locations(
    label: np.ndarray,
    *,
    per_class: int = CLASS_LOCATIONS_PER_CLASS,
    seed: int = 0,
    within: tuple[slice, ...] | None = None,
) -> np.ndarray:
    """Up to ``per_class`` voxel indices of every present unified class, as (n, 4) int32 rows
    ``(class, z, y, x)``, sorted by class.

    Precomputed at conversion (like nnU-Net's class locations) so a sampler can centre a patch
    on a tumour voxel without reading the whole label volume; a fixed seed keeps the store
    deterministic.  ``within``: a box outside which ``label`` is 0 (only it is searched); the
    result is the same, since C order inside a box is C order of the volume.
    """
    rng = np.random.default_rng(seed)
    rows = []
    box = resolved_box(within, label.shape)
    inner = np.ascontiguousarray(label[box])
    offset = np.array([s.start for s in box], dtype=np.intp)
    # Foreground first: it is a few percent of the volume, so no per-class pass (nor a
    # bincount's int64 copy, 8x the label's size) ever touches the background.
    foreground = _flat_foreground(inner)
    values = inner.ravel()[foreground]
    for value in np.unique(values):
        idx = foreground[values == value]
        if idx.size > per_class:
            idx = np.sort(rng.choice(idx, size=per_class, replace=False))
        zyx = np.stack(np.unravel_index(idx, inner.shape), axis=1) + offset
        rows.append(np.column_stack([np.full(len(idx), value), zyx]))
    if not rows:
        return np.zeros((0, 4), dtype=np.int32)
    return np.concatenate(rows).astype(np.int32)
