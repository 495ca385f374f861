"""``livercube demo``: the whole pipeline on built-in example data, end to end, in one command.

Synthesizes the three collections in their real on-disk forms, converts every collection the
installed version supports into one store, prints the report and catalog, reads a patch back
with plain xarray (no livercube import in that step's code path), and writes a PNG preview
and one contact sheet per collection.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from livercube import registry
from livercube.convert import EXIT_OK, convert
from livercube.errors import UsageError
from livercube.store.layout import data_path
from livercube.synth.collections import write_one


def run_demo(workdir: Path, *, size: str = "small", scheduler: str = "threads") -> int:
    workdir = Path(workdir)
    examples, store_url = workdir / "examples", str(workdir / "livercube.zarr")
    status = EXIT_OK
    for collection in (c.id for c in registry.BUILTIN):
        t0 = time.perf_counter()
        try:
            write_one(collection, examples, n=3, size=size, seed=0)
        except (ImportError, AttributeError) as exc:
            print(f"[synth] {collection}: generator not available in this version ({exc})")
            continue
        print(
            f"[synth] {collection}: {examples / registry.get(collection).example_folder} "
            f"({time.perf_counter() - t0:.1f} s)"
        )
        t0 = time.perf_counter()
        try:
            source = examples / registry.get(collection).example_folder
            report = convert(str(source), store_url, collection, scheduler=scheduler)
        except UsageError as exc:
            print(f"[convert] {collection}: not converted: {exc}")
            continue
        print(f"[convert] {report.summary()}  ({time.perf_counter() - t0:.1f} s)")
        status = max(status, report.exit_code)

    import xarray as xr

    cat = xr.open_zarr(f"{store_url}/catalog", zarr_format=3)  # its own consolidated document
    print(f"\n[store] {store_url}: {cat.sizes['volume']} volumes")
    for i in range(cat.sizes["volume"]):
        ext = "x".join(str(int(v)) for v in cat["extent"].values[i])
        print(
            f"  {cat['path'].values[i]!s:45s} {cat['phase'].values[i]!s:14s} {ext:>12s}"
            f"  annotated={bool(cat['annotated'].values[i])}"
        )
    # a patch centred on a tumour voxel, found through the stored class locations
    first = str(cat["path"].values[int(np.flatnonzero(cat["annotated"].values)[0])])
    # plain xarray: a volume's full-resolution Dataset is its group "0" (level 0 of the pyramid)
    ds = xr.open_zarr(store_url, group=data_path(first), zarr_format=3)
    loc = ds["class_locations"].values
    centre = loc[loc[:, 0] == 2][0, 1:] if (loc[:, 0] == 2).any() else loc[0, 1:]
    box = {
        dim: slice(max(0, int(c) - h), int(c) + h)
        for dim, c, h in zip(("z", "y", "x"), centre, (4, 16, 16), strict=True)
    }
    patch = ds[["image", "label"]].isel(box).load()
    print(
        f"\n[xarray] {first}: patch {dict(patch.sizes)} around tumour voxel "
        f"{centre.tolist()}, HU range "
        f"{int(patch.image.min())}..{int(patch.image.max())}, labels "
        f"{sorted(np.unique(patch.label.values).tolist())}"
    )

    import livercube
    from livercube.preview import volume_preview

    store = livercube.open(store_url)
    cat = store.catalog
    collections = cat["collection"].values
    annotated = cat["annotated"].values
    # one annotated volume per collection, so every row of the preview shows its labels
    keys = [
        int(np.flatnonzero((collections == c) & annotated)[0])
        if ((collections == c) & annotated).any()
        else int(np.flatnonzero(collections == c)[0])
        for c in dict.fromkeys(collections.tolist())
    ]
    png = volume_preview(store, keys, workdir / "preview.png")
    print(f"[preview] {png}")
    from livercube.preview import contact_sheets

    for sheet in contact_sheets(store, workdir / "sheets"):
        print(f"[contact sheet] {sheet}")
    return status
