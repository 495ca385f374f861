"""Match DICOM-SEG instances to CT volumes and paste their segments onto the CT grid.

Placement is by geometry only.  Every frame is put where its own ImagePositionPatient
(PlanePositionSequence), ImageOrientationPatient (PlaneOrientationSequence) and PixelSpacing
(PixelMeasuresSequence), per-frame or shared, say it is in LPS patient coordinates; frame order
and the referenced CT instances are never used to place a frame (the real collections have SEGs
whose frames cite several acquisitions at identical positions, SEGs that omit empty frames, SEGs
flipped in-plane relative to their CT, a SEG citing a CT file that does not exist and a SEG
whose grid matches no acquisition).

Matching (:func:`match_seg`; :func:`match_scanned_seg` with the frame table planning's header
read built, SEG header only) ranks candidate :class:`SegTarget` volumes by,
in this order:

1. compatibility: a target whose FrameOfReferenceUID or StudyInstanceUID is known and differs
   from the SEG's is only chosen when no compatible target fits at all (patient coordinates of
   another frame of reference are not comparable);
2. the number of frames lying *on* the target grid: same in-plane sampling and axes (up to flips
   and transposes) and a plane position on a grid plane inside the volume, each within
   :data:`GRID_TOL_VOXEL` of a voxel;
3. whether the SEG's own plane spacing equals the target's slice spacing;
4. the number of frames intersecting the target's extent at all;
5. the number of frames whose referenced SOPInstanceUID belongs to the target (this separates
   acquisitions at identical positions), then whether ReferencedSeriesSequence names the target's
   series, then an equal FrameOfReferenceUID, then the same study.

Placement (:func:`place_seg`), one segment at a time into a :class:`SegmentField`:

* **copy**: when every frame lies on the target grid lattice (whatever the spacing of the SEG's
  own planes: SEGs that omit empty frames step by multiples of the CT's), each frame is copied
  into its grid plane with the flips/transposes its direction cosines dictate; a plane no frame
  covers stays empty; pixels or whole frames outside the grid are counted and reported.
* **nearest-neighbour resampling** only for frames truly off the lattice (``resampled=True``):
  every target voxel centre in the slab a frame covers is mapped into that frame's pixel space
  and takes the value of the nearest SEG sample, like ``sitk.Resample`` with a nearest-neighbour
  interpolator over the SEG as a volume: a frame covers ``[-0.5, n - 0.5)`` pixels in-plane and
  half the SEG's plane spacing on either side along its normal (half-open).  The plane spacing
  is fitted to the distinct frame positions
  (:func:`~livercube.sources.dicom_geometry.analyse_spacing`, gaps allowed); a smaller declared
  SliceThickness wins (omitted frames make the fit a multiple), and with a single plane and no
  thickness the target's spacing along that normal is used.

Every placement counts, per segment, the foreground pixels of the SEG's frames, the voxels
stored and the foreground pixels that fell outside the target (``PlacedSeg.voxel_counts``).
The module is split by job: :mod:`~livercube.sources.seg_frames` (decoding),
:mod:`~livercube.sources.seg_match` (matching), :mod:`~livercube.sources.seg_place`
(placement); this module is their public face.

Segmentation types: BINARY (non-zero stored value), FRACTIONAL (stored value ≥ half of
MaximumFractionalValue, i.e. probability/occupancy ≥ 0.5) and LABELMAP (Labelmap
Segmentation Storage, or SegmentationType LABELMAP: a pixel belongs to the segment whose
SegmentNumber it holds).  Frames are decoded one at a time by highdicom
(``Segmentation.get_stored_frame``), with pydicom's per-frame decoder as a fallback when
highdicom refuses the dataset.  Memory: the SEG's encoded bytes (read lazily from the file),
one frame and one target-sized boolean mask.
"""

from livercube.sources.seg_match import (
    GRID_TOL_VOXEL,
    SegMatch,
    SegTarget,
    match_scanned_seg,
    match_seg,
    seg_kind,
    target_from_acquisition,
)
from livercube.sources.seg_place import PlacedSeg, place_seg

__all__ = [
    "GRID_TOL_VOXEL",
    "PlacedSeg",
    "SegMatch",
    "SegTarget",
    "match_scanned_seg",
    "match_seg",
    "place_seg",
    "seg_kind",
    "target_from_acquisition",
]
