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

import gc
import io
from collections import defaultdict
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from functools import partial
from pathlib import PurePosixPath
from typing import Any, NamedTuple, TypeVar

import fsspec
import numpy as np
import pydicom
from fsspec.implementations.local import LocalFileSystem

from livercube.errors import GeometryError, SlantedStackError, SourceError
from livercube.fanout import Mapper, balanced_size, chunks, mapper_slots, results_in_order
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
    MISSING,
    Header,
    NotDicomError,
    header_digest,
    list_files,
    read_header,
    stored_value,
)
from livercube.sources.seg_frames import KnownFrames, frame_table
from livercube.sources.slice_header import SliceHeader, pixel_location, slice_header

T = TypeVar("T")

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
    #: the header as planning read it, for the task to reuse when the file is unchanged
    #: (single-frame slices; see :mod:`livercube.sources.slice_header`)
    header: SliceHeader | None = None


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
    frame_of_reference_uid: str = ""
    #: the SEG's frame table, built where its header was read (a worker): matching it to a
    #: CT on the client then reads nothing.  ``None``: it could not be built there, and the
    #: client reads the header again and reports why.
    frames: KnownFrames | None = None


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


#: (keyword, tag) of :data:`ALLOWED_ATTRIBUTES`, resolved once.
_ALLOWED_TAGS: tuple[tuple[str, int], ...] = tuple(
    (k, int(pydicom.datadict.tag_for_keyword(k))) for k in ALLOWED_ATTRIBUTES
)
#: Elements a value's conversion can depend on besides its own bytes: the character set
#: (text VRs) and PixelRepresentation (US-or-SS elements such as PixelPaddingValue).
_CONTEXT_TAGS = (0x00080005, 0x00280103)


def allowed_attrs(ds: pydicom.Dataset, converted: dict[tuple, Any] | None = None) -> dict[str, Any]:
    """The allow-listed attributes present and non-empty, as plain Python values.

    ``converted`` remembers conversions by the element's stored bytes and what else its
    conversion reads (:func:`~livercube.sources.dicom_headers.stored_value`).
    """
    cache = {} if converted is None else converted
    context = tuple(_stored_bytes(ds.get_item(t)) for t in _CONTEXT_TAGS)
    out: dict[str, Any] = {}
    for key, tag in _ALLOWED_TAGS:
        v = stored_value(ds, tag, cache, context, _plain_or_none)
        if v is not MISSING and v is not None:
            out[key] = v
    return out


def _plain_or_none(value: Any) -> Any:
    """``plain_value``, with absent and empty values as ``None``."""
    return None if value is None or value == "" else plain_value(value)


def _stored_bytes(elem: Any) -> Any:
    """What identifies an element's value: its raw bytes, else its converted value."""
    if elem is None:
        return None
    value = elem.value
    return value if isinstance(value, bytes) else repr(value)


def _int_or_none(v: Any) -> int | None:
    if v is None or v == "":
        return None
    try:
        return int(v)
    except (TypeError, ValueError):
        return None


# --------------------------------------------------------------------------- scan

#: At most this many files' headers per task: the results of one task stay small and a lost
#: worker costs little re-reading.
HEADER_CHUNK_FILES = 256
#: At least this many per task: a Dask task costs ~1 ms, a header ~1.5 ms of CPU.
MIN_HEADER_CHUNK_FILES = 32
#: Tasks per worker thread in between: the last wave leaves little idle when costs differ.
HEADER_TASKS_PER_SLOT = 4


class _SeriesFields(NamedTuple):
    """What grouping and the Acquisition record need of a file's study/series attributes.

    Kept as the scan used to read them from the header (``str(...)`` versus ``or ""`` forms
    differ for empty elements), so a plan does not depend on where the header was read.
    """

    key: tuple[str, str]  # (StudyInstanceUID, SeriesInstanceUID) as grouped
    label: str  # "patient … series … #…", for geometry messages
    number_text: str  # SeriesNumber as notes quote it ("?" when absent)
    patient_id: str
    study_uid: str
    study_date: str
    study_description: str
    series_uid: str
    series_number: int | None
    series_description: str
    frame_of_reference_uid: str


