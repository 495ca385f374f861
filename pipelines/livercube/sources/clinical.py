"""Clinical spreadsheets of HCC-TACE-Seg and Colorectal-Liver-Metastases (CRLM), typed.

* HCC-TACE-Seg: ``HCC-TACE-Seg_clinical_data-V2.xlsx``, sheet ``data table``, id ``TCIA_ID``.
* CRLM: ``Colorectal-Liver-Metastases-Clinical-data-April-2023.xlsx``, sheet ``TCIA_n=197``,
  id ``Patient-ID``; a second sheet is a data dictionary whose descriptions (and codings) are
  used when it has a header row with a variable-name column and a description column.
* A CSV export of the data sheet is read the same way (no data dictionary then).

Cleaning rules: −999 (number or text) and empty cells are missing (``None``); "30%" is 30.0
and its column gets units "%"; known columns have a fixed type and documented units/coding
(:data:`COLUMN_SPECS`); other columns are ``float`` when every present value is a number and
``str`` otherwise.  Binary 0/1 columns stay ``float`` with their coding recorded (never guessed
as ``bool``).  Column names are kept verbatim (spaces included).  Everything odd — a cell that
does not fit its column's type, a duplicate or empty id, an unknown sex code, a fallback sheet —
is listed in :attr:`ClinicalTable.notes`.

What reaches the store (:func:`select_columns`): the collection's documented columns
(:data:`COLUMN_SPECS`), plus columns the user names (``convert --clinical-column NAME``);
a column whose *name* looks identifying (:func:`looks_identifying`: name, birth, DOB,
address, phone, MRN, e-mail, SSN …) is never stored, documented or named, and says so.

A spreadsheet that cannot be read (zero bytes, truncated, empty, no id column) raises
:class:`~livercube.errors.UnreadableFileError` naming the file; the converter then skips the
covariates, not the images.
"""

from __future__ import annotations

import csv
import datetime
import io
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

import fsspec

from livercube import registry
from livercube.errors import UnreadableFileError, UsageError

MISSING_CODES = (-999,)

_TIME_UNVERIFIED = "unverified; possibly weeks"

#: Per collection: file, sheet, id column, sex column and its coding, age column.
COLLECTIONS: dict[str, dict[str, Any]] = {
    "hcc-tace-seg": {
        "file": registry.get("hcc-tace-seg").clinical_files[0],
        "sheet": "data table",
        "id": "TCIA_ID",
        "sex_column": "Sex",
        "sex_codes": {1: "male", 2: "female"},
        "age_column": "age",
    },
    "crlm": {
        "file": registry.get("crlm").clinical_files[0],
        "sheet": "TCIA_n=197",
        "id": "Patient-ID",
        "sex_column": "sex",
        "sex_codes": {1: "male", 2: "female"},
        "age_column": "age",
    },
}

_BINARY = "0/1"

