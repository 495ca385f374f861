"""livercube: liver-CT collections as chunked, sharded Zarr v3 stores for fast 3-D patch training.

``livercube.open(url, **storage_options)`` returns a :class:`~livercube.store.reader.Store`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from livercube.store.reader import Store, open

__all__ = ["Store", "open"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """``Store`` and ``open`` on first use: the reader imports xarray and pandas (~0.4 CPU s),
    which a ``convert`` run or a DataLoader worker importing ``livercube.sampling`` never needs."""
    if name in __all__:
        from livercube.store import reader

        return getattr(reader, name)
    raise AttributeError(f"module 'livercube' has no attribute {name!r}")
