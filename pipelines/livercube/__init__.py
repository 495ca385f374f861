"""livercube: liver-CT collections as chunked, sharded Zarr v3 stores for fast 3-D patch training.

``livercube.open(url, **storage_options)`` returns a :class:`~livercube.store.reader.Store`.
"""

from livercube.store.reader import Store, open

__all__ = ["Store", "open"]
__version__ = "0.1.0"
