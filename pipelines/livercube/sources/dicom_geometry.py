"""Slice geometry shared by the scanner, the CT reader and the SEG placer (pure functions).

Everything here works on ImagePositionPatient / ImageOrientationPatient values only; file
order, InstanceNumber, SliceLocation and SliceThickness never decide where a slice is.

* :func:`slice_normal` — the stacking direction, cross(row cosines, column cosines);
* :func:`analyse_spacing` — fit positions along the normal to one regular grid, with gaps
  (missing slices) allowed and anything else refused;
* :func:`split_at_gaps` — a stray slice far from the rest is not a reason to fill hundreds of
  slices with air: runs separated by more than ``max_fill_slices`` missing slices are apart;
* :func:`slice_grid` — the :class:`SliceGrid` of one acquisition: order, grid indices and the
  in-plane drift of the slice origins, which is how gantry tilt (and sheared series) shows.

Tolerances are parameters (:class:`Tolerances`) with documented defaults.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from livercube.errors import GeometryError, SlantedStackError


@dataclass(frozen=True)
class Tolerances:
    """How far real headers may stray from ideal geometry before livercube objects.

    ``duplicate_mm``: two slices closer than this along the normal sit at the same position.
    ``spacing_rel`` / ``spacing_abs_mm``: a slice may deviate from its regular grid position by
    ``max(spacing_abs_mm, spacing_rel * spacing)`` (scanner rounding of positions).
    ``orientation``: two orientations are equal when no direction cosine differs by more.
    ``drift_voxel``: slice origins may wander in-plane, off the line along the normal, by this
    fraction of a pixel over the whole stack (an orthogonal grid then misplaces no slice by more
    than half a pixel, the same order as position rounding); more is gantry tilt or shear.
    ``max_fill_slices``: a gap of up to this many missing slices is filled (and recorded);
    a longer gap separates two stacks.
    """

    duplicate_mm: float = 0.01
    spacing_rel: float = 0.01
    spacing_abs_mm: float = 0.01
    orientation: float = 1e-3
    drift_voxel: float = 0.5
    max_fill_slices: int = 10

    def spacing(self, spacing: float) -> float:
        """Allowed deviation of a slice from its grid position (mm)."""
        return max(self.spacing_abs_mm, self.spacing_rel * spacing)


DEFAULT_TOLERANCES = Tolerances()


def slice_normal(orientation: Iterable[float]) -> np.ndarray:
    """Unit slice normal = cross(row cosines, column cosines) of an ImageOrientationPatient."""
    o = np.asarray(list(orientation), dtype=np.float64)
    if o.shape != (6,):
        raise GeometryError("ImageOrientationPatient", f"expected 6 values, got {o.size}")
    # np.cross's own terms, without its ~10 µs of axis handling: this runs once per slice
    # header on the planning workers
    r0, r1, r2, c0, c1, c2 = o.tolist()
    n = np.array([r1 * c2 - r2 * c1, r2 * c0 - r0 * c2, r0 * c1 - r1 * c0])
    norm = np.linalg.norm(n)
    if norm < 1e-6:
        raise GeometryError("ImageOrientationPatient", f"row and column cosines are parallel: {o}")
    return n / norm


def same_orientation(
    a: Sequence[float], b: Sequence[float], tol: Tolerances = DEFAULT_TOLERANCES
) -> bool:
    return max(abs(float(x) - float(y)) for x, y in zip(a, b, strict=True)) <= tol.orientation


def has_duplicates(offsets: Iterable[float], tol: Tolerances = DEFAULT_TOLERANCES) -> bool:
    z = np.sort(np.asarray(list(offsets), dtype=np.float64))
    return bool(z.size > 1 and np.any(np.diff(z) < tol.duplicate_mm))


@dataclass(frozen=True)
class SpacingAnalysis:
    """Where slices sit on a regular grid: ``grid_index[i]`` of sorted ``offsets[i]``."""

    spacing: float
    grid_index: tuple[int, ...]
    n_grid: int
    missing: tuple[int, ...]
    max_deviation: float
    tolerance: float


def _fit_grid(z: np.ndarray, d: np.ndarray, s0: float, tol: Tolerances):
    steps = np.maximum(np.rint(d / s0).astype(np.int64), 1)
    idx = np.concatenate([[0], np.cumsum(steps)])
    spacing = float((z[-1] - z[0]) / idx[-1])
    t = tol.spacing(spacing)
    dev = np.abs(z - (z[0] + idx * spacing))
    bad = np.flatnonzero((np.abs(d - steps * spacing) > t) | (dev[1:] > t))
    return idx, spacing, t, dev, bad


def analyse_spacing(
    offsets: Iterable[float], *, source: str = "series", tol: Tolerances = DEFAULT_TOLERANCES
) -> SpacingAnalysis:
    """Fit slice offsets (mm along the normal) to one regular grid.

    The regular spacing is estimated from the cluster of smallest differences (falling back to
    the median difference when that fits better), then refined over the whole extent.  A
    difference of an integer multiple of the spacing is a gap of missing slices; anything else
    raises :class:`GeometryError` naming the positions.

    Planning asks this of the same stack up to three times (is it one grid, where are its
    gaps, is it slanted); the fit is kept for the last :data:`SPACING_CACHE_SIZE` distinct
    stacks, keyed by the exact bytes of the sorted offsets, so the answer cannot differ from
    a fresh fit.
    """
    z = np.sort(np.asarray(list(offsets), dtype=np.float64))
    if z.size < 2:
        raise GeometryError(source, f"{z.size} slice(s): no slice spacing can be derived")
    fit = _fit_sorted(z.tobytes(), tol)
    if isinstance(fit, str):
        raise GeometryError(source, fit)
    return fit


#: Distinct stacks whose spacing fit :func:`analyse_spacing` remembers (a few hundred bytes
#: each; planning needs only the current series' few).
SPACING_CACHE_SIZE = 256


@lru_cache(maxsize=SPACING_CACHE_SIZE)
def _fit_sorted(z_bytes: bytes, tol: Tolerances) -> SpacingAnalysis | str:
    """The spacing fit of sorted offsets (at least two), or why they are no regular grid."""
    z = np.frombuffer(z_bytes, dtype=np.float64)
    d = np.diff(z)
    if np.any(d < tol.duplicate_mm):
        i = int(np.argmin(d))
        return (
            f"two slices at the same position {z[i]:.3f} mm along the slice normal "
            "(several acquisitions mixed?)"
        )
    dmin = float(d.min())
    candidates = [float(np.median(d[d <= 1.5 * dmin])), float(np.median(d))]
    fits = [_fit_grid(z, d, s0, tol) for s0 in candidates]
    idx, spacing, t, dev, bad = min(fits, key=lambda f: len(f[4]))
    if bad.size:
        show = ", ".join(f"{z[b]:.3f}→{z[b + 1]:.3f} mm" for b in bad[:5])
        return (
            f"irregular slice spacing: regular spacing {spacing:.4f} mm but slice steps {show} "
            f"are not a whole multiple of it (tolerance {t:.3f} mm); positions along the "
            f"normal: {np.round(z, 3).tolist()}"
        )
    present = set(idx.tolist())
    missing = tuple(i for i in range(int(idx[-1]) + 1) if i not in present)
    return SpacingAnalysis(
        spacing=spacing,
        grid_index=tuple(int(i) for i in idx),
        n_grid=int(idx[-1]) + 1,
        missing=missing,
        max_deviation=float(dev.max()),
        tolerance=t,
    )


def missing_count(offsets: Iterable[float], tol: Tolerances = DEFAULT_TOLERANCES) -> int | None:
    """Missing slices if the offsets lie on one regular grid, else ``None``."""
    try:
        return len(analyse_spacing(offsets, tol=tol).missing)
    except GeometryError:
        return None


def split_at_gaps(
    offsets: Sequence[float], tol: Tolerances = DEFAULT_TOLERANCES
) -> list[list[int]]:
    """Indices of ``offsets`` (any order) in runs separated by over-long gaps.

    Returns one run (all indices, sorted by offset) when the offsets are irregular or no gap
    is longer than ``tol.max_fill_slices`` missing slices.
    """
    z = np.asarray(offsets, dtype=np.float64)
    order = [int(i) for i in np.argsort(z, kind="stable")]
    try:
        spacing = analyse_spacing(z, tol=tol)
    except GeometryError:
        return [order]
    runs: list[list[int]] = [[order[0]]]
    for prev, cur, i in zip(spacing.grid_index, spacing.grid_index[1:], order[1:], strict=False):
        if cur - prev - 1 > tol.max_fill_slices:
            runs.append([])
        runs[-1].append(i)
    return runs


@dataclass(frozen=True)
class SliceGrid:
    """The regular grid one acquisition's slices lie on.

    ``order`` sorts the input positions ascending along ``normal``; ``offsets`` are the sorted
    positions along it; ``spacing`` places each on the grid; ``drift_mm`` is the largest
    in-plane distance of a slice origin from the line through the first one along the normal
    (0 for an orthogonal stack; gantry tilt makes it grow slice by slice).
    """

    normal: tuple[float, float, float]
    order: tuple[int, ...]
    positions: np.ndarray  # (n, 3) sorted
    offsets: np.ndarray  # (n,) sorted
    spacing: SpacingAnalysis
    drift_mm: float


def slice_grid(
    positions: Sequence[Sequence[float]],
    orientation: Sequence[float],
    pixel_spacing: Sequence[float],
    *,
    source: str,
    tol: Tolerances = DEFAULT_TOLERANCES,
) -> SliceGrid:
    """The :class:`SliceGrid` of parallel slices; raises :class:`GeometryError` when there is none.

    A stack whose slice origins drift in-plane by more than ``tol.drift_voxel`` of a pixel is
    refused with :class:`~livercube.errors.SlantedStackError`: storing it on an orthogonal grid
    would shear the anatomy (gantry tilt).
    """
    normal = slice_normal(orientation)
    pos = np.asarray(positions, dtype=np.float64).reshape(-1, 3)
    off = pos @ normal
    order = np.argsort(off, kind="stable")
    pos, off = pos[order], off[order]
    spacing = analyse_spacing(off, source=source, tol=tol)
    expected = pos[0] + np.outer(off - off[0], normal)
    drift = float(np.max(np.linalg.norm(pos - expected, axis=1))) if len(pos) else 0.0
    limit = tol.drift_voxel * float(min(pixel_spacing))
    if drift > limit:
        step = drift / max(float(off[-1] - off[0]), 1e-9)
        raise SlantedStackError(
            source,
            f"slice origins drift {drift:.2f} mm in-plane over the stack "
            f"({np.degrees(np.arctan(step)):.1f}° off the slice normal): gantry tilt or a "
            "sheared series; it cannot be stored on an orthogonal grid without resampling, "
            "so it is left out (dcm2niix can tilt-correct it)",
        )
    return SliceGrid(
        normal=tuple(float(v) for v in normal),  # type: ignore[arg-type]
        order=tuple(int(i) for i in order),
        positions=pos,
        offsets=off,
        spacing=spacing,
        drift_mm=drift,
    )
