"""Match DICOM-SEG instances to CT volumes and paste their segments onto the CT grid.

Placement is by geometry only.  Every frame is put where its own ImagePositionPatient
(PlanePositionSequence), ImageOrientationPatient (PlaneOrientationSequence) and PixelSpacing
(PixelMeasuresSequence), per-frame or shared, say it is in LPS patient coordinates; frame order
and the referenced CT instances are never used to place a frame (the real collections have SEGs
whose frames cite several acquisitions at identical positions, SEGs that omit empty frames, SEGs
flipped in-plane relative to their CT, a SEG citing a CT file that does not exist and a SEG
whose grid matches no acquisition).

Matching (:func:`match_seg`, SEG header only) ranks candidate :class:`SegTarget` volumes by,
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

* **copy**: when every frame lies on the target grid lattice and the SEG's plane spacing equals
  the grid's, each frame is copied into its grid plane with the flips/transposes its direction
  cosines dictate; pixels or whole frames outside the grid are counted and noted.
* **nearest-neighbour resampling** otherwise (``resampled=True``): every target voxel centre in
  the slab a frame covers is mapped into that frame's pixel space and takes the value of the
  nearest SEG sample, like ``sitk.Resample`` with a nearest-neighbour interpolator over the SEG
  as a volume: a frame covers ``[-0.5, n - 0.5)`` pixels in-plane and half the SEG's plane
  spacing on either side along its normal (half-open).  Planes missing from the SEG (omitted empty
  frames) therefore stay empty instead of borrowing from a neighbour.  The SEG's plane spacing is
  fitted to the distinct frame positions with :func:`~livercube.sources.dicom_scan.analyse_spacing`
  (gaps allowed); with a single plane, SliceThickness (else the target's spacing along that
  normal) is used.

Segmentation types: BINARY (non-zero stored value), FRACTIONAL (stored value ≥ half of
MaximumFractionalValue, i.e. probability/occupancy ≥ 0.5) and LABELMAP (Labelmap
Segmentation Storage, or SegmentationType LABELMAP: a pixel belongs to the segment whose
SegmentNumber it holds).  Frames are decoded one at a time by highdicom
(``Segmentation.get_stored_frame``), with pydicom's per-frame decoder as a fallback when
highdicom refuses the dataset.  Memory: the SEG's encoded bytes (read lazily from the file),
one frame and one target-sized boolean mask.
"""

from __future__ import annotations

import re
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
import pydicom
from pydicom.dataset import Dataset

from livercube.errors import (
    GeometryError,
    SegmentLimitError,
    SourceError,
    UnreadableFileError,
    UsageError,
)
from livercube.schema import label_schema, map_segment_label
from livercube.sources import dicom_sop
from livercube.sources.dicom_geometry import (
    DEFAULT_TOLERANCES,
    analyse_spacing,
    slice_grid,
    slice_normal,
)
from livercube.sources.dicom_scan import Acquisition, plain_value
from livercube.sources.dicom_sop import SegmentationType
from livercube.volumes.geometry import Grid, canonical_reorientation
from livercube.volumes.volume import SegmentField

#: A frame lies on a grid when its origin, its last row and its last column are within this
#: fraction of a voxel of grid voxel centres on every axis (the CT reader itself accepts slices
#: 1 % of a spacing off the regular grid; nearest-neighbour placement of a frame off by less
#: than half a voxel would give the same voxels anyway).
GRID_TOL_VOXEL = 0.05
#: Two spacings are "the same" within this relative difference.
SPACING_REL_TOL = DEFAULT_TOLERANCES.spacing_rel

_AI_PATTERN = re.compile(r"\b(ai|aimi)\b|artificial intelligence", re.IGNORECASE)


# --------------------------------------------------------------------------- public records


@dataclass(frozen=True)
class SegTarget:
    """One candidate CT volume for a SEG, described by headers only."""

    key: str
    series_uid: str
    study_uid: str
    grid: Grid
    sop_uids_by_z: dict[int, tuple[str, ...]]
    frame_of_reference_uid: str | None = None


@dataclass
class SegMatch:
    """The target a SEG belongs to (``target_key`` None when nothing fits, see ``reason``)."""

    target_key: str | None
    exact: bool
    referenced: dict[str, int]
    reason: str
    notes: list[str] = field(default_factory=list)


@dataclass
class PlacedSeg:
    """A SEG's segments on a target grid, one bit per source segment in SegmentNumber order."""

    target_key: str
    segments: SegmentField
    resampled: bool
    unknown_labels: list[str]
    notes: list[str]
    seg_attrs: dict
    #: per segment label: foreground pixels in the SEG's frames, voxels stored, and foreground
    #: pixels that fell outside the target (lost; the converter reports them)
    voxel_counts: dict[str, dict[str, int]] = field(default_factory=dict)


