"""Clean Descriptors: the stored form of free-text DICOM descriptions (pure functions).

The real descriptions below are every SeriesDescription and StudyDescription of HCC-TACE-Seg
and Colorectal-Liver-Metastases in the Imaging Data Commons index (v25): protocol text that
must survive cleaning unchanged, so that the catalog still says what each series is.
"""

from __future__ import annotations

import pickle

import pytest

from livercube.sources import deid
from livercube.sources.deid import (
    REMOVED,
    Descriptors,
    clean_attrs,
    clean_description,
    clean_segment_item,
    removed_words,
)
from livercube.sources.dicom_phase import describe

#: Every SeriesDescription of both collections (IDC v25).
SERIES_DESCRIPTIONS = (
    '2.5 SOFT',
    '2.5 STANDARD',
    '3 PHASE LIVER (ABD)',
    'ABD',
    'ABDOMEN/PELVIS',
    'AIMI liver-tumor AI segmentation',
    'AIMI liver-tumor radiologist 7 corrected segmentation',
    'ARTERIAL',
    'Abdomen',
    'Abdomen 5.0 B40s',
    'Abdomen 5/7.5/5',
    'Bind(17095/4/277..465)',
    'Bind(18383/5/190..403)',
    'Bind(18821/4/252..475)',
    'Bind(19210/4/130..266)',
    'Bind(19571/5/159..254)',
    'Bind(20696/3/277..526)',
    'Bind(21762/4/271..512)',
    'Bind(21866/4/41..131)',
    'Bind(2286/5/296..561)',
    'Bind(2451/4/171..390)',
    'Bind(2461/5/277..520)',
    'Bind(2464/4/277..514)',
    'Bind(2895/4/246..509)',
    'Bind(4126/4/314..545)',
    'Bind(5683/4/214..434)',
    'Bind(5721/4/233..483)',
    'C-A-P',
    'CH/ABD/PEL 5X5',
    'CHEST/ABDOMEN/PELVIS',
    'CT AB/PEL',
    'CT ABDOMEN',
    'CT ABDOMEN/PELVIS',
    'CT CAP W/CONTRAST',
    'CT CH/AB/PEL',
    'CT CHEST/ABD',
    'Chest/Abdomen/Pelvis',
    'LIVER 2 PHASE (AP)',
    'LIVER 2 PHASE (C/A/P)',
    'LIVER 2PHASE CAP',
    'LIVER 3 PHASE (AP)',
    'LIVER 3 PHASE (C/A/P)',
    'POST CON',
    'PRE',
    'PRE CONTRAST',
    'PRE LIVER',
    'Recon 2: 2 PHASE LIVER (ABD)',
    'Recon 2: 3 PHASE LIVER (ABD)',
    'Recon 2: LIVER  2PHASE WITH CON',
    'Recon 2: LIVER 2 PHASE (AP)',
    'Recon 2: LIVER 2 PHASE (C/A/P)',
    'Recon 2: LIVER 2 PHASE WITH CON',
    'Recon 2: LIVER 2PHASE CAP',
    'Recon 2: LIVER 3 PHASE (AP)',
    'Recon 2: LIVER 3 PHASE (C/A)',
    'Recon 2: LIVER 3 PHASE (C/A/P)',
    'Recon 2: LIVER 3 PHASE A/P',
    'Recon 2: PRE',
    'Recon 2: PRE LIVER',
    'Recon 3: 2 PHASE LIVER (ABD)',
    'Recon 3: 3 PHASE LIVER (ABD)',
    'Recon 3: LIVER  2PHASE WITH CON',
    'Recon 3: LIVER 2 PHASE (AP)',
    'Recon 3: LIVER 2 PHASE (C/A/P)',
    'Recon 3: LIVER 2 PHASE WITH CON',
    'Recon 3: LIVER 2PHASE CAP',
    'Recon 3: LIVER 3 PHASE (AP)',
    'Recon 3: LIVER 3 PHASE (C/A)',
    'Recon 3: LIVER 3 PHASE (C/A/P)',
    'Recon 3: PRE LIVER',
    'Segmentation',
    'VENOUS',
)
#: Every StudyDescription of both collections (IDC v25).
STUDY_DESCRIPTIONS = (
    'A/P - LIVER',
    'A/P -LIVER',
    'A/P LIVER',
    'A/P LIVER PROTOCOL',
    'A/P LIVER PRT W/WO',
    'A/P LIVER W/WO',
    'A/P-LIVER',
    'AA/P LIVER',
    'AABD/PELVIS',
    'ABD LIVER PROTOCOL',
    'ABD PEL LIVER',
    'ABD/PEL  LIVER',
    'ABD/PEL (LIVER)',
    'ABD/PEL LIVER PROTOCOL',
    'ABD/PEL W/C',
    'ABD/PELVIS',
    'ABD/PELVIS/  LIVER',
    'ABDOMEN LIVER PROTOCOL',
    'C-A-P/ LIVER PROTOCOL',
    'C/A/P LIVER',
    'C/A/P LIVER PROTOCOL',
    'CAP',
    'CAP (LIVER)',
    'CAP -LIVER',
    'CAP LIVER',
    'CAP LIVER W/WO',
    'CAP/LIVER',
    'CAP/LIVER W.WO',
    'CCT, AP LIVER',
    'CCT- ABD [LIVER]',
    'CH/ABD/PELVIS',
    'CHEST ABD LIVER PROTOC',
    'CHEST/ABD/PEL',
    'CHEST/ABD/PEL (LIVER)',
    'CHEST/ABD/PELVIS',
    'CHEST/ABDOMEN',
    'CT  ABD/PEL  LIVER',
    'CT  C/A/P  LIVER',
    'CT A-P LIVER',
    'CT A/P',
    'CT A/P  LIVER',
    'CT A/P (LIVER) W/WO',
    'CT A/P LIVER',
    'CT A/P LIVER PR.',
    'CT A/P LIVER PROT',
    'CT AB/PEL W/ CONTRAST',
    'CT AB/PEL WITH LIVER TRIPHASIC',
    'CT ABD & PELVIS W/O &',
    'CT ABD (LIVER)',
    'CT ABD LIV PRO',
    'CT ABD LIVER',
    'CT ABD LIVER PR.',
    'CT ABD/PEL',
    'CT ABD/PEL  LIVER',
    'CT ABD/PEL (LIVER PRO)',
    'CT ABD/PEL (LIVER)',
    'CT ABD/PEL LIV',
    'CT ABD/PEL W/WO LIVER',
    'CT ABD/PELVIS LIVER PR',
    'CT ABD/PELVIS WO/W',
    'CT ABD/PELVIS(LIVER)',
    'CT ABDOMEN (LIVER)',
    'CT ABDOMEN W/ CONTRAST',
    'CT ANGIO ABD WITH CH AND PEL',
    'CT ANGIO ABD WITH PEL',
    'CT ANGIO ABDOMEN W & W/O CONT',
    'CT ANGIO LIVER WITH CH',
    'CT ANGIO LIVER WITH CH/PEL',
    'CT ANGIO LIVER WITH PEL',
    'CT C/A LIVER PROT',
    'CT C/A/P',
    'CT C/A/P LIVER',
    'CT C/A/P LIVER PR',
    'CT C/A/P LIVER PR.',
    'CT C/A/P LIVER PROT',
    'CT C/A/P(LIVER)',
    'CT CAP',
    'CT CAP (LIV)',
    'CT CAP LI VER',
    'CT CAP LIV PRO',
    'CT CAP LIVER',
    'CT CAP LIVER PR.',
    'CT CAP LIVER PROT',
    'CT CAP LIVER PROT.',
    'CT CAP LIVER PROTO',
    'CT CAP ROUTINE',
    'CT CAP W/WO',
    'CT CAP WO/W',
    'CT CBD/PEL LIV',
    'CT CH-ABD-PEL (LIVER)',
    'CT CH/AB W/ CONTRAST',
    'CT CH/AB/PEL WITH LIVER TRIPHASIC',
    'CT CH/AB/PEL-LIVER',
    'CT CH/ABD  LIVER',
    'CT CH/ABD LIVER PROTO',
    'CT CH/ABD/PEL   LIVER',
    'CT CH/ABD/PEL  LIVER',
    'CT CH/ABD/PEL (LIVER)',
    'CT CH/ABD/PEL W/ CONTRAST',
    'CT CH/ABD/PEL(LIVER)',
    'CT CHEST ABD PEL. LIVE',
    'CT CHEST/AB/PEL (LIVER',
    'CT CHEST/ABD (LIVER)',
    'CT CHEST/ABD/PEL LIVER',
    'CT CHEST/ABD/PELVIS',
    'CT LIVER CAP',
    'CT THORAX W/CONTRAST',
    'CT, ABD/PEL W/C',
    'CT, ABDOMEN W&W/O CONT',
    'CT,ABD (LIVER)',
    'CT,ABD/PEL LIVER W/C',
    'CT-A/P  LIVER PROTOCOL',
    'CT-A/P LIVER PROTOCOL',
    'CT-ABD W/WO CON (LIVER',
    'CT-C/A/P W/WO CON',
    'CT/C-A-P/ LIVER',
    'FORFILE CT ABD AND/OR PEL - CD',
    'L I V E R',
    'LIVER// C A P',
    'LIVER//CHEST',
    'LIVER/C A  P',
    'LIVER/C A P',
    'LIVER/C AP',
    'LIVER/PELVIS',
    'OSF CT ABDOMEN',
    'P/P A/P',
    'P/P C/A',
    'P/P C/A/P W/LIVER PRO',
    'P/P C/A/P,LIVER PROTO.',
    'T/A/P LIVER W/C',
    'T/A/P W/C',
    'T/A/P W/C LIVER',
    'TAP LIVER W/C',
    'TAP W/C',
    'abd/pelvis',
)

