"""What kind of DICOM object a file is: the SOP classes and segmentation types livercube reads.

The one place these UIDs live; scanner, CT reader, SEG reader and the example generator import
them from here.  Names come from :mod:`pydicom.uid`; Label Map Segmentation Storage (2024
supplement 243, what dcmqi and highdicom write for LABELMAP) is newer than some pydicom
releases, so its UID is spelled out when pydicom does not know it.
"""

from __future__ import annotations

import enum

import pydicom.uid as _uid
from pydicom.uid import UID

CT_IMAGE = _uid.CTImageStorage
ENHANCED_CT_IMAGE = _uid.EnhancedCTImageStorage
LEGACY_ENHANCED_CT_IMAGE = _uid.LegacyConvertedEnhancedCTImageStorage
SEGMENTATION = _uid.SegmentationStorage
LABELMAP_SEGMENTATION = UID(
    getattr(_uid, "LabelMapSegmentationStorage", "1.2.840.10008.5.1.4.1.1.66.7")
)

#: CT images whose frames (one per file, or many per file) become volume slices.
CT_CLASSES: frozenset[str] = frozenset({CT_IMAGE, ENHANCED_CT_IMAGE, LEGACY_ENHANCED_CT_IMAGE})
#: Multi-frame CT: slices are frames described by per-frame functional groups.
MULTIFRAME_CT_CLASSES: frozenset[str] = frozenset({ENHANCED_CT_IMAGE, LEGACY_ENHANCED_CT_IMAGE})
#: Both segmentation storage classes; a SEG of either is matched and placed the same way.
SEGMENTATION_CLASSES: frozenset[str] = frozenset({SEGMENTATION, LABELMAP_SEGMENTATION})


class SegmentationType(enum.Enum):
    """How a SEG frame's stored value says which pixels belong to a segment."""

    BINARY = "BINARY"  # non-zero pixel (1 bit)
    FRACTIONAL = "FRACTIONAL"  # probability/occupancy; ≥ half of MaximumFractionalValue
    LABELMAP = "LABELMAP"  # the pixel holds the SegmentNumber

    @classmethod
    def of(cls, sop_class_uid: str, segmentation_type: str | None) -> SegmentationType:
        """The type of a SEG from its SOP class and SegmentationType attribute.

        Raises ``ValueError`` for anything else (a reader must not guess what a pixel means).
        """
        if str(sop_class_uid) == LABELMAP_SEGMENTATION:
            return cls.LABELMAP
        return cls(str(segmentation_type or "BINARY").strip().upper())


def sop_class_name(sop_class_uid: str) -> str:
    """A human name for a SOP class UID ("CT Image Storage"), or the UID itself."""
    if not sop_class_uid:
        return "(no SOP class)"
    if str(sop_class_uid) == LABELMAP_SEGMENTATION:
        return "Label Map Segmentation Storage"
    name = UID(str(sop_class_uid)).name
    return name or str(sop_class_uid)
