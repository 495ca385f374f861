"""Pure geometry: from a source's index-to-patient mapping to livercube's canonical LPS grid.

Conventions used everywhere in livercube:

* Patient coordinates are DICOM LPS millimetres: +x toward patient Left, +y toward Posterior,
  +z toward Superior.  NIfTI (RAS) sources are converted before they reach this module.
* A source array is indexed ``data[k, j, i]`` (numpy order); the *direction* matrix has one
  column per index axis ``i, j, k`` giving the unit vector of that axis in LPS, and ``spacing``
  is given per index axis ``(i, j, k)``.  Position of voxel (i, j, k) is
  ``origin + direction @ (spacing * (i, j, k))``.
* The canonical stored array is ``image[z, y, x]`` with identity direction; geometry in the
  store is always given in array order ``(z, y, x)``.

Canonicalisation only permutes and flips axes, it never resamples: every HU value survives
bit-exactly and the mapping is invertible.  Oblique sources (gantry tilt) are snapped to the
nearest axes and the angle is reported, because resampling would invent HU values.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from livercube.errors import GeometryError


@dataclass(frozen=True)
class Grid:
    """A canonical, axis-aligned voxel grid in LPS millimetres (array order z, y, x)."""

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]

    def centres(self, axis: int) -> np.ndarray:
        """Patient coordinate (mm) of the voxel centres along array axis 0 (z), 1 (y) or 2 (x)."""
        return self.origin[axis] + self.spacing[axis] * np.arange(
            self.shape[axis], dtype=np.float64
        )

    def index_of(self, point_zyx: np.ndarray) -> np.ndarray:
        """Continuous voxel index (z, y, x) of patient points given as ``(..., 3)``, z/y/x order."""
        return (np.asarray(point_zyx, dtype=np.float64) - np.asarray(self.origin)) / np.asarray(
            self.spacing
        )


@dataclass(frozen=True)
class Reorientation:
    """How a source array becomes canonical: ``canonical = flip(transpose(src, axes), flips)``."""

    axes: tuple[int, int, int]
    flips: tuple[bool, bool, bool]
    grid: Grid
    source_direction: tuple[tuple[float, float, float], ...]
    obliquity_deg: float

    def apply(self, data: np.ndarray) -> np.ndarray:
        """Reorient a ``(k, j, i)`` source array (or a mask on the same grid) to ``(z, y, x)``."""
        out = np.transpose(data, self.axes)
        slices = tuple(slice(None, None, -1) if f else slice(None) for f in self.flips)
        return np.ascontiguousarray(out[slices])


def _as_direction(direction: np.ndarray | list) -> np.ndarray:
    d = np.asarray(direction, dtype=np.float64).reshape(3, 3)
    norms = np.linalg.norm(d, axis=0)
    if np.any(norms < 1e-6):
        raise GeometryError("geometry", f"direction matrix has a zero column: {d.tolist()}")
    return d / norms


def canonical_reorientation(
    shape_kji: tuple[int, int, int],
    direction: np.ndarray | list,
    spacing_ijk: tuple[float, float, float],
    origin_lps: tuple[float, float, float],
    *,
    source: str = "volume",
    max_obliquity_deg: float = 45.0,
) -> Reorientation:
    """Plan the permutation and flips that bring a source array into canonical LPS order.

    ``shape_kji`` is the numpy shape of the source array, ``direction`` the 3×3 matrix whose
    columns are the LPS unit vectors of index axes i, j, k, ``spacing_ijk`` the spacing along
    those axes and ``origin_lps`` the LPS position (x, y, z) of voxel (0, 0, 0).
    """
    d = _as_direction(direction)
    spacing = np.asarray(spacing_ijk, dtype=np.float64)
    if np.any(~np.isfinite(spacing)) or np.any(spacing <= 0):
        raise GeometryError(source, f"voxel spacing must be positive, got {spacing.tolist()} mm")
    world_of_index = np.argmax(
        np.abs(d), axis=0
    )  # for index axis a (i, j, k): world axis 0=x,1=y,2=z
    if sorted(world_of_index.tolist()) != [0, 1, 2]:
        raise GeometryError(
            source,
            "image axes do not map one-to-one onto patient axes (direction "
            f"{np.round(d, 4).tolist()}); the volume is too oblique to store without resampling",
        )
    cosines = np.abs(d[world_of_index, [0, 1, 2]])
    obliquity = float(np.degrees(np.arccos(np.clip(cosines.min(), -1.0, 1.0))))
    if obliquity > max_obliquity_deg:
        raise GeometryError(source, f"volume is {obliquity:.1f}° oblique to the patient axes")
    signs = np.sign(d[world_of_index, [0, 1, 2]])

    n_ijk = np.asarray(shape_kji[::-1], dtype=np.int64)
    first_index = np.where(signs < 0, n_ijk - 1, 0)
    new_origin_xyz = np.asarray(origin_lps, dtype=np.float64) + d @ (spacing * first_index)

    # canonical array axis c (0=z, 1=y, 2=x) holds world axis w = 2 - c
    index_of_world = {int(w): a for a, w in enumerate(world_of_index)}
    axes, flips, spacing_zyx, shape_zyx = [], [], [], []
    for c in range(3):
        a = index_of_world[2 - c]  # index axis i=0, j=1, k=2
        axes.append(2 - a)  # numpy dim of index axis a in a (k, j, i) array
        flips.append(bool(signs[a] < 0))
        spacing_zyx.append(float(spacing[a]))
        shape_zyx.append(int(n_ijk[a]))
    grid = Grid(
        shape=tuple(shape_zyx),  # type: ignore[arg-type]
        spacing=tuple(spacing_zyx),  # type: ignore[arg-type]
        origin=tuple(float(v) for v in new_origin_xyz[::-1]),  # type: ignore[arg-type]
    )
    return Reorientation(
        axes=tuple(axes),  # type: ignore[arg-type]
        flips=tuple(flips),  # type: ignore[arg-type]
        grid=grid,
        source_direction=tuple(tuple(float(v) for v in row) for row in d),
        obliquity_deg=obliquity,
    )


def voxel_positions_lps(
    index_kji: np.ndarray,
    direction: np.ndarray | list,
    spacing_ijk: tuple[float, float, float],
    origin_lps: tuple[float, float, float],
) -> np.ndarray:
    """LPS positions (x, y, z) of source voxels given as ``(..., 3)`` indices in (k, j, i) order."""
    d = _as_direction(direction)
    ijk = np.asarray(index_kji, dtype=np.float64)[..., ::-1]
    return np.asarray(origin_lps) + (ijk * np.asarray(spacing_ijk)) @ d.T


def ras_to_lps_affine(affine: np.ndarray) -> np.ndarray:
    """Convert a NIfTI (RAS+) 4×4 affine to LPS by negating the first two world rows."""
    out = np.array(affine, dtype=np.float64, copy=True)
    out[:2, :] *= -1.0
    return out


def decompose_affine(
    affine_lps: np.ndarray,
) -> tuple[np.ndarray, tuple[float, float, float], tuple]:
    """Split a 4×4 LPS affine into (direction, spacing_ijk, origin_xyz)."""
    a = np.asarray(affine_lps, dtype=np.float64)
    m = a[:3, :3]
    spacing = np.linalg.norm(m, axis=0)
    if np.any(spacing <= 0):
        raise GeometryError("affine", f"affine has a zero-length axis: {m.tolist()}")
    return m / spacing, tuple(float(s) for s in spacing), tuple(float(v) for v in a[:3, 3])
