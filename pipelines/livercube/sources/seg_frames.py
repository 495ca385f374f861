"""Decode a DICOM-SEG: its per-frame geometry, its segmentation type and its frames.

The reading half of the SEG reader (matching is :mod:`~livercube.sources.seg_match`, placement
:mod:`~livercube.sources.seg_place`).  :func:`frame_table` collects every frame's plane position,
orientation, pixel spacing, segment number and referenced instances from the per-frame and
shared functional groups; :class:`Decoder` yields one frame at a time (numpy for native pixel
data, pydicom's per-frame decoder for compressed); :func:`frame_mask` says which pixels of a
decoded frame belong to a segment for BINARY, FRACTIONAL and LABELMAP segmentations.

The frame table is needed twice: to match a SEG to its CT while planning, and to place its
frames in the volume task.  Parsing the per-frame functional groups is most of a SEG's
decode cost, so the plan hands its table to the task as :class:`KnownFrames`, keyed by a
digest of the header bytes it was computed from (everything before the pixel data,
:func:`header_digest`); the task uses it only when its own copy of the file has the same
header bytes, else it builds the table again.
"""

from __future__ import annotations

from dataclasses import dataclass

import fsspec
import numpy as np
import pydicom
from pydicom.dataset import Dataset

from livercube.errors import GeometryError, SourceError, UnreadableFileError
from livercube.sources import dicom_raw as raw
from livercube.sources import dicom_sop
from livercube.sources.dicom_frames import first_item, functional_group, n_frames
from livercube.sources.dicom_geometry import DEFAULT_TOLERANCES, analyse_spacing, slice_normal
from livercube.sources.dicom_headers import PIXEL_ELEMENT_HEADER, header_digest
from livercube.sources.dicom_sop import SegmentationType


@dataclass
class Frames:
    """Per-frame geometry of a SEG (frame f is 0-based)."""

    rows: int
    cols: int
    position: np.ndarray  # (n, 3) LPS x, y, z of pixel (0, 0)
    row_cos: np.ndarray  # (n, 3) direction of increasing column index
    col_cos: np.ndarray  # (n, 3) direction of increasing row index
    pixel_spacing: np.ndarray  # (n, 2) PixelSpacing: (between rows, between columns)
    thickness: np.ndarray  # (n,) SliceThickness or nan
    segment: np.ndarray  # (n,) ReferencedSegmentNumber (0: none, LABELMAP)
    refs: list[tuple[str, ...]]  # referenced SOPInstanceUIDs per frame

    @property
    def n(self) -> int:
        return len(self.refs)

    @property
    def normal(self) -> np.ndarray:
        n = np.cross(self.row_cos, self.col_cos)
        return n / np.linalg.norm(n, axis=1, keepdims=True)


@dataclass(frozen=True)
class KnownFrames:
    """A frame table computed earlier, and the :func:`header_digest` of the header it came from."""

    key: str
    frames: Frames


_PIXEL_DATA = 0x7FE00010


def pixel_data_start(ds: Dataset) -> int | None:
    """File offset of the PixelData element of a dataset just read (before it is decoded)."""
    elem = ds.get_item(_PIXEL_DATA)
    if not isinstance(elem, pydicom.dataelem.RawDataElement) or elem.value_tell is None:
        return None
    return int(elem.value_tell) - PIXEL_ELEMENT_HEADER[bool(elem.is_implicit_VR)]


def frames_of(
    ds: Dataset, source: str, known: KnownFrames | None = None, key: str | None = None
) -> Frames:
    """The frame table of ``ds``: ``known``'s when it was built from a header whose digest is
    ``key`` (this file's :func:`header_digest`), else built here."""
    if known is not None and key is not None and key == known.key:
        return known.frames
    return frame_table(ds, source)


def frame_table(ds: Dataset, source: str) -> Frames:
    try:
        return _frame_table_unchecked(ds, source)
    except SourceError:
        raise
    except (AttributeError, TypeError, ValueError, KeyError, IndexError) as exc:
        raise UnreadableFileError(
            source, f"malformed DICOM-SEG frame description: {type(exc).__name__}: {exc}"
        ) from exc


