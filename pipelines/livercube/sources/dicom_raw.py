"""Attribute values read straight off pydicom's raw elements, for the per-frame hot loops.

pydicom parses a file's elements lazily and converts one on first access: a keyword lookup,
the conversion hooks, a ``DSfloat`` per number and a validated ``MultiValue``.  That is right
for a header read once, and a quarter of the cost of a DICOM-SEG's frame table, which reads
six attributes from each of hundreds or thousands of per-frame items (a 184-frame SEG: 44 ms
through keywords, 34 ms through these; the rest is pydicom parsing the per-frame items,
five nested datasets per frame).  These helpers take the element by tag and
parse its stored bytes when it is still raw and little-endian, and otherwise (converted
already, big-endian, an unexpected VR) ask pydicom, so they return what pydicom's value
would give in every case (tests compare the two on every SEG they build).
"""

from __future__ import annotations

from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset


def tag(keyword: str) -> int:
    """The tag of a dictionary keyword (a typo fails at import, not at read time)."""
    found = tag_for_keyword(keyword)
    if found is None:
        raise KeyError(f"no DICOM attribute named {keyword!r}")
    return int(found)


_PAD = b"\x00 "


def _raw_bytes(elem: object, vrs: tuple[str, ...]) -> bytes | None:
    """The stored value of a raw little-endian element of one of ``vrs`` (or of implicit VR,
    whose VR comes from the dictionary), else ``None``: pydicom should convert it."""
    if not isinstance(elem, RawDataElement) or not elem.is_little_endian:
        return None
    if elem.VR is not None and elem.VR not in vrs:
        return None
    return elem.value if isinstance(elem.value, bytes) else None


def items(ds: Dataset | None, at: int) -> list[Dataset]:
    """The items of sequence ``at`` in ``ds`` ([] when absent or empty)."""
    if ds is None or at not in ds:
        return []
    value = ds[at].value
    return [] if isinstance(value, bytes | str) or not value else list(value)


def decimals(ds: Dataset, at: int) -> list[float] | None:
    """A DS attribute as floats; ``None`` when absent or empty.  Raises ValueError for a value
    that is not a number, as ``float`` of pydicom's value would."""
    elem = ds.get_item(at)
    if elem is None:
        return None
    raw = _raw_bytes(elem, ("DS",))
    if raw is not None:
        raw = raw.strip(_PAD)
        return [float(v) for v in raw.split(b"\\")] if raw else None
    value = ds[at].value
    if value is None or value == "":
        return None
    return [float(v) for v in value] if not isinstance(value, str | float | int) else [float(value)]


def unsigned(ds: Dataset, at: int) -> int | None:
    """A single US value; ``None`` when absent or empty."""
    elem = ds.get_item(at)
    if elem is None:
        return None
    raw = _raw_bytes(elem, ("US",))
    if raw is not None and len(raw) == 2:
        return int.from_bytes(raw, "little")
    if raw is not None and not raw:
        return None
    value = ds[at].value
    return None if value is None or value == "" else int(value)


def uid(ds: Dataset, at: int) -> str | None:
    """A UI value as text; ``None`` when absent or empty."""
    elem = ds.get_item(at)
    if elem is None:
        return None
    raw = _raw_bytes(elem, ("UI",))
    if raw is not None and raw.isascii():
        return raw.rstrip(_PAD).decode("ascii") or None
    value = ds[at].value
    return str(value) if value else None