#: Known columns: dtype, units, coding, description (None = not documented).
COLUMN_SPECS: dict[str, dict[str, dict[str, Any]]] = {
    "hcc-tace-seg": {
        "TCIA_ID": {"dtype": "str", "description": "patient id (TCIA)"},
        "Sex": {
            "dtype": "float",
            "coding": "1 = male, 2 = female (as written by the synthetic generator and "
            "consistent with the DICOM PatientSex of the one patient carrying it; the "
            "collection only documents 'coded 1/2')",
        },
        "age": {"dtype": "float", "units": "years"},
        "AFP": {"dtype": "float", "description": "alpha-fetoprotein (units not documented)"},
        "TTP": {
            "dtype": "float",
            "units": _TIME_UNVERIFIED,
            "description": "time to progression; units not documented (unverified, possibly weeks)",
        },
        "OS": {
            "dtype": "float",
            "units": _TIME_UNVERIFIED,
            "description": "overall survival; units not documented (unverified, possibly weeks)",
        },
        "Death_1_StillAliveorLostToFU_0": {
            "dtype": "float",
            "coding": "1 = death, 0 = still alive or lost to follow-up (from the column name)",
        },
        "Censored_0_progressed_1": {
            "dtype": "float",
            "coding": "0 = censored, 1 = progressed (from the column name)",
        },
        "BCLC": {"dtype": "str", "coding": "'0', 'Stage-A', 'Stage-B', 'Stage-C', 'Stage-D'"},
        "CLIP_Score": {"dtype": "float"},
        "Okuda": {"dtype": "float"},
        "TNM": {"dtype": "float"},
        "CPS": {"dtype": "str", "description": "Child-Pugh score"},
        "T_involvment": {"dtype": "float"},
        "Tr_Size": {"dtype": "float"},
        "Vascular invasion": {"dtype": "float", "coding": f"{_BINARY} (meaning not documented)"},
        "Portal Vein Thrombosis": {
            "dtype": "float",
            "coding": f"{_BINARY} (meaning not documented)",
        },
        "1_mRECIST": {"dtype": "float"},
        "1_EASL": {"dtype": "float"},
        "1_RECIST": {"dtype": "float"},
    },
    "crlm": {
        "Patient-ID": {"dtype": "str", "description": "patient id (TCIA)"},
        "age": {"dtype": "float", "units": "years"},
        "sex": {"dtype": "float", "coding": "1 = male, 2 = female"},
        "body_mass_index": {"dtype": "float", "units": "kg/m2"},
        "node_positive_primary": {"dtype": "float", "coding": _BINARY},
        "synchronous_crlm": {"dtype": "float", "coding": _BINARY},
        "multiple_metastases": {"dtype": "float", "coding": _BINARY},
        "bilobar_disease": {"dtype": "float", "coding": _BINARY},
        "max_tumor_size": {"dtype": "float"},
        "carcinoembryonic_antigen": {"dtype": "float"},
        "clinrisk_score": {"dtype": "float"},
        "steatosis_yesno": {"dtype": "float", "coding": _BINARY},
        "necrosis_percent": {"dtype": "float", "units": "%"},
        "fibrosis_percent": {"dtype": "float", "units": "%"},
        "mucin_percent": {"dtype": "float", "units": "%"},
        "overall_survival_months": {"dtype": "float", "units": "months"},
        "vital_status": {"dtype": "float", "coding": _BINARY},
        "months_to_DFS_progression": {"dtype": "float", "units": "months"},
        "progression_or_recurrence": {"dtype": "float", "coding": _BINARY},
        "months_to_liver_DFS_progression": {"dtype": "float", "units": "months"},
        "progression_or_recurrence_liveronly": {"dtype": "float", "coding": _BINARY},
        "relevant_notes": {"dtype": "str"},
    },
}

_NUMBER = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")
_PERCENT = re.compile(r"^([+-]?(\d+(\.\d*)?|\.\d+))\s*%$")
_HEADER_SEARCH_ROWS = 20


@dataclass
class ClinicalTable:
    """One collection's clinical spreadsheet, typed; see the module docstring for the rules."""

    collection: str
    source: str
    columns: dict[str, dict[str, Any]]
    rows: dict[str, dict[str, Any]]
    age: dict[str, float | None]
    sex: dict[str, str | None]
    notes: list[str] = field(default_factory=list)


def _collection_id(collection: str) -> str:
    c = registry.canonical(collection)
    if c not in COLLECTIONS:
        raise UsageError(
            f"no clinical spreadsheet rules for collection {collection!r}; "
            f"known: {', '.join(sorted(COLLECTIONS))}"
        )
    return c


# --------------------------------------------------------------------------- raw grids


def _read_bytes(path_or_url: str, storage_options: dict | None) -> bytes:
    try:
        with fsspec.open(path_or_url, "rb", **(storage_options or {})) as f:
            data = f.read()
    except FileNotFoundError as exc:
        raise UnreadableFileError(path_or_url, "clinical spreadsheet not found") from exc
    except (IsADirectoryError, PermissionError) as exc:
        raise UnreadableFileError(
            path_or_url, f"clinical spreadsheet cannot be opened ({exc.strerror or exc})"
        ) from exc
    if not data.strip():
        raise UnreadableFileError(path_or_url, f"clinical spreadsheet is empty ({len(data)} bytes)")
    return data


def _xlsx_sheets(data: bytes, source: str) -> dict[str, list[list[Any]]]:
    from openpyxl import load_workbook

    try:
        wb = load_workbook(io.BytesIO(data), read_only=True, data_only=True)
    except Exception as exc:
        raise UnreadableFileError(
            source, f"not a readable .xlsx workbook ({type(exc).__name__}: {exc})"
        ) from exc
    try:  # read-only workbooks decompress sheets lazily: truncation shows up here
        return {ws.title: [list(r) for r in ws.iter_rows(values_only=True)] for ws in wb}
    except Exception as exc:
        raise UnreadableFileError(
            source, f"truncated or corrupt .xlsx workbook ({type(exc).__name__}: {exc})"
        ) from exc
    finally:
        wb.close()


def _csv_grid(data: bytes) -> list[list[Any]]:
    text = data.decode("utf-8-sig", errors="replace")
    try:
        dialect = csv.Sniffer().sniff(text[:4096], delimiters=",;\t")
    except csv.Error:
        dialect = csv.excel
    return [list(r) for r in csv.reader(io.StringIO(text), dialect)]


