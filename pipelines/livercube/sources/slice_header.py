"""What decoding one CT slice needs from its header, read once at planning and reused.

Planning parses every header anyway (on the workers); the conversion task used to parse each
one again with pydicom — about 0.3 ms for a short synthetic header and 0.8 ms for a real
scanner's (260 elements in pydicom's ``CT_small.dcm``), a tenth of a task's CPU.  So planning
keeps, per single-frame slice, the few values the decoder uses (:class:`SliceHeader`) and,
for a plain uncompressed 16-bit slice, where its pixels start plus a BLAKE2 digest of every
byte before them (:class:`PixelLocation`).  The task fetches the file as before; when the
digest of the same bytes matches, the header is the one planning parsed, so its values hold
and the pixels are viewed in place.  Any difference — the file was rewritten, a different
copy answers, the digest is absent — and the task parses the file itself, as it always did.

Everything the decoder reads from a header goes through :func:`slice_header`, on both paths,
so the planned and the parsed slice are decoded by the same code.
"""

from __future__ import annotations

import io
from typing import Any, NamedTuple

import numpy as np
import pydicom

from livercube.sources.dicom_headers import (
    MISSING,
    PIXEL_ELEMENT_HEADER,
    PIXEL_TAG_LE,
    header_digest,
    stored_value,
)

#: Transfer syntaxes whose pixel data are the file's own bytes after the header (no deflate,
#: no encapsulation, little endian).
NATIVE_LITTLE_ENDIAN = frozenset(
    (pydicom.uid.ImplicitVRLittleEndian, pydicom.uid.ExplicitVRLittleEndian)
)
_UNDEFINED_LENGTH = 0xFFFFFFFF


class PixelLocation(NamedTuple):
    """Where a plain slice's stored values lie in its file, and the digest that vouches for
    the header in front of them."""

    start: int  # first byte of the pixel values (after the pixel data element's header)
    dtype: str  # "<u2" or "<i2" (PixelRepresentation)
    digest: str  # header_digest of the file's first ``start`` bytes

    def view(self, blob: bytes, rows: int, columns: int) -> np.ndarray | None:
        """The stored values as a view of ``blob``; ``None`` unless its header is the one
        planned (same digest) and the whole frame is there."""
        end = self.start + 2 * rows * columns
        if len(blob) < end or header_digest(io.BytesIO(blob), self.start) != self.digest:
            return None
        return np.frombuffer(
            blob, dtype=self.dtype, count=rows * columns, offset=self.start
        ).reshape(rows, columns)


class SliceHeader(NamedTuple):
    """The attributes one slice is checked and rescaled with (:mod:`~livercube.sources.dicom_ct`).

    Padding values are already in the signedness of the pixel data; ``pixels`` is set only
    for a plain slice whose header bytes planning digested.
    """

    sop_uid: str
    rows: int
    columns: int
    orientation: tuple[float, ...]
    slope: float
    intercept: float
    pixel_representation: int
    padding_value: int | None
    padding_limit: int | None
    thickness: float | None
    pixels: PixelLocation | None = None


def _signed(value: int, pixel_representation: int) -> int:
    """A 16-bit padding value in the signedness of the pixel data (its VR may disagree)."""
    if pixel_representation == 1 and value >= 1 << 15:
        return value - (1 << 16)
    if pixel_representation != 1 and value < 0:
        return value + (1 << 16)
    return value


class _Values:
    """Attribute values of one dataset, each converted once per distinct stored value with
    a planning chunk's ``cache`` (:func:`~livercube.sources.dicom_headers.stored_value`);
    PixelRepresentation is the context, since it decides the VR of the padding values."""

    def __init__(self, ds: pydicom.Dataset, cache: dict | None) -> None:
        self._ds = ds
        self._cache = cache
        rep = ds.get_item(_PIXEL_REPRESENTATION) if cache is not None else None
        self._context = None if rep is None else (rep.VR, rep.value)

    def get(self, keyword: str, default: Any = None) -> Any:
        value = stored_value(self._ds, _TAGS[keyword], self._cache, self._context)
        return default if value is MISSING else value


_KEYWORDS = (
    "SOPInstanceUID", "Rows", "Columns", "ImageOrientationPatient", "RescaleSlope",
    "RescaleIntercept", "PixelRepresentation", "PixelPaddingValue", "PixelPaddingRangeLimit",
    "SliceThickness", "NumberOfFrames", "SamplesPerPixel", "BitsAllocated", "BitsStored",
)  # fmt: skip
_TAGS = {k: pydicom.datadict.tag_for_keyword(k) for k in _KEYWORDS}
_PIXEL_REPRESENTATION = _TAGS["PixelRepresentation"]