def _series_fields(ds: pydicom.Dataset) -> _SeriesFields:
    def text(keyword: str) -> str:
        return str(ds.get(keyword, "") or "")

    return _SeriesFields(
        key=(str(ds.get("StudyInstanceUID", "")), str(ds.get("SeriesInstanceUID", ""))),
        label=f"patient {ds.get('PatientID', '')} series {ds.get('SeriesInstanceUID', '')} "
        f"#{ds.get('SeriesNumber', '')}",
        number_text=f"{ds.get('SeriesNumber', '?')}",
        patient_id=text("PatientID"),
        study_uid=text("StudyInstanceUID"),
        study_date=text("StudyDate"),
        study_description=text("StudyDescription"),
        series_uid=text("SeriesInstanceUID"),
        series_number=_int_or_none(ds.get("SeriesNumber")),
        series_description=text("SeriesDescription"),
        frame_of_reference_uid=text("FrameOfReferenceUID"),
    )


@dataclass(slots=True)
class _Image:
    """One CT slice as grouping sees it: small, no pydicom Dataset.

    Built where the header is read (possibly a Dask worker); it travels to the planner as
    one column of a :class:`HeaderChunk`, not as an object.
    """

    path: str
    size: int
    complete: bool | None  # uncompressed pixel bytes fully present? None: cannot tell
    sop: str
    orientation: tuple[float, ...]
    position: tuple[float, float, float]
    rows: int
    cols: int
    spacing: tuple[float, float]
    acq_number: int | None
    acq_time: str  # AcquisitionDate + AcquisitionTime, for ordering and splitting
    instance: int
    series: _SeriesFields
    acquisition_time: str  # AcquisitionTime alone, as the record reports it
    slice_thickness: Any
    attrs: dict[str, Any]  # allowed_attrs of the file
    frame: int | None = None
    header: SliceHeader | None = None  # what the decoder needs (single-frame slices)
    offset: float = 0.0  # along the group's normal; set by partition_series, never shipped


#: The fields a chunk ships per slice (``offset`` is the planner's): those the slices of a
#: series share first, so pickle's references to them stay short.
_WIRE_FIELDS = (
    "orientation", "spacing", "series", "attrs", "acq_time", "acquisition_time",
    "slice_thickness", "rows", "cols", "complete", "acq_number", "frame", "instance",
    "size", "position", "sop", "path", "header",
)  # fmt: skip
#: :class:`_Image`'s positional arguments (every field but ``offset``).
_IMAGE_ARGS = tuple(f.name for f in fields(_Image) if f.name != "offset")


def _own_copy(value: Any) -> Any:
    """A copy of plain values (dicts and lists of str/int/float) sharing nothing mutable."""
    if isinstance(value, dict):
        return {k: _own_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_own_copy(v) for v in value]
    return value


class _Outcome(NamedTuple):
    """What one file contributes to the scan; exactly one of the fields is set (or none:
    a document the layout ships, not worth a word)."""

    images: tuple[_Image, ...] = ()
    seg: SegInstance | None = None
    note: ScanNote | None = None
    lost: ScanNote | None = None


class HeaderChunk(NamedTuple):
    """What one planning task sends back: its files' contributions, each list in file order.

    Slices travel as columns (one tuple per :data:`_WIRE_FIELDS` entry) rather than one
    object per file: the client unpickles a few dozen containers per chunk instead of
    several per file, and what the files of a series share is sent once.
    """

    n_images: int
    columns: tuple[tuple[Any, ...], ...]
    segs: tuple[SegInstance, ...]
    notes: tuple[ScanNote, ...]
    lost: tuple[ScanNote, ...]

    @classmethod
    def pack(cls, outcomes: Sequence[_Outcome]) -> HeaderChunk:
        images = [im for o in outcomes for im in o.images]
        columns = tuple(tuple(getattr(im, f) for im in images) for f in _WIRE_FIELDS)
        return cls(
            n_images=len(images),
            columns=columns if images else (),
            segs=tuple(o.seg for o in outcomes if o.seg is not None),
            notes=tuple(o.note for o in outcomes if o.note is not None),
            lost=tuple(o.lost for o in outcomes if o.lost is not None),
        )

    def images(self) -> list[_Image]:
        """The chunk's slices as the planner groups them (fresh objects, in file order)."""
        if not self.n_images:
            return []
        shipped = dict(zip(_WIRE_FIELDS, self.columns, strict=True))
        return list(map(_Image, *(shipped[f] for f in _IMAGE_ARGS)))


