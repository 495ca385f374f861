"""PNG previews: axial, coronal and sagittal slices through the liver with the label overlaid.

Drawn in physical millimetres (``extent`` from the stored spacing), so anisotropic voxels look
like anatomy and a wrong orientation is visible at a glance: patient Right on the image left,
anterior up, superior up — the radiological convention.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from livercube.store.reader import Store

LABEL_COLOURS = {
    1: (0.85, 0.45, 0.2),
    2: (0.9, 0.1, 0.1),
    3: (0.2, 0.4, 1.0),
    4: (0.1, 0.8, 0.9),
    5: (0.9, 0.2, 0.8),
}


def _overlay(ax, img: np.ndarray, lab: np.ndarray | None, extent, *, window=(-160, 240)) -> None:
    ax.imshow(
        img,
        cmap="gray",
        vmin=window[0],
        vmax=window[1],
        extent=extent,
        interpolation="nearest",
        aspect="equal",
    )
    if lab is not None:
        rgba = np.zeros((*lab.shape, 4))
        for value, colour in LABEL_COLOURS.items():
            rgba[lab == value] = (*colour, 0.45)
        ax.imshow(rgba, extent=extent, interpolation="nearest", aspect="equal")
    ax.set_xticks([])
    ax.set_yticks([])


def volume_preview(store: Store, keys: list[str | int], out: str | Path) -> Path:
    """One row per volume: axial, coronal, sagittal through the label's centre of mass."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(keys), 3, figsize=(9, 3 * len(keys)), squeeze=False)
    for row, key in zip(axes, keys, strict=True):
        ds = store.volume(key)
        img = np.asarray(ds["image"].values)
        lab = np.asarray(ds["label"].values) if "label" in ds else None
        sz, sy, sx = (
            float(ds[c].values[1] - ds[c].values[0]) if ds.sizes[c] > 1 else 1.0
            for c in ("z", "y", "x")
        )
        focus = (
            np.argwhere(lab > 0).mean(axis=0)
            if lab is not None and lab.any()
            else (np.array(img.shape) / 2)
        )
        kz, ky, kx = (round(float(v)) for v in focus)
        nz, ny, nx = img.shape
        # radiological display: patient right (low x) on the left of the image, anterior up
        _overlay(row[0], img[kz], None if lab is None else lab[kz], (0, nx * sx, ny * sy, 0))
        _overlay(
            row[1],
            img[::-1, ky, :],
            None if lab is None else lab[::-1, ky, :],
            (0, nx * sx, 0, nz * sz),
        )
        _overlay(
            row[2],
            img[::-1, :, kx],
            None if lab is None else lab[::-1, :, kx],
            (0, ny * sy, 0, nz * sz),
        )
        row[0].set_ylabel(str(store.paths()[key] if isinstance(key, int) else key), fontsize=7)
    for ax, title in zip(axes[0], ("axial", "coronal", "sagittal"), strict=True):
        ax.set_title(title)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out