def seg_kind(series_description: str) -> str:
    """``"ai"`` for AI segmentations ("AIMI liver-tumor AI segmentation"), else ``"expert"``."""
    return "ai" if _AI_PATTERN.search(series_description or "") else "expert"


def target_from_acquisition(
    acq: Acquisition, key: str, *, frame_of_reference_uid: str | None = None
) -> SegTarget:
    """The :class:`SegTarget` of a scanned acquisition, from its headers only.

    Gives the grid and canonical-z → SOPInstanceUID map that
    :func:`livercube.sources.dicom_ct.read_acquisition` produces (missing slices are grid
    planes without instances).  ``frame_of_reference_uid`` overrides the one the scan recorded.
    """
    sg = slice_grid(
        [s.position for s in acq.slices], acq.orientation, acq.pixel_spacing, source=acq.label
    )
    normal = np.asarray(sg.normal)
    slices = [acq.slices[i] for i in sg.order]
    positions, spacing = sg.positions, sg.spacing
    n_k = spacing.n_grid
    direction = np.column_stack(
        [np.asarray(acq.orientation[:3]), np.asarray(acq.orientation[3:]), normal]
    )
    spacing_ijk = (float(acq.pixel_spacing[1]), float(acq.pixel_spacing[0]), spacing.spacing)
    reo = canonical_reorientation(
        (n_k, acq.rows, acq.columns), direction, spacing_ijk, tuple(positions[0]), source=acq.label
    )
    slice_axis = reo.axes.index(0)
    flip_k = reo.flips[slice_axis]
    uids: dict[int, tuple[str, ...]]
    if slice_axis == 0:
        uids = {z: () for z in range(n_k)}
        for ref, k in zip(slices, spacing.grid_index, strict=True):
            uids[n_k - 1 - k if flip_k else k] = (ref.sop_uid,)
    else:  # sagittal/coronal source: every slice crosses every canonical z
        every = tuple(ref.sop_uid for ref in slices)
        uids = {z: every for z in range(reo.grid.shape[0])}
    return SegTarget(
        key=key,
        series_uid=acq.series_uid,
        study_uid=acq.study_uid,
        grid=reo.grid,
        sop_uids_by_z=uids,
        frame_of_reference_uid=frame_of_reference_uid or acq.frame_of_reference_uid or None,
    )


# --------------------------------------------------------------------------- frame geometry


@dataclass
class _Frames:
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


def _item(seq: Any) -> Dataset | None:
    if seq is None or isinstance(seq, bytes) or len(seq) == 0:
        return None
    return seq[0]


def _group(frame: Dataset | None, shared: Dataset | None, name: str) -> Dataset | None:
    for holder in (frame, shared):
        if holder is not None:
            item = _item(holder.get(name))
            if item is not None:
                return item
    return None


def _frame_table(ds: Dataset, source: str) -> _Frames:
    try:
        return _frame_table_unchecked(ds, source)
    except SourceError:
        raise
    except (AttributeError, TypeError, ValueError, KeyError, IndexError) as exc:
        raise UnreadableFileError(
            source, f"malformed DICOM-SEG frame description: {type(exc).__name__}: {exc}"
        ) from exc