def _header_row(grid: list[list[Any]], id_column: str) -> int | None:
    for i, row in enumerate(grid[:_HEADER_SEARCH_ROWS]):
        if any(isinstance(c, str) and c.strip() == id_column for c in row):
            return i
    return None


def _first_row(grid: list[list[Any]]) -> list[str]:
    for row in grid[:_HEADER_SEARCH_ROWS]:
        cells = [str(c) for c in row if c not in (None, "")]
        if cells:
            return cells
    return []


# --------------------------------------------------------------------------- cells


def _cell(value: Any) -> tuple[str, Any]:
    """Classify a raw cell: ("missing", None) | ("number", float) | ("percent", float) |
    ("text", str)."""
    if value is None:
        return "missing", None
    if isinstance(value, bool):
        return "number", float(value)
    if isinstance(value, (int, float)):
        f = float(value)
        if math.isnan(f) or f in MISSING_CODES:
            return "missing", None
        return "number", f
    if isinstance(value, (datetime.date, datetime.time)):
        return "text", value.isoformat()
    s = str(value).strip()
    if not s:
        return "missing", None
    if _NUMBER.match(s):
        f = float(s)
        return ("missing", None) if f in MISSING_CODES else ("number", f)
    m = _PERCENT.match(s)
    if m:
        return "percent", float(m[1])
    return "text", s


def _as_text(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, str):
        return value.strip()
    return str(value)


def _unique_names(header: list[Any], notes: list[str], source: str) -> list[str | None]:
    names: list[str | None] = []
    seen: dict[str, int] = {}
    for j, h in enumerate(header):
        if h is None or (isinstance(h, str) and not h.strip()):
            names.append(None)
            continue
        name = h if isinstance(h, str) else _as_text(h)
        if name in seen:
            seen[name] += 1
            new = f"{name}.{seen[name]}"
            notes.append(f"{source}: column {j + 1} repeats the name {name!r}; kept as {new!r}")
            name = new
        else:
            seen[name] = 0
        names.append(name)
    return names


# --------------------------------------------------------------------------- dictionary


def _dictionary(
    sheets: dict[str, list[list[Any]]], data_sheet: str, column_names: set[str]
) -> tuple[dict[str, dict[str, str]], str | None]:
    """{column: {"description"?, "coding"?}} from a data-dictionary sheet, and a note."""
    for title, grid in sheets.items():
        if title == data_sheet:
            continue
        for i, row in enumerate(grid[:_HEADER_SEARCH_ROWS]):
            labels = [str(c).strip().lower() if c is not None else "" for c in row]
            desc_j = next(
                (j for j, v in enumerate(labels) if v in ("description", "definition")), None
            )
            if desc_j is None:
                continue
            code_j = next((j for j, v in enumerate(labels) if v.startswith("cod")), None)
            # the variable column: the one whose values name the most data columns
            body = grid[i + 1 :]
            best_j, best_hits = None, 0
            for j in range(len(row)):
                hits = sum(
                    1
                    for r in body
                    if j < len(r) and isinstance(r[j], str) and r[j].strip() in column_names
                )
                if hits > best_hits:
                    best_j, best_hits = j, hits
            if best_j is None:
                continue
            out: dict[str, dict[str, str]] = {}
            for r in body:
                if best_j >= len(r) or not isinstance(r[best_j], str):
                    continue
                name = r[best_j].strip()
                if name not in column_names:
                    continue
                entry: dict[str, str] = {}
                if desc_j < len(r) and r[desc_j] not in (None, ""):
                    entry["description"] = str(r[desc_j]).strip()
                if code_j is not None and code_j < len(r) and r[code_j] not in (None, ""):
                    entry["coding"] = str(r[code_j]).strip()
                out[name] = entry
            return out, None
    others = [t for t in sheets if t != data_sheet]
    if others:
        return {}, (
            f"data dictionary sheet(s) {others} have no header row with a 'Description' "
            "column next to the variable names: descriptions not taken from them"
        )
    return {}, None


# --------------------------------------------------------------------------- main


