"""Where the synthetic DICOM files go: the NBIA (TCIA) download tree or the flat IDC bucket.

* TCIA: ``<root>/<Collection>/<PatientID>/<MM-DD-YYYY>-NA-<StudyDescription>-<5 digits>/
  <SeriesNumber>.000000-<SeriesDescription|NA>-<5 digits>/<acq>-<nn>.dcm`` with ``/ , ( ) & :``
  removed from descriptions; files are ordinals (``1-01.dcm``…, ``2-01.dcm``… for a second
  acquisition in the same folder), a SEG is ``1-1.dcm``; plus ``<root>/metadata.csv``.
* IDC: ``<root>/<crdc_series_uuid>/<crdc_instance_uuid>.dcm``, one flat folder per series.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from livercube.synth.dicom_ct import det_digits, det_uuid

METADATA_COLUMNS = (
    "Series UID",
    "Collection",
    "3rd Party Analysis",
    "Data Description URI",
    "Subject ID",
    "Study UID",
    "Study Description",
    "Study Date",
    "Series Description",
    "Manufacturer",
    "Modality",
    "SOP Class Name",
    "SOP Class UID",
    "Number of Images",
    "File Size",
    "File Location",
    "Download Timestamp",
)
DOWNLOAD_TIMESTAMP = "2024-05-02T10:41:17.417"
_DROP = str.maketrans("", "", "/,()&:")


def clean_description(text: str) -> str:
    """A description as NBIA puts it in a folder name (``/ , ( ) & :`` removed, ``NA`` if empty)."""
    out = text.translate(_DROP).strip()
    return out or "NA"


def nbia_date(dicom_date: str) -> str:
    """YYYYMMDD → MM-DD-YYYY."""
    return f"{dicom_date[4:6]}-{dicom_date[6:8]}-{dicom_date[0:4]}"


@dataclass(frozen=True)
class SeriesPlace:
    """Everything the layout needs to name one series' folder."""

    collection_dir: str
    patient_id: str
    study_uid: str
    study_date: str  # YYYYMMDD
    study_description: str
    series_uid: str
    series_number: int
    series_description: str


def series_dir(root: Path, layout: str, p: SeriesPlace) -> Path:
    """The folder holding one series' files."""
    if layout == "idc":
        return root / det_uuid("crdc-series", p.series_uid)
    study = (
        f"{nbia_date(p.study_date)}-NA-{clean_description(p.study_description)}-"
        f"{det_digits(5, 'study', p.study_uid)}"
    )
    series = (
        f"{p.series_number}.000000-{clean_description(p.series_description)}-"
        f"{det_digits(5, 'series', p.series_uid)}"
    )
    return root / p.collection_dir / p.patient_id / study / series


def instance_name(
    layout: str, sop_uid: str, acq_ordinal: int, ordinal: int, *, seg: bool = False
) -> str:
    """File name of one instance inside its series folder."""
    if layout == "idc":
        return det_uuid("crdc-instance", sop_uid) + ".dcm"
    if seg:
        return f"{acq_ordinal}-{ordinal}.dcm"
    return f"{acq_ordinal}-{ordinal:02d}.dcm"


def write_metadata_csv(root: Path, rows: list[dict[str, str]]) -> Path:
    """NBIA's ``metadata.csv`` (one row per series, columns :data:`METADATA_COLUMNS`)."""
    path = root / "metadata.csv"
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(METADATA_COLUMNS), lineterminator="\n")
        w.writeheader()
        for row in rows:
            w.writerow(row)
    return path


def metadata_row(
    root: Path,
    folder: Path,
    *,
    collection: str,
    uri: str,
    third_party: bool,
    p: SeriesPlace,
    manufacturer: str,
    modality: str,
    sop_class_name: str,
    sop_class_uid: str,
    files: list[Path],
) -> dict[str, str]:
    """One ``metadata.csv`` row describing ``folder`` as NBIA would."""
    size = sum(f.stat().st_size for f in files if f.exists())
    return {
        "Series UID": p.series_uid,
        "Collection": collection,
        "3rd Party Analysis": "YES" if third_party else "NO",
        "Data Description URI": uri,
        "Subject ID": p.patient_id,
        "Study UID": p.study_uid,
        "Study Description": p.study_description,
        "Study Date": nbia_date(p.study_date),
        "Series Description": p.series_description,
        "Manufacturer": manufacturer,
        "Modality": modality,
        "SOP Class Name": sop_class_name,
        "SOP Class UID": sop_class_uid,
        "Number of Images": str(len(files)),
        "File Size": f"{size / 1e6:.2f} MB",
        "File Location": "./" + folder.relative_to(root).as_posix(),
        "Download Timestamp": DOWNLOAD_TIMESTAMP,
    }
