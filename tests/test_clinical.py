"""Clinical spreadsheets of the synthetic HCC-TACE-Seg and CRLM collections, typed."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from openpyxl import Workbook, load_workbook

import livercube
from livercube import cli
from livercube.convert import convert
from livercube.errors import UnreadableFileError
from livercube.sources.clinical import (
    COLUMN_SPECS,
    looks_identifying,
    read_clinical,
    reconcile,
    select_columns,
)
from livercube.sources.planning import plan_collection
from livercube.store.contract import check_store
from livercube.store.verify import verify
from livercube.synth.dicom_collections import write_crlm, write_hcc_tace_seg


@pytest.fixture(scope="module")
def hcc(tmp_path_factory):
    return write_hcc_tace_seg(tmp_path_factory.mktemp("hcc") / "HCC", n_patients=2)


@pytest.fixture(scope="module")
def crlm(tmp_path_factory):
    return write_crlm(tmp_path_factory.mktemp("crlm") / "CRLM", n_patients=2)


def _expected(value):
    if value == -999 or value == "":
        return None
    if isinstance(value, str) and value.endswith("%"):
        return float(value[:-1])
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return value


def _check_rows(table, truth, id_col: str) -> None:
    assert set(table.rows) == {r[id_col] for r in truth.clinical_rows}
    for row in truth.clinical_rows:
        got = table.rows[row[id_col]]
        for col, value in row.items():
            if col == id_col:
                assert got[col] == value
            elif table.columns[col]["dtype"] == "str":
                assert got[col] == (None if value == "" else str(value)), col
            else:
                assert got[col] == _expected(value), col
    json.dumps(table.rows, allow_nan=False)  # JSON-serialisable, no NaN


def test_hcc_typed_values(hcc):
    t = read_clinical(str(hcc.clinical_path), "hcc-tace-seg")
    _check_rows(t, hcc, "TCIA_ID")
    assert t.collection == "hcc-tace-seg"
    assert t.columns["BCLC"]["dtype"] == "str"
    assert all(isinstance(r["BCLC"], str) for r in t.rows.values())
    assert t.columns["Vascular invasion"]["dtype"] == "float"  # name with a space, verbatim
    assert "Portal Vein Thrombosis" in t.columns
    assert t.columns["Death_1_StillAliveorLostToFU_0"]["coding"].startswith("1 = death")
    assert "possibly weeks" in t.columns["TTP"]["units"]
    assert "unverified" in t.columns["OS"]["description"]
    assert t.columns["age"]["units"] == "years"
    for row in hcc.clinical_rows:
        pid = row["TCIA_ID"]
        assert t.age[pid] == float(row["age"])
        assert t.sex[pid] == {1: "male", 2: "female"}[row["Sex"]]
    assert "1 = male" in t.columns["Sex"]["coding"]
    assert t.notes == []


def test_crlm_missing_percent_sex_dictionary(crlm):
    t = read_clinical(str(crlm.clinical_path), "Colorectal-Liver-Metastases")
    _check_rows(t, crlm, "Patient-ID")
    first, second = (r["Patient-ID"] for r in crlm.clinical_rows[:2])
    assert t.rows[first]["mucin_percent"] == 30.0
    assert t.columns["mucin_percent"]["units"] == "%"
    assert t.rows[second]["necrosis_percent"] is None  # −999
    assert t.rows[second]["carcinoembryonic_antigen"] is None
    assert t.columns["carcinoembryonic_antigen"]["dtype"] == "float"
    assert t.columns["overall_survival_months"]["units"] == "months"
    assert t.columns["relevant_notes"]["dtype"] == "str"
    assert t.columns["bilobar_disease"]["coding"] == "0/1"
    # descriptions from the data-dictionary sheet
    assert t.columns["body_mass_index"]["description"] == "body mass index"
    assert t.columns["sex"]["coding"] == "1 = male, 2 = female"
    for row in crlm.clinical_rows:
        assert t.sex[row["Patient-ID"]] == ("male" if row["sex"] == 1 else "female")
        assert t.age[row["Patient-ID"]] == float(row["age"])


def test_reconcile_reports_row_without_images(hcc, crlm):
    for truth, col in ((hcc, "hcc-tace-seg"), (crlm, "crlm")):
        t = read_clinical(str(truth.clinical_path), col)
        notes = reconcile(t, set(truth.patient_ids) | {"GHOST-1"})
        extra = sorted(set(t.rows) - set(truth.patient_ids))
        assert len(extra) == 1
        assert any(n.startswith(f"{extra[0]}: row") and "no images" in n for n in notes)
        assert any(n.startswith("GHOST-1: has images but no row") for n in notes)
        assert len(notes) == 2


def _rewrite(src: Path, dst: Path, edit) -> Path:
    wb = load_workbook(src)
    edit(wb)
    wb.save(dst)
    return dst


def test_missing_sheet_and_id_column_errors(hcc, tmp_path):
    def rename(wb):
        wb["data table"].title = "other"
        wb["other"]["A1"] = "PID"

    path = _rewrite(hcc.clinical_path, tmp_path / "renamed.xlsx", rename)
    with pytest.raises(UnreadableFileError, match=r"no sheet 'data table'.*'other'.*PID"):
        read_clinical(str(path), "hcc-tace-seg")

    def drop_id(wb):
        wb["data table"]["A1"] = "Patient"

    path = _rewrite(hcc.clinical_path, tmp_path / "noid.xlsx", drop_id)
    with pytest.raises(UnreadableFileError, match=r"TCIA_ID.*Patient"):
        read_clinical(str(path), "hcc-tace-seg")


def test_fallback_sheet_with_note(hcc, tmp_path):
    path = _rewrite(
        hcc.clinical_path,
        tmp_path / "fallback.xlsx",
        lambda wb: setattr(wb["data table"], "title", "Sheet1"),
    )
    t = read_clinical(str(path), "hcc-tace-seg")
    _check_rows(t, hcc, "TCIA_ID")
    assert any("read sheet 'Sheet1'" in n for n in t.notes)


def test_odd_cells_are_noted(tmp_path):
    wb = Workbook()
    ws = wb.active
    ws.title = "TCIA_n=197"
    ws.append(["Patient-ID", "age", "sex", "necrosis_percent", "new column"])
    ws.append(["CRLM-CT-1001", 60, 1, "-999", "x"])
    ws.append(["CRLM-CT-1001", 61, 2, 5, "y"])
    ws.append(["CRLM-CT-1002", "unknown", 3, "12.5%", 4])
    ws.append([None, 50, 1, 1, 1])
    wb.save(tmp_path / "odd.xlsx")
    t = read_clinical(str(tmp_path / "odd.xlsx"), "crlm")
    assert t.rows["CRLM-CT-1001"]["necrosis_percent"] is None
    assert t.rows["CRLM-CT-1002"]["necrosis_percent"] == 12.5
    assert t.rows["CRLM-CT-1002"]["age"] is None
    assert t.columns["new column"]["dtype"] == "str"  # mixed text and numbers
    assert t.rows["CRLM-CT-1002"]["new column"] == "4"
    assert t.sex == {"CRLM-CT-1001": "male", "CRLM-CT-1002": None}
    text = "\n".join(t.notes)
    assert "duplicate Patient-ID 'CRLM-CT-1001'" in text
    assert "'unknown' is not a number" in text
    assert "unknown sex code 3.0" in text
    assert "has no Patient-ID" in text
    assert "expected column 'bilobar_disease' is missing" in text


def test_csv_export(crlm, hcc, tmp_path):
    for truth, col, sheet in (
        (crlm, "crlm", "TCIA_n=197"),
        (hcc, "hcc-tace-seg", "data table"),
    ):
        wb = load_workbook(truth.clinical_path)
        path = tmp_path / f"{col}.csv"
        with path.open("w", newline="", encoding="utf-8-sig") as f:
            w = csv.writer(f)
            for row in wb[sheet].iter_rows(values_only=True):
                w.writerow(["" if v is None else v for v in row])
        t = read_clinical(str(path), col)
        _check_rows(t, truth, truth.clinical_id_column)
        ref = read_clinical(str(truth.clinical_path), col)
        assert t.rows == ref.rows and t.sex == ref.sex and t.age == ref.age
        assert {k: v["dtype"] for k, v in t.columns.items()} == {
            k: v["dtype"] for k, v in ref.columns.items()
        }

    bad = tmp_path / "bad.csv"
    bad.write_text("id,age\nX,1\n")
    with pytest.raises(UnreadableFileError, match=r"'Patient-ID'.*\['id', 'age'\]"):
        read_clinical(str(bad), "crlm")


# --------------------------------------------------------------------------- stored columns


def test_documented_columns_never_look_identifying():
    for collection, columns in COLUMN_SPECS.items():
        assert not [c for c in columns if looks_identifying(c)], collection
    for name in ("PatientName", "DOB", "Address", "Patient DOB", "date_of_birth", "MRN",
                 "mrn_number", "e-mail", "Phone", "Zip Code", "first_name", "SSN"):
        assert looks_identifying(name), name
    for name in ("toxicity", "Tr_Size", "Okuda", "months_to_DFS_progression"):
        assert not looks_identifying(name), name


def test_only_documented_and_named_columns_are_stored(crlm, tmp_path):
    wb = load_workbook(crlm.clinical_path)
    ws = wb["TCIA_n=197"]
    extra = ["PatientName", "DOB", "Address", "Research_Code", "toxicity_grade"]
    first = ws.max_column + 1
    for j, name in enumerate(extra):
        ws.cell(row=1, column=first + j, value=name)
        for i in range(2, ws.max_row + 1):
            ws.cell(row=i, column=first + j, value=f"{name}-{i}")
    wb.save(tmp_path / "planted.xlsx")
    table = read_clinical(str(tmp_path / "planted.xlsx"), "crlm")
    assert set(extra) <= set(table.columns)  # read_clinical reads everything …

    kept = select_columns(table, ["Research_Code", "Address", "Nope"])  # … not all is stored
    assert set(kept.columns) == set(COLUMN_SPECS["crlm"]) | {"Research_Code"}
    for row in kept.rows.values():
        assert set(row) == set(kept.columns)
    assert kept.age == table.age and kept.sex == table.sex
    text = "\n".join(kept.notes)
    assert "'PatientName' looks identifying" in text and "'DOB' looks identifying" in text
    assert "'Address' named with --clinical-column but looks identifying" in text
    assert "['toxicity_grade'] are not documented" in text
    assert "--clinical-column 'Nope': no such column" in text
    default = select_columns(table)
    assert set(default.columns) == set(COLUMN_SPECS["crlm"])


# --------------------------------------------------------------------------- broken files


def _truncated(src: Path) -> bytes:
    data = src.read_bytes()
    return data[: len(data) // 2]


def _empty_workbook(path: Path) -> bytes:
    wb = Workbook()
    wb.active.title = "data table"
    wb.save(path)
    return path.read_bytes()


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("zero-byte", r"empty \(0 bytes\)"),
        ("truncated", r"truncated or corrupt \.xlsx|not a readable \.xlsx"),
        ("empty-workbook", r"no 'TCIA_ID' column"),
        ("not-a-zip", r"not an \.xlsx workbook"),
        ("blank-csv", r"empty \(3 bytes\)"),
    ],
)
def test_broken_spreadsheets_name_the_file_and_reason(hcc, tmp_path, kind, reason):
    name = "sheet.csv" if kind == "blank-csv" else "sheet.xlsx"
    path = tmp_path / name
    data = {
        "zero-byte": lambda: b"",
        "truncated": lambda: _truncated(hcc.clinical_path),
        "empty-workbook": lambda: _empty_workbook(tmp_path / "e.xlsx"),
        "not-a-zip": lambda: b"TCIA_ID,age\nHCC_001,60\n",
        "blank-csv": lambda: b" \n\n",
    }[kind]()
    path.write_bytes(data)
    with pytest.raises(UnreadableFileError, match=reason) as err:
        read_clinical(str(path), "hcc-tace-seg")
    assert err.value.source == str(path)


@pytest.fixture(scope="module")
def small_hcc(tmp_path_factory):
    root = tmp_path_factory.mktemp("hcc-broken") / "HCC-TACE-Seg"
    truth = write_hcc_tace_seg(root, n_patients=1)
    return root, truth


def _assert_images_without_covariates(report: dict, source: str, dest: Path, sheet: Path) -> None:
    """``report``: the saved livercube-report.json."""
    n_volumes = len(plan_collection(source, "hcc-tace-seg", clinical=str(sheet)).tasks)
    assert report["exit_code"] == 3, report
    assert n_volumes > 0 and len(report["converted"]) == n_volumes and not report["failed"]
    (entry,) = [s for s in report["skipped"] if s["input"] == str(sheet)]
    assert "clinical covariates skipped, images converted" in entry["reason"]
    cat = livercube.open(str(dest)).catalog
    assert cat.sizes["volume"] == n_volumes
    assert not [v for v in cat.variables if str(v).startswith("hcc_")]
    assert np.isnan(cat["age"].values).all()
    assert check_store(str(dest)) == [] and verify(str(dest)).exit_code == 0


def _saved_report(dest: Path) -> dict:
    return json.loads((dest / "livercube-report.json").read_text())


def test_zero_byte_spreadsheet_in_source_converts_images_exit_3(small_hcc, tmp_path):
    root, truth = small_hcc
    source = tmp_path / "HCC-TACE-Seg"
    shutil.copytree(root, source)
    sheet = source / truth.clinical_path.name
    sheet.write_bytes(b"")  # found in SOURCE, as released
    dest = tmp_path / "store.zarr"
    report = convert(str(source), str(dest), "hcc-tace-seg", progress=False)
    assert report.exit_code == 3
    _assert_images_without_covariates(_saved_report(dest), str(source), dest, sheet)
    assert "empty (0 bytes)" in report.summary()


def test_truncated_spreadsheet_via_cli_exit_3(small_hcc, tmp_path, capsys):
    root, truth = small_hcc
    sheet = tmp_path / "clinical.xlsx"
    sheet.write_bytes(_truncated(truth.clinical_path))
    dest = tmp_path / "store.zarr"
    code = cli.main(
        ["convert", str(root), str(dest), "--collection", "hcc-tace-seg",
         "--clinical", str(sheet), "--quiet"]
    )  # fmt: skip
    out = capsys.readouterr()
    assert code == 3
    assert "Traceback" not in out.out + out.err
    assert f"SKIPPED {sheet}:" in out.out
    _assert_images_without_covariates(_saved_report(dest), str(root), dest, sheet)


def test_empty_crlm_workbook_converts_images(tmp_path):
    root = tmp_path / "CRLM"
    truth = write_crlm(root, n_patients=1)
    wb = Workbook()
    wb.active.title = "TCIA_n=197"
    wb.save(truth.clinical_path)
    dest = tmp_path / "store.zarr"
    report = convert(str(root), str(dest), "crlm", progress=False)
    assert report.exit_code == 3
    (entry,) = report.skipped
    assert entry["input"] == str(truth.clinical_path) and "Patient-ID" in entry["reason"]
    assert len(report.converted) == len(truth.patient_ids) >= 1
    assert not [v for v in livercube.open(str(dest)).catalog.variables if v.startswith("crlm_")]


def test_cli_passes_clinical_columns_and_description_mode(monkeypatch, tmp_path, capsys):
    seen = {}

    def fake_convert(source, dest, collection, **kwargs):
        seen.update(kwargs)
        from livercube.convert import ConvertReport

        return ConvertReport(collection, source, dest, "now")

    monkeypatch.setattr(cli, "convert", fake_convert)
    argv = ["convert", "src", str(tmp_path / "s.zarr"), "--collection", "crlm", "--quiet"]
    assert cli.main(argv) == 0
    assert seen["keep_descriptions"] is False and not seen["clinical_columns"]
    argv += ["--keep-descriptions", "--clinical-column", "A b", "--clinical-column", "C"]
    assert cli.main(argv) == 0
    assert seen["keep_descriptions"] is True and seen["clinical_columns"] == ["A b", "C"]
    capsys.readouterr()