def read_clinical(
    path_or_url: str, collection: str, storage_options: dict | None = None
) -> ClinicalTable:
    """Read and type a collection's clinical spreadsheet (.xlsx, or a CSV export of its sheet)."""
    cid = _collection_id(collection)
    spec = COLLECTIONS[cid]
    id_col: str = spec["id"]
    source = str(path_or_url)
    data = _read_bytes(path_or_url, storage_options)
    notes: list[str] = []
    sheets: dict[str, list[list[Any]]]
    is_csv = PurePosixPath(source.split("?")[0]).suffix.lower() in (".csv", ".tsv", ".txt")
    if data[:2] == b"PK" and not is_csv:
        sheets = _xlsx_sheets(data, source)
        sheet = spec["sheet"]
        if sheet not in sheets:
            alike = [t for t in sheets if t.strip().lower() == sheet.lower()]
            fallback = alike or [t for t in sheets if _header_row(sheets[t], id_col) is not None]
            if not fallback:
                found = "; ".join(f"{t!r} (header {_first_row(g)})" for t, g in sheets.items())
                raise UnreadableFileError(
                    source,
                    f"no sheet {sheet!r} and no sheet with an {id_col!r} column; "
                    f"sheets found: {found or 'none'}",
                )
            notes.append(
                f"{source}: no sheet {sheet!r}; read sheet {fallback[0]!r} "
                f"(its header has {id_col!r}); sheets: {list(sheets)}"
            )
            sheet = fallback[0]
    else:
        if data[:2] == b"PK":
            raise UnreadableFileError(source, "named like a CSV file but is a zip/xlsx workbook")
        suffix = PurePosixPath(source.split("?")[0]).suffix.lower()
        if suffix in (".xlsx", ".xlsm"):
            raise UnreadableFileError(
                source, f"not an .xlsx workbook (it starts with {data[:8]!r}, not a zip header)"
            )
        sheet = "csv"
        sheets = {sheet: _csv_grid(data)}
    grid = sheets[sheet]
    h = _header_row(grid, id_col)
    if h is None:
        raise UnreadableFileError(
            source,
            f"sheet {sheet!r} has no {id_col!r} column in its first {_HEADER_SEARCH_ROWS} rows; "
            f"header found: {_first_row(grid)}",
        )
    if h > 0:
        notes.append(f"{source}: header is on row {h + 1} of sheet {sheet!r}; rows above ignored")
    names = _unique_names(grid[h], notes, source)
    id_j = next(j for j, n in enumerate(names) if n is not None and n.strip() == id_col)

    # raw cells per column, rows keyed by id
    raw_rows: list[tuple[int, str, list[Any]]] = []
    seen: set[str] = set()
    for i, row in enumerate(grid[h + 1 :], start=h + 2):
        if all(c is None or (isinstance(c, str) and not c.strip()) for c in row):
            continue
        pid_raw = row[id_j] if id_j < len(row) else None
        kind, value = _cell(pid_raw)
        if kind == "missing":
            notes.append(f"{source}: row {i} has no {id_col}; ignored")
            continue
        pid = _as_text(value if kind == "number" else pid_raw)
        if pid in seen:
            notes.append(f"{source}: row {i}: duplicate {id_col} {pid!r}; first row kept")
            continue
        seen.add(pid)
        raw_rows.append((i, pid, list(row) + [None] * (len(names) - len(row))))
        if len(row) > len(names) and any(c not in (None, "") for c in row[len(names) :]):
            notes.append(f"{source}: row {i} ({pid}) has values beyond the header; ignored")

    known = COLUMN_SPECS[cid]
    present = {n for n in names if n is not None}
    dictionary, dict_note = _dictionary(sheets, sheet, present) if len(sheets) > 1 else ({}, None)
    if dict_note:
        notes.append(f"{source}: {dict_note}")
    columns: dict[str, dict[str, Any]] = {}
    rows: dict[str, dict[str, Any]] = {pid: {} for _, pid, _ in raw_rows}
    for j, name in enumerate(names):
        if name is None:
            if any(j < len(r) and r[j] not in (None, "") for _, _, r in raw_rows):
                notes.append(f"{source}: column {j + 1} has values but no header; ignored")
            continue
        cells = [(i, pid, _cell(r[j])) for i, pid, r in raw_rows]
        kinds = {k for _, _, (k, _) in cells if k != "missing"}
        spec_col = known.get(name, {})
        if j == id_j:
            dtype = "str"
        elif "dtype" in spec_col:
            dtype = spec_col["dtype"]
        else:
            dtype = "float" if kinds <= {"number", "percent"} and kinds else "str"
        units = spec_col.get("units")
        if dtype == "float" and "percent" in kinds:
            if units not in (None, "%"):
                notes.append(f"{source}: column {name!r} mixes % values with units {units!r}")
            units = "%"
        info = dictionary.get(name, {})
        columns[name] = {
            "dtype": dtype,
            "units": units,
            "coding": spec_col.get("coding") or info.get("coding"),
            "description": info.get("description") or spec_col.get("description"),
        }
        for (i, pid, (kind, value)), (_, _, r) in zip(cells, raw_rows, strict=True):
            if kind == "missing":
                rows[pid][name] = None
            elif dtype == "float":
                if kind == "text":
                    notes.append(
                        f"{source}: row {i} ({pid}) column {name!r}: {value!r} is not a number; "
                        "left empty"
                    )
                    rows[pid][name] = None
                else:
                    rows[pid][name] = float(value)
            else:
                raw = r[j]
                rows[pid][name] = _as_text(raw) if not isinstance(raw, str) else raw.strip()
    for name in known:
        if name not in columns:
            notes.append(f"{source}: expected column {name!r} is missing")

    age: dict[str, float | None] = {}
    sex: dict[str, str | None] = {}
    sex_col, age_col, codes = spec["sex_column"], spec["age_column"], spec["sex_codes"]
    for pid, row in rows.items():
        age[pid] = row.get(age_col) if columns.get(age_col, {}).get("dtype") == "float" else None
        code = row.get(sex_col)
        if code is None:
            sex[pid] = None
        elif isinstance(code, float) and code.is_integer() and int(code) in codes:
            sex[pid] = codes[int(code)]
        else:
            sex[pid] = None
            notes.append(f"{source}: {pid}: unknown {sex_col} code {code!r}; sex left empty")
    return ClinicalTable(cid, source, columns, rows, age, sex, notes)


