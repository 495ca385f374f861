"""Whole-store facts the fault and cluster tests compare: checksums by path, complete volumes."""

from __future__ import annotations

import json
from pathlib import Path

import livercube
from livercube.store.completion import is_complete


def fingerprint_of_store(url: str, **opts) -> dict[str, str]:
    """Content checksum of every catalogued volume, by path."""
    cat = livercube.open(url, **opts).catalog
    return dict(zip(cat.path.values.astype(str), cat.checksum.values.astype(str), strict=True))


def complete_count(store: Path) -> int:
    """Complete PLC-CECT volume groups in a local store, read from their group documents."""
    n = 0
    for meta in store.glob("plc-cect/*/*/*/zarr.json"):
        try:
            attrs = json.loads(meta.read_text())["attributes"]["livercube"]
        except (ValueError, KeyError):
            continue
        n += is_complete(attrs)
    return n
