"""Paste a DICOM-SEG's segments onto its target CT grid, by each frame's own geometry.

See :mod:`livercube.sources.dicom_seg` for the rules: frames on the target lattice are copied
into their planes (flips and transposes from their direction cosines), frames off it are
resampled nearest-neighbour; every segment becomes one bit of a :class:`SegmentField`, and the
foreground pixels of the SEG, the voxels stored and the pixels lost outside the target are
counted per segment so that nothing is dropped without a word.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from livercube.errors import SegmentLimitError, SourceError, UnreadableFileError, UsageError
from livercube.schema import label_schema, map_segment_label
from livercube.sources.dicom_scan import plain_value
from livercube.sources.dicom_sop import SegmentationType
from livercube.sources.seg_frames import (
    Decoder,
    Frames,
    KnownFrames,
    check_sop_class,
    frame_mask,
    frames_of,
    is_background,
    open_seg,
    plane_spacing,
    segmentation_type,
)
from livercube.sources.seg_match import (
    SPACING_REL_TOL,
    OnGrid,
    SegTarget,
    grid_spacing_along,
    map_frames,
    referenced_series,
    seg_kind,
)
from livercube.volumes.geometry import Grid
from livercube.volumes.volume import EMPTY_BOX, Extent, SegmentField, unique_segment_names


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
        "ReferencedSeriesInstanceUIDs": sorted(referenced_series(ds)),
        "kind": seg_kind(str(ds.get("SeriesDescription", "") or "")),
    }
    if seg_type == "FRACTIONAL":
        attrs["SegmentationFractionalType"] = text("SegmentationFractionalType")
        attrs["MaximumFractionalValue"] = plain_value(ds.get("MaximumFractionalValue"))
    return attrs


def _slab_thickness(frames: Frames, grid: Grid, notes: list[str]) -> float:
    """How thick a slab each off-grid frame paints: the SEG's own plane spacing.

    Fitted to the frame positions; omitted empty frames can make that fit a multiple of the
    true spacing, so a smaller SliceThickness wins when the frames declare one.  With a single
    plane and no SliceThickness, the target's spacing along the normal is used.
    """
    plane_dz, dz_note = plane_spacing(frames)
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
    return grid_spacing_along(grid, frames.normal[0] if frames.n else np.eye(3)[2])


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


class Pasted(NamedTuple):
    """What pasting one frame did: pixels that fell outside the grid, foreground pixels
    among them, and the box of the grid it wrote (``None``: nothing)."""

    outside: int
    lost: int
    box: tuple[slice, ...] | None


def _copy_frame(mask: np.ndarray, g: OnGrid, f: int, values: np.ndarray, positives: int) -> Pasted:
    """Copy an on-lattice frame into its grid plane; ``positives``: its foreground pixels."""
    shape = mask.shape
    ar = int(np.argmax(np.abs(g.step_row[f])))
    ac = int(np.argmax(np.abs(g.step_col[f])))
    pa = int(g.plane_axis[f])
    p = int(g.plane_index[f])
    if not 0 <= p < shape[pa]:
        return Pasted(int(values.size), positives, None)
    o = np.rint(g.origin[f]).astype(np.int64)
    sr, sc = int(np.sign(g.step_row[f, ar])), int(np.sign(g.step_col[f, ac]))
    r0, r1, t_r = _axis_span(int(o[ar]), sr, values.shape[0], shape[ar])
    c0, c1, t_c = _axis_span(int(o[ac]), sc, values.shape[1], shape[ac])
    if r1 <= r0 or c1 <= c0:
        return Pasted(int(values.size), positives, None)
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
    # a frame wholly inside the grid (the usual case) loses nothing: no second count
    cropped = block.size != values.size
    lost = positives - int(np.count_nonzero(block)) if cropped else 0
    idx[pa] = slice(p, p + 1)
    return Pasted(int(values.size - (r1 - r0) * (c1 - c0)), lost, tuple(idx))


def _resample_frame(
    mask: np.ndarray,
    frames: Frames,
    grid: Grid,
    g: OnGrid,
    f: int,
    values: np.ndarray,
    half_slab_mm: float,
) -> tuple[int, tuple[slice, ...] | None]:
    """Nearest-neighbour pull of target voxel centres in frame ``f``'s slab.

    Returns the number of target voxels the frame covers and the box it wrote into.
    """
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
        return 0, None
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
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))
    mask[box] |= hit
    return int(sel.sum()), box


def place_seg(
    url: str,
    target: SegTarget,
    *,
    collection: str,
    storage_options: dict | None = None,
    known_frames: KnownFrames | None = None,
) -> PlacedSeg:
    """Paste every segment of the SEG at ``url`` onto ``target.grid`` (see module doc).

    ``known_frames``: the frame table planning built from this SEG's header; used only if
    the file read here has the same header bytes (:func:`frames_of`).
    """
    if collection not in label_schema()["collections"]:
        raise UsageError(f"unknown collection {collection!r} for segment label mapping")
    notes: list[str] = []
    with ExitStack() as stack:
        try:
            fileobj = stack.enter_context(open_seg(url, storage_options))
        except Exception as exc:
            raise UnreadableFileError(url, f"cannot open the DICOM-SEG: {exc}") from exc
        decoder = Decoder(fileobj, url, notes)
        ds = decoder.ds
        check_sop_class(ds, url)
        seg_type = segmentation_type(ds, url)
        max_fractional = int(ds.get("MaximumFractionalValue", 255) or 255)
        if seg_type is SegmentationType.FRACTIONAL:
            notes.append(
                f"FRACTIONAL ({ds.get('SegmentationFractionalType', '')}) thresholded at 0.5 "
                f"(stored value >= {max_fractional}/2)"
            )
        key = None if known_frames is None else decoder.header_key()
        frames = frames_of(ds, url, known_frames, key)
        grid = target.grid
        g = map_frames(frames, grid)
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
                f"{grid_spacing_along(grid, frames.normal[0]):.4g} mm): resampled "
                "nearest-neighbour (target voxel centres pulled from SEG frames)"
            )

        segment_seq = sorted(ds.get("SegmentSequence") or [], key=lambda s: int(s.SegmentNumber))
        if seg_type is SegmentationType.LABELMAP:
            background = [s for s in segment_seq if is_background(s)]
            if background:
                segment_seq = [s for s in segment_seq if not is_background(s)]
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
        counts: dict[str, dict[str, int]] = {}  # keyed like Store.segments
        names = unique_segment_names([str(i.get("SegmentLabel", "") or "") for i in segment_seq])
        # one scratch mask for all segments, cleared through each segment's box afterwards:
        # np.zeros maps pages lazily, and a fresh mask per segment paid the kernel's
        # zero-fill page faults again for every segment (a third of the placement's time)
        mask = np.zeros(grid.shape, dtype=bool)
        for item, name in zip(segment_seq, names, strict=True):
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
            extent = Extent()
            n_source = n_lost = 0
            for f in which:
                values = frame_mask(decoder.frame(int(f)), seg_type, number, max_fractional)
                if values.shape != (frames.rows, frames.cols):
                    raise UnreadableFileError(
                        url, f"frame {f + 1} decodes to {values.shape}, not Rows×Columns"
                    )
                positives = int(np.count_nonzero(values))
                n_source += positives
                if copy:
                    out, lost, box = _copy_frame(mask, g, int(f), values, positives)
                    extent.include(box)
                    n_lost += lost
                    if out == values.size:
                        frames_outside += 1
                    else:
                        pixels_outside += out
                else:
                    got, box = _resample_frame(
                        mask, frames, grid, g, int(f), values, plane_dz / 2.0
                    )
                    extent.include(box)
                    if got == 0:
                        frames_empty_target.add(int(f))
                        n_lost += positives
            within = extent.box()
            # the field counts the segment's voxels as it adds them: that count is the stored one
            stored = field_.add(
                mask,
                label=label,
                number=number,
                unified=unified,
                codes=_segment_codes(item),
                within=within if within is not None else EMPTY_BOX,
            ).voxels
            counts[name] = {
                "source_voxels": n_source,
                "stored_voxels": stored,
                "outside_voxels": n_lost,
            }
            if copy and stored != n_source - n_lost:
                notes.append(
                    f"segment '{label}': {n_source - n_lost - stored} voxel(s) painted by more "
                    "than one frame (frames at the same position)"
                )
            if within is not None:
                mask[within] = False  # every frame wrote inside its box (Extent)
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
