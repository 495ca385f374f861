"""Multiscale levels for browsing (napari, neuroglancer, 3D Slicer's OME-Zarr reader).

Levels are strided subsamples (every 2nd voxel), not block means: image and label levels then
share one grid exactly, label values stay valid labels, and each level's OME-Zarr transform is
simply ``scale × factor`` with the level-0 translation.  Pyramids are for looking, never for
training — the full-resolution ``image``/``label`` are the data.

Every level is its own group (``<k>/image`` and, when annotated, ``<k>/label``) because an
xarray Dataset — one group of a ``DataTree`` — cannot hold two arrays that call different
lengths ``y``, and a DataTree child must agree with its parent's ``z, y, x``: only groups
without arrays may hold levels of different sizes.

There is no OME ``labels/`` group: OME-Zarr validators (ome-zarr-models) require a label
image to have as many levels as its image and find label levels only among the label group's
own arrays — levels of different sizes in one group, which no DataTree can open.  The label
pyramid is ``<k>/label`` beside each ``<k>/image``, on the same grid.
"""

from __future__ import annotations

import numpy as np

from livercube.store.layout import FULL_RES

#: Stop adding levels once the larger in-plane side is at most this many voxels.
MIN_SIDE = 128

#: CT soft-tissue window, (level, width) in HU: what viewers show when they open a volume
#: (OME ``omero`` metadata) and what the PNG previews use.
SOFT_TISSUE_WINDOW = (40.0, 400.0)

#: Range of the window sliders offered by viewers: air to dense bone/metal (int16 CT).
HU_DISPLAY_RANGE = (-1024.0, 3071.0)


def window_bounds(window: tuple[float, float] = SOFT_TISSUE_WINDOW) -> tuple[float, float]:
    """(lowest, highest) HU displayed by a (level, width) window: W400/L40 → (−160, 240)."""
    level, width = window
    return level - width / 2, level + width / 2


def level_group(k: int) -> str:
    """Group of image level ``k`` inside a volume group (``0`` = the full-resolution data)."""
    return FULL_RES if k == 0 else str(k)


def image_level_path(k: int) -> str:
    """Path of the image of level ``k`` relative to the volume group (OME dataset path)."""
    return f"{level_group(k)}/image"


def label_level_path(k: int) -> str:
    """Path of the unified label of level ``k`` relative to the volume group."""
    return f"{level_group(k)}/label"


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
    """Every ``factor``-th voxel of ``data``, as a strided *view*: the writer copies one inner
    chunk at a time out of it, so a browse level never costs a full-size copy."""
    return data[:: factor[0], :: factor[1], :: factor[2]]


def subsampled_box(
    box: tuple[slice, ...] | None, factor: tuple[int, int, int]
) -> tuple[slice, ...] | None:
    """The box of :func:`subsample`'s view holding every voxel it takes from ``box``.

    Level voxel ``i`` is level-0 voxel ``i * f``, so ``[a, b)`` maps to ``[⌈a/f⌉, ⌈b/f⌉)``.
    """
    if box is None:
        return None
    out = []
    for s, f in zip(box, factor, strict=True):
        lo, hi = -(-int(s.start) // f), -(-int(s.stop) // f)
        out.append(slice(lo, max(lo, hi)))
    return tuple(out)


def omero(n_slices: int, window: tuple[float, float] = SOFT_TISSUE_WINDOW) -> dict:
    """OME ``omero`` rendering metadata: one greyscale CT channel in the given HU window."""
    start, end = window_bounds(window)
    lo, hi = HU_DISPLAY_RANGE
    return {
        "channels": [
            {
                "label": "CT (HU)",
                "color": "FFFFFF",
                "active": True,
                "inverted": False,
                "coefficient": 1.0,
                "family": "linear",
                "window": {"min": lo, "max": hi, "start": start, "end": end},
            }
        ],
        "rdefs": {"model": "greyscale", "defaultZ": n_slices // 2, "defaultT": 0},
    }


def multiscales(
    name: str,
    spacing: tuple[float, float, float],
    origin: tuple[float, float, float],
    paths: list[str],
    factors: list[tuple[int, int, int]],
) -> dict:
    """One OME-Zarr 0.5 ``multiscales`` entry for ``paths`` (level 0 first).

    The translation stays the level-0 origin: strided levels start at voxel 0, so the first
    voxel centre of every level is the same point.
    """
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
