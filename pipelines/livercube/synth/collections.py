"""One entry point for all example collections (used by ``livercube synth``, the demo, tests)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from livercube.schema import COLLECTIONS

FOLDER = {"plc-cect": "PLC-CECT", "hcc-tace-seg": "HCC-TACE-Seg", "crlm": "CRLM"}


def write_one(collection: str, dest: Path, *, n: int, size: str, seed: int) -> Any:
    """Write one collection under ``dest/<FOLDER>``; returns the generator's truth object."""
    root = Path(dest) / FOLDER[collection]
    if collection == "plc-cect":
        from livercube.synth.plc_cect import write_plc_cect

        return write_plc_cect(root, n_subjects=n, size=size, seed=seed)
    from livercube.synth import dicom_collections as dicom

    writer = dicom.write_hcc_tace_seg if collection == "hcc-tace-seg" else dicom.write_crlm
    return writer(root, n_patients=n, size=size, seed=seed)


def write_examples(
    dest: Path,
    *,
    collections: list[str] | None = None,
    n: int = 3,
    size: str = "tiny",
    seed: int = 0,
) -> dict[str, Path]:
    """Write the requested collections (default all three); returns name → root folder."""
    out = {}
    for c in collections or list(COLLECTIONS):
        write_one(c, dest, n=n, size=size, seed=seed)
        out[c] = Path(dest) / FOLDER[c]
    return out
