"""Contrast-phase classifier: real IDC SeriesDescriptions, acquisition order, overrides, and
every volume of the generated collections."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from livercube.errors import UsageError
from livercube.sources.dicom_phase import (
    PhaseCall,
    acquisition_key,
    apply_overrides,
    classify_study,
    describe,
    read_phase_overrides,
    unused_overrides,
)
from livercube.sources.dicom_scan import Acquisition, SliceRef, scan
from livercube.synth.dicom_collections import write_crlm, write_hcc_tace_seg

IDC_CSV = Path("/work/shared/reference/idc_series_hcc_tace_seg_crlm.csv")
AGENT = "OMNIPAQUE 350"


def acq(
    description: str,
    *,
    series: str = "1.2.3",
    index: int = 0,
    number: int | None = 1,
    time_: str = "101500",
    agent: str | None = AGENT,
    z: tuple[float, float] = (0.0, 100.0),
    study: str = "9.9",
    **attrs,
) -> Acquisition:
    if agent is not None:
        attrs["ContrastBolusAgent"] = agent
    zs = [z[0] + (z[1] - z[0]) * k / 9 for k in range(10)]
    return Acquisition(
        source="mem",
        patient_id="P",
        study_uid=study,
        study_date="20000101",
        study_description="",
        series_uid=series,
        series_number=1,
        series_description=description,
        acquisition_number=number,
        acquisition_time=time_,
        index_in_series=index,
        slices=tuple(SliceRef(f"f{k}", f"s{k}", (0.0, 0.0, zk)) for k, zk in enumerate(zs)),
        orientation=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
        pixel_spacing=(1.0, 1.0),
        rows=4,
        columns=4,
        estimated_bytes=0,
        file_bytes=0,
        attrs=attrs,
    )


def one(description: str, collection: str, **kw) -> PhaseCall:
    a = acq(description, **kw)
    return classify_study([a], collection)[acquisition_key(a)]


# (SeriesDescription as found in the IDC listing, collection, expected phase, rule prefix)
REAL_SINGLE = [
    ("PRE LIVER", "hcc-tace-seg", "non_contrast", "description:PRE"),
    ("Recon 2: PRE LIVER", "hcc-tace-seg", "non_contrast", "description:PRE"),
    ("Recon 3: PRE LIVER", "hcc-tace-seg", "non_contrast", "description:PRE"),
    ("PRE", "hcc-tace-seg", "non_contrast", "description:PRE"),
    ("Recon 2: PRE", "hcc-tace-seg", "non_contrast", "description:PRE"),
    ("PRE CONTRAST", "hcc-tace-seg", "non_contrast", "description:PRE"),
    ("ARTERIAL", "hcc-tace-seg", "arterial", "description:ARTERIAL"),
    ("VENOUS", "hcc-tace-seg", "portal_venous", "description:VENOUS"),
    # region words, never a phase ("AP" in parentheses = abdomen/pelvis, C-A-P, CAP, A/P)
    ("C-A-P", "hcc-tace-seg", "unknown", "no-evidence"),
    ("ABD", "hcc-tace-seg", "unknown", "no-evidence"),
    ("2.5 STANDARD", "hcc-tace-seg", "unknown", "no-evidence"),
    ("2.5 SOFT", "hcc-tace-seg", "unknown", "no-evidence"),
    ("", "hcc-tace-seg", "unknown", "no-evidence"),
    # a multiphase protocol name on a single acquisition: which pass is not told
    ("LIVER 3 PHASE (AP)", "hcc-tace-seg", "unknown", "description:multiphase"),
    ("Recon 3: LIVER 2 PHASE (AP)", "hcc-tace-seg", "unknown", "description:multiphase"),
    ("Recon 2: LIVER 3 PHASE A/P", "hcc-tace-seg", "unknown", "description:multiphase"),
    ("Recon 2: LIVER 2PHASE CAP", "hcc-tace-seg", "unknown", "description:multiphase"),
    ("Recon 2: LIVER  2PHASE WITH CON", "hcc-tace-seg", "unknown", "description:multiphase"),
    ("Recon 3: 3 PHASE LIVER (ABD)", "hcc-tace-seg", "unknown", "description:multiphase"),
    # CRLM: documented as one portal-venous CT per patient
    ("", "crlm", "portal_venous", "collection-default"),
    ("Bind(17095/4/277..465)", "crlm", "portal_venous", "collection-default"),
    ("Bind(21866/4/41..131)", "crlm", "portal_venous", "collection-default"),
    ("CT CH/AB/PEL", "crlm", "portal_venous", "collection-default"),
    ("CT CAP W/CONTRAST", "crlm", "portal_venous", "collection-default"),
    ("POST CON", "crlm", "portal_venous", "collection-default"),
    ("Abdomen 5.0 B40s", "crlm", "portal_venous", "collection-default"),
    ("CH/ABD/PEL 5X5", "crlm", "portal_venous", "collection-default"),
    ("CT AB/PEL", "crlm", "portal_venous", "collection-default"),
    ("Chest/Abdomen/Pelvis", "crlm", "portal_venous", "collection-default"),
    ("Abdomen 5/7.5/5", "crlm", "portal_venous", "collection-default"),
]


def test_reference_descriptions_are_real():
    with IDC_CSV.open() as f:
        real = {r["SeriesDescription"] for r in csv.DictReader(f) if r["Modality"] == "CT"}
    missing = [d for d, *_ in REAL_SINGLE if d not in real]
    assert not missing


@pytest.mark.parametrize(("description", "collection", "phase", "rule"), REAL_SINGLE)
def test_real_descriptions(description, collection, phase, rule):
    call = one(description, collection)
    assert call.phase == phase, call
    assert call.rule.startswith(rule), call
    assert call.evidence


def test_every_real_description_classifies_without_conflict():
    with IDC_CSV.open() as f:
        rows = [r for r in csv.DictReader(f) if r["Modality"] == "CT"]
    for r in rows:
        facts = describe(r["SeriesDescription"])
        assert len(facts.phases) <= 1, r["SeriesDescription"]
        collection = "crlm" if r["collection_id"].startswith("colorectal") else "hcc-tace-seg"
        assert one(r["SeriesDescription"], collection).phase in (
            "non_contrast",
            "arterial",
            "portal_venous",
            "unknown",
        )


@pytest.mark.parametrize(
    ("description", "phase"),
    [
        ("AP", "arterial"),  # outside parentheses, not a protocol name
        ("ART PHASE", "arterial"),
        ("EARLY ARTERIAL 2.5", "arterial"),
        ("PORTAL VENOUS", "portal_venous"),
        ("PV 5MM", "portal_venous"),
        ("DELAYED 3 MIN", "delayed"),
        ("EQUIL", "delayed"),
        ("LATE", "delayed"),
        ("NON-CON", "non_contrast"),
        ("NC ABD", "non_contrast"),
        ("ABD WITHOUT", "non_contrast"),
        ("ABD W/O", "non_contrast"),
        ("CT ABD W/WO", "unknown"),  # with and without: no phase
        ("CAP", "unknown"),
        ("Bind(2895/4/246..509)", "unknown"),
    ],
)
def test_keyword_vocabulary(description, phase):
    assert one(description, "other").phase == phase


def test_description_against_contrast_tag_is_noted():
    call = one("PRE LIVER", "hcc-tace-seg", agent=AGENT)
    assert call.phase == "non_contrast"
    assert "contradicts" in call.evidence


def test_crlm_phase_word_beats_default():
    assert one("ARTERIAL", "crlm").phase == "arterial"
    assert one("PRE", "crlm", agent=None).phase == "non_contrast"


def test_multi_acquisition_order_by_time_not_number():
    # numbers deliberately out of time order: time decides
    series = [
        acq("Recon 2: LIVER 3 PHASE (AP)", index=0, number=1, time_="102410"),
        acq("Recon 2: LIVER 3 PHASE (AP)", index=1, number=2, time_="101930"),
        acq("Recon 2: LIVER 3 PHASE (AP)", index=2, number=3, time_="102025"),
    ]
    calls = classify_study(series, "hcc-tace-seg")
    assert [calls[acquisition_key(a)].phase for a in series] == [
        "delayed",
        "arterial",
        "portal_venous",
    ]
    assert all(calls[acquisition_key(a)].rule == "acquisition-order" for a in series)


def test_multi_acquisition_two_and_number_fallback():
    series = [
        acq("LIVER 2 PHASE (C/A/P)", index=0, number=2, time_=""),
        acq("LIVER 2 PHASE (C/A/P)", index=1, number=1, time_=""),
    ]
    calls = classify_study(series, "hcc-tace-seg")
    assert [calls[acquisition_key(a)].phase for a in series] == ["portal_venous", "arterial"]


def test_multi_acquisition_non_contrast_first():
    series = [
        acq("LIVER 3 PHASE (AP)", index=0, number=1, time_="101200", agent=None),
        acq("LIVER 3 PHASE (AP)", index=1, number=2, time_="101930"),
        acq("LIVER 3 PHASE (AP)", index=2, number=3, time_="102025"),
        acq("LIVER 3 PHASE (AP)", index=3, number=4, time_="102410"),
    ]
    calls = classify_study(series, "hcc-tace-seg")
    assert [calls[acquisition_key(a)].phase for a in series] == [
        "non_contrast",
        "arterial",
        "portal_venous",
        "delayed",
    ]


def test_too_many_acquisitions_unknown():
    series = [acq("LIVER 3 PHASE", index=i, number=i + 1, time_=f"10{i}000") for i in range(4)]
    calls = classify_study(series, "hcc-tace-seg")
    assert {c.phase for c in calls.values()} == {"unknown"}
    assert {c.rule for c in calls.values()} == {"acquisition-order:too-many"}


def test_repeated_coverage_vs_table_segments():
    # C-A-P with two overlapping acquisitions (HCC_001-like): successive passes
    over = [
        acq("C-A-P", index=0, number=1, time_="101930", z=(0, 70)),
        acq("C-A-P", index=1, number=2, time_="102025", z=(-10, 90)),
    ]
    calls = classify_study(over, "hcc-tace-seg")
    assert [calls[acquisition_key(a)].phase for a in over] == ["arterial", "portal_venous"]
    # two table segments (chest, then abdomen) are not phases
    apart = [
        acq("C-A-P", index=0, number=1, time_="101930", z=(200, 400)),
        acq("C-A-P", index=1, number=2, time_="102025", z=(0, 190)),
    ]
    assert {c.phase for c in classify_study(apart, "hcc-tace-seg").values()} == {"unknown"}
    # CRLM keeps its documented default
    calls = classify_study(over, "crlm")
    assert {c.rule for c in calls.values()} == {"collection-default"}


def test_named_phases_assigned_in_time_order():
    series = [
        acq("PRE/ART/PV", index=0, number=1, time_="101200", agent=None),
        acq("PRE/ART/PV", index=1, number=2, time_="101930"),
        acq("PRE/ART/PV", index=2, number=3, time_="102025"),
    ]
    calls = classify_study(series, "other")
    assert [calls[acquisition_key(a)].phase for a in series] == [
        "non_contrast",
        "arterial",
        "portal_venous",
    ]
    assert one("ART/PV", "other").rule == "description:conflict"


def test_contrast_tag_absent_in_study():
    plain = acq("2.5 STANDARD", series="s1", agent=None)
    enhanced = acq("2.5 STANDARD", series="s2")
    calls = classify_study([plain, enhanced], "hcc-tace-seg")
    assert calls[acquisition_key(plain)].phase == "non_contrast"
    assert calls[acquisition_key(plain)].rule == "contrast-tag:absent"
    assert calls[acquisition_key(enhanced)].phase == "unknown"
    # an absent tag alone (nobody in the study has one) proves nothing
    assert one("2.5 STANDARD", "hcc-tace-seg", agent=None).phase == "unknown"
    assert one("", "crlm", agent="NONE").rule == "collection-default"


def test_bolus_timing():
    assert one("", "hcc-tace-seg", time_="100035", ContrastBolusStartTime="100000").phase == (
        "arterial"
    )
    assert one("", "hcc-tace-seg", time_="100110", ContrastBolusStartTime="100000").phase == (
        "portal_venous"
    )
    assert one("", "hcc-tace-seg", time_="100300", ContrastBolusStartTime="100000").phase == (
        "delayed"
    )


def test_overrides():
    series = [
        acq("LIVER 3 PHASE (AP)", series="A", index=0, number=1, time_="101930"),
        acq("LIVER 3 PHASE (AP)", series="A", index=1, number=2, time_="102025"),
        acq("", series="B", index=0, number=None),
    ]
    calls = classify_study(series, "hcc-tace-seg")
    ov = read_phase_overrides(
        "series_uid,acquisition_number,phase\nA,2,delayed\nB,,portal_venous\nZ,,arterial\n"
    )
    assert ov == {("A", 2): "delayed", ("B", None): "portal_venous", ("Z", None): "arterial"}
    new = apply_overrides(calls, series, ov)
    assert new[("A", 0)] == calls[("A", 0)]
    assert new[("A", 1)].phase == "delayed" and new[("A", 1)].rule == "override"
    assert "was portal_venous by acquisition-order" in new[("A", 1)].evidence
    assert new[("B", 0)].phase == "portal_venous"
    assert "was unknown by no-evidence" in new[("B", 0)].evidence
    assert unused_overrides(series, ov) == ["phase override for series Z matches no acquisition"]
    with pytest.raises(UsageError, match=r"ov.csv:3: phase 'venous'"):
        read_phase_overrides(
            "series_uid,acquisition_number,phase\nA,1,arterial\nA,2,venous\n", "ov.csv"
        )
    with pytest.raises(UsageError, match="header"):
        read_phase_overrides("uid,phase\nA,arterial\n")


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    # 4 patients each: every series plan of the generator appears once
    hcc = write_hcc_tace_seg(root / "hcc", n_patients=4, keep_arrays=False)
    crlm = write_crlm(root / "crlm", n_patients=4, keep_arrays=False)
    return {"hcc-tace-seg": hcc, "crlm": crlm}


@pytest.mark.parametrize("collection", ["hcc-tace-seg", "crlm"])
def test_generated_truth_reproduced(generated, collection):
    truth = generated[collection]
    result = scan(str(truth.root))
    calls = classify_study(result.acquisitions, collection)
    by_sops = {frozenset(s.sop_uid for s in a.slices): a for a in result.acquisitions}
    assert len(by_sops) == len(truth.volumes)
    for vol in truth.volumes:
        a = by_sops[frozenset(vol.sop_instance_uids)]
        call = calls[acquisition_key(a)]
        assert call.phase == vol.phase, (vol.key, vol.series_description, call)
    # one study at a time gives the same answer
    for study in {a.study_uid for a in result.acquisitions}:
        part = [a for a in result.acquisitions if a.study_uid == study]
        sub = classify_study(part, collection)
        assert all(sub[k] == calls[k] for k in sub)
