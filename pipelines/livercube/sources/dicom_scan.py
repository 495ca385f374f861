"""Find CT acquisitions in a tree of DICOM files, from headers only.

:func:`scan` walks a local directory or any fsspec URL (``s3://idc-open-data/...``,
``memory://...``), reads every file's header without pixel data and returns small, picklable
:class:`Acquisition` records that :func:`livercube.sources.dicom_ct.read_acquisition` turns into
volumes, possibly on another machine.

Decisions are taken from DICOM headers only.  Folder and file names (TCIA's
``<SeriesNumber>.000000-<description>`` folders, ``1-01.dcm`` ordinals, IDC's uuids) and TCIA's
``metadata.csv`` are never trusted: they are walked like any other file and noted as non-DICOM.

Grouping rules:

* CT images (CT Image Storage, single frame) are grouped by study and SeriesInstanceUID, then by
  orientation, matrix size and pixel spacing (a volume needs all three constant).
* A series is split into acquisitions by AcquisitionNumber when present.  Inside one
  AcquisitionNumber (or without one), images at duplicate positions along the slice normal are
  split further: by AcquisitionTime when the distinct times partition the images into
  duplicate-free groups, else into runs in (AcquisitionTime, InstanceNumber) order that start
  anew whenever a position repeats.  A group whose positions do not form one regular grid is
  split by AcquisitionTime when that yields regular grids (two acquisitions on different
  z-grids); otherwise it is kept and the reader reports the irregular spacing.
* The same SOPInstanceUID seen twice (a second, possibly truncated copy): the complete file is
  kept (judged from the header: uncompressed pixel bytes actually present), else the larger one;
  the other is noted.
* Skipped, each with a :class:`ScanNote`: zero-byte files, non-DICOM files, non-image SOP
  classes (SR, RTSTRUCT, ...; DICOM-SEG instances are listed separately in
  :attr:`ScanResult.segs`), multi-frame images, images without plane geometry, localizers
  (ImageType contains LOCALIZER, or a single-slice group orthogonal to the study's main
  orientation) and other single-slice groups (no slice spacing, not a volume).

Only allow-listed, non-identifying attributes (:data:`ALLOWED_ATTRIBUTES`) are copied into the
records; names, birth dates, addresses, institutions and identifiers other than PatientID and
the UIDs needed to find the data again are never carried.
"""

from __future__ import annotations

import io
from collections import defaultdict
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import fsspec
import numpy as np
import pydicom
from fsspec.implementations.local import LocalFileSystem
from pydicom.errors import InvalidDicomError

from livercube.errors import GeometryError

#: How much of a remote file is fetched first; if the header is longer the whole file is read.
HEADER_PREFIX_BYTES = 64 * 1024

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"
SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"

#: Slice positions closer than this along the normal are "the same position" (mm).
DUPLICATE_POSITION_TOL_MM = 0.01
#: Relative and absolute tolerance for a regular slice spacing: a slice may deviate from its
#: grid position by ``max(SPACING_ABS_TOL_MM, SPACING_REL_TOL * spacing)``.
SPACING_REL_TOL = 0.01
SPACING_ABS_TOL_MM = 0.01
#: Two image orientations are the same when no direction cosine differs by more than this.
ORIENTATION_TOL = 1e-3

#: Non-identifying attributes copied verbatim (converted to plain Python types).
ALLOWED_ATTRIBUTES: tuple[str, ...] = (
    "Modality",
    "Manufacturer",
    "ManufacturerModelName",
    "SoftwareVersions",
    "ConvolutionKernel",
    "FilterType",
    "ContrastBolusAgent",
    "ContrastBolusRoute",
    "ContrastBolusVolume",
    "ContrastBolusStartTime",
    "ContrastBolusIngredient",
    "KVP",
    "XRayTubeCurrent",
    "ExposureTime",
    "Exposure",
    "SliceThickness",
    "SpacingBetweenSlices",
    "ReconstructionDiameter",
    "GantryDetectorTilt",
    "SpiralPitchFactor",
    "StudyDate",
    "SeriesDate",
    "AcquisitionDate",
    "AcquisitionTime",
    "StudyTime",
    "SeriesTime",
    "BodyPartExamined",
    "ScanOptions",
    "PatientPosition",
    "ImageType",
    "RescaleType",
    "PixelPaddingValue",
    "PhotometricInterpretation",
    "BitsStored",
    "PixelRepresentation",
)

