"""Find CT acquisitions in a tree of DICOM files, from headers only.

:func:`scan` walks a local directory or any fsspec URL (``s3://idc-open-data/...``,
``memory://...``), reads every file's header without pixel data
(:mod:`~livercube.sources.dicom_headers`) and returns small, picklable :class:`Acquisition`
records that :func:`livercube.sources.dicom_ct.read_acquisition` turns into volumes, possibly
on another machine.  Slice geometry lives in :mod:`~livercube.sources.dicom_geometry`, SOP
classes in :mod:`~livercube.sources.dicom_sop`.

Decisions are taken from DICOM headers only.  Folder and file names (TCIA's
``<SeriesNumber>.000000-<description>`` folders, ``1-01.dcm`` ordinals, IDC's uuids) and TCIA's
``metadata.csv`` are never trusted.

Grouping rules (:func:`partition_series`):

* CT images are grouped by study and SeriesInstanceUID, then by orientation, matrix size and
  pixel spacing (a volume needs all three constant).
* A series is one volume unless its images are several: AcquisitionNumber alone does not split
  it (some scanners write one per slice or per rotation).  Images at **duplicate positions**
  are split by AcquisitionNumber, else AcquisitionTime, when that partitions them into
  duplicate-free groups, else into runs in (AcquisitionTime, InstanceNumber) order that start
  anew whenever a position repeats.  A duplicate-free group whose positions do **not form one
  regular grid** is split by AcquisitionNumber, else AcquisitionTime, when each part is regular
  (two acquisitions on interleaved z-grids); otherwise it is kept and reported as irregular.
* A stack is cut where more than ``max_fill_slices`` slices are missing in a row: a stray slice
  hundreds of millimetres away is not a reason to fill a volume with air.
* The same SOPInstanceUID seen twice: the complete copy is kept (judged from the header:
  uncompressed pixel bytes actually present), else the larger one; the other is a note.

What the scan leaves out is said in one of two lists.  :attr:`ScanResult.notes` holds files
that were never meant to be a slice of a volume: documents the download layout ships
(``metadata.csv``, the clinical spreadsheet, READMEs — not even noted), other non-DICOM files,
non-image objects (SR, RTSTRUCT, ...; DICOM-SEGs are listed in :attr:`ScanResult.segs`),
localizers and redundant duplicate copies.  :attr:`ScanResult.left_out` holds **inputs that
were lost**: zero-byte, unreadable or truncated files, CT images without usable geometry or
with an implausible matrix, single slices that are not a volume, gantry-tilted stacks.

Multi-frame CT (Enhanced CT, Legacy Converted Enhanced CT) contributes one slice per frame,
placed by its per-frame functional groups (:mod:`~livercube.sources.dicom_frames`); from there
on its frames are grouped like single-frame files.  A converter reports each of those as
skipped (exit 3).

Only allow-listed, non-identifying attributes (:data:`ALLOWED_ATTRIBUTES`) are copied into the
records; names, birth dates, addresses, institutions and identifiers other than PatientID and
the UIDs needed to find the data again are never carried.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any, NamedTuple

import fsspec
import numpy as np
import pydicom
from fsspec.implementations.local import LocalFileSystem

from livercube.errors import GeometryError, SlantedStackError
from livercube.sources import dicom_sop
from livercube.sources.dicom_frames import frame_view, n_frames
from livercube.sources.dicom_geometry import (
    DEFAULT_TOLERANCES,
    Tolerances,
    has_duplicates,
    missing_count,
    same_orientation,
    slice_grid,
    slice_normal,
    split_at_gaps,
)
from livercube.sources.dicom_headers import (
    HEADER_PREFIX_BYTES,
    Header,
    NotDicomError,
    list_files,
    read_header,
)

#: Rows or Columns above this are not a CT slice (a damaged header; 65535×65535 would need
#: 8 GiB per slice before any pixel is checked).
MAX_MATRIX = 4096

#: Files a TCIA/NBIA download or a collection release ships beside the DICOM files; they are
#: expected and not worth a word.
EXPECTED_SUFFIXES = frozenset({".csv", ".xlsx", ".xls", ".txt", ".md", ".json", ".pdf", ".html"})
#: Names a DICOM file may carry: anything else that is not DICOM is a note, not a loss.
DICOM_SUFFIXES = frozenset({".dcm", ".dicom", ".ima", ""})

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

class ScanNote(NamedTuple):
    """A file (or group) the scan skipped or changed, and why."""

    path: str
    reason: str


class SliceRef(NamedTuple):
    """One slice of an acquisition: fs path, SOPInstanceUID, ImagePositionPatient (x, y, z).

    ``frame`` is the 0-based frame of a multi-frame CT file (``None`` for single-frame files).
    """

    path: str
    sop_uid: str
    position: tuple[float, float, float]
    frame: int | None = None


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
    sop_class_uid: str = dicom_sop.SEGMENTATION


@dataclass
class ScanResult:
    source: str
    acquisitions: list[Acquisition] = field(default_factory=list)
    segs: list[SegInstance] = field(default_factory=list)
    notes: list[ScanNote] = field(default_factory=list)
    #: inputs that were lost (damaged files, slices that are no volume, refused geometry)
    left_out: list[ScanNote] = field(default_factory=list)
    n_files: int = 0




# --------------------------------------------------------------------------- plain values


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


# --------------------------------------------------------------------------- scan


@dataclass
class _Image:
    hdr: Header
    sop: str
    orientation: tuple[float, ...]
    position: tuple[float, float, float]
    rows: int
    cols: int
    spacing: tuple[float, float]
    acq_number: int | None
    acq_time: str
    instance: int
    frame: int | None = None
    offset: float = 0.0


def _file_kind(path: str) -> str:
    """``"expected"`` (layout documents), ``"dicom-named"`` or ``"other"``, from the name only."""
    p = PurePosixPath(path)
    if p.name.startswith(".") or p.suffix.lower() in EXPECTED_SUFFIXES:
        return "expected"
    return "dicom-named" if p.suffix.lower() in DICOM_SUFFIXES else "other"


def scan(
    source: str | Sequence[str],
    storage_options: dict | None = None,
    *,
    header_bytes: int = HEADER_PREFIX_BYTES,
    max_workers: int | None = None,
    tol: Tolerances = DEFAULT_TOLERANCES,
) -> ScanResult:
    """Discover CT acquisitions and SEG instances below ``source`` from headers only.

    ``source`` may be several URLs on one filesystem (the series prefixes of an IDC
    selection); the result's ``source`` is then the first one, which only names the
    filesystem the recorded paths belong to.
    """
    sources = [source] if isinstance(source, str) else list(source)
    if not sources:
        raise ValueError("scan needs at least one source URL")
    fs, _ = fsspec.core.url_to_fs(sources[0], **(storage_options or {}))
    result = ScanResult(source=sources[0])
    files: list[tuple[str, int]] = []
    for url in sources:
        files += list_files(fs, fsspec.core.url_to_fs(url, **(storage_options or {}))[1])
    result.n_files = len(files)

    def load(item: tuple[str, int]) -> Header | tuple[ScanNote, str]:
        """The header, or a note and where it goes: "lost", "note" or "silent"."""
        path, size = item
        if size == 0:
            return ScanNote(path, "zero-byte file (damaged or incomplete download)"), "lost"
        try:
            return read_header(fs, path, size, header_bytes=header_bytes)
        except NotDicomError:
            kind = _file_kind(path)
            if kind == "dicom-named":
                return ScanNote(path, "named like a DICOM file but not DICOM (damaged?)"), "lost"
            return ScanNote(path, "not a DICOM file"), "silent" if kind == "expected" else "note"
        except Exception as exc:  # corrupt header: keep scanning the collection
            reason = f"unreadable DICOM header: {type(exc).__name__}: {exc}"
            return ScanNote(path, reason), "lost"

    workers = max_workers or (4 if isinstance(fs, LocalFileSystem) else 16)
    if workers > 1 and len(files) > 1:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            loaded = list(pool.map(load, files))
    else:
        loaded = [load(f) for f in files]

    images: list[_Image] = []
    for item in loaded:
        if isinstance(item, tuple):
            note, where = item
            if where == "lost":
                result.left_out.append(note)
            elif where == "note":
                result.notes.append(note)
            continue
        images.extend(_classify(item, result, result.source))

    images = _drop_duplicate_instances(images, result)
    _build_acquisitions(images, result, result.source, tol)
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


def _seg_instance(hdr: Header, source: str) -> SegInstance:
    ds = hdr.ds
    refs = [
        str(item.SeriesInstanceUID)
        for item in ds.get("ReferencedSeriesSequence", []) or []
        if item.get("SeriesInstanceUID")
    ]
    return SegInstance(
        source=source,
        path=hdr.path,
        sop_uid=str(ds.get("SOPInstanceUID", "")),
        patient_id=str(ds.get("PatientID", "")),
        study_uid=str(ds.get("StudyInstanceUID", "")),
        series_uid=str(ds.get("SeriesInstanceUID", "")),
        series_number=_int_or_none(ds.get("SeriesNumber")),
        series_description=str(ds.get("SeriesDescription", "") or ""),
        referenced_series_uids=tuple(refs),
        sop_class_uid=str(ds.get("SOPClassUID", "")),
    )


def _classify(hdr: Header, result: ScanResult, source: str) -> list[_Image]:
    """The CT slices a header contributes (none for SEGs, other objects and damaged CT)."""
    ds = hdr.ds
    sop_class = str(ds.get("SOPClassUID", ""))
    if sop_class in dicom_sop.SEGMENTATION_CLASSES:
        result.segs.append(_seg_instance(hdr, source))
        return []
    if sop_class not in dicom_sop.CT_CLASSES:
        name = dicom_sop.sop_class_name(sop_class)
        result.notes.append(ScanNote(hdr.path, f"non-image or non-CT object: {name}"))
        return []
    image_type = [str(v).upper() for v in (ds.get("ImageType") or [])]
    if "LOCALIZER" in image_type:
        result.notes.append(ScanNote(hdr.path, "localizer (ImageType contains LOCALIZER)"))
        return []
    multiframe = sop_class in dicom_sop.MULTIFRAME_CT_CLASSES or n_frames(ds) > 1
    n_groups = len(ds.get("PerFrameFunctionalGroupsSequence") or [])
    if multiframe and n_groups not in (0, n_frames(ds)):
        result.left_out.append(
            ScanNote(
                hdr.path,
                f"damaged multi-frame CT: {n_groups} per-frame functional groups for "
                f"NumberOfFrames {n_frames(ds)}",
            )
        )
        return []
    views = [frame_view(ds, f) for f in range(n_frames(ds))] if multiframe else [ds]
    images = []
    for f, view in enumerate(views):
        try:
            orientation, position, spacing, rows, cols = _plane(view)
        except (AttributeError, TypeError, ValueError, GeometryError) as exc:
            where = f"frame {f + 1} of a multi-frame CT" if multiframe else "CT image"
            result.left_out.append(
                ScanNote(hdr.path, f"{where} without usable plane geometry ({exc})")
            )
            return []
        if not (0 < rows <= MAX_MATRIX and 0 < cols <= MAX_MATRIX):
            result.left_out.append(
                ScanNote(hdr.path, f"implausible matrix {rows}×{cols} (damaged header?)")
            )
            return []
        images.append(
            _Image(
                hdr=hdr,
                sop=str(ds.get("SOPInstanceUID", "")),
                orientation=orientation,
                position=position,
                rows=rows,
                cols=cols,
                spacing=spacing,
                acq_number=_int_or_none(ds.get("AcquisitionNumber")),
                acq_time=str(ds.get("AcquisitionDate", "") or "")
                + str(ds.get("AcquisitionTime", "") or ""),
                instance=(_int_or_none(ds.get("InstanceNumber")) or 0) + f,
                frame=f if multiframe else None,
            )
        )
    return images


def _plane(view: pydicom.Dataset):
    """(orientation, position, pixel spacing, rows, columns) of one slice header."""
    orientation = tuple(float(v) for v in view.ImageOrientationPatient)
    position = tuple(float(v) for v in view.ImagePositionPatient)
    spacing = tuple(float(v) for v in view.PixelSpacing)
    rows, cols = int(view.Rows), int(view.Columns)
    if len(orientation) != 6 or len(position) != 3 or len(spacing) != 2:
        raise ValueError("wrong multiplicity")
    if not all(np.isfinite([*orientation, *position, *spacing])) or min(spacing) <= 0:
        raise ValueError("non-finite or non-positive values")
    slice_normal(orientation)
    return orientation, position, spacing, rows, cols


def _drop_duplicate_instances(images: list[_Image], result: ScanResult) -> list[_Image]:
    """One image per SOPInstanceUID (and frame); truncated unique files are lost inputs."""
    by_sop: dict[tuple[str, int | None], list[_Image]] = defaultdict(list)
    for im in images:
        by_sop[(im.sop, im.frame)].append(im)
    kept = []
    for (sop, _frame), group in by_sop.items():
        rank = sorted(
            group,
            key=lambda im: (im.hdr.complete is not False, im.hdr.complete is True, im.hdr.size),
            reverse=True,
        )
        best = rank[0]
        if best.hdr.complete is False:
            result.left_out.append(
                ScanNote(
                    best.hdr.path,
                    "truncated file: its pixel data is shorter than the header announces",
                )
            )
        else:
            kept.append(best)
        for other in rank[1:]:
            why = "truncated " if other.hdr.complete is False else ""
            result.notes.append(
                ScanNote(
                    other.hdr.path,
                    f"duplicate SOPInstanceUID {sop}: {why}copy of {other.hdr.size} bytes "
                    f"dropped, kept {best.hdr.path} ({best.hdr.size} bytes)",
                )
            )
    return kept


# --------------------------------------------------------------------------- grouping


def _partition_by(
    group: list[_Image], key: Callable[[_Image], Hashable]
) -> list[list[_Image]] | None:
    """``group`` split by ``key`` (in key order), or ``None`` when the key does not split it."""
    parts: dict[Any, list[_Image]] = defaultdict(list)
    for im in group:
        parts[key(im)].append(im)
    if len(parts) < 2:
        return None
    return [parts[k] for k in sorted(parts, key=lambda k: (k is None, str(k)))]


def _by_acquisition_number(im: _Image) -> Hashable:
    return im.acq_number


def _by_acquisition_time(im: _Image) -> Hashable:
    return im.acq_time


#: What may tell separate acquisitions of one series apart, in the order tried.
_ACQUISITION_KEYS: tuple[tuple[Callable[[_Image], Hashable], str], ...] = (
    (_by_acquisition_number, "AcquisitionNumber"),
    (_by_acquisition_time, "AcquisitionTime"),
)


def _split_duplicates(
    group: list[_Image], tol: Tolerances
) -> tuple[list[list[_Image]], str | None]:
    """Images at repeated positions: several acquisitions, each made duplicate-free."""
    for key, what in _ACQUISITION_KEYS:
        parts = _partition_by(group, key)
        if parts and all(not has_duplicates([im.offset for im in p], tol) for p in parts):
            return parts, f"split by {what} (repeated positions)"
    runs: list[list[_Image]] = []
    current: list[_Image] = []
    seen: list[float] = []
    for im in sorted(group, key=lambda im: (im.acq_time, im.instance, im.hdr.path)):
        if any(abs(im.offset - s) < tol.duplicate_mm for s in seen):
            runs.append(current)
            current, seen = [], []
        current.append(im)
        seen.append(im.offset)
    runs.append(current)
    return runs, "split into runs of InstanceNumber at repeated positions"


def _split_grids(group: list[_Image], tol: Tolerances) -> tuple[list[list[_Image]], str | None]:
    """A duplicate-free group on several z-grids, split where that gives regular volumes.

    Kept whole when it is one gap-free regular grid; split by AcquisitionNumber (else
    AcquisitionTime) when every part is a regular grid and together they need fewer filled
    slices (or the whole is irregular).
    """
    missing = missing_count([im.offset for im in group], tol)
    if len(group) < 3 or missing == 0:
        return [group], None
    for key, what in _ACQUISITION_KEYS:
        parts = _partition_by(group, key)
        if not parts or len(parts) > max(2, len(group) // 3):
            continue
        counts = [
            missing_count([im.offset for im in p], tol) if len(p) >= 2 else None for p in parts
        ]
        if any(c is None for c in counts):
            continue
        if missing is None or sum(counts) < missing:  # type: ignore[arg-type]
            return parts, f"split by {what} (different z-grids)"
    return [group], None


def partition_series(
    group: list[_Image], tol: Tolerances = DEFAULT_TOLERANCES
) -> list[tuple[list[_Image], list[str]]]:
    """Split one geometry group (same orientation, matrix, pixel spacing) into volumes.

    Returns ``(images, reasons)`` per part; see the module docstring for the rules.
    """
    normal = slice_normal(group[0].orientation)
    for im in group:
        im.offset = float(np.dot(normal, im.position))
    out: list[tuple[list[_Image], list[str]]] = []
    if has_duplicates([im.offset for im in group], tol):
        pieces, why = _split_duplicates(group, tol)
    else:
        pieces, why = [group], None
    for piece in pieces:
        finals, why2 = _split_grids(piece, tol)
        for part in finals:
            runs = split_at_gaps([im.offset for im in part], tol)
            why3 = (
                f"cut into {len(runs)} stacks where more than {tol.max_fill_slices} slices "
                "are missing in a row"
                if len(runs) > 1
                else None
            )
            for run in runs:
                out.append(([part[i] for i in run], [w for w in (why, why2, why3) if w]))
    return out


def _build_acquisitions(
    images: list[_Image], result: ScanResult, source: str, tol: Tolerances
) -> None:
    # (study, series) -> list of geometry groups
    series: dict[tuple[str, str], list[list[_Image]]] = defaultdict(list)
    for im in images:
        ds = im.hdr.ds
        key = (str(ds.get("StudyInstanceUID", "")), str(ds.get("SeriesInstanceUID", "")))
        for g in series[key]:
            ref = g[0]
            if (
                same_orientation(ref.orientation, im.orientation, tol)
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
        parts: list[tuple[list[_Image], list[str]]] = []
        for g in groups:
            normal = slice_normal(g[0].orientation)
            main = study_normal.get(study)
            if len(g) == 1 and main is not None and abs(float(np.dot(main, normal))) < 0.5:
                result.notes.append(
                    ScanNote(
                        g[0].hdr.path,
                        "localizer: single slice orthogonal to the study's main orientation",
                    )
                )
                continue
            parts.extend(partition_series(g, tol))
        parts.sort(
            key=lambda p: (
                p[0][0].acq_number is None,
                min(im.acq_number or 0 for im in p[0]),
                min(im.acq_time for im in p[0]),
                min(im.instance for im in p[0]),
                min(im.offset for im in p[0]),
            )
        )
        index = 0
        for imgs, reasons in parts:
            if len(imgs) == 1:
                im = imgs[0]
                result.left_out.append(
                    ScanNote(
                        im.hdr.path,
                        "single CT slice that is no part of a volume "
                        f"(series {im.hdr.ds.get('SeriesNumber', '?')}, position "
                        f"{im.offset:.2f} mm along the normal): not converted",
                    )
                )
                continue
            acq = _make_acquisition(imgs, index, reasons, source, tol, result)
            if acq is not None:
                result.acquisitions.append(acq)
                index += 1


def _make_acquisition(
    imgs: list[_Image],
    index: int,
    reasons: list[str],
    source: str,
    tol: Tolerances,
    result: ScanResult,
) -> Acquisition | None:
    imgs = sorted(imgs, key=lambda im: (im.offset, im.instance))
    first = imgs[0]
    ds = first.hdr.ds
    numbers = sorted({im.acq_number for im in imgs if im.acq_number is not None})
    label = (
        f"patient {ds.get('PatientID', '')} series {ds.get('SeriesInstanceUID', '')} "
        f"#{ds.get('SeriesNumber', '')}"
    )
    positions = [im.position for im in imgs]
    try:
        slice_grid(positions, first.orientation, first.spacing, source=label, tol=tol)
    except SlantedStackError as exc:
        result.left_out.append(ScanNote(first.hdr.path, f"{len(imgs)} slices: {exc.reason}"))
        return None
    except GeometryError:
        pass  # irregular spacing: the reader refuses it naming every position
    notes = [ScanNote(first.hdr.path, r) for r in reasons]
    if len(numbers) > 1 and not any("AcquisitionNumber" in r for r in reasons):
        notes.append(
            ScanNote(
                first.hdr.path,
                f"AcquisitionNumbers {numbers} on one regular stack: kept as one volume",
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
        acquisition_number=numbers[0] if numbers else None,
        acquisition_time=acq_time,
        index_in_series=index,
        slices=tuple(SliceRef(im.hdr.path, im.sop, im.position, im.frame) for im in imgs),
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
