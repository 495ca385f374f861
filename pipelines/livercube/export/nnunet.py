"""nnU-Net v2 raw dataset export: ``dataset.json``, ``imagesTr/<case>_0000.nii.gz``,
``labelsTr/<case>.nii.gz``, annotated volumes only.

Labels are the store's unified labels (``schemas/labels.json``), so nnU-Net trains on the
same classes the store and the sampler use.  Every channel is named ``CT`` because nnU-Net
picks its CT normalisation (dataset-wide HU percentiles) by that exact name; which phase each
channel holds is in ``dataset.json["livercube"]["channels"]``.

With ``phases``, each case is one study: its annotated reference volume (the first of
``phases`` that is annotated and selected) and, as ``_0000``, ``_0001`` …, the study's volume of
each phase resampled onto the reference grid by the patch sampler's own geometry (nearest or
linear, no registration); ``where`` picks the references, their partner phases come from
the same study whatever it says, as in the sampler.  The reference channel keeps exact int16
HU; resampled channels are float32 with linear interpolation.  Studies lacking a phase are
left out and reported.
``livercube-export.json`` maps every case back to its store volumes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from livercube.errors import StoreError
from livercube.export.geometry import volume_grid
from livercube.export.nifti import write_nifti
from livercube.schema import STORE_SCHEMA_VERSION, unified_labels
from livercube.store.reader import Store

#: nnU-Net selects CT normalisation for channels with exactly this name.
CHANNEL_NAME = "CT"
FILE_ENDING = ".nii.gz"


def case_id(path: str) -> str:
    """nnU-Net case identifier of a store volume: its path with ``/`` → ``_``."""
    return path.replace("/", "_")


def dataset_json(
    n_training: int, channels: list[str], *, name: str, extra: dict[str, Any]
) -> dict[str, Any]:
    """The ``dataset.json`` nnU-Net v2 reads (labels name → value, consecutive from 0)."""
    return {
        "name": name,
        "channel_names": {str(i): CHANNEL_NAME for i in range(len(channels))},
        "labels": {label: value for value, label in sorted(unified_labels().items())},
        "numTraining": int(n_training),
        "file_ending": FILE_ENDING,
        "livercube": {"channels": channels, "schema_version": STORE_SCHEMA_VERSION, **extra},
    }


def reference_rows(rows: pd.DataFrame, phases: list[str] | None) -> pd.DataFrame:
    """The annotated volumes that become cases: all of them, or one per study with ``phases``.

    Per study the reference is the annotated volume whose phase comes first in ``phases``
    (volumes of other phases after them, then by path), so each study gives one case.
    """
    annotated = rows[rows["annotated"].astype(bool)]
    if not phases:
        return annotated
    rank = {ph: i for i, ph in enumerate(phases)}
    ordered = annotated.assign(
        _rank=[rank.get(p, len(phases)) for p in annotated["phase"]]
    ).sort_values(["_rank", "path"], kind="stable")
    first = ordered.drop_duplicates(["collection", "patient_id", "study"], keep="first")
    return first.drop(columns="_rank").sort_values("path")


def _resampled_case(store: Store, ref_path: str, shape, phases, interpolation, reader):
    """(channel arrays, label, channel volume paths or None) via the patch sampler's geometry."""
    from livercube.sampling.sampler import PatchSampler, PatchSpec

    sampler = PatchSampler(
        store,
        where=f"path == {ref_path!r}",
        patch_size=shape,
        mode="uniform",
        phases=phases,
        missing_phase="pad",
        interpolation=interpolation,
        reader=reader,
        prefetch=1,
    )
    ref, chans = sampler.volumes[0], sampler.channels[0]
    sources = [None if ch is None else ch.path for ch in chans]
    if None in sources:
        return None, None, sources
    whole = PatchSpec(
        index=0,
        position=0,
        volume=0,
        start=(0, 0, 0),
        size=tuple(shape),
        cls=-1,
        anchor=tuple(s // 2 for s in shape),
    )
    sample = sampler.read(whole)
    images = [
        img.astype(np.int16) if ch is ref else img
        for img, ch in zip(sample["image"], chans, strict=True)
    ]
    return images, sample["label"][0], sources


def export_nnunet(
    store: Store,
    dest: Path,
    rows: pd.DataFrame,
    *,
    phases: list[str] | None = None,
    interpolation: str = "linear",
    extra: dict[str, Any] | None = None,
) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """Write the dataset under ``dest``; returns (cases written, (volume, reason) left out)."""
    refs = reference_rows(rows, phases)
    skipped = [(p, "not annotated") for p in rows.loc[~rows["annotated"].astype(bool), "path"]]
    images_dir, labels_dir = dest / "imagesTr", dest / "labelsTr"
    images_dir.mkdir(parents=True, exist_ok=True)
    labels_dir.mkdir(parents=True, exist_ok=True)
    reader = None
    if phases:
        from livercube.sampling.reader import ShardReader

        reader = ShardReader(store.url, dict(store.storage_options))
    cases: list[dict[str, Any]] = []
    seen: set[str] = set()
    for path in refs["path"]:
        meta = store.volume_attrs(path)
        grid = volume_grid(meta)
        case = case_id(path)
        if case in seen:
            raise StoreError(f"two volumes map to the same nnU-Net case {case!r}")
        seen.add(case)
        if phases:
            images, label, sources = _resampled_case(
                store, path, grid.shape, phases, interpolation, reader
            )
            if images is None:
                missing = [ph for ph, s in zip(phases, sources, strict=True) if s is None]
                skipped.append((path, f"study has no {', '.join(missing)} volume"))
                continue
        else:
            ds = store.volume(path)
            images, label, sources = [ds["image"].values], ds["label"].values, [path]
        for c, img in enumerate(images):
            write_nifti(images_dir / f"{case}_{c:04d}{FILE_ENDING}", img, grid)
        write_nifti(labels_dir / f"{case}{FILE_ENDING}", label, grid, np.uint8)
        cases.append(
            {
                "case": case,
                "label_from": path,
                "channels": sources,
                "annotation_complete": meta.get("annotation_complete"),
            }
        )
    channels = phases or ["as stored"]
    doc = dataset_json(len(cases), list(channels), name=dest.name, extra=extra or {})
    if phases:
        doc["livercube"]["interpolation"] = interpolation
    (dest / "dataset.json").write_text(json.dumps(doc, indent=1) + "\n")
    return cases, skipped


__all__ = ["CHANNEL_NAME", "case_id", "dataset_json", "export_nnunet", "reference_rows"]