#: The per-frame attributes a frame table reads, by tag (see :mod:`.dicom_raw`).
_PLANE_POSITION = raw.tag("PlanePositionSequence")
_PLANE_ORIENTATION = raw.tag("PlaneOrientationSequence")
_PIXEL_MEASURES = raw.tag("PixelMeasuresSequence")
_SEGMENT_IDENTIFICATION = raw.tag("SegmentIdentificationSequence")
_DERIVATION_IMAGE = raw.tag("DerivationImageSequence")
_SOURCE_IMAGE = raw.tag("SourceImageSequence")
_POSITION = raw.tag("ImagePositionPatient")
_ORIENTATION = raw.tag("ImageOrientationPatient")
_PIXEL_SPACING = raw.tag("PixelSpacing")
_THICKNESS = raw.tag("SliceThickness")
_SEGMENT_NUMBER = raw.tag("ReferencedSegmentNumber")
_REFERENCED_SOP = raw.tag("ReferencedSOPInstanceUID")


def _present(values: list[float] | None) -> list[float]:
    """``values``, which must be there: numpy would store a missing one as NaN silently."""
    if values is None:
        raise ValueError("missing or empty")
    return values


def _frame_table_unchecked(ds: Dataset, source: str) -> Frames:
    n = int(ds.get("NumberOfFrames", 1) or 1)
    rows, cols = int(ds.Rows), int(ds.Columns)
    shared = first_item(ds.get("SharedFunctionalGroupsSequence"))
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    if str(ds.get("DimensionOrganizationType", "")).upper() == "TILED_FULL":
        raise GeometryError(source, "tiled (slide) segmentations are not supported")
    if (per_frame and len(per_frame) != n) or (n > 1 and not per_frame):
        raise UnreadableFileError(
            source,
            f"damaged DICOM-SEG: {len(per_frame)} per-frame functional groups for "
            f"NumberOfFrames {n}; frames cannot be placed",
        )
    pos = np.full((n, 3), np.nan)
    rc = np.full((n, 3), np.nan)
    cc = np.full((n, 3), np.nan)
    ps = np.full((n, 2), np.nan)
    th = np.full(n, np.nan)
    seg = np.zeros(n, dtype=np.int64)
    refs: list[tuple[str, ...]] = []
    for f in range(n):
        item = per_frame[f] if len(per_frame) else None
        p = functional_group(item, shared, _PLANE_POSITION)
        o = functional_group(item, shared, _PLANE_ORIENTATION)
        m = functional_group(item, shared, _PIXEL_MEASURES)
        try:
            pos[f] = _present(raw.decimals(p, _POSITION))  # type: ignore[arg-type]
            iop = _present(raw.decimals(o, _ORIENTATION))  # type: ignore[arg-type]
            rc[f], cc[f] = iop[:3], iop[3:]
            ps[f] = _present(raw.decimals(m, _PIXEL_SPACING))  # type: ignore[arg-type]
        except (AttributeError, TypeError, ValueError) as exc:
            raise GeometryError(
                source,
                f"frame {f + 1} has no usable ImagePositionPatient, ImageOrientationPatient or "
                f"PixelSpacing in patient coordinates ({exc})",
            ) from exc
        thickness = raw.decimals(m, _THICKNESS)  # type: ignore[arg-type]
        if thickness is not None:
            th[f] = thickness[0]
        ident = functional_group(item, shared, _SEGMENT_IDENTIFICATION)
        number = None if ident is None else raw.unsigned(ident, _SEGMENT_NUMBER)
        if number is not None:
            seg[f] = number
        uids: list[str] = []
        for der in raw.items(item, _DERIVATION_IMAGE):
            for src in raw.items(der, _SOURCE_IMAGE):
                ref = raw.uid(src, _REFERENCED_SOP)
                if ref:
                    uids.append(ref)
        refs.append(tuple(dict.fromkeys(uids)))
    for f in range(n):
        slice_normal(np.concatenate([rc[f], cc[f]]))  # raises GeometryError when degenerate
    if np.any(ps <= 0):
        raise GeometryError(source, f"non-positive PixelSpacing {ps[np.any(ps <= 0, axis=1)][0]}")
    rc /= np.linalg.norm(rc, axis=1, keepdims=True)
    cc /= np.linalg.norm(cc, axis=1, keepdims=True)
    return Frames(rows, cols, pos, rc, cc, ps, th, seg, refs)


