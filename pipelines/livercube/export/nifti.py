"""NIfTI export: one ``.nii.gz`` per volume for ``image`` and ``label`` (and each segment).

Files mirror the store's layout, ``DEST/<collection>/<patient>/<study>/<series>/image.nii.gz``,
so a file names the volume it came from.  Voxels are the stored ones (int16 HU, uint8 labels,
uint8 0/1 segment masks; never rescaled) and the affine is the store's grid in RAS
(:mod:`livercube.export.geometry`), written as both qform and sform with code 1 (scanner) so
every reader — nibabel, ITK/SimpleITK, TorchIO, MONAI, nnU-Net — finds the same geometry.
NIfTI-1 keeps the affine in float32: coordinates agree with the store's to float32 precision
(~1e-5 mm at 500 mm), far below any voxel.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from livercube.export.geometry import ras_affine, to_ijk, volume_grid
from livercube.store.layout import sanitize
from livercube.store.reader import Store
from livercube.volumes.geometry import Grid


def nifti_image(array_zyx: np.ndarray, grid: Grid, dtype: Any | None = None) -> nib.Nifti1Image:
    """A NIfTI-1 image of a stored ``(z, y, x)`` array on ``grid``, voxels unchanged."""
    data = np.asarray(to_ijk(array_zyx))
    if dtype is not None:
        data = data.astype(dtype, copy=False)
    affine = ras_affine(grid)
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm")
    img.header.set_data_dtype(data.dtype)  # on-disk type = stored type: no scl_slope rescaling
    return img


def write_nifti(path: Path, array_zyx: np.ndarray, grid: Grid, dtype: Any | None = None) -> Path:
    """Write one ``.nii.gz`` (parents created) and return its path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nifti_image(array_zyx, grid, dtype), str(path))
    return path


def segment_filename(bit: int, name: str) -> str:
    """``03_Tumor_1.nii.gz``: bit number first, so names stay unique and sort in source order."""
    return f"{int(bit):02d}_{sanitize(name)}.nii.gz"


def export_volume(store: Store, path: str, dest: Path, *, segments: bool = False) -> dict:
    """Write one volume's ``image`` / ``label`` (and segment masks) under ``dest/path``.

    Returns a manifest entry: the files written (relative to ``dest``) and the segment table.
    """
    meta = store.volume_attrs(path)
    grid = volume_grid(meta)
    ds = store.volume(path)
    out = dest / path
    files = {"image": write_nifti(out / "image.nii.gz", ds["image"].values, grid, np.int16)}
    if "label" in ds:
        files["label"] = write_nifti(out / "label.nii.gz", ds["label"].values, grid, np.uint8)
    entry: dict[str, Any] = {"path": path, "phase": meta.get("phase")}
    if segments and meta.get("segments"):
        table = []
        masks = store.segments(path)  # source order, the same order as meta["segments"]
        for seg, (name, mask) in zip(meta["segments"], masks.items(), strict=True):
            file = write_nifti(
                out / "segments" / segment_filename(seg["bit"], name), mask, grid, np.uint8
            )
            table.append(
                {
                    "file": str(file.relative_to(dest)),
                    "label": seg["label"],
                    "number": seg.get("number"),
                    "unified_label": seg.get("unified_label"),
                }
            )
        (out / "segments" / "segments.json").write_text(json.dumps(table, indent=1) + "\n")
        entry["segments"] = table
    entry["files"] = {k: str(v.relative_to(dest)) for k, v in files.items()}
    return entry


__all__ = ["export_volume", "nifti_image", "segment_filename", "write_nifti"]
