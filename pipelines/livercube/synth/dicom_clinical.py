"""Clinical spreadsheets of the synthetic collections (openpyxl).

* HCC: ``HCC-TACE-Seg_clinical_data-V2.xlsx``, sheet ``data table``, id ``TCIA_ID``; ``Sex`` coded
  1/2, ``BCLC`` as text ('0', 'Stage-A'…), column names with spaces ("Vascular invasion").
* CRLM: ``Colorectal-Liver-Metastases-Clinical-data-April-2023.xlsx``, sheet ``TCIA_n=197`` plus a
  ``Data Dictionary`` sheet, id ``Patient-ID``; −999 codes missing values; a percent column holds
  a "30%" string.
* Both include one row for a patient without images (the id after the last imaged patient).
Values are drawn from a seeded generator and the zip timestamps are fixed, so the same seed
gives byte-identical workbooks.
"""

from __future__ import annotations

import datetime
import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
from openpyxl import Workbook

HCC_FILE = "HCC-TACE-Seg_clinical_data-V2.xlsx"
HCC_SHEET = "data table"
HCC_ID = "TCIA_ID"
HCC_COLUMNS = (
    "TCIA_ID",
    "Sex",
    "age",
    "AFP",
    "TTP",
    "OS",
    "Death_1_StillAliveorLostToFU_0",
    "Censored_0_progressed_1",
    "BCLC",
    "CLIP_Score",
    "Okuda",
    "TNM",
    "CPS",
    "T_involvment",
    "Tr_Size",
    "Vascular invasion",
    "Portal Vein Thrombosis",
    "1_mRECIST",
    "1_EASL",
    "1_RECIST",
)
CRLM_FILE = "Colorectal-Liver-Metastases-Clinical-data-April-2023.xlsx"
CRLM_SHEET = "TCIA_n=197"
CRLM_DICT_SHEET = "Data Dictionary"
CRLM_ID = "Patient-ID"
CRLM_COLUMNS = (
    "Patient-ID",
    "age",
    "sex",
    "body_mass_index",
    "node_positive_primary",
    "synchronous_crlm",
    "multiple_metastases",
    "bilobar_disease",
    "max_tumor_size",
    "carcinoembryonic_antigen",
    "clinrisk_score",
    "steatosis_yesno",
    "necrosis_percent",
    "fibrosis_percent",
    "mucin_percent",
    "overall_survival_months",
    "vital_status",
    "months_to_DFS_progression",
    "progression_or_recurrence",
    "months_to_liver_DFS_progression",
    "progression_or_recurrence_liveronly",
    "relevant_notes",
)
MISSING = -999
_FIXED_TIME = datetime.datetime(2023, 4, 1, 9, 0, 0)
_CORE_TIME = re.compile(rb">\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ<")


def hcc_rows(
    ids: list[str],
    seed: int,
    sexes: dict[str, int] | None = None,
    ages: dict[str, int] | None = None,
) -> list[dict[str, Any]]:
    """One clinical row per id (values plausible, not real)."""
    rng = np.random.default_rng([seed, 7001])
    rows = []
    for pid in ids:
        rows.append(
            {
                "TCIA_ID": pid,
                "Sex": (sexes or {}).get(pid, int(rng.choice([1, 1, 1, 2]))),
                "age": (ages or {}).get(pid, int(rng.integers(45, 85))),
                "AFP": int(rng.integers(2, 5000)),
                "TTP": round(float(rng.uniform(2, 60)), 1),
                "OS": round(float(rng.uniform(5, 200)), 1),
                "Death_1_StillAliveorLostToFU_0": int(rng.integers(0, 2)),
                "Censored_0_progressed_1": int(rng.integers(0, 2)),
                "BCLC": str(rng.choice(["0", "Stage-A", "Stage-B", "Stage-C", "Stage-D"])),
                "CLIP_Score": int(rng.integers(0, 5)),
                "Okuda": int(rng.integers(1, 3)),
                "TNM": int(rng.integers(1, 5)),
                "CPS": str(rng.choice(["A", "B", "C"])),
                "T_involvment": int(rng.integers(1, 3)),
                "Tr_Size": round(float(rng.uniform(0.1, 0.8)), 2),
                "Vascular invasion": int(rng.integers(0, 2)),
                "Portal Vein Thrombosis": int(rng.integers(0, 2)),
                "1_mRECIST": int(rng.integers(1, 5)),
                "1_EASL": int(rng.integers(1, 5)),
                "1_RECIST": int(rng.integers(1, 5)),
            }
        )
    return rows


