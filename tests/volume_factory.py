"""Phantom volumes written straight through the store writer (no source collection needed)."""

from __future__ import annotations

from livercube.synth.phantom import abdomen_grid, make_anatomy, render
from livercube.volumes.volume import SegmentField, Volume


def phantom_volume(
    collection: str = "crlm",
    patient: str = "CRLM-CT-1001",
    series: str = "100",
    *,
    shape: tuple[int, int, int] = (24, 300, 260),
    spacing: tuple[float, float, float] = (1.0, 1.4, 1.4),
    annotated: bool = True,
    seed: int = 1,
) -> Volume:
    """A rendered abdomen (liver + two tumours) large enough to get browse levels."""
    grid = abdomen_grid(shape, spacing)
    r = render(make_anatomy(3, n_tumours=2), grid, "portal_venous", seed=seed)
    field = None
    if annotated:
        field = SegmentField(grid.shape, 2)
        field.add(r.masks["liver"], label="Liver", number=1, unified=1)
        field.add(r.masks["tumor_1"], label="Tumor_1", number=2, unified=2)
    return Volume(
        collection,
        patient,
        "S1",
        series,
        r.image,
        grid,
        "portal_venous",
        segments=field,
        meta={"intensity": {"exact": True}, "geometry_flags": {}, "source": {}},
    )