def _frame_table_unchecked(ds: Dataset, source: str) -> _Frames:
    n = int(ds.get("NumberOfFrames", 1) or 1)
    rows, cols = int(ds.Rows), int(ds.Columns)
    shared = _item(ds.get("SharedFunctionalGroupsSequence"))
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
        p = _group(item, shared, "PlanePositionSequence")
        o = _group(item, shared, "PlaneOrientationSequence")
        m = _group(item, shared, "PixelMeasuresSequence")
        try:
            pos[f] = [float(v) for v in p.ImagePositionPatient]  # type: ignore[union-attr]
            iop = [float(v) for v in o.ImageOrientationPatient]  # type: ignore[union-attr]
            rc[f], cc[f] = iop[:3], iop[3:]
            ps[f] = [float(v) for v in m.PixelSpacing]  # type: ignore[union-attr]
        except (AttributeError, TypeError, ValueError) as exc:
            raise GeometryError(
                source,
                f"frame {f + 1} has no usable ImagePositionPatient, ImageOrientationPatient or "
                f"PixelSpacing in patient coordinates ({exc})",
            ) from exc
        if m.get("SliceThickness") not in (None, ""):  # type: ignore[union-attr]
            th[f] = float(m.SliceThickness)  # type: ignore[union-attr]
        ident = _group(item, shared, "SegmentIdentificationSequence")
        if ident is not None and ident.get("ReferencedSegmentNumber") is not None:
            seg[f] = int(ident.ReferencedSegmentNumber)
        uids: list[str] = []
        if item is not None:
            for der in item.get("DerivationImageSequence") or []:
                for src in der.get("SourceImageSequence") or []:
                    uid = src.get("ReferencedSOPInstanceUID")
                    if uid:
                        uids.append(str(uid))
        refs.append(tuple(dict.fromkeys(uids)))
    for f in range(n):
        slice_normal(np.concatenate([rc[f], cc[f]]))  # raises GeometryError when degenerate
    if np.any(ps <= 0):
        raise GeometryError(source, f"non-positive PixelSpacing {ps[np.any(ps <= 0, axis=1)][0]}")
    rc /= np.linalg.norm(rc, axis=1, keepdims=True)
    cc /= np.linalg.norm(cc, axis=1, keepdims=True)
    return _Frames(rows, cols, pos, rc, cc, ps, th, seg, refs)


@dataclass
class _OnGrid:
    """Frames mapped into a target's continuous (z, y, x) index space."""

    origin: np.ndarray  # (n, 3) index of pixel (0, 0)
    step_row: np.ndarray  # (n, 3) index step for one row down (row index + 1)
    step_col: np.ndarray  # (n, 3) index step for one column right
    lattice: np.ndarray  # (n,) bool: on the grid lattice with the grid's sampling
    plane_axis: np.ndarray  # (n,) grid axis the frame is a plane of (-1: not on lattice)
    plane_index: np.ndarray  # (n,) that plane's index (may be outside the grid)
    inside: np.ndarray  # (n,) bool: lattice and plane index inside the grid
    touches: np.ndarray  # (n,) bool: footprint intersects the grid's extent


def _map_frames(frames: _Frames, grid: Grid) -> _OnGrid:
    spacing = np.asarray(grid.spacing)
    shape = np.asarray(grid.shape)
    origin = (frames.position[:, ::-1] - np.asarray(grid.origin)) / spacing
    step_row = frames.col_cos[:, ::-1] * frames.pixel_spacing[:, :1] / spacing
    step_col = frames.row_cos[:, ::-1] * frames.pixel_spacing[:, 1:] / spacing
    n = frames.n
    lattice = np.zeros(n, dtype=bool)
    plane_axis = np.full(n, -1, dtype=np.int64)
    plane_index = np.zeros(n, dtype=np.int64)
    extent = max(frames.rows, frames.cols)
    for f in range(n):
        ar = int(np.argmax(np.abs(step_row[f])))
        ac = int(np.argmax(np.abs(step_col[f])))
        if ar == ac:
            continue
        er = np.zeros(3)
        er[ar] = np.sign(step_row[f, ar])
        ec = np.zeros(3)
        ec[ac] = np.sign(step_col[f, ac])
        if (
            np.max(np.abs(step_row[f] - er)) * extent > GRID_TOL_VOXEL
            or np.max(np.abs(step_col[f] - ec)) * extent > GRID_TOL_VOXEL
            or np.max(np.abs(origin[f] - np.rint(origin[f]))) > GRID_TOL_VOXEL
        ):
            continue
        lattice[f] = True
        plane_axis[f] = 3 - ar - ac
        plane_index[f] = int(np.rint(origin[f, plane_axis[f]]))
    inside = lattice.copy()
    for f in np.flatnonzero(lattice):
        inside[f] = 0 <= plane_index[f] < shape[plane_axis[f]]
    # footprint corners (pixel edges) against the grid extent [-0.5, n - 0.5]
    corners = np.stack(
        [
            origin + a * step_row + b * step_col
            for a in (-0.5, frames.rows - 0.5)
            for b in (-0.5, frames.cols - 0.5)
        ],
        axis=1,
    )  # (n, 4, 3)
    lo, hi = corners.min(axis=1), corners.max(axis=1)
    touches = np.all((hi >= -0.5 - 1e-6) & (lo <= shape - 0.5 + 1e-6), axis=1)
    return _OnGrid(origin, step_row, step_col, lattice, plane_axis, plane_index, inside, touches)


def _plane_spacing(frames: _Frames) -> tuple[float | None, str | None]:
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