#: The only real descriptions cleaning changes: words outside the protocol vocabulary (an
#: institution-like prefix, a filing note) go.
CHANGED_STUDY_DESCRIPTIONS = {
    "FORFILE CT ABD AND/OR PEL - CD": "CT ABD AND/OR PEL - CD",
    "OSF CT ABDOMEN": "CT ABDOMEN",
}


def test_every_real_series_description_survives_verbatim():
    changed = {d: clean_description(d) for d in SERIES_DESCRIPTIONS if clean_description(d) != d}
    assert changed == {}
    assert clean_description("Recon 2: LIVER  2PHASE WITH CON") == "Recon 2: LIVER  2PHASE WITH CON"


def test_real_study_descriptions_survive_but_for_unknown_words():
    changed = {d: clean_description(d) for d in STUDY_DESCRIPTIONS if clean_description(d) != d}
    assert changed == CHANGED_STUDY_DESCRIPTIONS


@pytest.mark.parametrize(
    ("raw", "stored"),
    [
        ("PRE LIVER John Smith", "PRE LIVER"),
        ("Recon 2: LIVER 3 PHASE (AP) - Dr. Welby", "Recon 2: LIVER 3 PHASE (AP)"),
        ("VENOUS (Jane Doe)", "VENOUS"),
        ("CT A/P LIVER MRN 12345678", "CT A/P LIVER"),
        ("PRE LIVER DOB 3/14/1950", "PRE LIVER"),
        ("ARTERIAL 1950-03-14", "ARTERIAL"),
        ("ARTERIAL 14.03.1950 Muller", "ARTERIAL"),
        ("Isovue-370 Ratched", "Isovue-370"),
        ("DOE^JANE", ""),
        ("CT CAP 5551234567", "CT CAP"),
    ],
)
def test_names_numbers_and_dates_are_removed(raw, stored):
    assert clean_description(raw) == stored
    assert describe(clean_description(raw)).phases == describe(raw).phases


