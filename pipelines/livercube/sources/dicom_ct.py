"""Assemble one scanned CT acquisition into a canonical int16 HU volume.

Geometry comes from ImagePositionPatient and ImageOrientationPatient only:

* the slice normal is cross(row cosines, column cosines); slices are sorted by the projection of
  their position on it, so the source index axes are i = row cosines (columns), j = column
  cosines (rows) and k = +normal;
* the slice spacing is derived from position differences, never from SliceThickness or
  SpacingBetweenSlices (both are reported in ``spacing_report`` for comparison);
* a slice may deviate from the regular grid by ``max(0.01 mm, 1 % of the spacing)``
  (:func:`livercube.sources.dicom_geometry.slice_grid`; a stack whose slice origins drift
  in-plane — gantry tilt — is refused there).  A gap that is a whole multiple of
  the spacing is a run of missing slices: they are filled with :data:`FILL_HU` (−1024 HU, air)
  and their canonical indices listed in ``filled_slices`` — the volume is never closed up.  Any
  other irregularity raises :class:`~livercube.errors.GeometryError` naming the series and the
  positions;
* the stacked ``(k, j, i)`` array is brought to canonical ``(z, y, x)`` LPS order by
  :func:`livercube.volumes.geometry.canonical_reorientation` (permutations and flips only).

A slice whose file cannot be read or decoded when the volume is assembled (damaged after the
scan, a codec that fails) is filled like a missing slice and listed in ``damaged_slices`` with
the file and the reason, so the converter can report it as a lost input and flag the volume;
a volume none of whose slices decode is an :class:`~livercube.errors.UnreadableFileError`.

Intensities are exact: HU = stored × RescaleSlope + RescaleIntercept, computed on the stored
values as pydicom decodes them (PixelRepresentation 0 → unsigned, 1 → signed), per slice.  The
result must be integral and inside int16, else :class:`~livercube.errors.IntensityError`.

Padding: stored values equal to PixelPaddingValue (or inside [PixelPaddingValue,
PixelPaddingRangeLimit]) are not measurements (GE writes −2000 outside the reconstruction
circle).  By default (:data:`PADDING_HU` = ``None``) they keep their exact rescaled value
(−3024 HU for GE's −2000 with intercept −1024): bit-identical to SimpleITK and dcm2niix, and
below −1024 HU, so padding can never pass for air or tissue.  How many voxels are padding and
which stored values declared it is recorded in ``attrs["padding_voxels"]`` /
``attrs["padding_values_stored"]``; a caller may pass ``padding_hu`` to replace them.
"""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import fsspec
import numpy as np
import pydicom
from fsspec.implementations.local import LocalFileSystem

from livercube.errors import GeometryError, IntensityError, SourceError, UnreadableFileError
from livercube.sources.dicom_frames import frame_view, n_frames
from livercube.sources.dicom_geometry import (
    DEFAULT_TOLERANCES,
    SliceGrid,
    Tolerances,
    slice_grid,
)
from livercube.sources.dicom_scan import Acquisition, SliceRef, plain_value
from livercube.sources.slice_header import SliceHeader, plain_16_bit_dtype, slice_header
from livercube.volumes.geometry import Grid, Reorientation, canonical_reorientation

#: HU written into missing slices (gaps of a whole number of slice spacings).
FILL_HU = -1024
#: HU written where the stored value is PixelPaddingValue (None: keep the exact rescaled value).
PADDING_HU: int | None = None

_INT16 = np.iinfo(np.int16)