def _slab_thickness(frames: _Frames, grid: Grid, notes: list[str]) -> float:
    """How thick a slab each off-grid frame paints: the SEG's own plane spacing.

    Fitted to the frame positions; omitted empty frames can make that fit a multiple of the
    true spacing, so a smaller SliceThickness wins when the frames declare one.  With a single
    plane and no SliceThickness, the target's spacing along the normal is used.
    """
    plane_dz, dz_note = _plane_spacing(frames)
    if dz_note:
        notes.append(dz_note)
    th = frames.thickness[np.isfinite(frames.thickness) & (frames.thickness > 0)]
    if th.size and (plane_dz is None or float(th.min()) < plane_dz * (1 - SPACING_REL_TOL)):
        if plane_dz is not None:
            notes.append(
                f"SEG plane positions step {plane_dz:.4g} mm (omitted frames?); slab thickness "
                f"from SliceThickness {float(th.min()):.4g} mm"
            )
        return float(th.min())
    if plane_dz is not None:
        return plane_dz
    return _grid_spacing_along(grid, frames.normal[0] if frames.n else np.eye(3)[2])


def _grid_spacing_along(grid: Grid, normal: np.ndarray) -> float:
    """Spacing of the grid along the (axis-aligned) direction closest to ``normal`` (x, y, z)."""
    axis_xyz = int(np.argmax(np.abs(normal)))
    return float(grid.spacing[2 - axis_xyz])


# --------------------------------------------------------------------------- reading


def _open(url: str, storage_options: dict | None):
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    return fs.open(path, "rb")


def _read_header(url: str, storage_options: dict | None) -> Dataset:
    try:
        with _open(url, storage_options) as f:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
    except Exception as exc:
        raise UnreadableFileError(url, f"cannot read the DICOM-SEG header: {exc}") from exc
    _check_sop_class(ds, url)
    return ds


def _check_sop_class(ds: Dataset, url: str) -> None:
    sop_class = str(ds.get("SOPClassUID", ""))
    if sop_class not in dicom_sop.SEGMENTATION_CLASSES:
        raise UnreadableFileError(url, f"not a Segmentation (SOP class {sop_class or 'missing'})")


def _segmentation_type(ds: Dataset, url: str) -> SegmentationType:
    try:
        return SegmentationType.of(str(ds.get("SOPClassUID", "")), ds.get("SegmentationType"))
    except ValueError:
        raise SourceError(
            url, f"unsupported SegmentationType {ds.get('SegmentationType')!r}"
        ) from None


# --------------------------------------------------------------------------- matching


def _referenced_series(ds: Dataset) -> set[str]:
    return {
        str(item.SeriesInstanceUID)
        for item in ds.get("ReferencedSeriesSequence") or []
        if item.get("SeriesInstanceUID")
    }


def match_seg(url: str, targets: list[SegTarget], storage_options: dict | None = None) -> SegMatch:
    """Pick the target volume of the SEG at ``url`` from its header only (see module doc)."""
    ds = _read_header(url, storage_options)
    frames = _frame_table(ds, url)
    return _match(ds, frames, targets)