def _padding(values: _Values, keyword: str, pixel_representation: int) -> int | None:
    value = values.get(keyword)
    if value is None or isinstance(value, bytes):  # absent, or an undecodable raw value
        return None
    return _signed(int(value), pixel_representation)


def slice_header(
    ds: pydicom.Dataset, pixels: PixelLocation | None = None, cache: dict | None = None
) -> SliceHeader:
    """The decoder's view of one slice header (a file, or a frame view of a multi-frame file).

    ``cache``: conversions shared between the headers of a chunk (planning); values are the
    same with or without it.  Raises ``ValueError``/``TypeError`` for a value that is not a
    number where one must be.
    """
    v = _Values(ds, cache)
    rep = int(v.get("PixelRepresentation", 0) or 0)
    thickness = v.get("SliceThickness")
    return SliceHeader(
        sop_uid=str(v.get("SOPInstanceUID", "")),
        rows=int(v.get("Rows", 0) or 0),
        columns=int(v.get("Columns", 0) or 0),
        orientation=tuple(float(x) for x in v.get("ImageOrientationPatient") or ()),
        slope=float(v.get("RescaleSlope", 1) or 1),
        intercept=float(v.get("RescaleIntercept", 0) or 0),
        pixel_representation=rep,
        padding_value=_padding(v, "PixelPaddingValue", rep),
        padding_limit=_padding(v, "PixelPaddingRangeLimit", rep),
        thickness=None if thickness in (None, "") else float(thickness),
        pixels=pixels,
    )


def plain_16_bit_dtype(ds: pydicom.Dataset, cache: dict | None = None) -> str | None:
    """``"<u2"``/``"<i2"`` for an uncompressed little-endian single-frame slice of one 16-bit
    sample (BitsStored = BitsAllocated = 16: no bits to mask or sign-extend), whose stored
    values are the pixel bytes themselves; ``None`` for anything else (pydicom decodes it)."""
    meta = getattr(ds, "file_meta", None)
    ts = getattr(meta, "TransferSyntaxUID", None)
    if ts is None or ts.is_compressed or not ts.is_little_endian:
        return None
    v = _Values(ds, cache)
    if int(v.get("NumberOfFrames", 1) or 1) != 1 or int(v.get("SamplesPerPixel", 1) or 1) != 1:
        return None
    if int(v.get("BitsAllocated", 0) or 0) != 16 or int(v.get("BitsStored", 0) or 0) != 16:
        return None
    return "<i2" if int(v.get("PixelRepresentation", 0) or 0) == 1 else "<u2"


def pixel_location(
    ds: pydicom.Dataset, head: bytes, at: int, cache: dict | None = None
) -> PixelLocation | None:
    """Where the pixels of a plain slice start, given the file's first bytes ``head`` and the
    offset ``at`` of its pixel data element (where pydicom stopped reading the header).

    ``None`` unless the transfer syntax is native little endian (a deflated file's header is
    not at these offsets), the slice is plain 16-bit (:func:`plain_16_bit_dtype`) and the
    element is (7FE0,0010) with a defined length that holds a whole frame.
    """
    if getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None) not in (
        NATIVE_LITTLE_ENDIAN
    ):
        return None
    try:
        dtype = plain_16_bit_dtype(ds, cache)
        need = 2 * int(ds.Rows) * int(ds.Columns)
    except (AttributeError, TypeError, ValueError):
        return None
    if dtype is None or head[at : at + 4] != PIXEL_TAG_LE:
        return None
    # explicit VR: tag, VR, 2 reserved bytes, 4-byte length; implicit VR: tag, 4-byte length
    # (an implicit length is even, so it never reads as "OW"/"OB")
    implicit = head[at + 4 : at + 6] not in (b"OW", b"OB")
    start = at + PIXEL_ELEMENT_HEADER[implicit]
    if len(head) < start:
        return None
    length = int.from_bytes(head[start - 4 : start], "little")
    if length == _UNDEFINED_LENGTH or length < need:
        return None
    return PixelLocation(start, dtype, header_digest(io.BytesIO(head), start))


__all__ = [
    "NATIVE_LITTLE_ENDIAN",
    "PixelLocation",
    "SliceHeader",
    "pixel_location",
    "plain_16_bit_dtype",
    "slice_header",
]