def crlm_rows(
    ids: list[str],
    seed: int,
    sexes: dict[str, int] | None = None,
    ages: dict[str, int] | None = None,
) -> list[dict[str, Any]]:
    """One clinical row per id; row 0 has a "30%" mucin string, row 1 has −999 values."""
    rng = np.random.default_rng([seed, 7002])
    rows = []
    for i, pid in enumerate(ids):
        row: dict[str, Any] = {
            "Patient-ID": pid,
            "age": (ages or {}).get(pid, int(rng.integers(35, 85))),
            "sex": (sexes or {}).get(pid, int(rng.integers(1, 3))),
            "body_mass_index": round(float(rng.uniform(19, 38)), 1),
            "node_positive_primary": int(rng.integers(0, 2)),
            "synchronous_crlm": int(rng.integers(0, 2)),
            "multiple_metastases": int(rng.integers(0, 2)),
            "bilobar_disease": int(rng.integers(0, 2)),
            "max_tumor_size": round(float(rng.uniform(0.5, 12)), 1),
            "carcinoembryonic_antigen": round(float(rng.uniform(0.5, 900)), 1),
            "clinrisk_score": int(rng.integers(0, 6)),
            "steatosis_yesno": int(rng.integers(0, 2)),
            "necrosis_percent": int(rng.integers(0, 100)),
            "fibrosis_percent": int(rng.integers(0, 100)),
            "mucin_percent": int(rng.integers(0, 30)),
            "overall_survival_months": round(float(rng.uniform(3, 150)), 1),
            "vital_status": int(rng.integers(0, 2)),
            "months_to_DFS_progression": round(float(rng.uniform(1, 100)), 1),
            "progression_or_recurrence": int(rng.integers(0, 2)),
            "months_to_liver_DFS_progression": round(float(rng.uniform(1, 100)), 1),
            "progression_or_recurrence_liveronly": int(rng.integers(0, 2)),
            "relevant_notes": "",
        }
        if i == 0:
            row["mucin_percent"] = "30%"
        if i == 1 or len(ids) == 1:
            row["necrosis_percent"] = MISSING
            row["carcinoembryonic_antigen"] = MISSING
            row["relevant_notes"] = "path review pending"
        rows.append(row)
    return rows


def _fill(ws, columns: tuple[str, ...], rows: list[dict[str, Any]]) -> None:
    ws.append(list(columns))
    for row in rows:
        ws.append([row[c] for c in columns])


def _save(wb: Workbook, path: Path) -> None:
    """Save ``wb`` with fixed zip-member timestamps so the same rows give the same bytes."""
    wb.properties.created = wb.properties.modified = _FIXED_TIME
    tmp = path.with_name(path.name + ".tmp")
    wb.save(tmp)
    with zipfile.ZipFile(tmp) as src, zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            data = src.read(info.filename)
            if info.filename == "docProps/core.xml":
                data = _CORE_TIME.sub(b">2023-04-01T09:00:00Z<", data)
            fixed = zipfile.ZipInfo(info.filename, date_time=_FIXED_TIME.timetuple()[:6])
            fixed.compress_type = zipfile.ZIP_DEFLATED
            dst.writestr(fixed, data)
    tmp.unlink()


def write_hcc_clinical(root: Path, rows: list[dict[str, Any]]) -> Path:
    wb = Workbook()
    ws = wb.active
    ws.title = HCC_SHEET
    _fill(ws, HCC_COLUMNS, rows)
    path = root / HCC_FILE
    _save(wb, path)
    return path


def write_crlm_clinical(root: Path, rows: list[dict[str, Any]]) -> Path:
    wb = Workbook()
    ws = wb.active
    ws.title = CRLM_SHEET
    _fill(ws, CRLM_COLUMNS, rows)
    dd = wb.create_sheet(CRLM_DICT_SHEET)
    dd.append(["Variable", "Description", "Coding"])
    for col in CRLM_COLUMNS:
        dd.append([col, col.replace("_", " "), "-999 = missing"])
    path = root / CRLM_FILE
    _save(wb, path)
    return path