def _match(ds: Dataset, frames: _Frames, targets: list[SegTarget]) -> SegMatch:
    notes: list[str] = []
    seg_for = str(ds.get("FrameOfReferenceUID", "") or "") or None
    seg_study = str(ds.get("StudyInstanceUID", "") or "") or None
    ref_series = _referenced_series(ds)
    if not ref_series:
        notes.append("SEG has no ReferencedSeriesSequence")
    if not any(frames.refs):
        notes.append("frames reference no source instances (no DerivationImageSequence)")
    if frames.n == 0:
        return SegMatch(None, False, {}, "SEG has no frames", notes)
    plane_dz, _ = _plane_spacing(frames)
    referenced: dict[str, int] = {}
    scored = []
    for t in targets:
        sops = {u for uids in t.sop_uids_by_z.values() for u in uids}
        n_ref = sum(1 for r in frames.refs if any(u in sops for u in r))
        if n_ref:
            referenced[t.key] = n_ref
        g = _map_frames(frames, t.grid)
        n_on = int(g.inside.sum())
        spacing_ok = True
        if plane_dz is not None:
            along = _grid_spacing_along(t.grid, frames.normal[0])
            spacing_ok = abs(plane_dz - along) <= SPACING_REL_TOL * along
        compatible = not (
            (seg_for and t.frame_of_reference_uid and seg_for != t.frame_of_reference_uid)
            or (seg_study and t.study_uid and seg_study != t.study_uid)
        )
        score = (
            compatible,
            n_on,
            spacing_ok,
            int(g.touches.sum()),
            n_ref,
            t.series_uid in ref_series,
            bool(seg_for and seg_for == t.frame_of_reference_uid),
            seg_study == t.study_uid,
        )
        scored.append((score, t, g))
    cited = {k: v for k, v in referenced.items() if v}
    if len(cited) > 1:
        notes.append(
            "frames cite instances of several targets: "
            + ", ".join(f"{k} ({v})" for k, v in sorted(cited.items()))
        )
    all_sops = {u for t in targets for uids in t.sop_uids_by_z.values() for u in uids}
    missing = sum(1 for r in frames.refs if r and not any(u in all_sops for u in r))
    if missing:
        notes.append(f"{missing} frame(s) cite instances found in no target (missing CT files?)")
    usable = [s for s in scored if s[0][1] > 0 or s[0][3] > 0]
    if not usable:
        reason = (
            f"none of {len(targets)} target(s) contains any of the SEG's {frames.n} frames"
            if targets
            else "no target volumes given"
        )
        return SegMatch(None, False, referenced, reason, notes)
    usable.sort(key=lambda s: s[0], reverse=True)
    score, best, g = usable[0]
    ties = [s[1].key for s in usable[1:] if s[0] == score]
    if ties:
        notes.append(f"targets {', '.join(ties)} fit equally well; chose {best.key}")
    if not score[0]:
        notes.append("no target shares the SEG's FrameOfReference/study; chose by position")
    exact = bool(g.lattice.all())
    n_out = frames.n - int(g.touches.sum())
    why = [
        f"{score[1]}/{frames.n} frames on the grid of {best.key}"
        if score[1]
        else f"no frame on any target grid; {score[3]}/{frames.n} frames intersect {best.key}"
    ]
    if not score[2]:
        why.append("SEG plane spacing differs from the target's slice spacing")
    if score[4]:
        why.append(f"{score[4]} frames cite its instances")
    if n_out:
        notes.append(f"{n_out} frame(s) lie outside {best.key}")
    if cited and best.key not in cited:
        notes.append(
            f"SEG cites instances of {', '.join(sorted(cited))} but its frames lie on "
            f"{best.key}: placed by frame geometry, not by the references"
        )
    return SegMatch(best.key, exact, referenced, "; ".join(why), notes)


# --------------------------------------------------------------------------- segment metadata


def _code(item: Dataset) -> dict[str, Any]:
    value = item.get("CodeValue") or item.get("LongCodeValue") or item.get("URNCodeValue")
    out: dict[str, Any] = {
        "scheme": str(item.get("CodingSchemeDesignator", "") or ""),
        "value": str(value or ""),
        "meaning": str(item.get("CodeMeaning", "") or ""),
    }
    if item.get("CodingSchemeVersion"):
        out["version"] = str(item.CodingSchemeVersion)
    skip = {
        "CodeValue",
        "LongCodeValue",
        "URNCodeValue",
        "CodingSchemeDesignator",
        "CodeMeaning",
        "CodingSchemeVersion",
    }
    out.update({k: v for k, v in _plain_dataset(item).items() if k not in skip})
    return out


def _plain_dataset(ds: Dataset) -> dict[str, Any]:
    """A JSON-serialisable copy of a dataset: code items as {scheme, value, meaning}."""
    out: dict[str, Any] = {}
    for elem in ds:
        key = elem.keyword or f"({elem.tag.group:04X},{elem.tag.element:04X})"
        if elem.VR == "SQ":
            items = list(elem.value or [])
            out[key] = [
                _code(i)
                if any(k in i for k in ("CodeValue", "LongCodeValue", "URNCodeValue"))
                else _plain_dataset(i)
                for i in items
            ]
        elif isinstance(elem.value, bytes):
            out[key] = elem.value.hex()
        elif elem.VR == "PN":
            out[key] = str(elem.value)
        else:
            out[key] = plain_value(elem.value)
    return out


def _segment_codes(item: Dataset) -> dict[str, Any]:
    return _plain_dataset(item)