#: Column names that look like they hold direct identifiers: any of these inside the name
#: (case-insensitive) …
IDENTIFYING_COLUMN = re.compile(
    r"name|birth|address|phone|e-?mail|medical.?record|record.?number|social.?security"
    r"|passport",
    re.IGNORECASE,
)
#: … or one of these as a whole word of it (words split at non-letters and camelCase, so
#: "PatientDOB" has the word "dob" while "toxicity" does not have "city").
IDENTIFYING_WORDS = frozenset(
    {
        "dob", "mrn", "ssn", "city", "zip", "zipcode", "postcode", "postal", "street",
        "fax", "mobile", "initials", "contact", "insurance", "license", "licence", "accession",
    }
)  # fmt: skip
_WORD = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+")


def looks_identifying(column: str) -> bool:
    """Whether a column name suggests direct identifiers; such columns are never stored."""
    if IDENTIFYING_COLUMN.search(column):
        return True
    return any(w.lower() in IDENTIFYING_WORDS for w in _WORD.findall(column))


def select_columns(table: ClinicalTable, extra: Iterable[str] = ()) -> ClinicalTable:
    """Only the columns that may be stored: documented ones and those named in ``extra``.

    The id column is always kept (it is the collection's public pseudonym).  Dropped columns
    are listed in the returned table's notes: identifying-looking ones one by one, the other
    undocumented ones together (with how to keep them).
    """
    spec = COLLECTIONS[table.collection]
    documented = set(COLUMN_SPECS[table.collection])
    wanted = set(extra)
    notes = list(table.notes)
    keep: list[str] = []
    undocumented: list[str] = []
    for name in table.columns:
        if name != spec["id"] and looks_identifying(name):
            how = "named with --clinical-column but " if name in wanted else ""
            notes.append(
                f"{table.source}: column {name!r} {how}looks identifying "
                "(name, birth date, address, phone, record number …): not stored"
            )
        elif name in documented or name in wanted or name == spec["id"]:
            keep.append(name)
        else:
            undocumented.append(name)
    if undocumented:
        notes.append(
            f"{table.source}: column(s) {undocumented} are not documented for "
            f"{table.collection}: not stored (keep one with --clinical-column NAME)"
        )
    for name in sorted(wanted - set(table.columns)):
        notes.append(f"{table.source}: --clinical-column {name!r}: no such column")
    columns = {k: table.columns[k] for k in keep}
    rows = {pid: {k: v for k, v in row.items() if k in columns} for pid, row in table.rows.items()}
    return ClinicalTable(
        table.collection, table.source, columns, rows, table.age, table.sex, notes
    )


def reconcile(table: ClinicalTable, image_patient_ids: set[str]) -> list[str]:
    """Notes on patients with images but no clinical row, and rows without images."""
    notes = []
    rows = set(table.rows)
    for pid in sorted(image_patient_ids - rows):
        notes.append(f"{pid}: has images but no row in {table.source}")
    for pid in sorted(rows - image_patient_ids):
        notes.append(f"{pid}: row in {table.source} but no images")
    return notes


__all__ = [
    "COLLECTIONS",
    "COLUMN_SPECS",
    "IDENTIFYING_COLUMN",
    "IDENTIFYING_WORDS",
    "ClinicalTable",
    "looks_identifying",
    "read_clinical",
    "reconcile",
    "select_columns",
]
