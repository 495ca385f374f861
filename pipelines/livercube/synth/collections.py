"""One entry point for all example collections (used by ``livercube synth``, the demo, tests).

Which writer and folder belong to a collection is its :mod:`livercube.registry` entry.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from livercube import registry


def write_one(collection: str, dest: Path, *, n: int, size: str, seed: int) -> Any:
    """Write one collection under ``dest/<example folder>``; returns the generator's truth."""
    entry = registry.get(collection)
    return entry.write_example(Path(dest) / entry.example_folder, n=n, size=size, seed=seed)


def write_examples(
    dest: Path,
    *,
    collections: list[str] | None = None,
    n: int = 3,
    size: str = "tiny",
    seed: int = 0,
) -> dict[str, Path]:
    """Write the requested collections (default all); returns id → root folder."""
    out = {}
    for c in collections or list(registry.ids()):
        write_one(c, dest, n=n, size=size, seed=seed)
        out[c] = Path(dest) / registry.get(c).example_folder
    return out