def _seg_attrs(ds: Dataset, seg_type: str) -> dict[str, Any]:
    def text(name: str) -> Any:
        v = ds.get(name)
        if v is None or v == "":
            return None
        return str(v) if not isinstance(v, pydicom.multival.MultiValue) else plain_value(v)

    attrs: dict[str, Any] = {
        "SOPClassUID": text("SOPClassUID"),
        "SeriesInstanceUID": text("SeriesInstanceUID"),
        "SOPInstanceUID": text("SOPInstanceUID"),
        "SeriesNumber": plain_value(ds.get("SeriesNumber")),
        "SeriesDescription": str(ds.get("SeriesDescription", "") or ""),
        "SegmentationType": seg_type,
        "ContentLabel": text("ContentLabel"),
        "ContentDescription": text("ContentDescription"),
        "ContentDate": text("ContentDate"),
        "Manufacturer": text("Manufacturer"),
        "ManufacturerModelName": text("ManufacturerModelName"),
        "SoftwareVersions": text("SoftwareVersions"),
        "ReferencedSeriesInstanceUIDs": sorted(_referenced_series(ds)),
        "kind": seg_kind(str(ds.get("SeriesDescription", "") or "")),
    }
    if seg_type == "FRACTIONAL":
        attrs["SegmentationFractionalType"] = text("SegmentationFractionalType")
        attrs["MaximumFractionalValue"] = plain_value(ds.get("MaximumFractionalValue"))
    return attrs


# --------------------------------------------------------------------------- placement


class _Decoder:
    """One frame at a time: highdicom, or pydicom's per-frame decoder as a fallback."""

    def __init__(self, fileobj, url: str, notes: list[str]) -> None:
        import highdicom as hd

        self.url = url
        try:
            self.seg = hd.seg.segread(fileobj, lazy_frame_retrieval=True)
            self.ds: Dataset = self.seg
        except Exception as exc:  # highdicom is strict; pydicom decodes any valid frame
            notes.append(f"highdicom could not open the SEG ({exc}); decoded with pydicom")
            fileobj.seek(0)
            self.seg = None
            try:
                self.ds = pydicom.dcmread(fileobj)
            except Exception as exc2:
                raise UnreadableFileError(url, f"cannot read the DICOM-SEG: {exc2}") from exc2

    def frame(self, f: int) -> np.ndarray:
        try:
            if self.seg is not None:
                return np.asarray(self.seg.get_stored_frame(f, as_index=True))
            from pydicom.pixels import pixel_array

            return np.asarray(pixel_array(self.ds, index=f))
        except Exception as exc:
            raise UnreadableFileError(
                self.url, f"frame {f + 1} cannot be decoded (truncated or unsupported): {exc}"
            ) from exc


def _axis_span(origin: int, sign: int, n: int, size: int) -> tuple[int, int, slice]:
    """Frame indices [a0, a1) that land inside ``[0, size)`` along one axis, and their target.

    Target index of frame index ``a`` is ``origin + sign * a``; the target is returned as a
    basic slice (ascending) so the copy is a strided view, not a fancy-index scatter.
    """
    if sign > 0:
        a0, a1 = max(0, -origin), min(n, size - origin)
        return a0, a1, slice(origin + a0, origin + a1)
    a0, a1 = max(0, origin - size + 1), min(n, origin + 1)
    return a0, a1, slice(origin - a1 + 1, origin - a0 + 1)


def _copy_frame(mask: np.ndarray, g: _OnGrid, f: int, values: np.ndarray) -> tuple[int, int]:
    """Copy an on-lattice frame into its grid plane.

    Returns (pixels falling outside the grid, foreground pixels among them).
    """
    shape = mask.shape
    ar = int(np.argmax(np.abs(g.step_row[f])))
    ac = int(np.argmax(np.abs(g.step_col[f])))
    pa = int(g.plane_axis[f])
    p = int(g.plane_index[f])
    if not 0 <= p < shape[pa]:
        return int(values.size), int(np.count_nonzero(values))
    o = np.rint(g.origin[f]).astype(np.int64)
    sr, sc = int(np.sign(g.step_row[f, ar])), int(np.sign(g.step_col[f, ac]))
    r0, r1, t_r = _axis_span(int(o[ar]), sr, values.shape[0], shape[ar])
    c0, c1, t_c = _axis_span(int(o[ac]), sc, values.shape[1], shape[ac])
    if r1 <= r0 or c1 <= c0:
        return int(values.size), int(np.count_nonzero(values))
    block = values[r0:r1, c0:c1]
    if sr < 0:
        block = block[::-1]
    if sc < 0:
        block = block[:, ::-1]
    if ar > ac:  # the target plane stores columns before rows
        block = block.T
    idx: list[Any] = [None, None, None]
    idx[pa], idx[ar], idx[ac] = p, t_r, t_c
    block = block.astype(bool, copy=False)
    mask[tuple(idx)] |= block
    lost = int(np.count_nonzero(values)) - int(np.count_nonzero(block))
    return int(values.size - (r1 - r0) * (c1 - c0)), lost