_PIXEL_TAG_LE = b"\xe0\x7f\x10\x00"
_PIXEL_TAG_BE = b"\x7f\xe0\x00\x10"
_UNCOMPRESSED = {
    "1.2.840.10008.1.2",
    "1.2.840.10008.1.2.1",
    "1.2.840.10008.1.2.2",
}


class ScanNote(NamedTuple):
    """A file (or group) the scan skipped or changed, and why."""

    path: str
    reason: str


class SliceRef(NamedTuple):
    """One image of an acquisition: fs path, SOPInstanceUID, ImagePositionPatient (x, y, z)."""

    path: str
    sop_uid: str
    position: tuple[float, float, float]


@dataclass(frozen=True)
class Acquisition:
    """One CT acquisition: a set of parallel slices meant to form one regular volume.

    ``slices`` are sorted ascending along ``normal`` = cross(row cosines, column cosines);
    ``offsets`` are their positions along that normal (mm).  ``source`` is the URL that was
    scanned (paths are relative to its filesystem); ``attrs`` holds the allow-listed
    attributes; ``estimated_bytes`` the int16 size of the assembled volume without gap filling.
    """

    source: str
    patient_id: str
    study_uid: str
    study_date: str
    study_description: str
    series_uid: str
    series_number: int | None
    series_description: str
    acquisition_number: int | None
    acquisition_time: str
    index_in_series: int
    slices: tuple[SliceRef, ...]
    orientation: tuple[float, float, float, float, float, float]
    pixel_spacing: tuple[float, float]
    rows: int
    columns: int
    estimated_bytes: int
    file_bytes: int
    attrs: dict[str, Any] = field(default_factory=dict)
    notes: tuple[ScanNote, ...] = ()
    #: Tells SEG matching which CT shares the SEG's patient coordinate system (not stored).
    frame_of_reference_uid: str = ""

    @property
    def normal(self) -> tuple[float, float, float]:
        return tuple(float(v) for v in slice_normal(self.orientation))  # type: ignore[return-value]

    @property
    def offsets(self) -> tuple[float, ...]:
        n = np.asarray(self.normal)
        return tuple(float(np.dot(n, s.position)) for s in self.slices)

    @property
    def label(self) -> str:
        """Human-readable name used in error messages."""
        acq = "" if self.acquisition_number is None else f" acquisition {self.acquisition_number}"
        part = f" (part {self.index_in_series})"
        return (
            f"patient {self.patient_id} series {self.series_uid} "
            f"#{self.series_number} '{self.series_description}'{acq}{part}"
        )


@dataclass(frozen=True)
class SegInstance:
    """A DICOM-SEG instance found next to the CTs (read later by the SEG reader)."""

    source: str
    path: str
    sop_uid: str
    patient_id: str
    study_uid: str
    series_uid: str
    series_number: int | None
    series_description: str
    referenced_series_uids: tuple[str, ...] = ()


@dataclass
class ScanResult:
    source: str
    acquisitions: list[Acquisition] = field(default_factory=list)
    segs: list[SegInstance] = field(default_factory=list)
    notes: list[ScanNote] = field(default_factory=list)
    n_files: int = 0


# --------------------------------------------------------------------------- helpers


def slice_normal(orientation: Iterable[float]) -> np.ndarray:
    """Unit slice normal = cross(row cosines, column cosines) of an ImageOrientationPatient."""
    o = np.asarray(list(orientation), dtype=np.float64)
    n = np.cross(o[:3], o[3:])
    norm = np.linalg.norm(n)
    if norm < 1e-6:
        raise GeometryError("ImageOrientationPatient", f"row and column cosines are parallel: {o}")
    return n / norm


@dataclass(frozen=True)
class SpacingAnalysis:
    """Where slices sit on a regular grid: ``grid_index[i]`` of sorted ``offsets[i]``."""

    spacing: float
    grid_index: tuple[int, ...]
    n_grid: int
    missing: tuple[int, ...]
    max_deviation: float
    tolerance: float


def spacing_tolerance(spacing: float) -> float:
    return max(SPACING_ABS_TOL_MM, SPACING_REL_TOL * spacing)