@dataclass
class CTVolume:
    """One CT acquisition on its canonical grid.

    ``image`` is int16 HU indexed ``(z, y, x)`` in LPS; ``grid`` its geometry.
    ``slice_axis`` is the canonical axis the source slices are stacked along (0 for axial CT);
    ``slice_positions`` the LPS position (x, y, z) of the first voxel of each source slice in
    canonical order along that axis (computed for filled slices); ``filled_slices`` the
    canonical indices along ``slice_axis`` that were filled with :data:`FILL_HU`;
    ``sop_uids_by_canonical_z`` maps every canonical z index to the SOPInstanceUIDs of the
    source slices crossing it (one per z for axial CT, none for a filled slice).
    """

    image: np.ndarray
    grid: Grid
    reorientation: Reorientation
    source_direction: tuple[tuple[float, float, float], ...]
    slice_axis: int
    slice_positions: tuple[tuple[float, float, float], ...]
    filled_slices: list[int]
    spacing_report: dict[str, Any]
    sop_uids_by_canonical_z: dict[int, tuple[str, ...]]
    attrs: dict[str, Any] = field(default_factory=dict)
    #: slices filled because their file failed to read or decode: {"path", "z", "reason"}
    damaged_slices: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class AcquisitionLayout:
    """Where an acquisition's slices go on its canonical grid, from headers only.

    The one place that turns a scanned :class:`Acquisition` into grid geometry: the CT reader
    assembles pixels with it and the SEG matcher describes targets with it, so both agree on
    the grid and on which instance lies on which canonical plane.
    """

    grid: SliceGrid
    slices: tuple[SliceRef, ...]  # sorted ascending along the normal
    reorientation: Reorientation

    @property
    def n_k(self) -> int:
        return self.grid.spacing.n_grid

    @property
    def slice_axis(self) -> int:
        """The canonical axis the source slices are stacked along (0 for axial CT)."""
        return self.reorientation.axes.index(0)

    def canon(self, k: int) -> int:
        """Canonical index along :attr:`slice_axis` of source grid plane ``k``."""
        return self.n_k - 1 - k if self.reorientation.flips[self.slice_axis] else k

    def sop_uids_by_z(self) -> dict[int, tuple[str, ...]]:
        """Canonical z → SOPInstanceUIDs of the slices crossing it (none for a missing one)."""
        if self.slice_axis != 0:  # sagittal/coronal source: every slice crosses every z
            every = tuple(ref.sop_uid for ref in self.slices)
            return {z: every for z in range(self.reorientation.grid.shape[0])}
        uids: dict[int, tuple[str, ...]] = {z: () for z in range(self.n_k)}
        for ref, k in zip(self.slices, self.grid.spacing.grid_index, strict=True):
            uids[self.canon(k)] = (ref.sop_uid,)
        return uids


def acquisition_layout(acq: Acquisition, tol: Tolerances = DEFAULT_TOLERANCES) -> AcquisitionLayout:
    """The :class:`AcquisitionLayout` of ``acq``; :class:`GeometryError` when it has none."""
    sg = slice_grid(
        [s.position for s in acq.slices], acq.orientation, acq.pixel_spacing, source=acq.label,
        tol=tol,
    )  # fmt: skip
    direction = np.column_stack(
        [np.asarray(acq.orientation[:3]), np.asarray(acq.orientation[3:]), np.asarray(sg.normal)]
    )
    spacing_ijk = (float(acq.pixel_spacing[1]), float(acq.pixel_spacing[0]), sg.spacing.spacing)
    reo = canonical_reorientation(
        (sg.spacing.n_grid, acq.rows, acq.columns),
        direction,
        spacing_ijk,
        tuple(sg.positions[0]),
        source=acq.label,
    )
    return AcquisitionLayout(sg, tuple(acq.slices[i] for i in sg.order), reo)


def _open_bytes(fs: fsspec.AbstractFileSystem, path: str) -> bytes:
    with fs.open(path, "rb") as f:
        return f.read()


def stored_to_hu(
    header: SliceHeader,
    stored: np.ndarray,
    *,
    source: str,
    padding_hu: int | None = PADDING_HU,
) -> tuple[np.ndarray, int]:
    """Exact int16 HU of one decoded slice and the number of padding pixels replaced."""
    slope, intercept = header.slope, header.intercept
    mask = _padding_mask(header, stored)
    n_pad = int(np.count_nonzero(mask)) if mask is not None else 0
    if (
        slope.is_integer()
        and intercept.is_integer()
        and stored.size
        and not (n_pad and padding_hu is not None)
    ):
        # integral rescale, nothing replaced: the HU range follows from the stored extremes,
        # and once it is known to fit int16 the arithmetic can run in int32 without overflow
        s, b = int(slope), int(intercept)
        ends = (int(stored.min()) * s + b, int(stored.max()) * s + b)
        _check_int16_range(min(ends), max(ends), source)
        if s == 1 and _INT16.min <= b <= _INT16.max:
            # int16 wraps modulo 2**16 and the true result fits: the wrapped sum is exact
            hu = stored.astype(np.int16)
            hu += np.int16(b)
            return hu, n_pad
        if abs(b) < 1 << 30 and abs(s) < 1 << 15:
            hu32 = np.multiply(stored, s, dtype=np.int32)
            hu32 += b
            return hu32.astype(np.int16), n_pad
    if slope.is_integer() and intercept.is_integer():
        hu = stored.astype(np.int64) * int(slope) + int(intercept)
    else:
        exact = stored.astype(np.float64) * slope + intercept
        hu_f = np.rint(exact)
        err = float(np.max(np.abs(exact - hu_f))) if exact.size else 0.0
        if err > 1e-3:
            raise IntensityError(
                source,
                f"RescaleSlope {slope} and RescaleIntercept {intercept} give non-integer HU "
                f"(off by up to {err:.3f}); int16 storage would lose information",
            )
        hu = hu_f.astype(np.int64)
    if n_pad and padding_hu is not None:
        hu[mask] = padding_hu
    _check_int16_range(int(hu.min()), int(hu.max()), source)
    return hu.astype(np.int16), n_pad


