"""Which CT volume a DICOM-SEG annotates, decided from headers and frame geometry only.

See :mod:`livercube.sources.dicom_seg` for the ranking rules.  :func:`target_from_acquisition`
describes a scanned acquisition as a :class:`SegTarget` (its canonical grid and the instances on
each plane); :func:`map_frames` puts a SEG's frames into a target's index space; :func:`match_seg`
ranks the targets.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
from pydicom.dataset import Dataset

from livercube.sources.dicom_ct import acquisition_layout
from livercube.sources.dicom_geometry import DEFAULT_TOLERANCES
from livercube.sources.dicom_scan import Acquisition, SegInstance
from livercube.sources.seg_frames import (
    Frames,
    KnownFrames,
    frame_table,
    plane_spacing,
    read_seg_header,
)
from livercube.volumes.geometry import Grid

#: A frame lies on a grid when its origin, its last row and its last column are within this
#: fraction of a voxel of grid voxel centres on every axis (the CT reader itself accepts slices
#: 1 % of a spacing off the regular grid; nearest-neighbour placement of a frame off by less
#: than half a voxel would give the same voxels anyway).
GRID_TOL_VOXEL = 0.05
#: Two spacings are "the same" within this relative difference.
SPACING_REL_TOL = DEFAULT_TOLERANCES.spacing_rel

_AI_PATTERN = re.compile(r"\b(ai|aimi)\b|artificial intelligence", re.IGNORECASE)


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
    #: the SEG's frame table, for the task that places it (``None``: it must build its own)
    known_frames: KnownFrames | None = None


def seg_kind(series_description: str) -> str:
    """``"ai"`` for AI segmentations ("AIMI liver-tumor AI segmentation"), else ``"expert"``."""
    return "ai" if _AI_PATTERN.search(series_description or "") else "expert"


def target_from_acquisition(
    acq: Acquisition, key: str, *, frame_of_reference_uid: str | None = None
) -> SegTarget:
    """The :class:`SegTarget` of a scanned acquisition, from its headers only.

    The grid and canonical-z → SOPInstanceUID map are the acquisition's
    :func:`~livercube.sources.dicom_ct.acquisition_layout`, the same the CT reader assembles
    pixels with (missing slices are grid planes without instances).
    ``frame_of_reference_uid`` overrides the one the scan recorded.
    """
    lay = acquisition_layout(acq)
    return SegTarget(
        key=key,
        series_uid=acq.series_uid,
        study_uid=acq.study_uid,
        grid=lay.reorientation.grid,
        sop_uids_by_z=lay.sop_uids_by_z(),
        frame_of_reference_uid=frame_of_reference_uid or acq.frame_of_reference_uid or None,
    )


@dataclass
class OnGrid:
    """Frames mapped into a target's continuous (z, y, x) index space."""

    origin: np.ndarray  # (n, 3) index of pixel (0, 0)
    step_row: np.ndarray  # (n, 3) index step for one row down (row index + 1)
    step_col: np.ndarray  # (n, 3) index step for one column right
    lattice: np.ndarray  # (n,) bool: on the grid lattice with the grid's sampling
    plane_axis: np.ndarray  # (n,) grid axis the frame is a plane of (-1: not on lattice)
    plane_index: np.ndarray  # (n,) that plane's index (may be outside the grid)
    inside: np.ndarray  # (n,) bool: lattice and plane index inside the grid
    touches: np.ndarray  # (n,) bool: footprint intersects the grid's extent


def map_frames(frames: Frames, grid: Grid) -> OnGrid:
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
    return OnGrid(origin, step_row, step_col, lattice, plane_axis, plane_index, inside, touches)


def grid_spacing_along(grid: Grid, normal: np.ndarray) -> float:
    """Spacing of the grid along the (axis-aligned) direction closest to ``normal`` (x, y, z)."""
    axis_xyz = int(np.argmax(np.abs(normal)))
    return float(grid.spacing[2 - axis_xyz])


def referenced_series(ds: Dataset) -> set[str]:
    return {
        str(item.SeriesInstanceUID)
        for item in ds.get("ReferencedSeriesSequence") or []
        if item.get("SeriesInstanceUID")
    }


@dataclass(frozen=True)
class SegFacts:
    """What matching needs of a SEG's header besides its frame table."""

    frame_of_reference_uid: str | None
    study_uid: str | None
    referenced_series: frozenset[str]

    @classmethod
    def of(cls, ds: Dataset) -> SegFacts:
        return cls(
            str(ds.get("FrameOfReferenceUID", "") or "") or None,
            str(ds.get("StudyInstanceUID", "") or "") or None,
            frozenset(referenced_series(ds)),
        )


def match_seg(url: str, targets: list[SegTarget], storage_options: dict | None = None) -> SegMatch:
    """Pick the target volume of the SEG at ``url`` from its header only (see module doc)."""
    ds, key = read_seg_header(url, storage_options)
    frames = frame_table(ds, url)
    match = _match(SegFacts.of(ds), frames, targets)
    match.known_frames = KnownFrames(key, frames)
    return match


def match_scanned_seg(
    seg: SegInstance, url: str, targets: list[SegTarget], storage_options: dict | None = None
) -> SegMatch:
    """:func:`match_seg` for a SEG found by planning: with the frame table its header read
    built (on a worker), nothing is read here; without one, the header is read again."""
    if seg.frames is None:
        return match_seg(url, targets, storage_options)
    facts = SegFacts(
        seg.frame_of_reference_uid or None,
        seg.study_uid or None,
        frozenset(seg.referenced_series_uids),
    )
    match = _match(facts, seg.frames.frames, targets)
    match.known_frames = seg.frames
    return match


def _match(facts: SegFacts, frames: Frames, targets: list[SegTarget]) -> SegMatch:
    notes: list[str] = []
    seg_for = facts.frame_of_reference_uid
    seg_study = facts.study_uid
    ref_series = facts.referenced_series
    if not ref_series:
        notes.append("SEG has no ReferencedSeriesSequence")
    if not any(frames.refs):
        notes.append("frames reference no source instances (no DerivationImageSequence)")
    if frames.n == 0:
        return SegMatch(None, False, {}, "SEG has no frames", notes)
    plane_dz, _ = plane_spacing(frames)
    referenced: dict[str, int] = {}
    scored = []
    for t in targets:
        sops = {u for uids in t.sop_uids_by_z.values() for u in uids}
        n_ref = sum(1 for r in frames.refs if any(u in sops for u in r))
        if n_ref:
            referenced[t.key] = n_ref
        g = map_frames(frames, t.grid)
        n_on = int(g.inside.sum())
        spacing_ok = True
        if plane_dz is not None:
            along = grid_spacing_along(t.grid, frames.normal[0])
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
