"""BINARY DICOM-SEG instances for the synthetic collections, written with highdicom.

Quirks of the real SEGs reproduced here (one line each):

* One frame per segment per slice; ``omit_empty_frames=False`` (HCC-TACE-Seg, every referenced
  slice has a frame for every segment) or ``True`` (CRLM: only slices with content).
* Frames are placed by ``PlanePositionSequence`` and reference their CT slice through
  ``DerivationImageSequence``/``SourceImageSequence``; source slices may come from several
  acquisitions of one series at the same table positions.
* In-plane flipped SEGs: for a CT with ImageOrientationPatient (−1,0,0,0,−1,0) the SEG is built
  with the standard orientation (1,0,0,0,1,0), so its own geometry is right but its pixel
  array order is the reverse of the CT's.
* Optional removal of ``ReferencedSeriesSequence`` (HCC_048).
* SCT-coded categories and types (given per segment by the collection description in
  :mod:`~livercube.synth.dicom_plans`); readers should map by ``SegmentLabel``, not by code.
* Dates, times and UIDs are fixed, so the same inputs give byte-identical files.
"""

from __future__ import annotations

import copy

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from livercube.synth.dicom_ct import IOP_FLIPPED, IOP_STANDARD, _ds, slice_position
from livercube.volumes.geometry import Grid

#: CIELab display colours (L*, a*, b*) cycled over segments, like Slicer's defaults.
_COLOURS = (
    (61.0, -18.0, 12.0),
    (53.0, 70.0, 50.0),
    (40.0, 20.0, -60.0),
    (60.0, 60.0, 60.0),
    (80.0, -5.0, 70.0),
    (50.0, 60.0, -40.0),
    (70.0, -50.0, -10.0),
)

#: Fixed creation stamp of every generated SEG (the real ones were made years after the CTs).
SEG_CREATION = ("20210315", "120000")


#: (label, SCT category (value, meaning), SCT type (value, meaning)) of one segment.
SegmentCode = tuple[str, tuple[str, str], tuple[str, str]]


def _concept(code: tuple[str, str]) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(code[0], "SCT", code[1])


def _descriptions(segments: list[SegmentCode], ai: bool) -> list[hd.seg.SegmentDescription]:
    out = []
    for n, (label, category, type_) in enumerate(segments, start=1):
        cat, typ = _concept(category), _concept(type_)
        if ai:
            algo = hd.AlgorithmIdentificationSequence(
                name="AIMI liver-tumor",
                family=codes.cid7162.ArtificialIntelligence,
                version="1.0",
            )
        else:
            algo = None
        colour = hd.color.CIELabColor(*_COLOURS[(n - 1) % len(_COLOURS)])
        out.append(
            hd.seg.SegmentDescription(
                n,
                label,
                cat,
                typ,
                "AUTOMATIC" if ai else "MANUAL",
                algo,
                display_color=colour,
            )
        )
    return out


def header_copy(ds: Dataset) -> Dataset:
    """A deep copy of a CT dataset without its pixel data (what highdicom needs)."""
    pixels = ds.get("PixelData")
    if pixels is not None:
        del ds.PixelData
    out = copy.deepcopy(ds)
    if pixels is not None:
        ds.PixelData = pixels
    return out


def build_seg(
    *,
    source_by_z: list[Dataset | None],
    grid: Grid,
    segments: list[SegmentCode],
    masks: list[np.ndarray],
    series_uid: str,
    sop_uid: str,
    series_number: int,
    series_description: str,
    ai: bool,
    omit_empty_frames: bool,
    flip_in_plane: bool,
    content_date: str,
    referenced_series: bool = True,
    labelmap: bool = False,
) -> Dataset:
    """A BINARY Segmentation of canonical ``masks`` (one (z, y, x) bool array per segment).

    With ``labelmap`` it is a LABELMAP written as Label Map Segmentation Storage (what dcmqi
    and highdicom write for label maps); the masks must not overlap then.

    ``source_by_z[z]`` is the header of the CT slice the frames at canonical ``z`` reference
    (``None``: that slice is not referenced).  With ``flip_in_plane`` the SEG is written in the
    orientation opposite to the source CT's.
    """
    zs = [z for z, s in enumerate(source_by_z) if s is not None]
    src_orient = tuple(float(v) for v in source_by_z[zs[0]].ImageOrientationPatient)
    orient = src_orient
    if flip_in_plane:
        orient = IOP_STANDARD if src_orient == IOP_FLIPPED else IOP_FLIPPED
    sources = []
    for z in zs:
        s = source_by_z[z]
        if orient != src_orient:
            s = copy.deepcopy(s)
            s.ImageOrientationPatient = [_ds(v) for v in orient]
            s.ImagePositionPatient = [_ds(v) for v in slice_position(grid, z, orient)]
        sources.append(s)
    stack = np.stack([m[zs] for m in masks], axis=-1)  # (frames, y, x, segments)
    if orient == IOP_FLIPPED:
        stack = stack[:, ::-1, ::-1, :]
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=np.ascontiguousarray(stack.astype(np.uint8)),
        segmentation_type=(
            hd.seg.SegmentationTypeValues.LABELMAP
            if labelmap
            else hd.seg.SegmentationTypeValues.BINARY
        ),
        segment_descriptions=_descriptions(segments, ai),
        series_instance_uid=series_uid,
        series_number=series_number,
        sop_instance_uid=sop_uid,
        instance_number=1,
        manufacturer="QIICR",
        manufacturer_model_name=(
            "git@github.com:QIICR/dcmqi.git" if ai else "git://github.com/QIICR/dcmqi.git"
        ),
        software_versions="livercube-synth",
        device_serial_number="0",
        series_description=series_description,
        content_label="SEGMENTATION",
        content_description="AI segmentation" if ai else "Image segmentation",
        content_creator_name=None if ai else "Expert^Reader",
        omit_empty_frames=omit_empty_frames,
        content_date=content_date,
        content_time="120000",
    )
    seg.InstanceCreationDate, seg.InstanceCreationTime = SEG_CREATION
    seg.SeriesDate = content_date
    seg.SeriesTime = "120000"
    for item in seg.get("ContributingEquipmentSequence", []):
        item.ContributionDateTime = "".join(SEG_CREATION)
    if "DimensionOrganizationSequence" in seg:
        fixed = series_uid + ".1" if len(series_uid) < 62 else series_uid[:-2] + ".1"
        for item in seg.DimensionOrganizationSequence:
            item.DimensionOrganizationUID = fixed
        for item in seg.get("DimensionIndexSequence", []):
            item.DimensionOrganizationUID = fixed
    if not referenced_series and "ReferencedSeriesSequence" in seg:
        del seg.ReferencedSeriesSequence
    return seg
