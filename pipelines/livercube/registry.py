"""The collections livercube reads: one entry each, the way xarray registers a backend.

Everything that differs between collections and is not the reading itself lives in its
:class:`Collection` entry: the names users may type, how to plan a conversion, how to write
the example copy, where the clinical spreadsheet is, the catalog prefix of its covariates,
what the dataset card says about it.  Code that needs any of this asks :func:`get` instead of
branching on the collection's name, so a fourth collection is one new source module, one
example writer and one entry here.

Planners and example writers are named as ``"module:function"`` and imported on first use:
the registry itself is cheap to import (the CLI's argument parser reads it).

Collections from other packages plug in through the ``livercube.collections`` entry-point
group (each entry point names a :class:`Collection`), the way xarray finds its backends: a
fourth collection needs no change to livercube at all.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from livercube.errors import UsageError

if TYPE_CHECKING:
    from livercube.sources.plan import Plan

#: Entry-point group through which other packages register collections.
ENTRY_POINT_GROUP = "livercube.collections"


@dataclass(frozen=True)
class Collection:
    """One collection: identity, planning, example data, covariates, provenance.

    ``planner`` is called as ``planner(source, collection=id, clinical=, overrides=,
    storage_options=, where=, keep_descriptions=, clinical_columns=)`` and returns a
    :class:`~livercube.sources.plan.Plan` of :class:`~livercube.sources.plan.VolumeTask` s;
    ``example_writer`` as ``writer(root, n=, size=, seed=)`` and returns the generator's truth
    object.  ``idc_collection`` is the collection's ``collection_id`` in the Imaging Data
    Commons index, for ``idc://`` sources.
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
    idc_collection: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    def plan(self, source: str, **kwargs: Any) -> Plan:
        return _load(self.planner)(source, collection=self.id, **kwargs)

    def write_example(self, root: Path, *, n: int, size: str, seed: int) -> Any:
        return _load(self.example_writer)(Path(root), n=n, size=size, seed=seed)


def _load(ref: str) -> Callable[..., Any]:
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


_CC_BY = {"licence": "CC BY 4.0", "licence_url": "https://creativecommons.org/licenses/by/4.0/"}

#: The collections livercube ships, in the order commands list them.
BUILTIN: tuple[Collection, ...] = (
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
        idc_collection="hcc_tace_seg",
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
        idc_collection="colorectal_liver_metastases",
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


def _plugins(known: Mapping[str, Collection]) -> list[Collection]:
    """Collections other installed packages register (``livercube.collections`` entry points).

    A plug-in that fails to load, is not a :class:`Collection` or reuses a known name is left
    out with a warning naming it: one broken package must not take livercube down.
    """
    from importlib.metadata import entry_points

    found: list[Collection] = []
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            entry = ep.load()
        except Exception as exc:
            warnings.warn(f"collection plug-in {ep.value!r} failed to load: {exc}", stacklevel=2)
            continue
        names = {n for c in [*known.values(), *found] for n in (c.id, *c.aliases)}
        if not isinstance(entry, Collection):
            warnings.warn(f"collection plug-in {ep.value!r} is not a Collection", stacklevel=2)
        elif {entry.id, *entry.aliases} & names:
            warnings.warn(
                f"collection plug-in {ep.value!r} reuses a known name "
                f"({', '.join(sorted({entry.id, *entry.aliases} & names))}); left out",
                stacklevel=2,
            )
        else:
            found.append(entry)
    return found


@cache
def entries() -> Mapping[str, Collection]:
    """Every collection by id: the built-in ones, then plug-ins (loaded once, on first use).

    Plug-ins are looked up on first use, not at import: a plug-in imports livercube itself,
    and must find it whole.
    """
    found = {c.id: c for c in BUILTIN}
    found.update((c.id, c) for c in _plugins(found))
    return MappingProxyType(found)


def ids() -> tuple[str, ...]:
    """Collection ids in the order commands list them (built-in first, then plug-ins)."""
    return tuple(entries())


def canonical(name: str) -> str | None:
    """The collection id ``name`` spells (id or alias, any case), or ``None``."""
    key = str(name).strip().lower()
    for c in entries().values():
        if key == c.id or key in c.aliases:
            return c.id
    return None


def get(name: str) -> Collection:
    """The entry for ``name`` (id or alias); a :class:`UsageError` listing the known ones."""
    cid = canonical(name)
    if cid is None:
        raise UsageError(f"unknown collection {name!r}; known: {', '.join(ids())}")
    return entries()[cid]