def plane_spacing(frames: Frames) -> tuple[float | None, str | None]:
    """Spacing of the SEG's planes along their normal (gaps of omitted frames allowed)."""
    normal = frames.normal
    ref = normal[0]
    if np.max(np.abs(normal - ref)) > DEFAULT_TOLERANCES.orientation:
        return None, "frames have several orientations; slab thickness from SliceThickness"
    offsets = np.sort(frames.position @ ref)
    apart = np.diff(offsets) >= DEFAULT_TOLERANCES.duplicate_mm
    distinct = offsets[np.concatenate([[True], apart])]
    if distinct.size < 2:
        return None, None
    try:
        return analyse_spacing(distinct, source="SEG frames").spacing, None
    except GeometryError:
        d = float(np.min(np.diff(distinct)))
        return d, f"SEG planes are not regularly spaced; slab thickness {d:.4g} mm (smallest step)"


def open_seg(url: str, storage_options: dict | None):
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    return fs.open(path, "rb")


def read_seg_header(url: str, storage_options: dict | None) -> tuple[Dataset, str]:
    """A SEG's header (no pixel data) and its :func:`header_digest`."""
    try:
        with open_seg(url, storage_options) as f:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
            key = header_digest(f, f.tell())  # pydicom stops at the PixelData tag
    except Exception as exc:
        raise UnreadableFileError(url, f"cannot read the DICOM-SEG header: {exc}") from exc
    check_sop_class(ds, url)
    return ds, key


def check_sop_class(ds: Dataset, url: str) -> None:
    sop_class = str(ds.get("SOPClassUID", ""))
    if sop_class not in dicom_sop.SEGMENTATION_CLASSES:
        raise UnreadableFileError(url, f"not a Segmentation (SOP class {sop_class or 'missing'})")


def segmentation_type(ds: Dataset, url: str) -> SegmentationType:
    try:
        return SegmentationType.of(str(ds.get("SOPClassUID", "")), ds.get("SegmentationType"))
    except ValueError:
        raise SourceError(
            url, f"unsupported SegmentationType {ds.get('SegmentationType')!r}"
        ) from None


