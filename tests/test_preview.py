"""Contact sheets: one PNG per collection, tiles from the coarsest browse level only."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr
from PIL import Image
from volume_factory import phantom_volume

import livercube
from livercube.cli import main
from livercube.preview import (
    LABEL_COLOURS,
    coarsest_level,
    read_thumbnail,
    sheet_grid,
    window_rgb,
)
from livercube.store.catalog import write_catalog
from livercube.store.writer import write_volume


@pytest.fixture(scope="module")
def two_collections(tmp_path_factory):
    """3 CRLM volumes (two annotated) and 1 PLC volume, all big enough for browse levels."""
    url = str(tmp_path_factory.mktemp("sheets") / "s.zarr")
    zarr.open_group(url, mode="w", zarr_format=3)
    vols = [
        phantom_volume("crlm", "CRLM-CT-1001", "100", seed=1),
        phantom_volume("crlm", "CRLM-CT-1002", "100", seed=2, annotated=False),
        phantom_volume("crlm", "CRLM-CT-1003", "7", seed=3, shape=(20, 280, 300)),
        phantom_volume("plc-cect", "P0001", "C2", seed=4, spacing=(5.0, 0.8, 0.8)),
    ]
    for v in vols:
        write_volume(url, v, fingerprint="x")
    write_catalog(url)
    return url, vols


def test_sheet_grid_pages() -> None:
    assert sheet_grid(0, 48, 8) == []
    assert sheet_grid(5, 48, 8) == [(0, 5, 1)]
    assert sheet_grid(17, 8, 4) == [(0, 8, 2), (8, 8, 2), (16, 1, 1)]


def test_window_rgb_blends_labels_only_where_labelled() -> None:
    img = np.array([[-1000, 40], [240, 40]], dtype=np.int16)
    lab = np.array([[0, 2], [0, 0]], dtype=np.uint8)
    rgb = window_rgb(img, lab)
    np.testing.assert_allclose(rgb[0, 0], 0.0)  # air below the window
    np.testing.assert_allclose(rgb[1, 0], 1.0)  # top of the window
    np.testing.assert_allclose(rgb[1, 1], 0.5)  # level 40 = mid-grey, no label
    np.testing.assert_allclose(rgb[0, 1], 0.55 * 0.5 + 0.45 * np.asarray(LABEL_COLOURS[2]))


def test_thumbnail_is_the_coarsest_level_through_the_liver(two_collections) -> None:
    url, vols = two_collections
    store = livercube.open(url)
    for i, path in enumerate(store.paths()):
        vol = next(v for v in vols if path.startswith(f"{v.collection}/{v.patient_id}/"))
        group = store.root[path]
        level = coarsest_level(group)
        assert level >= 1, "these volumes are large enough for browse levels"
        f = group[f"{level}/image"].attrs["subsampling"]
        image = vol.image[:: f[0], :: f[1], :: f[2]]
        t = read_thumbnail(store, i)
        assert t.level == level
        if vol.annotated:
            label = vol.label()[:: f[0], :: f[1], :: f[2]]
            kz = round(float(np.flatnonzero(label.any(axis=(1, 2))).mean()))
            np.testing.assert_array_equal(t.label, label[kz])
            assert (t.label > 0).any()
        else:
            kz = image.shape[0] // 2
            assert t.label is None
        np.testing.assert_array_equal(t.image, image[kz])
        assert t.aspect == pytest.approx(vol.grid.spacing[1] / vol.grid.spacing[2])


def _colourful(png: Path) -> bool:
    """Any clearly non-grey pixel: only the label overlay is coloured on a sheet."""
    px = np.asarray(Image.open(png).convert("RGB"), dtype=int)
    return bool((px.max(axis=-1) - px.min(axis=-1) > 40).any())


def test_contact_sheets_cli_never_reads_full_resolution(two_collections, tmp_path, capsys):
    url, _ = two_collections
    # without the full-resolution image and label shards the sheets must still come out whole
    stripped = tmp_path / "stripped.zarr"
    shutil.copytree(url, stripped)
    removed = 0
    for arr in ("image", "label", "segments"):
        for shard in stripped.glob(f"*/*/*/*/0/{arr}/c"):
            shutil.rmtree(shard)
            removed += 1
    assert removed == 4 + 3 + 3
    out = tmp_path / "sheets"
    code = main(["preview", str(stripped), "--contact-sheets", str(out), "--max-per-sheet", "2"])
    assert code == 0
    printed = capsys.readouterr().out.split()
    assert sorted(Path(p).name for p in printed) == ["crlm-1.png", "crlm-2.png", "plc-cect.png"]
    # a page of two tiles is wider than a page of one, and every page is a real image
    sizes = {Path(p).name: Image.open(p).size for p in printed}
    assert sizes["crlm-1.png"][0] > sizes["crlm-2.png"][0]
    assert sizes["crlm-2.png"] == sizes["plc-cect.png"]
    assert all(_colourful(Path(p)) for p in printed)  # each page holds an annotated volume


def test_where_filters_the_sheets_and_unannotated_tiles_have_no_overlay(
    two_collections, tmp_path, capsys
):
    url, _ = two_collections
    out = tmp_path / "plain"
    assert main(["preview", url, "--contact-sheets", str(out), "--where", "not annotated"]) == 0
    printed = capsys.readouterr().out.split()
    assert [Path(p).name for p in printed] == ["crlm.png"]
    assert not _colourful(Path(printed[0]))
    out = tmp_path / "annotated"
    assert main(["preview", url, "--contact-sheets", str(out), "--where", "annotated"]) == 0
    printed = capsys.readouterr().out.split()
    assert sorted(Path(p).name for p in printed) == ["crlm.png", "plc-cect.png"]
