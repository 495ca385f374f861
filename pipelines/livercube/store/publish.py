"""Make a store ready to be hosted and opened anonymously: ``livercube publish URL``.

Publishing a store that is already in its bucket (or directory to be served over HTTP):

1. rebuilds the catalog from the volumes' own metadata and consolidates the root metadata
   (:func:`~livercube.store.catalog.write_catalog`), so a reader opens the store, its catalog
   and any volume without listing anything — plain HTTP hosting has no listing at all;
2. exports the catalog as ``<store>/catalog.parquet`` (one row per volume, ``spacing``/
   ``origin``/``extent`` flattened to ``_z``/``_y``/``_x`` columns, units and source column
   names kept as Parquet field metadata) for tools that do not speak Zarr;
3. writes the dataset card ``<store>/README.md``: provenance (collections, counts, converter,
   conversion dates), licences, label schema, phase vocabulary and citations.

Nothing here writes storage options anywhere; URLs are printed without user info.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import numpy as np
import pandas as pd
import xarray as xr

from livercube import registry
from livercube.schema import (
    PHASES,
    STORE_SCHEMA_VERSION,
    label_precedence,
    label_schema,
    unified_labels,
)
from livercube.store.completion import CompletionRecord
from livercube.store.location import StoreLocation
from livercube.store.query import catalog_frame


def collection_info(collection: str) -> dict[str, str]:
    """Public facts about a collection for the dataset card (its registry entry's provenance)."""
    return dict(registry.get(collection).provenance)

REPORT_NAME = "livercube-report.json"
PARQUET_NAME = "catalog.parquet"
CARD_NAME = "README.md"


def redact(url: str) -> str:
    """``url`` without user info (``https://user:pass@host`` → ``https://host``)."""
    parts = urlsplit(str(url))
    if parts.netloc and "@" in parts.netloc:
        return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))
    return str(url)


# --------------------------------------------------------------------------- catalog tables


def _column_metadata(catalog: xr.Dataset, column: str) -> dict[str, Any]:
    name = column
    if column not in catalog and column.rsplit("_", 1)[0] in catalog:
        name = column.rsplit("_", 1)[0]
    attrs = dict(catalog[name].attrs) if name in catalog else {}
    return {k: v for k, v in attrs.items() if isinstance(v, (str, int, float, bool, list))}


