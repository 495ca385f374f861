"""Which volumes an export takes: the catalog rows a ``--where`` expression selects.

One place, and the same query ``livercube ls`` runs (per-axis columns such as ``spacing_z``
included), so every command that filters the catalog agrees on what an expression means.
"""

from __future__ import annotations

import pandas as pd

from livercube.store.query import catalog_frame
from livercube.store.query import select as query
from livercube.store.reader import Store


def select(store: Store, where: str | None) -> pd.DataFrame:
    """Catalog rows matching ``where`` (all rows when empty); the index is the volume index."""
    return query(catalog_frame(store.catalog), where)


__all__ = ["select"]