def _fit_grid(z: np.ndarray, d: np.ndarray, s0: float):
    steps = np.maximum(np.rint(d / s0).astype(np.int64), 1)
    idx = np.concatenate([[0], np.cumsum(steps)])
    spacing = float((z[-1] - z[0]) / idx[-1])
    tol = spacing_tolerance(spacing)
    dev = np.abs(z - (z[0] + idx * spacing))
    bad = np.flatnonzero((np.abs(d - steps * spacing) > tol) | (dev[1:] > tol))
    return idx, spacing, tol, dev, bad


def analyse_spacing(offsets: Iterable[float], *, source: str = "series") -> SpacingAnalysis:
    """Fit sorted slice offsets (mm along the normal) to one regular grid.

    The regular spacing is estimated from the cluster of smallest differences (falling back to
    the median difference when that fits better), then refined over the whole extent.  A
    difference of an integer multiple of the spacing is a gap of missing slices; anything else
    raises :class:`GeometryError` naming the positions.
    """
    z = np.sort(np.asarray(list(offsets), dtype=np.float64))
    if z.size < 2:
        raise GeometryError(source, f"{z.size} slice(s): no slice spacing can be derived")
    d = np.diff(z)
    if np.any(d < DUPLICATE_POSITION_TOL_MM):
        i = int(np.argmin(d))
        raise GeometryError(
            source,
            f"two slices at the same position {z[i]:.3f} mm along the slice normal "
            "(several acquisitions mixed?)",
        )
    dmin = float(d.min())
    candidates = [float(np.median(d[d <= 1.5 * dmin])), float(np.median(d))]
    fits = [_fit_grid(z, d, s0) for s0 in candidates]
    idx, spacing, tol, dev, bad = min(fits, key=lambda f: len(f[4]))
    if bad.size:
        show = ", ".join(f"{z[b]:.3f}→{z[b + 1]:.3f} mm" for b in bad[:5])
        raise GeometryError(
            source,
            f"irregular slice spacing: regular spacing {spacing:.4f} mm but slice steps {show} "
            f"are not a whole multiple of it (tolerance {tol:.3f} mm); positions along the "
            f"normal: {np.round(z, 3).tolist()}",
        )
    present = set(idx.tolist())
    missing = tuple(i for i in range(int(idx[-1]) + 1) if i not in present)
    return SpacingAnalysis(
        spacing=spacing,
        grid_index=tuple(int(i) for i in idx),
        n_grid=int(idx[-1]) + 1,
        missing=missing,
        max_deviation=float(dev.max()),
        tolerance=tol,
    )


def _missing_count(offsets: list[float]) -> int | None:
    """Missing slices if the offsets lie on one regular grid, else ``None``."""
    try:
        return len(analyse_spacing(offsets).missing)
    except GeometryError:
        return None


def plain_value(value: Any) -> Any:
    """Convert a pydicom value into plain, picklable, JSON-friendly Python."""
    if value is None:
        return None
    if isinstance(value, pydicom.multival.MultiValue | list | tuple):
        return [plain_value(v) for v in value]
    if isinstance(value, pydicom.valuerep.DSfloat | pydicom.valuerep.DSdecimal | float):
        return float(value)
    if isinstance(value, pydicom.valuerep.IS | int):
        return int(value)
    if isinstance(value, bytes):
        return None
    return str(value)


def allowed_attrs(ds: pydicom.Dataset) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in ALLOWED_ATTRIBUTES:
        if key in ds:
            v = ds.get(key)
            if v is None or v == "":
                continue
            out[key] = plain_value(v)
    return out


def _int_or_none(v: Any) -> int | None:
    if v is None or v == "":
        return None
    try:
        return int(v)
    except (TypeError, ValueError):
        return None


# --------------------------------------------------------------------------- header reading


class _NotDicom(Exception):
    pass


@dataclass
class _Header:
    path: str
    size: int
    ds: pydicom.Dataset
    complete: bool | None  # uncompressed pixel bytes fully present? None: cannot tell