def write_parquet(catalog: xr.Dataset, fs, target: str) -> int:
    """Write the catalog as Parquet at ``target`` on ``fs``; returns the number of bytes."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    frame = catalog_frame(catalog)
    table = pa.Table.from_pandas(frame, preserve_index=False)
    fields = []
    for f in table.schema:
        meta = _column_metadata(catalog, f.name)
        fields.append(f.with_metadata({"livercube": json.dumps(meta)}) if meta else f)
    schema = pa.schema(fields, metadata=table.schema.metadata).with_metadata(
        {
            **(table.schema.metadata or {}),
            b"livercube": json.dumps(
                {"schema_version": STORE_SCHEMA_VERSION, "n_volumes": len(frame)}
            ).encode(),
        }
    )
    table = table.cast(schema)
    with fs.open(target, "wb") as f:
        pq.write_table(table, f, compression="zstd")
    return int(fs.info(target).get("size") or 0)


# --------------------------------------------------------------------------- dataset card


def _read_report(fs, root: str) -> dict[str, Any] | None:
    try:
        with fs.open(f"{root}/{REPORT_NAME}", "rb") as f:
            return json.loads(f.read())
    except (FileNotFoundError, ValueError, OSError):
        return None


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    def cell(v: Any) -> str:
        return str(v).replace("|", "\\|").replace("\n", " ")

    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return out + ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]


def _date_range(values: list[str]) -> str:
    days = sorted({v[:10] for v in values if v})
    if not days:
        return "unknown"
    return days[0] if days[0] == days[-1] else f"{days[0]} to {days[-1]}"


def dataset_card(
    catalog: xr.Dataset,
    volume_meta: dict[str, dict[str, Any]],
    report: dict[str, Any] | None,
    *,
    url: str,
    version: str,
) -> str:
    """The Markdown dataset card of a store (pure: everything it says is passed in)."""
    frame = catalog_frame(catalog) if catalog.sizes.get("volume", 0) else pd.DataFrame()
    present = [c for c in registry.ids() if len(frame) and (frame["collection"] == c).any()]
    today = dt.datetime.now(dt.UTC).date().isoformat()
    title_list = ", ".join(collection_info(c)["title"] for c in present) or "no collections"
    lines = [
        "# livercube store: " + title_list,
        "",
        "Liver CT volumes with unified labels as a Zarr v3 store (one OME-Zarr 0.5 image per "
        "volume, chunked and sharded for 3-D patch reads), with a catalog of volumes and "
        "clinical covariates. Store contract version "
        f"{STORE_SCHEMA_VERSION}; card written by livercube {version} on {today}.",
        "",
        "## Open it",
        "",
        "```python",
        "import livercube, xarray as xr",
        "",
        f'store = livercube.open("{redact(url)}")   # add anon=True for a public bucket',
        "store.catalog          # one row per volume",
        "ds = store.volume(0)   # image (HU), label, segments; z/y/x in LPS mm",
        "",
        f'cat = xr.open_zarr("{redact(url)}/catalog", zarr_format=3)  # no livercube needed',
        "```",
        "",
        f"The same catalog as a plain table: `{PARQUET_NAME}` (Parquet, one row per volume). "
        "Root metadata is consolidated, so the store, its catalog and every volume open without "
        "listing (plain HTTPS hosting works; the server must honour byte-range requests).",
        "",
        "## Contents",
        "",
    ]
    rows = []
    for c in present:
        sub = frame[frame["collection"] == c]
        rows.append(
            [
                collection_info(c)["title"],
                sub["patient_id"].nunique(),
                len(sub),
                int(sub["annotated"].sum()),
                ", ".join(f"{k} {v}" for k, v in sorted(Counter(sub["phase"]).items())),
            ]
        )
    lines += _table(["collection", "patients", "volumes", "annotated", "phases"], rows)
    lines += ["", f"{len(frame)} volumes in total.", "", "## Provenance", ""]
    prov = []
    for c in present:
        written = [
            getattr(CompletionRecord.of(m), "written_at", "")
            for m in volume_meta.values()
            if m.get("collection") == c
        ]
        prov.append([collection_info(c)["title"], collection_info(c)["publisher"]])
        prov[-1].append(_date_range(written))
    lines += _table(["collection", "source", "volumes written (UTC)"], prov)
    lines += [
        "",
        f"Converted with livercube (converter version {version}, store contract "
        f"{STORE_SCHEMA_VERSION}). Every volume records its source provenance (allow-listed, "
        "non-identifying header fields) and a completion record with a SHA-256 content "
        "checksum; `livercube verify URL` re-checks them.",
    ]
    if report:
        lines += [
            "",
            f"Last conversion (`{REPORT_NAME}`): collection {report.get('collection', '?')}, "
            f"started {report.get('started_at', '?')}, finished {report.get('finished_at', '?')}"
            f"; {len(report.get('converted', []))} converted, "
            f"{len(report.get('unchanged', []))} unchanged, "
            f"{len(report.get('skipped', []))} inputs skipped, "
            f"{len(report.get('failed', []))} failed.",
        ]
    flags = []
    if len(frame):
        if "intensity_exact" in frame and (~frame["intensity_exact"].astype(bool)).any():
            flags.append(
                f"{int((~frame['intensity_exact'].astype(bool)).sum())} volumes have approximate "
                "HU (`intensity_exact = false`: the source shipped an 8-bit window)."
            )
        if "spacing_trusted" in frame and (~frame["spacing_trusted"].astype(bool)).any():
            flags.append(
                f"{int((~frame['spacing_trusted'].astype(bool)).sum())} volumes have untrusted "
                "voxel spacing (`spacing_trusted = false`: declared by the source, not verified)."
            )
    if flags:
        lines += ["", *[f"* {f}" for f in flags]]

    lines += ["", "## Licences", ""]
    lines += _table(
        ["collection", "licence", "DOI"],
        [
            [
                collection_info(c)["title"],
                f"[{collection_info(c)['licence']}]({collection_info(c)['licence_url']})",
                f"[{collection_info(c)['doi']}](https://doi.org/{collection_info(c)['doi']})",
            ]
            for c in present
        ],
    )
    lines += [
        "",
        "The volumes stay under their collections' licences: keep the attribution to each "
        "collection (see Citation) when you use or redistribute them.",
        "",
        "## Label schema",
        "",
        "`label` (uint8) holds unified labels; where source segments overlap the precedence is "
        + " > ".join(unified_labels()[k] for k in label_precedence())
        + ". Every source segment is also kept losslessly as one bit of `segments`.",
        "",
    ]
    lines += _table(["value", "name"], [[k, v] for k, v in unified_labels().items()])
    rules = label_schema()["collections"]
    lines += ["", "Source segment labels (case-insensitive full match) → unified label:", ""]
    for c in present:
        names = unified_labels()
        mapped = ", ".join(
            f"`{r['pattern']}` → {names.get(r['label']) or 'none'}" for r in rules.get(c, [])
        )
        lines.append(f"* {collection_info(c)['title']}: {mapped}")
    lines += [
        "",
        "## Phase vocabulary",
        "",
        "`phase` is one of " + ", ".join(f"`{p}`" for p in PHASES) + ".",
        "",
        "## Citation",
        "",
        "If you use this store, cite every collection it contains:",
        "",
    ]
    for c in present:
        info = collection_info(c)
        lines.append(
            f"* {info['title']}: <authors>, <title>, {info['publisher']}, <year>. "
            f"https://doi.org/{info['doi']}"
        )
    lines += ["", "and this conversion: livercube <version>, <repository URL>.", ""]
    text = "\n".join(lines)
    return re.sub(r"\n{3,}", "\n\n", text)


# --------------------------------------------------------------------------- publish


@dataclass
class PublishResult:
    url: str
    n_volumes: int
    collections: dict[str, int]
    parquet: str
    parquet_bytes: int
    card: str

    def summary(self) -> str:
        parts = ", ".join(f"{c} {n}" for c, n in self.collections.items()) or "none"
        return (
            f"published {redact(self.url)}: {self.n_volumes} volumes ({parts}); "
            f"root metadata consolidated; {PARQUET_NAME} ({self.parquet_bytes} bytes) and "
            f"{CARD_NAME} written"
        )


def publish(
    where: str | StoreLocation, storage_options: dict[str, Any] | None = None
) -> PublishResult:
    """Consolidate, export ``catalog.parquet`` and write ``README.md`` in the store at ``url``.

    Needs write access (credentials) to the store; the result reads anonymously.
    """
    import livercube
    from livercube.store.catalog import complete_volumes, write_catalog
    from livercube.store.reader import Store

    loc = StoreLocation.of(where, storage_options)
    url = loc.url
    write_catalog(loc)  # catalog from the volumes, root consolidated
    store = Store(loc)
    catalog = store.catalog
    volume_meta = dict(complete_volumes(store.root))  # from the consolidated metadata
    fs, root = loc.filesystem()
    root = root.rstrip("/")
    parquet = f"{root}/{PARQUET_NAME}"
    size = write_parquet(catalog, fs, parquet)
    card = dataset_card(
        catalog,
        volume_meta,
        _read_report(fs, root),
        url=url,
        version=livercube.__version__,
    )
    target = f"{root}/{CARD_NAME}"
    with fs.open(target, "wb") as f:
        f.write(card.encode())
    counts = Counter(str(c) for c in np.asarray(catalog["collection"].values))
    return PublishResult(
        url=str(url),
        n_volumes=int(catalog.sizes.get("volume", 0)),
        collections={c: counts[c] for c in registry.ids() if counts.get(c)},
        parquet=parquet,
        parquet_bytes=size,
        card=target,
    )