class _Interner:
    """Hands out one shared object per distinct value within a chunk of headers.

    The files of a series repeat their study/series attributes, orientation and most
    allow-listed values; sharing the objects lets pickle send each once per chunk.
    """

    def __init__(self) -> None:
        self._seen: dict[Any, Any] = {}
        #: allow-listed values converted so far, by stored bytes (see :func:`allowed_attrs`)
        self.converted: dict[tuple, Any] = {}
        #: the decoder's values likewise (see :func:`~livercube.sources.slice_header.slice_header`)
        self.decoder: dict[tuple, Any] = {}

    def __call__(self, value: T) -> T:
        if isinstance(value, list):  # mutable: share its items, never the list
            return [self(v) for v in value]  # type: ignore[return-value]
        # repr keeps apart what compares equal but is not the same value (-0.0 and 0.0)
        key = value if type(value) is str else (type(value), repr(value))
        return self._seen.setdefault(key, value)

    def attrs(self, attrs: dict[str, Any]) -> dict[str, Any]:
        return {k: self(v) for k, v in attrs.items()}


def _file_kind(path: str) -> str:
    """``"expected"`` (layout documents), ``"dicom-named"`` or ``"other"``, from the name only."""
    p = PurePosixPath(path)
    if p.name.startswith(".") or p.suffix.lower() in EXPECTED_SUFFIXES:
        return "expected"
    return "dicom-named" if p.suffix.lower() in DICOM_SUFFIXES else "other"


def _summarize_file(
    fs: fsspec.AbstractFileSystem,
    item: tuple[str, int],
    source: str,
    header_bytes: int,
    intern: _Interner,
) -> _Outcome:
    """Read one file's header and say what it contributes (never raises for a bad file)."""
    path, size = item
    if size == 0:
        return _Outcome(lost=ScanNote(path, "zero-byte file (damaged or incomplete download)"))
    try:
        hdr = read_header(fs, path, size, header_bytes=header_bytes)
    except NotDicomError:
        kind = _file_kind(path)
        if kind == "dicom-named":
            return _Outcome(lost=ScanNote(path, "named like a DICOM file but not DICOM (damaged?)"))
        if kind == "expected":
            return _Outcome()
        return _Outcome(note=ScanNote(path, "not a DICOM file"))
    except Exception as exc:  # corrupt header: keep scanning the collection
        return _Outcome(
            lost=ScanNote(path, f"unreadable DICOM header: {type(exc).__name__}: {exc}")
        )
    return _classify(hdr, source, intern)


def read_header_chunk(
    files: Sequence[tuple[str, int]],
    *,
    source: str,
    storage_options: dict | None,
    header_bytes: int = HEADER_PREFIX_BYTES,
    max_workers: int | None = None,
) -> HeaderChunk:
    """What the ``(path, size)`` of ``files`` contribute, in file order: one planning task.

    Runs wherever the mapper puts it (here or on a Dask worker), so it opens the filesystem
    itself from ``source``; headers are fetched ``max_workers`` at a time (default 1 locally,
    16 on object storage, where each read waits on the network).  From local disk a header
    costs ~1.5 ms of pure-Python parsing and no waiting: threads only fight over the GIL
    (measured: 4 threads take twice the CPU per file and longer on the clock).
    """
    fs, _ = fsspec.core.url_to_fs(source, **(storage_options or {}))
    intern = _Interner()

    def one(item: tuple[str, int]) -> _Outcome:
        return _summarize_file(fs, item, source, header_bytes, intern)

    workers = max_workers or (1 if isinstance(fs, LocalFileSystem) else 16)
    if workers > 1 and len(files) > 1:
        with ThreadPoolExecutor(max_workers=min(workers, len(files))) as pool:
            return HeaderChunk.pack(list(pool.map(one, files)))
    return HeaderChunk.pack([one(f) for f in files])