def _dcmread_header(buf: io.BytesIO | Any) -> pydicom.Dataset:
    try:
        return pydicom.dcmread(buf, stop_before_pixels=True)
    except InvalidDicomError:
        buf.seek(0)
        try:
            ds = pydicom.dcmread(buf, stop_before_pixels=True, force=True)
        except Exception as exc:
            raise _NotDicom(str(exc)) from exc
        if "SOPClassUID" not in ds or "SOPInstanceUID" not in ds:
            raise _NotDicom("no DICOM preamble and no SOP class") from None
        return ds


def _stopped_at_pixels(buf: io.BytesIO | Any, data: bytes | None = None) -> bool:
    pos = buf.tell()
    if data is None:
        head = buf.read(4)
        buf.seek(pos)
    else:
        head = data[pos : pos + 4]
    return head in (_PIXEL_TAG_LE, _PIXEL_TAG_BE)


def _completeness(ds: pydicom.Dataset, size: int, header_end: int | None) -> bool | None:
    ts = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "") or "")
    if header_end is None or ts not in _UNCOMPRESSED:
        return None
    try:
        expected = (
            int(ds.Rows)
            * int(ds.Columns)
            * int(ds.get("SamplesPerPixel", 1) or 1)
            * int(ds.get("NumberOfFrames", 1) or 1)
            * int(ds.BitsAllocated)
            // 8
        )
    except (AttributeError, TypeError, ValueError):
        return None
    element_header = 8 if ts == "1.2.840.10008.1.2" else 12
    return size >= header_end + element_header + expected


def read_header(
    fs: fsspec.AbstractFileSystem, path: str, size: int, *, header_bytes: int = HEADER_PREFIX_BYTES
) -> _Header:
    """Read one file's DICOM header; raises ``_NotDicom`` for anything else."""
    if isinstance(fs, LocalFileSystem):
        with fs.open(path, "rb") as f:
            ds = _dcmread_header(f)
            end = f.tell() if _stopped_at_pixels(f) else None
        return _Header(path, size, ds, _completeness(ds, size, end))
    prefix = fs.cat_file(path, start=0, end=min(size, header_bytes))
    if len(prefix) < size:
        plausible = prefix[128:132] == b"DICM"
        buf = io.BytesIO(prefix)
        try:
            ds = _dcmread_header(buf)
            if _stopped_at_pixels(buf, prefix):
                return _Header(path, size, ds, _completeness(ds, size, buf.tell()))
            plausible = True  # parsed, but the header may go on beyond the prefix
        except Exception:
            pass
        if not plausible:
            raise _NotDicom("no DICOM header in the first bytes")
        prefix = fs.cat_file(path)
    buf = io.BytesIO(prefix)
    ds = _dcmread_header(buf)
    end = buf.tell() if _stopped_at_pixels(buf, prefix) else None
    return _Header(path, size, ds, _completeness(ds, len(prefix), end))


# --------------------------------------------------------------------------- scan


@dataclass
class _Image:
    hdr: _Header
    sop: str
    orientation: tuple[float, ...]
    position: tuple[float, float, float]
    rows: int
    cols: int
    spacing: tuple[float, float]
    acq_number: int | None
    acq_time: str
    instance: int
    localizer: bool
    offset: float = 0.0


def _list_files(fs: fsspec.AbstractFileSystem, root: str) -> list[tuple[str, int]]:
    if fs.isfile(root):
        info = fs.info(root)
        return [(info["name"], int(info.get("size") or 0))]
    found = fs.find(root, detail=True)
    out = []
    for name, info in found.items():
        if info.get("type", "file") != "file":
            continue
        out.append((name, int(info.get("size") or 0)))
    return sorted(out)


