"""No patient-identifying header value survives conversion + publish, anywhere in the store.

A tiny HCC-TACE-Seg collection carries the generator's dummy PHI (names, birth dates, MRNs,
accession numbers, institution, referring physician); on top of that every DICOM file gets
more than 30 further identifying attributes with unique marker values.  After ``convert`` and
``publish`` every byte of every object of the store is scanned — metadata documents, shards,
the catalog's arrays decoded (they are compressed on disk), ``catalog.parquet`` raw and
decoded, ``README.md`` and the report — for every value and its usual spellings.

PatientID and the (shifted) study dates are kept on purpose: they are the collection's public
pseudonymous identifiers and dates.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
import zarr
from openpyxl import load_workbook

import livercube
from livercube.convert import convert
from livercube.store.contract import check_store
from livercube.store.publish import publish
from livercube.store.verify import verify
from livercube.synth.dicom_collections import write_hcc_tace_seg

#: keyword -> VR; a unique marker value is written into each (PN: family^given).
EXTRA_PHI = {
    "PatientBirthTime": "TM",
    "PatientAddress": "LO",
    "OtherPatientNames": "PN",
    "PatientBirthName": "PN",
    "PatientMotherBirthName": "PN",
    "PatientTelephoneNumbers": "SH",
    "MilitaryRank": "LO",
    "Occupation": "SH",
    "PatientComments": "LT",
    "AdditionalPatientHistory": "LT",
    "CountryOfResidence": "LO",
    "RegionOfResidence": "LO",
    "PatientReligiousPreference": "LO",
    "MedicalRecordLocator": "LO",
    "ResponsiblePerson": "PN",
    "ResponsibleOrganization": "LO",
    "IssuerOfPatientID": "LO",
    "InstitutionAddress": "ST",
    "InstitutionalDepartmentName": "LO",
    "StationName": "SH",
    "OperatorsName": "PN",
    "PerformingPhysicianName": "PN",
    "ReferringPhysicianAddress": "ST",
    "ReferringPhysicianTelephoneNumbers": "SH",
    "NameOfPhysiciansReadingStudy": "PN",
    "PhysiciansOfRecord": "PN",
    "RequestingPhysician": "PN",
    "StudyID": "SH",
    "DeviceSerialNumber": "LO",
    "AdmissionID": "LO",
    "CurrentPatientLocation": "LO",
    "PatientState": "LO",
    "RequestedProcedureID": "SH",
    "PerformedProcedureStepID": "SH",
    "ImageComments": "LT",
    "ContentCreatorName": "PN",
    "OtherPatientIDs": "LO",
}
#: A date of birth that is not the generator's (which stays in PatientBirthDate).
EXTRA_DATE = ("PatientBirthDate", "19230417")

#: Names typed into the free-text descriptors (as a technologist might), one per attribute;
#: phase classification must ignore them and cleaning must remove them.
DESCRIPTOR_NAMES = {
    "SeriesDescription": "Zebedee Quaxwell",
    "StudyDescription": "Dr Yarborough",
    "ContrastBolusAgent": "Wibberley",
    "ContrastBolusRoute": "Plonkett",
    "SEG SegmentDescription": "Fennimore",
    "SEG ContentDescription": "Throgmorton",
}
#: Identifying spreadsheet columns added to the clinical workbook (value per patient index).
SHEET_PHI = {
    "PatientName": lambda i: f"QUILLFEATHER^OTTOLINE{i}",
    "DOB": lambda i: f"1931-07-2{i}",
    "Address": lambda i: f"{17 + i} Brimblecombe Lane",
}
#: An undocumented, non-identifying column: stored only when named with --clinical-column.
EXTRA_COLUMN = ("Research_Code", lambda i: f"RC{i}XKQVZ")
PRIVATE_CREATOR = "LIVERCUBE PHI TEST"


def _marker(i: int) -> str:
    return f"QX{i:02d}PHIZK"  # unique, fits SH (16 chars), never appears by chance


def _private_and_nested(ds: pydicom.Dataset, markers: dict[str, str]) -> None:
    block = ds.private_block(0x0009, PRIVATE_CREATOR, create=True)
    block.add_new(0x01, "LO", markers["private LO"])
    block.add_new(0x02, "PN", f"{markers['private PN']}^X")
    block.add_new(0x03, "UT", f"notes {markers['private UT']}")
    inner = pydicom.Dataset()
    inner.PatientName = f"{markers['private SQ item']}^Y"
    block.add_new(0x04, "SQ", pydicom.Sequence([inner]))
    request = pydicom.Dataset()
    request.RequestedProcedureID = markers["RequestAttributesSequence.RequestedProcedureID"]
    request.ScheduledProcedureStepDescription = markers[
        "RequestAttributesSequence.ScheduledProcedureStepDescription"
    ]
    deeper = pydicom.Dataset()
    deeper.PatientName = f"{markers['RequestAttributesSequence.ReferencedPatient']}^Z"
    request.ReferencedPatientSequence = pydicom.Sequence([deeper])
    ds.RequestAttributesSequence = pydicom.Sequence([request])
    code = pydicom.Dataset()
    code.CodeValue, code.CodingSchemeDesignator = "X1", "99LC"
    code.CodeMeaning = markers["ProcedureCodeSequence.CodeMeaning"]
    ds.ProcedureCodeSequence = pydicom.Sequence([code])


NESTED_MARKERS = (
    "private LO",
    "private PN",
    "private UT",
    "private SQ item",
    "RequestAttributesSequence.RequestedProcedureID",
    "RequestAttributesSequence.ScheduledProcedureStepDescription",
    "RequestAttributesSequence.ReferencedPatient",
    "ProcedureCodeSequence.CodeMeaning",
    "SEG SegmentSequence private",
    "SEG SegmentSequence nested",
)


def _stuff(path: Path, markers: dict[str, str]) -> None:
    ds = pydicom.dcmread(path)
    for keyword, vr in EXTRA_PHI.items():
        m = markers[keyword]
        value = {"PN": f"{m}FAM^{m}GIV", "TM": "101112.131415"}.get(vr, m)
        if keyword == "OtherPatientIDs":  # keep the generator's MRN, add ours (VM 1-n)
            value = [str(ds.get("OtherPatientIDs", "")), m]
        setattr(ds, keyword, value)
    _private_and_nested(ds, markers)
    names = DESCRIPTOR_NAMES
    ds.SeriesDescription = f"{ds.get('SeriesDescription', '')} {names['SeriesDescription']}"
    ds.StudyDescription = f"{ds.get('StudyDescription', '')} {names['StudyDescription']}"
    if ds.get("ContrastBolusAgent"):  # presence decides phases: never add one
        ds.ContrastBolusAgent = f"{ds.ContrastBolusAgent} {names['ContrastBolusAgent']}"
    ds.ContrastBolusRoute = f"IV {names['ContrastBolusRoute']}"
    if ds.Modality == "SEG":
        ds.ContentDescription = f"Segmentation {names['SEG ContentDescription']}"
        for item in ds.SegmentSequence:
            item.SegmentDescription = f"{item.SegmentLabel} {names['SEG SegmentDescription']}"
            item.private_block(0x0011, PRIVATE_CREATOR, create=True).add_new(
                0x01, "LO", markers["SEG SegmentSequence private"]
            )
            nested = pydicom.Dataset()
            nested.PatientName = f"{markers['SEG SegmentSequence nested']}^W"
            item.ReferencedPatientSequence = pydicom.Sequence([nested])
    ds.save_as(path)


def _plant_in_spreadsheet(path: Path) -> dict[str, set[str]]:
    """Identifying columns (and one undocumented harmless one) added to the workbook."""
    wb = load_workbook(path)
    ws = wb[wb.sheetnames[0]]
    names = [*SHEET_PHI, EXTRA_COLUMN[0]]
    first = ws.max_column + 1
    for j, name in enumerate(names):
        ws.cell(row=1, column=first + j, value=name)
    needles: dict[str, set[str]] = {}
    for i in range(2, ws.max_row + 1):
        for j, (name, make) in enumerate([*SHEET_PHI.items(), EXTRA_COLUMN]):
            value = make(i)
            ws.cell(row=i, column=first + j, value=value)
            needles.setdefault(f"sheet {name}", set()).update(_variants(value))
    wb.save(path)
    return needles


def _tcia_folder_with_the_name(root: Path) -> Path:
    """TCIA names series folders after SeriesDescription: one carries the planted name.  Its
    series holds two acquisitions at repeated positions, so the report notes its file paths."""
    folder = next(p for p in sorted(root.rglob("*")) if p.is_dir() and "C-A-P-" in p.name)
    stem, _, suffix = folder.name.rpartition("-")
    renamed = folder.with_name(f"{stem} {DESCRIPTOR_NAMES['SeriesDescription']}-{suffix}")
    folder.rename(renamed)
    return renamed


def _variants(value: str) -> set[str]:
    """Spellings a value may take once copied: as written, DICOM PN carets as spaces or
    reordered, ISO dates; matched case-insensitively."""
    out = {value}
    if "^" in value:
        parts = [p for p in value.split("^") if p]
        out |= {" ".join(parts), " ".join(reversed(parts)), ", ".join(parts)}
    if len(value) == 8 and value.isdigit():
        d = dt.date(int(value[:4]), int(value[4:6]), int(value[6:]))
        out |= {d.isoformat(), d.strftime("%m-%d-%Y"), d.strftime("%d.%m.%Y")}
    return {v.lower() for v in out}


@dataclass
class PhiStores:
    cleaned: Path  # converted with the defaults
    kept: Path  # --keep-descriptions --clinical-column Research_Code --clinical-column PatientName
    needles: dict[str, set[str]]
    truth: object
    reports: dict[str, dict]


def _name_words(text: str) -> set[str]:
    return {w.lower() for w in text.split() if len(w) > 2}


@pytest.fixture(scope="module")
def phi_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("phi") / "HCC-TACE-Seg"
    truth = write_hcc_tace_seg(root, n_patients=2, size="tiny")
    markers = {k: _marker(i) for i, k in enumerate([*EXTRA_PHI, *NESTED_MARKERS])}
    files = sorted(root.rglob("*.dcm"))
    assert files
    for f in files:
        _stuff(f, markers)
    needles: dict[str, set[str]] = {}
    for pid, phi in truth.phi.items():
        for keyword, value in phi.items():
            needles[f"{pid}.{keyword}"] = _variants(str(value))
    for keyword, m in markers.items():
        needles[keyword] = {m.lower()}
    for keyword, name in DESCRIPTOR_NAMES.items():
        needles[f"name in {keyword}"] = _name_words(name)
    needles.update(_plant_in_spreadsheet(truth.clinical_path))
    _tcia_folder_with_the_name(root)
    # the stuffed values really are in the sources (the scan below is not vacuous)
    sample = pydicom.dcmread(files[0])
    assert str(sample.OperatorsName).startswith(markers["OperatorsName"])
    assert markers["OtherPatientIDs"] in list(sample.OtherPatientIDs)
    assert str(sample.PatientName) in {p["PatientName"] for p in truth.phi.values()}
    assert DESCRIPTOR_NAMES["SeriesDescription"] in sample.SeriesDescription
    assert sample.private_block(0x0009, PRIVATE_CREATOR)[0x01].value == markers["private LO"]
    seg = next(
        ds for ds in map(pydicom.dcmread, sorted(root.rglob("*.dcm"))) if ds.Modality == "SEG"
    )
    assert DESCRIPTOR_NAMES["SEG SegmentDescription"] in seg.SegmentSequence[0].SegmentDescription
    needles["extra birth date"] = _variants(EXTRA_DATE[1])

    stores, reports = {}, {}
    for mode, options in (
        ("cleaned", {}),
        (
            "kept",
            {"keep_descriptions": True, "clinical_columns": [EXTRA_COLUMN[0], "PatientName"]},
        ),
    ):
        dest = tmp_path_factory.mktemp(f"phistore-{mode}") / "store.zarr"
        report = convert(str(root), str(dest), "hcc-tace-seg", progress=False, **options)
        assert report.exit_code == 0, report.summary()
        publish(str(dest))
        stores[mode] = dest
        reports[mode] = json.loads((dest / "livercube-report.json").read_text())
    return PhiStores(stores["cleaned"], stores["kept"], needles, truth, reports)


def _decoded_arrays(dest: Path) -> dict[str, bytes]:
    """Every non-numeric Zarr array of the store, decompressed and decoded by zarr."""
    out = {}
    root = zarr.open_group(str(dest), mode="r", zarr_format=3)
    for path, node in root.members(max_depth=None):
        if isinstance(node, zarr.Array) and node.dtype.kind not in "biufcmM":
            out[f"{path} decoded"] = " | ".join(map(str, np.ravel(node[...]))).encode()
    return out


def _store_texts(dest: Path) -> dict[str, bytes]:
    """Every file of the store as bytes, plus decoded views of compressed content."""
    texts = {str(p.relative_to(dest)): p.read_bytes() for p in dest.rglob("*") if p.is_file()}
    texts.update(_decoded_arrays(dest))
    store = livercube.open(str(dest))
    cat = store.catalog
    for name in cat.variables:
        values = " | ".join(map(str, np.ravel(cat[name].values)))
        texts[f"catalog[{name}] decoded"] = (values + repr(cat[name].attrs)).encode()
    frame = pd.read_parquet(dest / "catalog.parquet")
    texts["catalog.parquet decoded"] = frame.to_csv().encode()
    for path in store.paths():
        texts[f"{path} attrs"] = repr(store.volume_attrs(path)).encode()
    return texts


def _leaks(texts: dict[str, bytes], needles: dict[str, set[str]]) -> list[str]:
    return [
        f"{what} ({needle!r}) in {where}"
        for where, body in texts.items()
        for what, forms in needles.items()
        for needle in forms
        if needle.encode() in body.lower()
    ]


#: Checked on its own: the SEG's ContentCreatorName (a person name, removed under DICOM
#: PS3.15's basic profile) once leaked into volume provenance via ``sources/dicom_seg.py``.
KNOWN_LEAKS = ("ContentCreatorName",)


def test_identifiers_are_planted_in_35_plus_places(phi_store):
    header = len(EXTRA_PHI) + len(NESTED_MARKERS) + len(DESCRIPTOR_NAMES) + 1  # + birth date
    assert header >= 35
    assert {k for k in phi_store.needles if k.startswith("sheet ")} >= {
        f"sheet {c}" for c in SHEET_PHI
    }


def test_no_phi_anywhere_in_the_store(phi_store):
    dest, needles = phi_store.cleaned, phi_store.needles
    texts = _store_texts(dest)
    assert "README.md" in texts and "livercube-report.json" in texts
    assert any(k.startswith("catalog/") and k.endswith("decoded") for k in texts)
    assert len(texts) > 100
    checked = {k: v for k, v in needles.items() if k not in KNOWN_LEAKS}
    leaks = _leaks(texts, checked)
    assert not leaks, "\n".join(leaks)


def test_seg_content_creator_name_is_not_kept(phi_store):
    leaks = _leaks(
        _store_texts(phi_store.cleaned), {k: phi_store.needles[k] for k in KNOWN_LEAKS}
    )
    assert not leaks, "\n".join(leaks)


def test_cleaned_descriptions_keep_their_protocol_words(phi_store):
    """Cleaning removes the names, not the description: the catalog still says what the
    series is, phases are the same as with the raw text, the report names the mode."""
    cleaned = livercube.open(str(phi_store.cleaned)).catalog
    kept = livercube.open(str(phi_store.kept)).catalog
    descriptions = set(cleaned["series_description"].values)
    assert "Recon 2: LIVER 3 PHASE (AP)" in descriptions and "PRE LIVER" in descriptions
    assert list(cleaned["phase"].values) == list(kept["phase"].values)
    assert set(cleaned["phase"].values) - {"unknown"}
    assert phi_store.reports["cleaned"]["deidentification"]["descriptions"] == "cleaned"
    assert "Clean Descriptors" in phi_store.reports["cleaned"]["deidentification"]["rule"]
    assert phi_store.reports["kept"]["deidentification"]["descriptions"] == "kept"
    attrs = livercube.open(str(phi_store.cleaned)).volume_attrs(0)
    assert attrs["deidentification"]["descriptions"] == "cleaned"
    # the undocumented and identifying spreadsheet columns were dropped with a warning
    warnings = "\n".join(phi_store.reports["cleaned"]["warnings"])
    for column in SHEET_PHI:
        assert f"column {column!r} looks identifying" in warnings
    assert EXTRA_COLUMN[0] in warnings and "--clinical-column" in warnings
    # files in the folder named after a description are noted by path, without the name
    notes = [w for w in phi_store.reports["cleaned"]["warnings"] if "split by" in w]
    assert [w for w in notes if ".000000-C-A-P-" in w]


def test_both_stores_follow_the_contract_and_verify(phi_store):
    for dest in (phi_store.cleaned, phi_store.kept):
        assert check_store(str(dest)) == []
        report = verify(str(dest))
        assert report.exit_code == 0, report.summary()


def test_positive_control_kept_descriptions_and_named_column_are_found(phi_store):
    """The same scan on the --keep-descriptions store finds the planted description names and
    the named harmless column, so it would find them in the cleaned store too; the
    identifying columns stay out even when named, and header tags stay out in both modes."""
    texts = _store_texts(phi_store.kept)
    needles = phi_store.needles
    found = {what for what in needles if _leaks(texts, {what: needles[what]})}
    for keyword in ("SeriesDescription", "StudyDescription", "ContrastBolusAgent"):
        assert f"name in {keyword}" in found
    assert f"sheet {EXTRA_COLUMN[0]}" in found
    cat = livercube.open(str(phi_store.kept)).catalog
    assert "hcc_research_code" in cat.variables
    never = {f"sheet {c}" for c in SHEET_PHI} | set(EXTRA_PHI) | set(NESTED_MARKERS)
    assert not (found & never) - set(KNOWN_LEAKS)


def test_kept_pseudonymous_ids_are_found_by_the_same_scan(phi_store):
    """Positive control: PatientID and the shifted study date are kept on purpose, and the
    scan finds them, so it would find a leaked value too."""
    dest, truth = phi_store.cleaned, phi_store.truth
    texts = _store_texts(dest)
    blob = b"\n".join(texts.values()).lower()
    for pid in truth.patient_ids:
        assert pid.lower().encode() in blob
    cat = livercube.open(str(dest)).catalog
    date = pd.Timestamp(cat["study_date"].values[0]).strftime("%Y%m%d")
    assert date.encode() in blob


def test_skipped_volume_message_quotes_the_cleaned_description(tmp_path):
    """A volume that cannot be read is reported with its series' description: cleaned too."""
    root = tmp_path / "HCC-TACE-Seg"
    write_hcc_tace_seg(root, n_patients=1, size="tiny")
    files = [
        f
        for f in sorted(root.rglob("*.dcm"))
        if f.parent.name.split("-")[1:2] == ["PRE LIVER"] and "Recon" not in f.parent.name
    ]
    assert len(files) > 4
    for f in files:
        ds = pydicom.dcmread(f)
        ds.SeriesDescription = f"PRE LIVER {DESCRIPTOR_NAMES['SeriesDescription']}"
        ds.RescaleSlope = 0.37  # non-integer HU: the series cannot be stored exactly
        ds.save_as(f)
    dest = tmp_path / "store.zarr"
    report = convert(str(root), str(dest), "hcc-tace-seg", progress=False)
    assert report.exit_code == 3
    (entry,) = [s for s in report.skipped if "non-integer HU" in s["reason"]]
    assert "'PRE LIVER'" in entry["input"]
    saved = (dest / "livercube-report.json").read_text().lower()
    assert all(w not in saved for w in _name_words(DESCRIPTOR_NAMES["SeriesDescription"]))