def scan(
    source: str | Sequence[str],
    storage_options: dict | None = None,
    *,
    header_bytes: int = HEADER_PREFIX_BYTES,
    max_workers: int | None = None,
    tol: Tolerances = DEFAULT_TOLERANCES,
    mapper: Mapper | None = None,
    chunk_files: int | None = None,
) -> ScanResult:
    """Discover CT acquisitions and SEG instances below ``source`` from headers only.

    ``source`` may be several URLs on one filesystem (the series prefixes of an IDC
    selection); the result's ``source`` is then the first one, which only names the
    filesystem the recorded paths belong to.

    Listing and grouping happen here; the headers are read in chunks of ``chunk_files``
    (default: about :data:`HEADER_TASKS_PER_SLOT` chunks per thread of the mapper, between
    :data:`MIN_HEADER_CHUNK_FILES` and :data:`HEADER_CHUNK_FILES` files) by
    :func:`read_header_chunk` through ``mapper`` (here, one chunk after another, by default;
    :func:`livercube.fanout.dask_map` reads them on a cluster's workers and hands each chunk
    back as it comes, so grouping it (:class:`Grouping`) overlaps the reading of the rest).
    The result does not depend on the mapper or the chunk size.
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

    size = chunk_files or balanced_size(
        len(files),
        mapper_slots(mapper),
        per_slot=HEADER_TASKS_PER_SLOT,
        smallest=MIN_HEADER_CHUNK_FILES,
        largest=HEADER_CHUNK_FILES,
    )
    parts = chunks(files, size) if files else []
    job = partial(
        read_header_chunk,
        source=result.source,
        storage_options=storage_options,
        header_bytes=header_bytes,
        max_workers=max_workers,
    )
    return group_outcomes(result, parts, results_in_order(mapper, job, parts), tol)


def group_outcomes(
    result: ScanResult,
    parts: Sequence[Sequence[tuple[str, int]]],
    outcomes: Iterable[HeaderChunk | BaseException],
    tol: Tolerances = DEFAULT_TOLERANCES,
) -> ScanResult:
    """Fill ``result`` from the chunks' outcomes, one per part in order, each folded in as it
    is taken from ``outcomes`` (a stream overlaps the grouping with the reads; see
    :class:`Grouping`)."""
    grouping = Grouping(result, tol)
    for part, got in zip(parts, outcomes, strict=True):
        grouping.add(part, got)
    return grouping.finish()


class Grouping:
    """Turns the chunks' outcomes into acquisitions on the client (no I/O), chunk by chunk.

    The scan hands each chunk over in file order as soon as its task is back, so most of the
    client's work per file (unpacking the slices, noting each SOP instance, sorting slices
    into geometry groups) happens while the workers still read the next chunks; only
    splitting the groups into volumes waits for the last chunk (:meth:`finish`), since a
    series may straddle any number of chunks.  The notes come out the same, in the same
    order, as from a file-by-file scan.  A chunk whose task failed loses each of its files,
    named with the error, so nothing read by a dead worker vanishes from the report.
    """

    def __init__(self, result: ScanResult, tol: Tolerances = DEFAULT_TOLERANCES) -> None:
        self.result, self.tol = result, tol
        self._images: list[_Image] = []
        self._instances: set[tuple[str, int | None]] = set()
        #: set once an instance repeats or a copy is truncated: :meth:`finish` then picks
        #: the copies to keep and sorts them into groups again, from all the slices
        self._regroup = False
        self._groups = _GeometryGroups(tol)

    def add(self, part: Sequence[tuple[str, int]], got: HeaderChunk | BaseException) -> None:
        """Fold in the outcome of the chunk of ``part``'s files (chunks in file order)."""
        result = self.result
        if isinstance(got, BaseException):
            reason = f"header not read: the task reading it failed ({type(got).__name__}: {got})"
            result.left_out.extend(ScanNote(path, reason) for path, _size in part)
            return
        result.left_out.extend(got.lost)
        result.notes.extend(got.notes)
        result.segs.extend(got.segs)
        with _gc_paused():
            images = got.images()
            self._images.extend(images)
            seen = self._instances
            for im in images:
                key = (im.sop, im.frame)
                if key in seen or im.complete is False:
                    self._regroup = True
                seen.add(key)
                if not self._regroup:
                    self._groups.add(im)

    def finish(self) -> ScanResult:
        """The scan's result, once every chunk has been added."""
        result = self.result
        with _gc_paused():
            groups = self._groups
            if self._regroup:
                groups = _GeometryGroups(self.tol)
                for im in _drop_duplicate_instances(self._images, result):
                    groups.add(im)
            _build_acquisitions(groups, result, result.source, self.tol)
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


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Suspend the cyclic garbage collector while the plan's objects are built.

    Grouping creates a few objects per file and frees almost none, so every collection in
    between walks the whole growing graph for nothing: a third of the client's time for
    10,000 files.  Nothing built here forms cycles that need collecting.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


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
        frame_of_reference_uid=str(ds.get("FrameOfReferenceUID", "") or ""),
        frames=_seg_frames(hdr),
    )