def scan(
    source: str,
    storage_options: dict | None = None,
    *,
    header_bytes: int = HEADER_PREFIX_BYTES,
    max_workers: int | None = None,
) -> ScanResult:
    """Discover CT acquisitions and SEG instances below ``source`` from headers only."""
    fs, root = fsspec.core.url_to_fs(source, **(storage_options or {}))
    result = ScanResult(source=source)
    files = _list_files(fs, root)
    result.n_files = len(files)

    def load(item: tuple[str, int]) -> _Header | ScanNote:
        path, size = item
        if size == 0:
            return ScanNote(path, "zero-byte file")
        try:
            return read_header(fs, path, size, header_bytes=header_bytes)
        except _NotDicom:
            return ScanNote(path, "not a DICOM file")
        except Exception as exc:  # corrupt header: note it, keep scanning the collection
            return ScanNote(path, f"unreadable DICOM header: {type(exc).__name__}: {exc}")

    workers = max_workers or (4 if isinstance(fs, LocalFileSystem) else 16)
    if workers > 1 and len(files) > 1:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            loaded = list(pool.map(load, files))
    else:
        loaded = [load(f) for f in files]

    images: list[_Image] = []
    for item in loaded:
        if isinstance(item, ScanNote):
            result.notes.append(item)
            continue
        img = _classify(item, result, source)
        if img is not None:
            images.append(img)

    images = _drop_duplicate_instances(images, result.notes)
    _build_acquisitions(images, result, source)
    result.acquisitions.sort(
        key=lambda a: (
            a.patient_id,
            a.study_date,
            a.study_uid,
            a.series_number or 0,
            a.series_uid,
            a.index_in_series,
        )
    )
    return result


def _classify(hdr: _Header, result: ScanResult, source: str) -> _Image | None:
    ds = hdr.ds
    sop_class = str(ds.get("SOPClassUID", ""))
    sop = str(ds.get("SOPInstanceUID", ""))
    if sop_class == SEGMENTATION_STORAGE:
        refs = []
        for item in ds.get("ReferencedSeriesSequence", []) or []:
            uid = item.get("SeriesInstanceUID")
            if uid:
                refs.append(str(uid))
        result.segs.append(
            SegInstance(
                source=source,
                path=hdr.path,
                sop_uid=sop,
                patient_id=str(ds.get("PatientID", "")),
                study_uid=str(ds.get("StudyInstanceUID", "")),
                series_uid=str(ds.get("SeriesInstanceUID", "")),
                series_number=_int_or_none(ds.get("SeriesNumber")),
                series_description=str(ds.get("SeriesDescription", "") or ""),
                referenced_series_uids=tuple(refs),
            )
        )
        return None
    if sop_class != CT_IMAGE_STORAGE:
        try:
            name = pydicom.uid.UID(sop_class).name
        except Exception:
            name = sop_class
        kind = (
            "multi-frame Enhanced CT (not supported)"
            if sop_class == ENHANCED_CT_IMAGE_STORAGE
            else "non-image or non-CT SOP class"
        )
        result.notes.append(ScanNote(hdr.path, f"{kind}: {name or '(none)'}"))
        return None
    if (_int_or_none(ds.get("NumberOfFrames")) or 1) > 1:
        result.notes.append(ScanNote(hdr.path, "multi-frame CT image (not supported)"))
        return None
    image_type = [str(v).upper() for v in (ds.get("ImageType") or [])]
    try:
        orientation = tuple(float(v) for v in ds.ImageOrientationPatient)
        position = tuple(float(v) for v in ds.ImagePositionPatient)
        spacing = tuple(float(v) for v in ds.PixelSpacing)
        rows, cols = int(ds.Rows), int(ds.Columns)
        if len(orientation) != 6 or len(position) != 3 or len(spacing) != 2:
            raise ValueError("wrong multiplicity")
        slice_normal(orientation)
    except (AttributeError, TypeError, ValueError, GeometryError) as exc:
        reason = (
            "localizer" if "LOCALIZER" in image_type else "CT image without usable plane geometry"
        )
        result.notes.append(ScanNote(hdr.path, f"{reason} ({exc})"))
        return None
    if "LOCALIZER" in image_type:
        result.notes.append(ScanNote(hdr.path, "localizer (ImageType contains LOCALIZER)"))
        return None
    return _Image(
        hdr=hdr,
        sop=sop,
        orientation=orientation,
        position=position,  # type: ignore[arg-type]
        rows=rows,
        cols=cols,
        spacing=spacing,  # type: ignore[arg-type]
        acq_number=_int_or_none(ds.get("AcquisitionNumber")),
        acq_time=str(ds.get("AcquisitionDate", "") or "")
        + str(ds.get("AcquisitionTime", "") or ""),
        instance=_int_or_none(ds.get("InstanceNumber")) or 0,
        localizer=False,
    )