def _check_int16_range(lo: int, hi: int, source: str) -> None:
    """Refuse a slice whose exact HU range does not fit the store's int16."""
    if lo < _INT16.min or hi > _INT16.max:
        raise IntensityError(source, f"HU range [{lo}, {hi}] after rescaling does not fit int16")


def _padding_mask(header: SliceHeader, stored: np.ndarray) -> np.ndarray | None:
    a, b = header.padding_value, header.padding_limit
    if a is None:
        return None
    if b is None:
        return stored == a
    lo, hi = min(a, b), max(a, b)
    return (stored >= lo) & (stored <= hi)


@dataclass
class _SliceStats:
    padding_voxels: int = 0
    slopes: set[float] = field(default_factory=set)
    intercepts: set[float] = field(default_factory=set)
    pixel_representation: set[int] = field(default_factory=set)
    padding_values: set[int] = field(default_factory=set)
    thickness: set[float] = field(default_factory=set)


def _native_int16_pixels(ds: pydicom.Dataset) -> np.ndarray | None:
    """The stored values of a plain 16-bit slice (:func:`plain_16_bit_dtype`) as a view of
    its pixel bytes: ``ds.pixel_array`` without its validation and copies (half a CT read's
    decode time).  Anything else returns ``None`` and goes through pydicom."""
    dtype = plain_16_bit_dtype(ds)
    if dtype is None or "PixelData" not in ds:
        return None
    rows, cols = int(ds.Rows), int(ds.Columns)
    data = ds.PixelData
    if not isinstance(data, bytes) or len(data) < 2 * rows * cols:
        return None  # truncated: pydicom's error names it
    return np.frombuffer(data, dtype=dtype, count=rows * cols).reshape(rows, cols)


class _Decoded(NamedTuple):
    """One file as the slices read from it need it: the dataset (``None`` when the planned
    header was reused), the header of a single-frame file, and the stored values."""

    ds: pydicom.Dataset | None
    header: SliceHeader | None
    stored: np.ndarray


def _decode_file(
    blob: bytes | Exception, where: str, planned: SliceHeader | None = None
) -> _Decoded:
    """One file's header and stored pixel values (frames first for multi-frame files).

    ``planned``: the header planning read from this file.  If the bytes before the pixels are
    still the ones it digested, the header is not parsed again and the pixels are viewed in
    place (:mod:`livercube.sources.slice_header`); otherwise pydicom reads the whole file.
    """
    if isinstance(blob, bytes) and planned is not None and planned.pixels is not None:
        stored = planned.pixels.view(blob, planned.rows, planned.columns)
        if stored is not None:
            return _Decoded(None, planned, stored)
    try:
        if isinstance(blob, Exception):
            raise blob
        ds = pydicom.dcmread(io.BytesIO(blob))
    except Exception as exc:
        raise UnreadableFileError(where, f"cannot read DICOM file: {exc}") from exc
    try:
        stored = _native_int16_pixels(ds)
        if stored is None:
            stored = ds.pixel_array
    except Exception as exc:
        raise UnreadableFileError(
            where, f"pixel data cannot be decoded (truncated or unsupported codec): {exc}"
        ) from exc
    header = None if n_frames(ds) > 1 else _header_of(ds, where)
    return _Decoded(ds, header, stored)


