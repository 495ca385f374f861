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
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest

import livercube
from livercube.convert import convert
from livercube.store.publish import publish
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


def _marker(i: int) -> str:
    return f"QX{i:02d}PHIZK"  # unique, fits SH (16 chars), never appears by chance


def _stuff(path: Path, markers: dict[str, str]) -> None:
    ds = pydicom.dcmread(path)
    for keyword, vr in EXTRA_PHI.items():
        m = markers[keyword]
        value = {"PN": f"{m}FAM^{m}GIV", "TM": "101112.131415"}.get(vr, m)
        if keyword == "OtherPatientIDs":  # keep the generator's MRN, add ours (VM 1-n)
            value = [str(ds.get("OtherPatientIDs", "")), m]
        setattr(ds, keyword, value)
    ds.save_as(path)


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


@pytest.fixture(scope="module")
def phi_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("phi") / "HCC-TACE-Seg"
    truth = write_hcc_tace_seg(root, n_patients=2, size="tiny")
    markers = {k: _marker(i) for i, k in enumerate(EXTRA_PHI)}
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
    # the stuffed values really are in the sources (the scan below is not vacuous)
    sample = pydicom.dcmread(files[0])
    assert str(sample.OperatorsName).startswith(markers["OperatorsName"])
    assert markers["OtherPatientIDs"] in list(sample.OtherPatientIDs)
    assert str(sample.PatientName) in {p["PatientName"] for p in truth.phi.values()}
    needles["extra birth date"] = _variants(EXTRA_DATE[1])

    dest = tmp_path_factory.mktemp("phistore") / "store.zarr"
    report = convert(str(root), str(dest), "hcc-tace-seg", progress=False)
    assert report.exit_code == 0, report.summary()
    publish(str(dest))
    return dest, needles, truth


def _store_texts(dest: Path) -> dict[str, bytes]:
    """Every file of the store as bytes, plus decoded views of compressed content."""
    texts = {str(p.relative_to(dest)): p.read_bytes() for p in dest.rglob("*") if p.is_file()}
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


def test_no_phi_anywhere_in_the_store(phi_store):
    dest, needles, _ = phi_store
    texts = _store_texts(dest)
    assert "README.md" in texts and "livercube-report.json" in texts
    assert len(texts) > 100
    checked = {k: v for k, v in needles.items() if k not in KNOWN_LEAKS}
    leaks = _leaks(texts, checked)
    assert not leaks, "\n".join(leaks)


def test_seg_content_creator_name_is_not_kept(phi_store):
    dest, needles, _ = phi_store
    leaks = _leaks(_store_texts(dest), {k: needles[k] for k in KNOWN_LEAKS})
    assert not leaks, "\n".join(leaks)


def test_kept_pseudonymous_ids_are_found_by_the_same_scan(phi_store):
    """Positive control: PatientID and the shifted study date are kept on purpose, and the
    scan finds them, so it would find a leaked value too."""
    dest, _, truth = phi_store
    texts = _store_texts(dest)
    blob = b"\n".join(texts.values()).lower()
    for pid in truth.patient_ids:
        assert pid.lower().encode() in blob
    cat = livercube.open(str(dest)).catalog
    date = pd.Timestamp(cat["study_date"].values[0]).strftime("%Y%m%d")
    assert date.encode() in blob