def _drop_duplicate_instances(images: list[_Image], notes: list[ScanNote]) -> list[_Image]:
    by_sop: dict[str, list[_Image]] = defaultdict(list)
    for im in images:
        by_sop[im.sop].append(im)
    kept = []
    for sop, group in by_sop.items():
        if len(group) == 1:
            kept.append(group[0])
            continue
        rank = sorted(
            group,
            key=lambda im: (im.hdr.complete is not False, im.hdr.complete is True, im.hdr.size),
            reverse=True,
        )
        best = rank[0]
        kept.append(best)
        for other in rank[1:]:
            why = "truncated " if other.hdr.complete is False else ""
            notes.append(
                ScanNote(
                    other.hdr.path,
                    f"duplicate SOPInstanceUID {sop}: {why}copy of {other.hdr.size} bytes "
                    f"dropped, kept {best.hdr.path} ({best.hdr.size} bytes)",
                )
            )
    return kept


def _same_orientation(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    return max(abs(x - y) for x, y in zip(a, b, strict=True)) <= ORIENTATION_TOL


def _has_duplicates(offsets: list[float]) -> bool:
    z = np.sort(np.asarray(offsets))
    return bool(z.size > 1 and np.any(np.diff(z) < DUPLICATE_POSITION_TOL_MM))


def _split_duplicates(group: list[_Image]) -> tuple[list[list[_Image]], str | None]:
    """Split images at repeated positions into duplicate-free acquisitions."""
    if not _has_duplicates([im.offset for im in group]):
        return [group], None
    z = np.sort(np.asarray([im.offset for im in group]))
    # multiplicity of the most repeated position
    clusters = np.concatenate([[0], np.cumsum(np.diff(z) >= DUPLICATE_POSITION_TOL_MM)])
    multiplicity = int(np.bincount(clusters).max())
    by_time: dict[str, list[_Image]] = defaultdict(list)
    for im in group:
        by_time[im.acq_time].append(im)
    if len(by_time) == multiplicity and all(
        not _has_duplicates([im.offset for im in g]) for g in by_time.values()
    ):
        return [
            by_time[t] for t in sorted(by_time)
        ], "split by AcquisitionTime (repeated positions)"
    runs: list[list[_Image]] = []
    current: list[_Image] = []
    seen: list[float] = []
    for im in sorted(group, key=lambda im: (im.acq_time, im.instance, im.hdr.path)):
        if any(abs(im.offset - s) < DUPLICATE_POSITION_TOL_MM for s in seen):
            runs.append(current)
            current, seen = [], []
        current.append(im)
        seen.append(im.offset)
    runs.append(current)
    return runs, "split into runs of InstanceNumber at repeated positions"


def _split_grids(group: list[_Image]) -> tuple[list[list[_Image]], str | None]:
    """Split a duplicate-free group lying on several z-grids by AcquisitionTime, if that helps.

    Kept whole when it is one gap-free regular grid; split when every AcquisitionTime group is
    a regular grid and together they need fewer filled slices (or the whole is irregular).
    """
    missing = _missing_count([im.offset for im in group])
    if len(group) < 3 or missing == 0:
        return [group], None
    by_time: dict[str, list[_Image]] = defaultdict(list)
    for im in group:
        by_time[im.acq_time].append(im)
    if not 1 < len(by_time) <= max(2, len(group) // 3):
        return [group], None
    counts = [
        _missing_count([im.offset for im in g]) if len(g) >= 2 else None for g in by_time.values()
    ]
    if any(c is None for c in counts):
        return [group], None
    if missing is None or sum(counts) < missing:  # type: ignore[arg-type]
        return [by_time[t] for t in sorted(by_time)], "split by AcquisitionTime (different z-grids)"
    return [group], None


def _build_acquisitions(images: list[_Image], result: ScanResult, source: str) -> None:
    # (study, series) -> list of geometry groups
    series: dict[tuple[str, str], list[list[_Image]]] = defaultdict(list)
    for im in images:
        ds = im.hdr.ds
        key = (str(ds.get("StudyInstanceUID", "")), str(ds.get("SeriesInstanceUID", "")))
        for g in series[key]:
            ref = g[0]
            if (
                _same_orientation(ref.orientation, im.orientation)
                and (ref.rows, ref.cols) == (im.rows, im.cols)
                and np.allclose(ref.spacing, im.spacing, rtol=1e-4, atol=1e-4)
            ):
                g.append(im)
                break
        else:
            series[key].append([im])

    # study's main slice normal: that of its largest geometry group
    study_normal: dict[str, np.ndarray] = {}
    study_size: dict[str, int] = defaultdict(int)
    for (study, _), groups in series.items():
        for g in groups:
            if len(g) > study_size[study]:
                study_size[study] = len(g)
                study_normal[study] = slice_normal(g[0].orientation)

    for (study, _series_uid), groups in series.items():
        parts: list[tuple[list[_Image], list[ScanNote]]] = []
        for g in groups:
            normal = slice_normal(g[0].orientation)
            for im in g:
                im.offset = float(np.dot(normal, im.position))
            if len(g) == 1:
                im = g[0]
                main = study_normal.get(study)
                if main is not None and abs(float(np.dot(main, normal))) < 0.5:
                    result.notes.append(
                        ScanNote(
                            im.hdr.path,
                            "localizer: single slice orthogonal to the study's main orientation",
                        )
                    )
                else:
                    result.notes.append(
                        ScanNote(im.hdr.path, "single-slice CT image: not a volume")
                    )
                continue
            by_acq: dict[int | None, list[_Image]] = defaultdict(list)
            for im in g:
                by_acq[im.acq_number].append(im)
            for acq in sorted(by_acq, key=lambda a: (a is None, a or 0)):
                pieces, why = _split_duplicates(by_acq[acq])
                for piece in pieces:
                    finals, why2 = _split_grids(piece)
                    for f in finals:
                        parts.append((f, [ScanNote(f[0].hdr.path, w) for w in (why, why2) if w]))
        parts.sort(
            key=lambda p: (
                p[0][0].acq_number is None,
                p[0][0].acq_number or 0,
                min(im.acq_time for im in p[0]),
                min(im.instance for im in p[0]),
            )
        )
        for index, (imgs, notes) in enumerate(parts):
            if len(imgs) == 1:
                result.notes.append(
                    ScanNote(imgs[0].hdr.path, "single-slice acquisition: not a volume")
                )
                continue
            result.acquisitions.append(_make_acquisition(imgs, index, notes, source))


def _make_acquisition(
    imgs: list[_Image], index: int, notes: list[ScanNote], source: str
) -> Acquisition:
    imgs = sorted(imgs, key=lambda im: (im.offset, im.instance))
    first = imgs[0]
    ds = first.hdr.ds
    for im in imgs:
        if im.hdr.complete is False:
            notes.append(
                ScanNote(
                    im.hdr.path,
                    "file looks truncated (pixel data shorter than the header announces)",
                )
            )
    attrs = allowed_attrs(ds)
    times = sorted(str(im.hdr.ds.get("AcquisitionTime", "") or "") for im in imgs)
    times = [t for t in times if t]
    acq_time = times[0] if times else ""
    if acq_time:
        attrs["AcquisitionTime"] = acq_time
    thickness = {plain_value(im.hdr.ds.get("SliceThickness")) for im in imgs}
    if len(thickness) > 1:
        attrs["SliceThickness"] = sorted(t for t in thickness if t is not None)
    return Acquisition(
        source=source,
        patient_id=str(ds.get("PatientID", "") or ""),
        study_uid=str(ds.get("StudyInstanceUID", "") or ""),
        study_date=str(ds.get("StudyDate", "") or ""),
        study_description=str(ds.get("StudyDescription", "") or ""),
        series_uid=str(ds.get("SeriesInstanceUID", "") or ""),
        series_number=_int_or_none(ds.get("SeriesNumber")),
        series_description=str(ds.get("SeriesDescription", "") or ""),
        acquisition_number=first.acq_number,
        acquisition_time=acq_time,
        index_in_series=index,
        slices=tuple(SliceRef(im.hdr.path, im.sop, im.position) for im in imgs),
        orientation=first.orientation,  # type: ignore[arg-type]
        pixel_spacing=first.spacing,
        rows=first.rows,
        columns=first.cols,
        estimated_bytes=2 * first.rows * first.cols * len(imgs),
        file_bytes=sum(im.hdr.size for im in imgs),
        attrs=attrs,
        notes=tuple(notes),
        frame_of_reference_uid=str(ds.get("FrameOfReferenceUID", "") or ""),
    )