def _header_of(view: pydicom.Dataset, where: str) -> SliceHeader:
    try:
        return slice_header(view)
    except (TypeError, ValueError) as exc:
        raise UnreadableFileError(where, f"header value is not a number: {exc}") from exc


def _read_slice(
    ref: SliceRef,
    k: int,
    decoded: _Decoded,
    src: np.ndarray,
    acq: Acquisition,
    stats: _SliceStats,
    *,
    where: str,
    padding_hu: int | None,
    tol: Tolerances,
) -> None:
    """Put one slice (a file, or a frame of one) into ``src[k]`` after checking it is the
    slice the scan saw."""
    stored = decoded.stored
    rows, cols = acq.rows, acq.columns
    if ref.frame is None:
        h = decoded.header
        if h is None:  # a multi-frame file where the scan saw a single-frame one
            raise UnreadableFileError(where, "the file now holds several frames")
    else:
        if decoded.ds is None or stored.ndim != 3 or ref.frame >= stored.shape[0]:
            raise UnreadableFileError(where, f"frame {ref.frame + 1} is not in the pixel data")
        h = _header_of(frame_view(decoded.ds, ref.frame), where)
        stored = stored[ref.frame]
    if h.sop_uid != ref.sop_uid:
        raise UnreadableFileError(
            where, f"SOPInstanceUID {h.sop_uid} is not the scanned {ref.sop_uid}"
        )
    if (h.rows, h.columns) != (rows, cols):
        raise GeometryError(where, f"matrix {h.rows}×{h.columns} != {rows}×{cols}")
    if len(h.orientation) != 6:
        raise GeometryError(where, "no usable ImageOrientationPatient")
    iop = list(h.orientation)
    if max(abs(a - b) for a, b in zip(iop, acq.orientation, strict=True)) > tol.orientation:
        raise GeometryError(where, f"orientation {iop} differs from the series {acq.orientation}")
    if stored.shape != (rows, cols):
        raise UnreadableFileError(where, f"decoded pixel array has shape {stored.shape}")
    hu, n_pad = stored_to_hu(h, stored, source=where, padding_hu=padding_hu)
    src[k] = hu
    stats.padding_voxels += n_pad
    stats.slopes.add(h.slope)
    stats.intercepts.add(h.intercept)
    stats.pixel_representation.add(h.pixel_representation)
    if h.padding_value is not None:
        stats.padding_values.add(h.padding_value)
    if h.thickness is not None:
        stats.thickness.add(h.thickness)