def _seg_frames(hdr: Header) -> KnownFrames | None:
    """The SEG's frame table and the digest of the header bytes it came from, or ``None``.

    Built here, beside the header read, so a cluster builds the tables of a collection's
    SEGs in parallel (hundreds of ms each for CRLM's many-segment SEGs) instead of the client
    re-reading every SEG one after another."""
    if hdr.pixel_at is None or len(hdr.head) < hdr.pixel_at:
        return None
    try:
        frames = frame_table(hdr.ds, hdr.path)
    except SourceError:
        return None  # the client's own read reports the reason
    return KnownFrames(header_digest(io.BytesIO(hdr.head), hdr.pixel_at), frames)


def _classify(hdr: Header, source: str, intern: _Interner) -> _Outcome:
    """What a header contributes: CT slices, a SEG, a note, or a lost input."""
    ds = hdr.ds
    sop_class = str(ds.get("SOPClassUID", ""))
    if sop_class in dicom_sop.SEGMENTATION_CLASSES:
        return _Outcome(seg=_seg_instance(hdr, source))
    if sop_class not in dicom_sop.CT_CLASSES:
        name = dicom_sop.sop_class_name(sop_class)
        return _Outcome(note=ScanNote(hdr.path, f"non-image or non-CT object: {name}"))
    image_type = [str(v).upper() for v in (ds.get("ImageType") or [])]
    if "LOCALIZER" in image_type:
        return _Outcome(note=ScanNote(hdr.path, "localizer (ImageType contains LOCALIZER)"))
    multiframe = sop_class in dicom_sop.MULTIFRAME_CT_CLASSES or n_frames(ds) > 1
    n_groups = len(ds.get("PerFrameFunctionalGroupsSequence") or [])
    if multiframe and n_groups not in (0, n_frames(ds)):
        return _Outcome(
            lost=ScanNote(
                hdr.path,
                f"damaged multi-frame CT: {n_groups} per-frame functional groups for "
                f"NumberOfFrames {n_frames(ds)}",
            )
        )
    views = [frame_view(ds, f) for f in range(n_frames(ds))] if multiframe else [ds]
    header = None if multiframe else _decoder_header(hdr, intern.decoder)
    series = intern(_series_fields(ds))
    attrs = intern.attrs(allowed_attrs(ds, intern.converted))
    acq_number = _int_or_none(ds.get("AcquisitionNumber"))
    acq_time = intern(
        str(ds.get("AcquisitionDate", "") or "") + str(ds.get("AcquisitionTime", "") or "")
    )
    acquisition_time = intern(str(ds.get("AcquisitionTime", "") or ""))
    thickness = intern(plain_value(ds.get("SliceThickness")))
    sop = str(ds.get("SOPInstanceUID", ""))
    images = []
    for f, view in enumerate(views):
        try:
            orientation, position, spacing, rows, cols = _plane(view)
        except (AttributeError, TypeError, ValueError, GeometryError) as exc:
            where = f"frame {f + 1} of a multi-frame CT" if multiframe else "CT image"
            return _Outcome(
                lost=ScanNote(hdr.path, f"{where} without usable plane geometry ({exc})")
            )
        if not (0 < rows <= MAX_MATRIX and 0 < cols <= MAX_MATRIX):
            return _Outcome(
                lost=ScanNote(hdr.path, f"implausible matrix {rows}×{cols} (damaged header?)")
            )
        images.append(
            _Image(
                path=hdr.path,
                size=hdr.size,
                complete=hdr.complete,
                sop=sop,
                orientation=intern(orientation),
                position=position,
                rows=rows,
                cols=cols,
                spacing=intern(spacing),
                acq_number=acq_number,
                acq_time=acq_time,
                instance=(_int_or_none(ds.get("InstanceNumber")) or 0) + f,
                series=series,
                acquisition_time=acquisition_time,
                slice_thickness=thickness,
                attrs=attrs,
                frame=f if multiframe else None,
                header=header,
            )
        )
    return _Outcome(images=tuple(images))