class Decoder:
    """The frames of a SEG, decoded once.

    Native (uncompressed) pixel data — what dcmqi and highdicom write by default — is unpacked
    with numpy in one step: BINARY frames are 1 bit per pixel packed back to back with no padding
    between frames (PS3.5 8.1.1, so a frame need not start on a byte), FRACTIONAL and LABELMAP
    frames are 8 or 16 bits.  Encapsulated (compressed) pixel data is decoded frame by frame by
    pydicom.  highdicom is not on this path (building its frame tables cost more than the whole
    placement); it stays the independent reference in ``verify`` and the tests.
    """

    def __init__(self, fileobj, url: str, notes: list[str]) -> None:
        self.url = url
        try:
            self.ds: Dataset = pydicom.dcmread(fileobj)
        except Exception as exc:
            raise UnreadableFileError(url, f"cannot read the DICOM-SEG: {exc}") from exc
        self._fileobj = fileobj
        self._header_end = pixel_data_start(self.ds)  # before the pixel data is decoded
        ts = getattr(getattr(self.ds, "file_meta", None), "TransferSyntaxUID", None)
        self._frames: np.ndarray | None = None
        self._packed: np.ndarray | None = None  # 1-bit frames, unpacked one at a time
        self._n, self._shape = 0, (0, 0)  # frames, (rows, columns) of native pixel data
        if ts is not None and not ts.is_compressed and "PixelData" in self.ds:
            self._unpack(ts.is_little_endian)

    def header_key(self) -> str | None:
        """:func:`header_digest` of this file (``None``: no pixel data ends its header).

        Computed only when asked (a frame table from planning is at hand), while the file
        is still open."""
        if self._header_end is None:
            return None
        return header_digest(self._fileobj, self._header_end)

    def _unpack(self, little_endian: bool) -> None:
        """Check the native pixel data holds every frame and make frames readable.

        8- and 16-bit frames are a view of the pixel data.  1-bit frames stay packed and are
        unpacked when asked for (:meth:`frame`): unpacking all of them at once builds a
        8-bit copy of every frame, empty ones included (47 MB for 179 frames of 512², whose
        fresh pages cost more than the unpacking).
        """
        ds = self.ds
        n, rows, cols = n_frames(ds), int(ds.Rows), int(ds.Columns)
        bits = int(ds.get("BitsAllocated", 1) or 1)
        need = n * rows * cols
        raw = np.frombuffer(ds.PixelData, dtype=np.uint8)
        if bits == 1:
            have = raw.size * 8
        elif bits in (8, 16):
            flat = raw.view(np.dtype(f"{'<' if little_endian else '>'}u{bits // 8}"))
            have = flat.size
        else:
            raise UnreadableFileError(self.url, f"unsupported BitsAllocated {bits} in a SEG")
        if have < need:
            raise UnreadableFileError(
                self.url,
                f"pixel data holds {have} of the {need} pixels of {n} frames (truncated file?)",
            )
        self._n, self._shape = n, (rows, cols)
        if bits == 1:
            self._packed = raw
        else:
            self._frames = flat[:need].reshape(n, rows, cols)

    def _bit_frame(self, f: int) -> np.ndarray:
        """Frame ``f`` of 1-bit pixel data, unpacked (it may start inside a byte)."""
        assert self._packed is not None
        if not 0 <= f < self._n:
            raise IndexError(f"frame index {f} outside the SEG's {self._n} frames")
        rows, cols = self._shape
        size = rows * cols
        first = f * size  # bit offset of the frame; frames are packed back to back
        lo, skip = divmod(first, 8)
        hi = (first + size + 7) // 8
        bits = np.unpackbits(self._packed[lo:hi], bitorder="little")
        # unpacked bits are 0 or 1: a boolean view of them is the frame's mask as it is
        return bits[skip : skip + size].view(bool).reshape(rows, cols)

    def frame(self, f: int) -> np.ndarray:
        if self._packed is not None:
            return self._bit_frame(f)
        if self._frames is not None:
            return self._frames[f]
        try:
            from pydicom.pixels import pixel_array

            return np.asarray(pixel_array(self.ds, index=f))
        except Exception as exc:
            raise UnreadableFileError(
                self.url, f"frame {f + 1} cannot be decoded (truncated or unsupported): {exc}"
            ) from exc


def is_background(item: Dataset) -> bool:
    """A LABELMAP segment describing pixel value 0 as background (dcmqi writes one)."""
    if int(item.SegmentNumber) != 0:
        return False
    typ = first_item(item.get("SegmentedPropertyTypeCodeSequence"))
    words = {str(item.get("SegmentLabel", "")), str(typ.get("CodeMeaning", "")) if typ else ""}
    return any(w.strip().lower() == "background" for w in words)


def frame_mask(
    raw: np.ndarray, seg_type: SegmentationType, number: int, max_fractional: int
) -> np.ndarray:
    if seg_type is SegmentationType.LABELMAP:
        return raw == number
    if seg_type is SegmentationType.FRACTIONAL:
        # probability/occupancy >= 0.5: stored / MaximumFractionalValue >= 0.5
        return raw.astype(np.int64) * 2 >= max_fractional
    # 1-bit frames arrive unpacked as booleans already (Decoder.frame)
    return raw if raw.dtype == bool else raw != 0
