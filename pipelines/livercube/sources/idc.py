"""The Imaging Data Commons as a source: ``idc://hcc_tace_seg``, ``idc://crlm``; nothing downloaded.

The two DICOM collections live in IDC's public bucket as one flat prefix per series
(``s3://idc-open-data/<crdc_series_uuid>/<crdc_instance_uuid>.dcm``).  Which prefixes belong to
a collection is read from the IDC index that ``idc-index-data`` ships as Parquet (its version is
recorded in the report: IDC revises series and their uuids between versions), optionally
narrowed by a pandas expression over the index columns (``PatientID``, ``SeriesInstanceUID``,
``Modality``, ``SeriesDescription``, …).  AI analysis results (IDC's
``analysis_result_id``, e.g. the AIMI liver-tumour SEGs) are not fetched: livercube uses the
expert SEGs only.  The selected prefixes then go through the same header scan as any other
source, read anonymously unless storage options say otherwise.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import pandas as pd

from livercube import registry
from livercube.errors import UsageError

SCHEME = "idc://"

#: Overrides the index file (an index subset in the same schema; tests, pinned mirrors).
INDEX_ENV = "LIVERCUBE_IDC_INDEX"

#: Index columns the selection reads.
COLUMNS = (
    "collection_id",
    "analysis_result_id",
    "PatientID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SeriesNumber",
    "SeriesDescription",
    "Modality",
    "instanceCount",
    "series_size_MB",
    "aws_bucket",
    "crdc_series_uuid",
    "series_aws_url",
)


@dataclass(frozen=True)
class IdcSelection:
    """The series prefixes of one collection, and what was chosen how."""

    collection: str
    prefixes: tuple[str, ...]
    index: str  # "idc-index-data 25.0.5" or the override file
    n_series: int
    n_ai_results_left_out: int
    size_mb: float

    def describe(self) -> str:
        return (
            f"IDC index {self.index}: {self.n_series} series of {self.collection} selected "
            f"({self.size_mb:.0f} MB); {self.n_ai_results_left_out} AI analysis-result series "
            "in the index not fetched"
        )


def is_idc(source: str) -> bool:
    return str(source).startswith(SCHEME)


def idc_collection_id(source: str) -> str:
    """The IDC ``collection_id`` named by an ``idc://`` URL (livercube or IDC spelling).

    The mapping is each registry entry's ``idc_collection``.
    """
    name = str(source)[len(SCHEME) :].strip("/").lower()
    ids = {c.id: c.idc_collection for c in registry.entries().values() if c.idc_collection}
    if name in ids:
        return ids[name]
    if name in ids.values():
        return name
    known = ", ".join(f"idc://{k}" for k in ids)
    raise UsageError(f"{source}: not an IDC collection livercube reads (use {known})")


def _index_file() -> tuple[str, str]:
    override = os.environ.get(INDEX_ENV)
    if override:
        return override, f"file {override}"
    try:
        import idc_index_data
    except ImportError:
        raise UsageError(
            "reading idc:// needs the IDC index: pip install 'livercube[idc]' "
            "(idc-index-data)"
        ) from None
    return str(idc_index_data.IDC_INDEX_PARQUET_FILEPATH), (
        f"idc-index-data {idc_index_data.__version__}"
    )


def select_series(source: str, where: str | None = None) -> IdcSelection:
    """The bucket prefixes of the series an ``idc://`` URL (and ``where``) selects."""
    import pyarrow.parquet as pq

    cid = idc_collection_id(source)
    path, version = _index_file()
    table = pq.read_table(path, columns=list(COLUMNS), filters=[("collection_id", "==", cid)])
    frame: pd.DataFrame = table.to_pandas()
    ai = frame["analysis_result_id"].notna() & (frame["analysis_result_id"].astype(str) != "")
    n_ai = int(ai.sum())
    frame = frame[~ai]
    if where:
        try:
            frame = frame.query(where, engine="python")
        except Exception as exc:
            cols = ", ".join(c for c in COLUMNS if c != "collection_id")
            raise UsageError(
                f"--where {where!r} on the IDC index: {exc} (columns: {cols})"
            ) from None
    if frame.empty:
        raise UsageError(f"{source}: no series selected from the IDC index ({version})")
    prefixes = tuple(
        sorted(str(u).rstrip("*").rstrip("/") for u in frame["series_aws_url"].astype(str))
    )
    return IdcSelection(
        collection=cid,
        prefixes=prefixes,
        index=version,
        n_series=len(frame),
        n_ai_results_left_out=n_ai,
        size_mb=float(frame["series_size_MB"].fillna(0).sum()),
    )