@pytest.mark.parametrize(
    "text",
    [
        "OMNIPAQUE 350",
        "Visipaque 320",
        "Isovue-370",
        "iohexol 300 mgI/mL",
        "IODIXANOL",
        "iopamidol 100 ML IV",
        "ORAL & IV",
        "Abdomen 5.0 B40s",
        "2.5 SOFT",
        "B30f",
        "Bind(17095/4/277..465)",
        "Abdomen 5/7.5/5",
    ],
)
def test_agents_kernels_units_and_numbers_are_kept(text):
    assert clean_description(text) == text


def test_every_phase_keyword_survives_cleaning():
    from livercube.sources.dicom_phase import _KEYWORDS

    for words in _KEYWORDS.values():
        for kw in words:
            assert clean_description(f"CT {kw} LIVER") == f"CT {kw} LIVER"


def test_phase_facts_of_real_descriptions_unchanged_with_a_name_added():
    for d in SERIES_DESCRIPTIONS:
        planted = f"{d} Quentin Blakeworth"
        assert clean_description(planted) == d
        assert describe(clean_description(planted)) == describe(d)


def test_removed_words_and_empty_values():
    assert removed_words("PRE LIVER John Smith 12345678") == {"John", "Smith", "12345678"}
    assert removed_words("Recon 2: LIVER 3 PHASE (AP)") == set()
    assert clean_description("") == "" and clean_description(None) == ""


