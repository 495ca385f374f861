"""Independent re-decoding of a DICOM volume for ``livercube verify --source``.

A verification that re-runs the converter's own code can only confirm the converter agrees with
itself.  Here the same source files are decoded by other implementations and placed onto the
stored grid by physical coordinates alone:

* **CT**: SimpleITK reads every slice file on its own (its GDCM-based reader applies
  Rescale Slope/Intercept and its own orientation handling); ``DICOMOrient("LPS")`` and the
  slice's own origin say which stored voxels it covers.  Stored voxels no file covers must hold
  the fill value (missing or damaged slices).
* **SEG**: highdicom builds the segmentation's volume (``Segmentation.get_volume``, omitted
  empty frames allowed) with its own affine; every stored voxel centre is mapped into it.  Where
  highdicom cannot build one volume (frames on several orientations or irregular planes) the
  segmentation is not checked and the result says so.

Only the choice of files (which slices and which SEG make a volume) is taken from the
converter's plan: that is what ``verify`` checks against, not how they decode.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import fsspec
import numpy as np
from fsspec.implementations.local import LocalFileSystem

#: A stored voxel centre and a reference sample coincide within this fraction of a voxel.
COINCIDE_VOXEL = 0.1


@dataclass
class ReferenceVolume:
    """What the independent decoders say the stored arrays must hold."""

    image: np.ndarray  # int, stored grid
    covered: np.ndarray  # (z,) or full bool: voxels some source file covers
    segments: dict[int, np.ndarray] = field(default_factory=dict)  # SegmentNumber -> mask
    checked_planes: np.ndarray | None = None  # bool (z, y, x): where segments were compared
    notes: list[str] = field(default_factory=list)


@contextlib.contextmanager
def _local(url: str, storage_options: dict | None) -> Iterator[str]:
    """A local path for a file at any fsspec URL (downloaded to a temp file when remote)."""
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    if isinstance(fs, LocalFileSystem):
        yield path
        return
    fd, tmp = tempfile.mkstemp(suffix=".dcm")
    os.close(fd)
    try:
        fs.get_file(path, tmp)
        yield tmp
    finally:
        os.unlink(tmp)


def _index(values: np.ndarray, coord: np.ndarray, what: str) -> np.ndarray:
    """Stored index of physical positions ``values`` along one axis (must coincide)."""
    step = float(coord[1] - coord[0]) if coord.size > 1 else 1.0
    idx = (np.asarray(values, dtype=np.float64) - float(coord[0])) / step
    near = np.rint(idx)
    if np.any(np.abs(idx - near) > COINCIDE_VOXEL):
        raise ValueError(f"{what} does not lie on the stored grid (index {idx.tolist()[:3]}…)")
    return near.astype(np.int64)


def reference_ct(
    slice_urls: Sequence[str],
    coords: tuple[np.ndarray, np.ndarray, np.ndarray],
    *,
    fill: int,
    storage_options: dict | None = None,
) -> ReferenceVolume:
    """The stored image as SimpleITK decodes each slice file (see module docstring)."""
    import SimpleITK as sitk

    z, y, x = (np.asarray(c, dtype=np.float64) for c in coords)
    image = np.full((z.size, y.size, x.size), fill, dtype=np.int64)
    covered = np.zeros(image.shape, dtype=bool)
    for url in slice_urls:
        with _local(url, storage_options) as path:
            img = sitk.DICOMOrient(sitk.ReadImage(path), "LPS")
        arr = sitk.GetArrayFromImage(img)  # (z, y, x) in LPS now
        ox, oy, oz = img.GetOrigin()
        sx, sy, sz = img.GetSpacing()
        iz = _index(oz + sz * np.arange(arr.shape[0]), z, f"{url} z")
        iy = _index(oy + sy * np.arange(arr.shape[1]), y, f"{url} y")
        ix = _index(ox + sx * np.arange(arr.shape[2]), x, f"{url} x")
        inside = (
            (iz[:, None, None] >= 0) & (iz[:, None, None] < z.size)
            & (iy[None, :, None] >= 0) & (iy[None, :, None] < y.size)
            & (ix[None, None, :] >= 0) & (ix[None, None, :] < x.size)
        )  # fmt: skip
        if not inside.all():
            raise ValueError(f"{url} reaches outside the stored volume")
        if not np.allclose(np.asarray(img.GetDirection()), np.eye(3).ravel(), atol=1e-3):
            raise ValueError(f"{url} is oblique: no voxel-for-voxel reference")
        image[np.ix_(iz, iy, ix)] = arr
        covered[np.ix_(iz, iy, ix)] = True
    return ReferenceVolume(image=image, covered=covered)


def reference_segments(
    seg_url: str,
    coords: tuple[np.ndarray, np.ndarray, np.ndarray],
    numbers: Sequence[int],
    *,
    storage_options: dict | None = None,
) -> tuple[dict[int, np.ndarray], np.ndarray | None, list[str]]:
    """Each segment of the SEG as highdicom places it, pulled onto the stored grid.

    Returns (masks by SegmentNumber, the voxels that could be compared, notes).  A stored voxel
    is compared where its centre maps inside highdicom's volume and, along the SEG's plane
    normal, coincides with one of its planes — or everywhere inside when the SEG samples planes
    at the stored spacing.
    """
    import highdicom as hd

    z, y, x = (np.asarray(c, dtype=np.float64) for c in coords)
    with _local(seg_url, storage_options) as path:
        seg = hd.seg.segread(path)
        try:
            vol = seg.get_volume(
                combine_segments=False, segment_numbers=list(numbers), allow_missing_positions=True
            )
        except Exception as exc:
            return {}, None, [f"highdicom cannot build one volume from the SEG ({exc})"]
    data = np.asarray(vol.array)  # (slices, rows, cols, segments)
    if data.ndim == 3:
        data = data[..., None]
    inv = np.linalg.inv(np.asarray(vol.affine, dtype=np.float64))
    shape = np.asarray(data.shape[:3])
    masks = {n: np.zeros((z.size, y.size, x.size), dtype=bool) for n in numbers}
    checked = np.zeros((z.size, y.size, x.size), dtype=bool)
    fractional = seg.segmentation_type.value == "FRACTIONAL"
    yy, xx = np.meshgrid(y, x, indexing="ij")
    for k, zk in enumerate(z):
        pts = np.stack([xx.ravel(), yy.ravel(), np.full(xx.size, zk), np.ones(xx.size)])
        ijk = (inv @ pts)[:3].T  # continuous (slice, row, col) index
        near = np.rint(ijk)
        ok = np.all((near >= 0) & (near < shape), axis=1)
        # along the plane normal only coinciding planes are compared
        ok &= np.abs(ijk[:, 0] - near[:, 0]) <= COINCIDE_VOXEL
        # beyond highdicom's volume nothing may be stored
        outside = ~np.all((ijk >= -0.5) & (ijk < shape - 0.5), axis=1)
        checked.reshape(z.size, -1)[k, outside] = True
        if not ok.any():
            continue
        idx = near[ok].astype(np.int64)
        flat = np.flatnonzero(ok)
        checked.reshape(z.size, -1)[k, flat] = True
        for j, n in enumerate(numbers):
            vals = data[idx[:, 0], idx[:, 1], idx[:, 2], j]
            # highdicom rescales FRACTIONAL to [0, 1]; the store keeps occupancy >= 0.5
            on = vals >= 0.5 - 1e-6 if fractional else vals != 0
            masks[n].reshape(z.size, -1)[k, flat] = on
    return masks, checked, []
