"""PNG previews: per-volume montages and per-collection contact sheets.

* :func:`volume_preview`: axial, coronal and sagittal slices through the liver with the label
  overlaid, drawn in physical millimetres (``extent`` from the stored spacing), so anisotropic
  voxels look like anatomy and a wrong orientation is visible at a glance: patient Right on the
  image left, anterior up, superior up — the radiological convention.
* :func:`contact_sheets`: one grid of axial thumbnails per collection, a tile per volume,
  read from the coarsest browse level (``<k>/image``, ``<k>/label``) so that a
  sheet of a bucket costs a few hundred kB per volume instead of the full-resolution arrays —
  the quick look a curator takes over a whole collection to spot a flipped or empty volume.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from livercube.store.pyramid import (
    SOFT_TISSUE_WINDOW,
    image_level_path,
    label_level_path,
    window_bounds,
)
from livercube.store.query import select_indices
from livercube.store.reader import Store

#: Abdominal soft-tissue window (level 40, width 400 HU): the one viewers open with (omero).
THUMB_WINDOW = window_bounds(SOFT_TISSUE_WINDOW)

LABEL_COLOURS = {
    1: (0.85, 0.45, 0.2),
    2: (0.9, 0.1, 0.1),
    3: (0.2, 0.4, 1.0),
    4: (0.1, 0.8, 0.9),
    5: (0.9, 0.2, 0.8),
}


def _overlay(
    ax, img: np.ndarray, lab: np.ndarray | None, extent, *, window=THUMB_WINDOW
) -> None:
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


# --------------------------------------------------------------------------- contact sheets



@dataclass(frozen=True)
class Thumbnail:
    """One tile: an axial slice at a browse level, its label slice and a caption."""

    image: np.ndarray  # (y, x) int16 HU
    label: np.ndarray | None  # (y, x) uint8 unified labels, None when not annotated
    caption: str
    level: int  # browse level read (0 = full resolution)
    aspect: float  # physical height / width of one pixel (y spacing / x spacing)


def window_rgb(
    image: np.ndarray, label: np.ndarray | None, window: tuple[float, float] = THUMB_WINDOW
) -> np.ndarray:
    """Windowed grey image with the label blended in, as float RGB in [0, 1].

    Pure, so a test can recompute a tile independently of matplotlib.
    """
    lo, hi = window
    grey = np.clip((image.astype(np.float32) - lo) / float(hi - lo), 0.0, 1.0)
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    if label is not None:
        for value, colour in LABEL_COLOURS.items():
            hit = label == value
            if hit.any():
                rgb[hit] = 0.55 * rgb[hit] + 0.45 * np.asarray(colour, dtype=np.float32)
    return rgb


def sheet_grid(n: int, max_per_sheet: int, columns: int) -> list[tuple[int, int, int]]:
    """Pages of a sheet of ``n`` tiles: ``(first, count, rows)`` per page, in order."""
    if n <= 0:
        return []
    per = max(1, max_per_sheet)
    pages = []
    for first in range(0, n, per):
        count = min(per, n - first)
        pages.append((first, count, math.ceil(count / max(1, columns))))
    return pages


def coarsest_level(group) -> int:
    """Index of the coarsest image level listed in a volume's OME multiscales (0: none)."""
    datasets = group.attrs.get("ome", {}).get("multiscales", [{}])[0].get("datasets", [])
    return max(len(datasets) - 1, 0)


def _focus_slice(label: np.ndarray | None, nz: int) -> int:
    """Axial index through the label's centre of mass (the liver), else the middle slice."""
    if label is not None and label.any():
        return round(float(np.flatnonzero(label.any(axis=(1, 2))).mean()))
    return nz // 2


def read_thumbnail(store: Store, index: int) -> Thumbnail:
    """The axial tile of volume ``index`` from its coarsest browse level."""
    cat = store.catalog
    path = str(cat["path"].values[index])
    group = store.root[path]
    level = coarsest_level(group)
    image_arr = group[image_level_path(level)]
    label_path = label_level_path(level)
    label_arr = group.get(label_path)
    label = np.asarray(label_arr[...]) if label_arr is not None else None
    kz = _focus_slice(label, image_arr.shape[0])
    image = np.asarray(image_arr[kz])
    spacing = cat["spacing"].values[index]  # (z, y, x) mm at level 0
    factor = _level_factor(group, level)
    aspect = float(spacing[1] * factor[1]) / float(spacing[2] * factor[2])
    series = path.rsplit("/", 1)[-1]
    caption = f"{cat['patient_id'].values[index]} {series}\n{cat['phase'].values[index]}"
    return Thumbnail(image, None if label is None else label[kz], caption, level, aspect)


def _level_factor(group, level: int) -> tuple[int, int, int]:
    if not level:
        return (1, 1, 1)
    f = group[image_level_path(level)].attrs.get("subsampling", [1, 1, 1])
    return tuple(int(v) for v in f)  # type: ignore[return-value]


def contact_sheets(
    store: Store,
    out_dir: str | Path,
    *,
    where: str | None = None,
    max_per_sheet: int = 48,
    columns: int = 8,
    tile_inches: float = 1.6,
) -> list[Path]:
    """One PNG per collection (``<collection>.png``, or ``<collection>-<page>.png`` when it has
    more than ``max_per_sheet`` volumes): an axial tile per volume in catalog order, liver level,
    abdominal window, labels blended in, patient id and phase as caption.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cat = store.catalog
    indices = select_indices(cat, where)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    collections = cat["collection"].values
    for coll in dict.fromkeys(collections[indices].tolist()):
        members = [int(i) for i in indices if collections[i] == coll]
        pages = sheet_grid(len(members), max_per_sheet, columns)
        for page, (first, count, rows) in enumerate(pages, start=1):
            cols = min(columns, count)
            fig, axes = plt.subplots(
                rows,
                cols,
                figsize=(tile_inches * cols, (tile_inches + 0.35) * rows + 0.5),
                squeeze=False,
            )
            for ax in axes.ravel():
                ax.set_axis_off()
            for slot, i in enumerate(members[first : first + count]):
                t = read_thumbnail(store, i)
                ax = axes[slot // cols][slot % cols]
                ax.imshow(window_rgb(t.image, t.label), interpolation="nearest", aspect=t.aspect)
                ax.set_title(t.caption, fontsize=6)
            suffix = f" (page {page}/{len(pages)})" if len(pages) > 1 else ""
            fig.suptitle(f"{coll}: {len(members)} volumes{suffix}", fontsize=9)
            fig.tight_layout()
            name = f"{coll}.png" if len(pages) == 1 else f"{coll}-{page}.png"
            target = out_dir / name
            fig.savefig(target, dpi=80)
            plt.close(fig)
            written.append(target)
    return written