def test_clean_attrs_cleans_only_descriptors():
    attrs = {
        "series_description": "PRE LIVER John Smith",
        "StudyDescription": "CT ABD Dr Who",
        "ContrastBolusAgent": ["OMNIPAQUE 350", "Nurse Ratched"],
        "Manufacturer": "GE MEDICAL SYSTEMS",
        "SliceThickness": 2.5,
    }
    out = clean_attrs(attrs)
    assert out == {
        "series_description": "PRE LIVER",
        "StudyDescription": "CT ABD",
        "ContrastBolusAgent": ["OMNIPAQUE 350", ""],
        "Manufacturer": "GE MEDICAL SYSTEMS",  # not a descriptor: kept as written
        "SliceThickness": 2.5,
    }
    assert attrs["series_description"] == "PRE LIVER John Smith"  # a copy


def test_descriptors_scrub_quoted_descriptions_and_folder_names():
    raw = "PRE LIVER John Smith"
    d = Descriptors.collect(["Recon 2: LIVER 3 PHASE (AP)", raw, None, "", "OMNIPAQUE 350"])
    assert d.mode == deid.CLEANED and d.words == {"John", "Smith"}
    evidence = f"description:PRE: SeriesDescription {raw!r} contains 'PRE'"
    assert d.scrub(evidence) == "description:PRE: SeriesDescription 'PRE LIVER' contains 'PRE'"
    # TCIA folder names are descriptions with / , ( ) & : removed; case does not matter
    path = "HCC_001/11-30-1999-NA-CT/2.000000-PRE LIVER JOHN smith-39450/1-01.dcm: not DICOM"
    assert d.scrub(path) == (
        f"HCC_001/11-30-1999-NA-CT/2.000000-PRE LIVER {REMOVED} {REMOVED}-39450/1-01.dcm: "
        "not DICOM"
    )
    assert d.scrub("Johnson's series") == "Johnson's series"  # whole words only
    assert d.scrub_record({"input": f"x/{raw}", "n": 3}) == {"input": "x/PRE LIVER", "n": 3}
    assert d.clean(raw) == "PRE LIVER"
    assert d.summary()["descriptions"] == "cleaned"
    assert pickle.loads(pickle.dumps(d)) == d  # travels with every volume task


def test_keep_mode_changes_nothing():
    raw = "PRE LIVER John Smith"
    d = Descriptors.collect([raw], keep=True)
    assert d.mode == deid.KEPT
    assert d.clean(raw) == raw and d.scrub(f"'{raw}'") == f"'{raw}'"
    assert d.clean_attrs({"series_description": raw}) == {"series_description": raw}
    assert d.summary()["descriptions"] == "kept"


def test_segment_item_keeps_codes_drops_private_and_unexpected():
    item = {
        "SegmentNumber": 1,
        "SegmentLabel": "Liver",
        "SegmentDescription": "Liver Quentin Blakeworth",
        "SegmentAlgorithmType": "MANUAL",
        "SegmentedPropertyTypeCodeSequence": [
            {
                "scheme": "SCT",
                "value": "10200004",
                "meaning": "Liver",
                "(0013,1001)": "private in a code item",
                "SegmentedPropertyTypeModifierCodeSequence": [
                    {"scheme": "SCT", "value": "7771000", "meaning": "Left"}
                ],
            }
        ],
        "(0011,0010)": "LIVERCUBE PHI TEST",
        "(0011,1001)": "QX01PHIZK",
        "ReferencedPatientSequence": [{"PatientName": "DOE^JANE"}],
    }
    out = clean_segment_item(item)
    assert out == {
        "SegmentNumber": 1,
        "SegmentLabel": "Liver",
        "SegmentDescription": "Liver",
        "SegmentAlgorithmType": "MANUAL",
        "SegmentedPropertyTypeCodeSequence": [
            {
                "scheme": "SCT",
                "value": "10200004",
                "meaning": "Liver",
                "SegmentedPropertyTypeModifierCodeSequence": [
                    {"scheme": "SCT", "value": "7771000", "meaning": "Left"}
                ],
            }
        ],
    }
    kept = clean_segment_item(item, keep_descriptions=True)
    assert kept["SegmentDescription"] == item["SegmentDescription"]
    assert "(0011,1001)" not in kept and "ReferencedPatientSequence" not in kept
