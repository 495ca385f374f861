"""Per-frame attributes of multi-frame DICOM objects (Enhanced CT, Legacy Converted, SEG).

Multi-frame objects keep what single-frame files hold at the top level (plane position and
orientation, pixel spacing, rescale) in functional groups: per frame in
PerFrameFunctionalGroupsSequence, or once for all frames in SharedFunctionalGroupsSequence.
:func:`functional_group` looks a macro up where the standard allows it to be, per frame first;
:func:`frame_view` gives one frame's values the shape of a single-frame dataset, so the CT
reader's rescale and padding rules apply unchanged.
"""

from __future__ import annotations

from typing import Any

from pydicom.dataset import Dataset

#: Attributes a single-frame CT holds at the top level, by the functional group holding them
#: in a multi-frame CT.
_FRAME_ATTRIBUTES = {
    "PlanePositionSequence": ("ImagePositionPatient",),
    "PlaneOrientationSequence": ("ImageOrientationPatient",),
    "PixelMeasuresSequence": ("PixelSpacing", "SliceThickness"),
    "PixelValueTransformationSequence": ("RescaleSlope", "RescaleIntercept", "RescaleType"),
}


def first_item(seq: Any) -> Dataset | None:
    """The first item of a sequence value, or ``None`` for an absent or empty one."""
    if seq is None or isinstance(seq, bytes) or len(seq) == 0:
        return None
    return seq[0]


def functional_group(
    frame: Dataset | None, shared: Dataset | None, key: str | int
) -> Dataset | None:
    """The ``key`` macro (keyword or tag) of one frame: its per-frame item, else the shared
    one.  Hot loops pass the tag: it skips pydicom's keyword lookup."""
    for holder in (frame, shared):
        if holder is not None and key in holder:
            item = first_item(holder[key].value)
            if item is not None:
                return item
    return None


def n_frames(ds: Dataset) -> int:
    try:
        return max(1, int(ds.get("NumberOfFrames", 1) or 1))
    except (TypeError, ValueError):
        return 1


def frame_view(ds: Dataset, frame: int) -> Dataset:
    """Frame ``frame`` (0-based) of a multi-frame dataset as a flat single-frame header.

    Top-level attributes that apply to every frame (PixelRepresentation, PixelPaddingValue,
    Rows, …) are copied; the functional-group ones override them.
    """
    view = Dataset()
    for elem in ds:
        if elem.VR != "SQ" and elem.keyword != "PixelData":
            view.add(elem)
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    item = per_frame[frame] if frame < len(per_frame) else None
    shared = first_item(ds.get("SharedFunctionalGroupsSequence"))
    for group, keywords in _FRAME_ATTRIBUTES.items():
        macro = functional_group(item, shared, group)
        if macro is None:
            continue
        for keyword in keywords:
            if keyword in macro:
                setattr(view, keyword, macro.get(keyword))
    return view