def read_acquisition(
    acq: Acquisition,
    storage_options: dict | None = None,
    *,
    fill_hu: int = FILL_HU,
    padding_hu: int | None = PADDING_HU,
    max_workers: int | None = None,
    tol: Tolerances = DEFAULT_TOLERANCES,
) -> CTVolume:
    """Read the pixels of one :class:`Acquisition` and return its canonical volume.

    Files are fetched through fsspec (``max_workers`` in parallel; default 1 locally, 8 for
    remote filesystems) and decoded by pydicom one at a time.
    """
    label = acq.label
    fs, _ = fsspec.core.url_to_fs(acq.source, **(storage_options or {}))
    lay = acquisition_layout(acq, tol)
    sg = lay.grid
    normal = np.asarray(sg.normal)
    slices = lay.slices
    positions = sg.positions
    spacing = sg.spacing
    dz = spacing.spacing
    n_k = spacing.n_grid
    rows, cols = acq.rows, acq.columns
    drift = sg.drift_mm

    src = np.full((n_k, rows, cols), fill_hu, dtype=np.int16)
    stats = _SliceStats()

    def fetch(path: str) -> bytes | Exception:
        try:
            return _open_bytes(fs, path)
        except Exception as exc:  # reported with the file's name below
            return exc

    # one fetch and one decode per file: a multi-frame file holds many slices
    paths = list(dict.fromkeys(ref.path for ref in slices))
    workers = max_workers or (1 if isinstance(fs, LocalFileSystem) else 8)
    pool = ThreadPoolExecutor(max_workers=workers) if workers > 1 else None
    damaged: list[tuple[SliceRef, int, str]] = []
    decoded: dict[str, _Decoded | SourceError] = {}
    try:
        fetched = pool.map(fetch, paths) if pool else map(fetch, paths)
        blobs = dict(zip(paths, fetched, strict=True))
        for ref, k in zip(slices, spacing.grid_index, strict=True):
            where = f"{label}: file {ref.path}"
            if ref.path not in decoded:
                decoded.clear()  # slices of one file are adjacent: keep one decoded file
                try:
                    decoded[ref.path] = _decode_file(blobs.pop(ref.path), where, ref.header)
                except SourceError as exc:
                    decoded[ref.path] = exc
            try:
                got = decoded[ref.path]
                if isinstance(got, SourceError):
                    raise got
                _read_slice(
                    ref, k, got, src, acq, stats, where=where, padding_hu=padding_hu, tol=tol
                )
            except IntensityError:
                raise  # a property of the series, not of one damaged file
            except SourceError as exc:
                src[k] = fill_hu
                damaged.append((ref, k, exc.reason))
    finally:
        if pool:
            pool.shutdown(cancel_futures=True)
    if damaged and len(damaged) == len(slices):
        raise UnreadableFileError(label, f"no slice could be read; first: {damaged[0][2]}")

    reo = lay.reorientation
    image = reo.apply(src)
    slice_axis = lay.slice_axis
    canon = lay.canon

    all_pos = positions[0] + np.outer(np.arange(n_k) * dz, normal)
    canon_order = [canon(k) for k in range(n_k)]
    slice_positions: list[tuple[float, float, float]] = [(0.0, 0.0, 0.0)] * n_k
    for k in range(n_k):
        slice_positions[canon_order[k]] = tuple(float(v) for v in all_pos[k])  # type: ignore[assignment]
    for ref, k in zip(slices, spacing.grid_index, strict=True):
        slice_positions[canon(k)] = tuple(float(v) for v in ref.position)  # type: ignore[assignment]
    filled = sorted([canon(k) for k in spacing.missing] + [canon(k) for _, k, _ in damaged])
    damaged_slices = [
        {"path": ref.path, "z": canon(k), "reason": reason} for ref, k, reason in damaged
    ]

    uids_by_z = lay.sop_uids_by_z()

    spacing_report = {
        "slice_spacing_mm": dz,
        "spacing_source": "ImagePositionPatient",
        "pixel_spacing_mm": [float(v) for v in acq.pixel_spacing],
        "n_source_slices": len(slices),
        "n_grid_slices": n_k,
        "n_filled": len(filled),
        "n_damaged": len(damaged_slices),
        "filled_positions_mm": [list(slice_positions[z]) for z in filled],
        "max_deviation_mm": spacing.max_deviation,
        "tolerance_mm": spacing.tolerance,
        "in_plane_drift_mm": drift,
        "obliquity_deg": reo.obliquity_deg,
        "slice_thickness_mm": sorted(stats.thickness),
        "spacing_between_slices_mm": plain_value(acq.attrs.get("SpacingBetweenSlices")),
        "thickness_differs_from_spacing": any(
            abs(t - dz) > spacing.tolerance for t in stats.thickness
        ),
    }
    attrs: dict[str, Any] = dict(acq.attrs)
    attrs.update(
        patient_id=acq.patient_id,
        study_uid=acq.study_uid,
        study_date=acq.study_date,
        study_description=acq.study_description,
        series_uid=acq.series_uid,
        series_number=acq.series_number,
        series_description=acq.series_description,
        acquisition_number=acq.acquisition_number,
        acquisition_time=acq.acquisition_time,
        index_in_series=acq.index_in_series,
        n_source_files=len(slices),
        filled_slices=len(filled),
        fill_hu=fill_hu,
        padding_voxels=stats.padding_voxels,
        padding_hu=padding_hu,
        padding_values_stored=sorted(stats.padding_values),
        rescale_slopes=sorted(stats.slopes),
        rescale_intercepts=sorted(stats.intercepts),
        pixel_representation=sorted(stats.pixel_representation),
        obliquity_deg=reo.obliquity_deg,
        scan_notes=[f"{n.path}: {n.reason}" for n in acq.notes],
    )
    return CTVolume(
        image=image,
        grid=reo.grid,
        reorientation=reo,
        source_direction=reo.source_direction,
        slice_axis=slice_axis,
        slice_positions=tuple(slice_positions),
        filled_slices=filled,
        spacing_report=spacing_report,
        sop_uids_by_canonical_z=uids_by_z,
        attrs=attrs,
        damaged_slices=damaged_slices,
    )