def _resample_frame(
    mask: np.ndarray,
    frames: _Frames,
    grid: Grid,
    g: _OnGrid,
    f: int,
    values: np.ndarray,
    half_slab_mm: float,
) -> int:
    """Nearest-neighbour pull of target voxel centres in frame ``f``'s slab; returns voxels set."""
    shape = np.asarray(mask.shape)
    n = frames.normal[f]
    slab = (n[::-1] * half_slab_mm) / np.asarray(grid.spacing)
    corners = np.stack(
        [
            g.origin[f] + a * g.step_row[f] + b * g.step_col[f] + s * slab
            for a in (-0.5, frames.rows - 0.5)
            for b in (-0.5, frames.cols - 0.5)
            for s in (-1.0, 1.0)
        ]
    )
    lo = np.maximum(np.floor(corners.min(axis=0)).astype(np.int64), 0)
    hi = np.minimum(np.ceil(corners.max(axis=0)).astype(np.int64) + 1, shape)
    if np.any(hi <= lo):
        return 0
    zz, yy, xx = (np.arange(lo[a], hi[a]) for a in range(3))
    # patient positions (x, y, z) of the voxel centres in the box, relative to the frame origin
    rel = (
        np.stack(np.meshgrid(zz, yy, xx, indexing="ij"), axis=-1) * np.asarray(grid.spacing)
        + np.asarray(grid.origin)
    )[..., ::-1] - frames.position[f]
    t = rel @ n
    col = np.floor(rel @ frames.row_cos[f] / frames.pixel_spacing[f, 1] + 0.5).astype(np.int64)
    row = np.floor(rel @ frames.col_cos[f] / frames.pixel_spacing[f, 0] + 0.5).astype(np.int64)
    sel = (
        (t >= -half_slab_mm)
        & (t < half_slab_mm)
        & (col >= 0)
        & (col < frames.cols)
        & (row >= 0)
        & (row < frames.rows)
    )
    hit = np.zeros(sel.shape, dtype=bool)
    hit[sel] = values[row[sel], col[sel]]
    sub = mask[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
    sub |= hit
    return int(sel.sum())


def _is_background(item: Dataset) -> bool:
    """A LABELMAP segment describing pixel value 0 as background (dcmqi writes one)."""
    if int(item.SegmentNumber) != 0:
        return False
    typ = _item(item.get("SegmentedPropertyTypeCodeSequence"))
    words = {str(item.get("SegmentLabel", "")), str(typ.get("CodeMeaning", "")) if typ else ""}
    return any(w.strip().lower() == "background" for w in words)


def _frame_mask(
    raw: np.ndarray, seg_type: SegmentationType, number: int, max_fractional: int
) -> np.ndarray:
    if seg_type is SegmentationType.LABELMAP:
        return raw == number
    if seg_type is SegmentationType.FRACTIONAL:
        # probability/occupancy >= 0.5: stored / MaximumFractionalValue >= 0.5
        return raw.astype(np.int64) * 2 >= max_fractional
    return raw != 0


def place_seg(
    url: str,
    target: SegTarget,
    *,
    collection: str,
    storage_options: dict | None = None,
) -> PlacedSeg:
    """Paste every segment of the SEG at ``url`` onto ``target.grid`` (see module doc)."""
    if collection not in label_schema()["collections"]:
        raise UsageError(f"unknown collection {collection!r} for segment label mapping")
    notes: list[str] = []
    with ExitStack() as stack:
        try:
            fileobj = stack.enter_context(_open(url, storage_options))
        except Exception as exc:
            raise UnreadableFileError(url, f"cannot open the DICOM-SEG: {exc}") from exc
        decoder = _Decoder(fileobj, url, notes)
        ds = decoder.ds
        _check_sop_class(ds, url)
        seg_type = _segmentation_type(ds, url)
        max_fractional = int(ds.get("MaximumFractionalValue", 255) or 255)
        if seg_type is SegmentationType.FRACTIONAL:
            notes.append(
                f"FRACTIONAL ({ds.get('SegmentationFractionalType', '')}) thresholded at 0.5 "
                f"(stored value >= {max_fractional}/2)"
            )
        frames = _frame_table(ds, url)
        grid = target.grid
        g = _map_frames(frames, grid)
        # frames on the target lattice are pasted where they are, whatever the spacing of the
        # SEG's own planes (omitted empty frames make it a multiple of the CT's): an omitted
        # plane stays empty.  Only frames truly off the lattice are resampled.
        copy = bool(g.lattice.all())
        if not copy:
            plane_dz = _slab_thickness(frames, grid, notes)
            n_off = int((~g.lattice).sum())
            notes.append(
                f"SEG grid does not match {target.key} ({n_off}/{frames.n} frames off the grid "
                f"lattice, SEG plane spacing {plane_dz:.4g} mm vs "
                f"{_grid_spacing_along(grid, frames.normal[0]):.4g} mm): resampled "
                "nearest-neighbour (target voxel centres pulled from SEG frames)"
            )

        segment_seq = sorted(ds.get("SegmentSequence") or [], key=lambda s: int(s.SegmentNumber))
        if seg_type is SegmentationType.LABELMAP:
            background = [s for s in segment_seq if _is_background(s)]
            if background:
                segment_seq = [s for s in segment_seq if not _is_background(s)]
                notes.append(
                    "LABELMAP segment 0 "
                    f"'{background[0].get('SegmentLabel', '')}' is the background: not stored"
                )
        if not segment_seq:
            raise SourceError(url, "the SEG describes no segments (empty SegmentSequence)")
        try:
            field_ = SegmentField(grid.shape, len(segment_seq))
        except SegmentLimitError as exc:
            raise SourceError(url, str(exc)) from exc
        unknown: list[str] = []
        frames_outside = 0
        pixels_outside = 0
        frames_empty_target = set()
        counts: dict[str, dict[str, int]] = {}
        for item in segment_seq:
            number = int(item.SegmentNumber)
            label = str(item.get("SegmentLabel", "") or "")
            try:
                unified = map_segment_label(collection, label)
            except KeyError:
                unified = 0
                unknown.append(label)
            if seg_type is SegmentationType.LABELMAP:
                which = np.arange(frames.n)
            else:
                which = np.flatnonzero(frames.segment == number)
            mask = np.zeros(grid.shape, dtype=bool)
            n_source = n_lost = 0
            for f in which:
                values = _frame_mask(decoder.frame(int(f)), seg_type, number, max_fractional)
                if values.shape != (frames.rows, frames.cols):
                    raise UnreadableFileError(
                        url, f"frame {f + 1} decodes to {values.shape}, not Rows×Columns"
                    )
                positives = int(np.count_nonzero(values))
                n_source += positives
                if copy:
                    out, lost = _copy_frame(mask, g, int(f), values)
                    n_lost += lost
                    if out == values.size:
                        frames_outside += 1
                    else:
                        pixels_outside += out
                else:
                    got = _resample_frame(mask, frames, grid, g, int(f), values, plane_dz / 2.0)
                    if got == 0:
                        frames_empty_target.add(int(f))
                        n_lost += positives
            stored = int(np.count_nonzero(mask))
            counts[label or str(number)] = {
                "source_voxels": n_source,
                "stored_voxels": stored,
                "outside_voxels": n_lost,
            }
            if copy and stored != n_source - n_lost:
                notes.append(
                    f"segment '{label}': {n_source - n_lost - stored} voxel(s) painted by more "
                    "than one frame (frames at the same position)"
                )
            field_.add(
                mask, label=label, number=number, unified=unified, codes=_segment_codes(item)
            )
            del mask
        seg_attrs = _seg_attrs(ds, seg_type.value)
    if seg_type is not SegmentationType.LABELMAP:
        orphans = int(np.sum(~np.isin(frames.segment, [int(s.SegmentNumber) for s in segment_seq])))
        if orphans:
            notes.append(f"{orphans} frame(s) reference no described segment and were ignored")
    if frames_outside:
        notes.append(f"{frames_outside} frame(s) lie outside the grid of {target.key}")
    if pixels_outside:
        notes.append(f"{pixels_outside} pixel(s) of on-grid frames fall outside {target.key}")
    if frames_empty_target:
        notes.append(
            f"{len(frames_empty_target)} frame(s) cover no voxel centre of {target.key} "
            "(outside the grid)"
        )
    sops = {u for uids in target.sop_uids_by_z.values() for u in uids}
    foreign = sum(1 for r in frames.refs if r and not any(u in sops for u in r))
    if foreign:
        notes.append(
            f"{foreign} frame(s) cite instances not in {target.key} (other acquisitions at the "
            "same positions, or missing files); placed by their own geometry"
        )
    if unknown:
        notes.append(f"segment label(s) unknown to the schema kept with unified 0: {unknown}")
    return PlacedSeg(
        target_key=target.key,
        segments=field_,
        resampled=not copy,
        unknown_labels=unknown,
        notes=notes,
        seg_attrs=seg_attrs,
        voxel_counts=counts,
    )


__all__ = [
    "GRID_TOL_VOXEL",
    "PlacedSeg",
    "SegMatch",
    "SegTarget",
    "match_seg",
    "place_seg",
    "seg_kind",
    "target_from_acquisition",
]
