"""Going back out: a store's volumes as NIfTI files or as an nnU-Net v2 raw dataset.

``export(url, dest, "nifti" | "nnunet", where=…)`` selects volumes with the catalog query
``livercube ls`` uses, writes them under the local directory ``dest`` and records what it
wrote in ``dest/livercube-export.json`` (store, expression, files per volume or case).
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from livercube.errors import UsageError
from livercube.schema import PHASES
from livercube.store.location import StoreLocation, is_remote
from livercube.store.publish import redact

FORMATS = ("nifti", "nnunet")
INTERPOLATIONS = ("linear", "nearest")
MANIFEST_NAME = "livercube-export.json"


@dataclass
class ExportResult:
    dest: Path
    format: str
    written: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        what = "cases" if self.format == "nnunet" else "volumes"
        lines = [f"{len(self.written)} {what} exported to {self.dest} ({self.format})"]
        lines += [f"  left out {path}: {reason}" for path, reason in self.skipped]
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)


def _prepare(dest: Path, overwrite: bool) -> None:
    if dest.exists() and not dest.is_dir():
        raise UsageError(f"{dest} exists and is not a directory")
    if dest.exists() and any(dest.iterdir()):
        if not overwrite:
            raise UsageError(f"{dest} is not empty; pass --overwrite to replace an earlier export")
        for name in ("imagesTr", "labelsTr"):  # stale cases would break numTraining
            shutil.rmtree(dest / name, ignore_errors=True)
    dest.mkdir(parents=True, exist_ok=True)


def export(
    where_from: str | StoreLocation,
    dest: str | Path,
    format: str,
    *,
    where: str | None = None,
    segments: bool = False,
    phases: list[str] | None = None,
    interpolation: str = "linear",
    overwrite: bool = False,
    storage_options: dict[str, Any] | None = None,
) -> ExportResult:
    """Export the volumes ``where`` selects from the store ``where_from`` into ``dest``."""
    import livercube
    from livercube.export.selection import select

    if format not in FORMATS:
        raise UsageError(f"--format must be one of {', '.join(FORMATS)}, not {format!r}")
    if is_remote(str(dest)):
        raise UsageError(f"export writes to a local directory, not {dest}")
    if segments and format != "nifti":
        raise UsageError("--segments applies to --format nifti (nnU-Net takes one label map)")
    if phases and format != "nnunet":
        raise UsageError("--phases applies to --format nnunet")
    if interpolation not in INTERPOLATIONS:
        raise UsageError(f"--interpolation must be one of {', '.join(INTERPOLATIONS)}")
    unknown = [p for p in phases or [] if p not in PHASES]
    if unknown:
        raise UsageError(
            f"--phases: unknown phase(s) {', '.join(unknown)}; use {', '.join(PHASES)}"
        )
    if phases and len(set(phases)) != len(phases):
        raise UsageError("--phases: each phase once")
    store = livercube.open(StoreLocation.of(where_from, storage_options))
    url = store.url
    rows = select(store, where)
    dest = Path(dest)
    _prepare(dest, overwrite)
    result = ExportResult(dest, format)
    if format == "nifti":
        from livercube.export.nifti import export_volume

        result.written = [export_volume(store, p, dest, segments=segments) for p in rows["path"]]
    else:
        from livercube.export.nnunet import export_nnunet

        result.written, result.skipped = export_nnunet(
            store,
            dest,
            rows,
            phases=phases,
            interpolation=interpolation,
            extra={"store": redact(url), "where": where},
        )
        if not re.fullmatch(r"Dataset\d{3}_[A-Za-z0-9_-]+", dest.name):
            result.notes.append(
                f"nnU-Net finds datasets named DatasetNNN_Name under $nnUNet_raw; rename "
                f"{dest.name!r} (e.g. Dataset501_Liver) before nnUNetv2_plan_and_preprocess"
            )
    manifest = {
        "store": redact(url),
        "where": where,
        "format": format,
        "phases": phases,
        "written": result.written,
        "left_out": [{"path": p, "reason": r} for p, r in result.skipped],
    }
    (dest / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1) + "\n")
    return result


__all__ = ["FORMATS", "ExportResult", "export"]
