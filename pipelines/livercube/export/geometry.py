"""From the store's canonical LPS grid to the (i, j, k) + RAS affine convention of NIfTI.

The store keeps ``image[z, y, x]`` with ``x`` toward the patient's Left, ``y`` toward Posterior
and ``z`` toward Superior, voxel centres at ``origin + index · spacing`` (no rotation).  NIfTI,
nibabel, MONAI and TorchIO index arrays ``[i, j, k]`` (first axis fastest on disk) and give an
affine to RAS millimetres.  So the exported array is the stored one with its axes reversed
(``i = x``, ``j = y``, ``k = z``) and the affine negates the x and y rows (L → R, P → A).
Nothing is resampled: every voxel is the stored one and sits at the stored coordinates.
Pure functions; the exporters and the MONAI/TorchIO integrations share them.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from livercube.volumes.geometry import Grid, ras_to_lps_affine


def volume_grid(meta: dict[str, Any]) -> Grid:
    """The canonical grid of a volume from its ``livercube`` metadata (shape, spacing, origin)."""
    return Grid(
        tuple(int(v) for v in meta["shape_zyx"]),  # type: ignore[arg-type]
        tuple(float(v) for v in meta["spacing_zyx"]),  # type: ignore[arg-type]
        tuple(float(v) for v in meta["origin_zyx"]),  # type: ignore[arg-type]
    )


def lps_affine(grid: Grid) -> np.ndarray:
    """4×4 affine from (i, j, k) = (x, y, z) voxel indices to LPS millimetres."""
    affine = np.eye(4)
    affine[:3, :3] = np.diag(grid.spacing[::-1])
    affine[:3, 3] = grid.origin[::-1]
    return affine


def ras_affine(grid: Grid) -> np.ndarray:
    """4×4 affine from (i, j, k) = (x, y, z) voxel indices to RAS millimetres (NIfTI's world)."""
    return ras_to_lps_affine(lps_affine(grid))  # negating x and y rows is its own inverse


def to_ijk(array_zyx: np.ndarray) -> np.ndarray:
    """A stored ``(z, y, x)`` array as NIfTI's ``(i, j, k)`` = ``(x, y, z)`` (a view)."""
    return np.asarray(array_zyx).transpose(2, 1, 0)


def from_ijk(array_ijk: np.ndarray) -> np.ndarray:
    """The inverse of :func:`to_ijk`."""
    return np.asarray(array_ijk).transpose(2, 1, 0)


__all__ = ["from_ijk", "lps_affine", "ras_affine", "to_ijk", "volume_grid"]
