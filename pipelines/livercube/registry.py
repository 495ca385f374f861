"""The collections livercube reads: one entry each, the way xarray registers a backend.

Everything that differs between collections and is not the reading itself lives in its
:class:`Collection` entry: the names users may type, how to plan a conversion, how to write
the example copy, where the clinical spreadsheet is, the catalog prefix of its covariates,
what the dataset card says about it.  Code that needs any of this asks :func:`get` instead of
branching on the collection's name, so a fourth collection is one new source module, one
example writer and one entry here.

Planners and example writers are named as ``"module:function"`` and imported on first use:
the registry itself is cheap to import (the CLI's argument parser reads it).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from livercube.errors import UsageError


@dataclass(frozen=True)
class Collection:
    """One collection: identity, planning, example data, covariates, provenance.

    ``planner`` is called as ``planner(source, collection=id, clinical=, overrides=,
    storage_options=, where=, keep_descriptions=, clinical_columns=, mapper=)`` (``mapper``:
    where per-file planning work may run, :mod:`livercube.fanout`) and returns a plan
    (``tasks``, ``skipped``, ``warnings``, ``clinical_columns``); ``example_writer`` as
    ``writer(root, n=, size=, seed=)`` and returns the generator's truth object.
    """

    id: str
    title: str
    aliases: tuple[str, ...]
    planner: str
    example_writer: str
    example_folder: str
    catalog_prefix: str
    provenance: Mapping[str, str]
    clinical_files: tuple[str, ...] = ()
    #: Every CT is one portal-venous acquisition (no phase to infer from the study).
    single_portal_venous: bool = False
    extra: Mapping[str, Any] = field(default_factory=dict)

    def plan(self, source: str, **kwargs: Any) -> Any:
        return _load(self.planner)(source, collection=self.id, **kwargs)

    def write_example(self, root: Path, *, n: int, size: str, seed: int) -> Any:
        return _load(self.example_writer)(Path(root), n=n, size=size, seed=seed)


def _load(ref: str) -> Callable[..., Any]:
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


_CC_BY = {"licence": "CC BY 4.0", "licence_url": "https://creativecommons.org/licenses/by/4.0/"}

REGISTRY: dict[str, Collection] = {
    c.id: c
    for c in (
        Collection(
            id="hcc-tace-seg",
            title="HCC-TACE-Seg",
            aliases=("hcc_tace_seg", "hcc-tace-seg", "hcc"),
            planner="livercube.sources.dicom_collection:plan",
            example_writer="livercube.synth.dicom_collections:write_hcc_example",
            example_folder="HCC-TACE-Seg",
            catalog_prefix="hcc_",
            provenance={
                "title": "HCC-TACE-Seg",
                "publisher": "The Cancer Imaging Archive (TCIA)",
                **_CC_BY,
                "doi": "10.7937/TCIA.5FNA-0924",
            },
            clinical_files=("HCC-TACE-Seg_clinical_data-V2.xlsx",),
        ),
        Collection(
            id="crlm",
            title="Colorectal-Liver-Metastases (CRLM)",
            aliases=("crlm", "colorectal-liver-metastases", "colorectal_liver_metastases"),
            planner="livercube.sources.dicom_collection:plan",
            example_writer="livercube.synth.dicom_collections:write_crlm_example",
            example_folder="CRLM",
            catalog_prefix="crlm_",
            provenance={
                "title": "Colorectal-Liver-Metastases (CRLM)",
                "publisher": "The Cancer Imaging Archive (TCIA)",
                **_CC_BY,
                "doi": "10.7937/QXK2-QG03",
            },
            clinical_files=("Colorectal-Liver-Metastases-Clinical-data-April-2023.xlsx",),
            single_portal_venous=True,
        ),
        Collection(
            id="plc-cect",
            title="PLC-CECT",
            aliases=("plc-cect", "plc_cect", "plc"),
            planner="livercube.sources.plc_cect:plan",
            example_writer="livercube.synth.plc_cect:write_plc_example",
            example_folder="PLC-CECT",
            catalog_prefix="plc_",
            provenance={
                "title": "PLC-CECT",
                "publisher": "Science Data Bank",
                **_CC_BY,
                "doi": "10.57760/sciencedb.12207",
            },
            clinical_files=("patient_data.csv",),
        ),
    )
}

#: Collection ids in the order commands list them.
COLLECTIONS: tuple[str, ...] = tuple(REGISTRY)


def canonical(name: str) -> str | None:
    """The collection id ``name`` spells (id or alias, any case), or ``None``."""
    key = str(name).strip().lower()
    for c in REGISTRY.values():
        if key == c.id or key in c.aliases:
            return c.id
    return None


def get(name: str) -> Collection:
    """The entry for ``name`` (id or alias); a :class:`UsageError` listing the known ones."""
    cid = canonical(name)
    if cid is None:
        raise UsageError(f"unknown collection {name!r}; known: {', '.join(COLLECTIONS)}")
    return REGISTRY[cid]
