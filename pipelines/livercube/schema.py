"""Access to the store contract files in ``schemas/`` (label schema, phase vocabulary, version).

The JSON files in ``schemas/`` are the single source of truth; the package reads them at run
time (from the repository in a development install, from ``livercube/_schemas`` in a wheel)
instead of keeping a second copy in code.
"""

from __future__ import annotations

import json
import re
from functools import cache
from pathlib import Path
from typing import Any

#: Version of the on-disk contract written into every store root and volume group.
STORE_SCHEMA_VERSION = "2.2"

#: Phase vocabulary of the catalog and of every volume.
PHASES = ("non_contrast", "arterial", "portal_venous", "delayed", "unknown")

#: Catalog group at the store root.
CATALOG_GROUP = "catalog"



def schemas_dir() -> Path:
    """Directory holding the contract files, in a wheel or in a source checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "_schemas", here.parent.parent / "schemas"):
        if (candidate / "labels.json").is_file():
            return candidate
    raise FileNotFoundError("livercube schemas/ directory not found next to the package")


@cache
def label_schema() -> dict[str, Any]:
    """The parsed ``schemas/labels.json``."""
    return json.loads((schemas_dir() / "labels.json").read_text())


def unified_labels() -> dict[int, str]:
    """Unified label value → name (0 background … 5 aorta)."""
    return {int(k): v for k, v in label_schema()["labels"].items()}


def label_precedence() -> list[int]:
    """Unified labels from highest to lowest precedence where segments overlap."""
    return list(label_schema()["precedence"])


def map_segment_label(collection: str, segment_label: str) -> int | None:
    """Unified label value for a source segment label, or ``None`` if it feeds no unified label.

    Raises ``KeyError`` when the label is unknown to the schema, so callers can report it.
    """
    text = segment_label.strip().lower()
    for rule in label_schema()["collections"][collection]:
        if re.fullmatch(rule["pattern"], text):
            return rule["label"]
    raise KeyError(segment_label)
