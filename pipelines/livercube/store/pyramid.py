"""Multiscale levels for browsing (napari, neuroglancer, 3D Slicer's OME-Zarr reader).

Levels are strided subsamples (every 2nd voxel), not block means: image and label levels then
share one grid exactly, label values stay valid labels, and each level's OME-Zarr transform is
simply ``scale × factor`` with the level-0 translation.  Pyramids are for looking, never for
training — the full-resolution ``image``/``label`` are the data.
"""

from __future__ import annotations

import numpy as np

#: Stop adding levels once the larger in-plane side is at most this many voxels.
MIN_SIDE = 128


def pyramid_factors(
    shape: tuple[int, int, int], spacing: tuple[float, float, float]
) -> list[tuple[int, int, int]]:
    """Cumulative (z, y, x) subsampling factors of levels 1…n (level 0 is the volume).

    In-plane axes halve every level; z halves only while its spacing is finer than the
    in-plane spacing of the level, so thick-slice CTs are not made thicker.
    """
    factors: list[tuple[int, int, int]] = []
    fz, fy, fx = 1, 1, 1
    while max(-(-shape[1] // fy), -(-shape[2] // fx)) > MIN_SIDE:
        fy, fx = fy * 2, fx * 2
        if spacing[0] * fz * 2 <= spacing[1] * fy:
            fz *= 2
        factors.append((fz, fy, fx))
    return factors


def subsample(data: np.ndarray, factor: tuple[int, int, int]) -> np.ndarray:
    return np.ascontiguousarray(data[:: factor[0], :: factor[1], :: factor[2]])


def multiscales(
    name: str,
    spacing: tuple[float, float, float],
    origin: tuple[float, float, float],
    paths: list[str],
    factors: list[tuple[int, int, int]],
) -> dict:
    """One OME-Zarr 0.5 ``multiscales`` entry for ``paths`` (level 0 first)."""
    levels = [(1, 1, 1), *factors]
    return {
        "name": name,
        "axes": [{"name": ax, "type": "space", "unit": "millimeter"} for ax in ("z", "y", "x")],
        "datasets": [
            {
                "path": path,
                "coordinateTransformations": [
                    {
                        "type": "scale",
                        "scale": [float(s) * f for s, f in zip(spacing, lf, strict=True)],
                    },
                    {"type": "translation", "translation": [float(o) for o in origin]},
                ],
            }
            for path, lf in zip(paths, levels, strict=True)
        ],
    }