def _decoder_header(hdr: Header, cache: dict) -> SliceHeader | None:
    """The slice's :class:`SliceHeader` for the task, or ``None`` when a value is not what
    the decoder can use (the task then parses the file and reports what is wrong)."""
    try:
        pixels = None
        if hdr.pixel_at is not None:
            pixels = pixel_location(hdr.ds, hdr.head, hdr.pixel_at, cache)
        return slice_header(hdr.ds, pixels, cache)
    except (AttributeError, TypeError, ValueError):
        return None


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
            key=lambda im: (im.complete is not False, im.complete is True, im.size),
            reverse=True,
        )
        best = rank[0]
        if best.complete is False:
            result.left_out.append(
                ScanNote(
                    best.path,
                    "truncated file: its pixel data is shorter than the header announces",
                )
            )
        else:
            kept.append(best)
        for other in rank[1:]:
            why = "truncated " if other.complete is False else ""
            result.notes.append(
                ScanNote(
                    other.path,
                    f"duplicate SOPInstanceUID {sop}: {why}copy of {other.size} bytes "
                    f"dropped, kept {best.path} ({best.size} bytes)",
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
    for im in sorted(group, key=lambda im: (im.acq_time, im.instance, im.path)):
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
    group: list[_Image],
    tol: Tolerances = DEFAULT_TOLERANCES,
    *,
    normal: np.ndarray | None = None,
) -> list[tuple[list[_Image], list[str]]]:
    """Split one geometry group (same orientation, matrix, pixel spacing) into volumes.

    Returns ``(images, reasons)`` per part; see the module docstring for the rules.
    ``normal`` is ``slice_normal`` of the first image's orientation, if already known.
    """
    if normal is None:
        normal = slice_normal(group[0].orientation)
    # one product for the group, as slice_grid computes them (not one np.dot per slice)
    offsets = (np.array([im.position for im in group], dtype=np.float64) @ normal).tolist()
    for im, offset in zip(group, offsets, strict=True):
        im.offset = offset
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


def _same_spacing(a: tuple[float, float], b: tuple[float, float]) -> bool:
    """``np.allclose(a, b, rtol=1e-4, atol=1e-4)`` for finite pairs, without numpy's
    per-call overhead: it runs once per slice on the client, where planning must stay cheap."""
    return all(abs(x - y) <= 1e-4 + 1e-4 * abs(y) for x, y in zip(a, b, strict=True))


class _GeometryGroups:
    """Slices sorted by (study, series), then into groups of one orientation, matrix and
    pixel spacing (each group's first slice stands for it), in the order they come."""

    def __init__(self, tol: Tolerances) -> None:
        self.tol = tol
        self.series: dict[tuple[str, str], list[list[_Image]]] = defaultdict(list)

    def add(self, im: _Image) -> None:
        groups = self.series[im.series.key]
        for g in groups:
            ref = g[0]
            if (
                ref.rows == im.rows
                and ref.cols == im.cols
                # equal values (a chunk shares one object) are the same geometry: the
                # tolerant comparisons only decide for the few slices that differ
                and (
                    ref.orientation == im.orientation
                    or same_orientation(ref.orientation, im.orientation, self.tol)
                )
                and (ref.spacing == im.spacing or _same_spacing(ref.spacing, im.spacing))
            ):
                g.append(im)
                return
        groups.append([im])


def _build_acquisitions(
    grouped: _GeometryGroups, result: ScanResult, source: str, tol: Tolerances
) -> None:
    series = grouped.series
    # each group's slice normal, computed once (np.cross costs more than a group's loop)
    normals = {id(g): slice_normal(g[0].orientation) for gs in series.values() for g in gs}
    # study's main slice normal: that of its largest geometry group
    study_normal: dict[str, np.ndarray] = {}
    study_size: dict[str, int] = defaultdict(int)
    for (study, _), groups in series.items():
        for g in groups:
            if len(g) > study_size[study]:
                study_size[study] = len(g)
                study_normal[study] = normals[id(g)]

    for (study, _series_uid), groups in series.items():
        parts: list[tuple[list[_Image], list[str]]] = []
        for g in groups:
            normal = normals[id(g)]
            main = study_normal.get(study)
            if len(g) == 1 and main is not None and abs(float(np.dot(main, normal))) < 0.5:
                result.notes.append(
                    ScanNote(
                        g[0].path,
                        "localizer: single slice orthogonal to the study's main orientation",
                    )
                )
                continue
            parts.extend(partition_series(g, tol, normal=normal))
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
                        im.path,
                        "single CT slice that is no part of a volume "
                        f"(series {im.series.number_text}, position "
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
    fields = first.series
    numbers = sorted({im.acq_number for im in imgs if im.acq_number is not None})
    label = fields.label
    positions = [im.position for im in imgs]
    try:
        slice_grid(positions, first.orientation, first.spacing, source=label, tol=tol)
    except SlantedStackError as exc:
        result.left_out.append(ScanNote(first.path, f"{len(imgs)} slices: {exc.reason}"))
        return None
    except GeometryError:
        pass  # irregular spacing: the reader refuses it naming every position
    notes = [ScanNote(first.path, r) for r in reasons]
    if len(numbers) > 1 and not any("AcquisitionNumber" in r for r in reasons):
        notes.append(
            ScanNote(
                first.path,
                f"AcquisitionNumbers {numbers} on one regular stack: kept as one volume",
            )
        )
    attrs = _own_copy(first.attrs)  # its values are shared between the slices of a chunk
    times = sorted(im.acquisition_time for im in imgs)
    times = [t for t in times if t]
    acq_time = times[0] if times else ""
    if acq_time:
        attrs["AcquisitionTime"] = acq_time
    thickness = {im.slice_thickness for im in imgs}
    if len(thickness) > 1:
        attrs["SliceThickness"] = sorted(t for t in thickness if t is not None)
    return Acquisition(
        source=source,
        patient_id=fields.patient_id,
        study_uid=fields.study_uid,
        study_date=fields.study_date,
        study_description=fields.study_description,
        series_uid=fields.series_uid,
        series_number=fields.series_number,
        series_description=fields.series_description,
        acquisition_number=numbers[0] if numbers else None,
        acquisition_time=acq_time,
        index_in_series=index,
        slices=tuple(SliceRef(im.path, im.sop, im.position, im.frame, im.header) for im in imgs),
        orientation=first.orientation,  # type: ignore[arg-type]
        pixel_spacing=first.spacing,
        rows=first.rows,
        columns=first.cols,
        estimated_bytes=2 * first.rows * first.cols * len(imgs),
        file_bytes=sum(im.size for im in imgs),
        attrs=attrs,
        notes=tuple(notes),
        frame_of_reference_uid=fields.frame_of_reference_uid,
    )
