"""What the two DICOM example collections are made of: one frozen description per collection.

:mod:`livercube.synth.dicom_collections` has a single writer; everything in which HCC-TACE-Seg
and Colorectal-Liver-Metastases differ lives here as data, so a quirk of the real collection is
one field of its description, not a branch in the writer.

Quirks of the collections reproduced by these descriptions (one line each; the CT, SEG, layout
and clinical quirks are listed in :mod:`~livercube.synth.dicom_ct`,
:mod:`~livercube.synth.dicom_seg`, :mod:`~livercube.synth.dicom_layout` and
:mod:`~livercube.synth.dicom_clinical`):

* HCC: two studies per patient (pre-TACE and post-TACE 55–160 days later), 4–6 CT series each
  patient, series lists copied from real patients (HCC_001, HCC_002, HCC_017, HCC_065).
* HCC: "LIVER 3 PHASE"-style series holding 2–3 AcquisitionNumbers at identical table
  positions (HCC_002-like: 3 × N files in one folder) and a "C-A-P" series with two
  acquisitions on different z-grids (HCC_001-like).
* HCC: one series without AcquisitionNumber ("VENOUS" of patient 2, also RescaleIntercept 0).
* HCC: one series with PixelRepresentation 0 ("PRE LIVER" of patient 1).
* HCC: phases by acquisition order (arterial, portal venous, delayed); "PRE" = non-contrast.
* HCC: expert SEG (SeriesNumber 300, "Segmentation") in the earliest study only, segments
  Liver, Mass, Portal vein, Abdominal aorta (+ Necrosis for patient 1), empty frames kept,
  source slices taken alternately from the acquisitions of the multi-acquisition series.
* HCC: patient 2's expert SEG has no ReferencedSeriesSequence.
* HCC: an AI SEG (SeriesNumber 300, "AIMI liver-tumor AI segmentation", Liver + Mass, masks
  eroded/dilated by one voxel in-plane) beside the expert SEG; told apart only by description.
* HCC: PatientAge/PatientSex empty except for the GE patient (HCC_017-like).
* CRLM: one study, one portal-venous GE CT, PixelPaddingValue −2000 with a circular FOV,
  SeriesDescription empty or ``Bind(...)``, SeriesNumber 100 for one CT (same as its SEG),
  InstanceNumber starting at 45/46, SliceThickness ≠ slice spacing for patient 1; ids skip
  ``CRLM-CT-1024``.
* CRLM: SEG SeriesNumber 100 with Liver, Liver Remnant, Hepatic, Portal, Tumor_1…Tumor_k
  (k ≥ 2), empty frames omitted, overlapping tumours and an in-plane flipped SEG over an
  IOP (−1,0,0,0,−1,0) CT for patient 2 (3D Slicer's exporter does that).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from livercube.synth import dicom_clinical as clinical
from livercube.synth.dicom_ct import IOP_FLIPPED, IOP_STANDARD

HCC_COLLECTION = "HCC-TACE-Seg"
CRLM_COLLECTION = "Colorectal-Liver-Metastases"
AI_DESCRIPTION = "AIMI liver-tumor AI segmentation"
GE = "GE MEDICAL SYSTEMS"

# --------------------------------------------------------------------------- segments

#: SNOMED CT (value, meaning) of the segment property categories and types the SEGs carry.
ANATOMY = ("123037004", "Anatomical Structure")
MORPHOLOGY = ("49755003", "Morphologically Altered Structure")
LIVER = ("10200004", "Liver")
MASS = ("4147007", "Mass")
NECROSIS = ("6574001", "Necrosis")
PORTAL_VEIN = ("32764006", "Portal vein")
HEPATIC_VEIN = ("8993003", "Hepatic vein")
AORTA = ("7832008", "Abdominal aorta")
NEOPLASM = ("108369006", "Neoplasm")


@dataclass(frozen=True)
class Segment:
    """One segment of a SEG: its label, where its mask comes from, and how it is coded.

    ``mask`` names a phantom mask (``liver``, ``remnant``, ``portal_vein``…) or one of the
    derived masks: ``tumours`` (union of all tumours), ``tumour`` (one segment per tumour,
    ``label`` then holds ``{k}`` for the 1-based tumour number) or ``necrosis`` (the core of
    the first tumour).  Codes are SCT; readers must map by label (the real codes are loose).
    """

    label: str
    mask: str
    category: tuple[str, str]
    type: tuple[str, str]


@dataclass(frozen=True)
class AiSeg:
    """An AI segmentation beside the expert SEG, same SeriesNumber, told apart by description.

    ``segments`` are (expert label, ``"erode"`` | ``"dilate"``): the expert's mask eroded, or
    dilated inside the body, by one voxel in-plane (a model's boundary is never the reader's).
    Written on the portal-venous acquisition of the annotated series when there is one, empty
    frames omitted.
    """

    description: str
    series_number: int
    segments: tuple[tuple[str, str], ...]


# --------------------------------------------------------------------------- series


@dataclass(frozen=True)
class Acq:
    """One acquisition of a CT series (a phase; its own z-grid when ``centre_shift`` is set)."""

    phase: str
    number: int | None  # AcquisitionNumber; None = tag absent
    centre_shift: float = 0.0  # grid centre offset in slice spacings (fractional: other z-grid)
    nz_factor: float = 1.0
    time: str = "101500"


@dataclass(frozen=True)
class Series:
    number: int
    description: str
    acqs: tuple[Acq, ...]
    dz_factor: float = 1.0
    px_factor: float = 1.0
    pixel_representation: int = 1
    intercept: float = -1024.0
    kernel: str = "STANDARD"
    thickness_factor: float = 1.0
    orientation: tuple[float, ...] = IOP_STANDARD
    first_instance: int = 1


@dataclass(frozen=True)
class Study:
    date: str  # before the per-cycle date shift
    description: str
    series: tuple[Series, ...]


@dataclass(frozen=True)
class PatientPlan:
    """One real patient's exam list, copied by hand from the IDC series listing.

    The expert SEG annotates series ``seg_series`` of the first study and cites its
    acquisitions ``seg_acqs`` (0-based) alternately slice by slice.
    """

    like: str
    studies: tuple[Study, ...]
    seg_series: int
    seg_acqs: tuple[int, ...]
    n_tumours: int
    manufacturer: str = ""
    model: str = ""
    age: str = ""  # PatientAge in the headers ("" = empty, as in most HCC files)
    sex: str = ""
    padding: bool = False  # GE PixelPaddingValue with a circular field of view
    overlapping: bool = False  # tumours that overlap each other
    extra_segments: tuple[Segment, ...] = ()  # beyond the collection's expert segments
    referenced_series: bool = True  # False: the expert SEG lacks ReferencedSeriesSequence


# --------------------------------------------------------------------------- collection


@dataclass(frozen=True)
class CollectionSpec:
    """Everything in which one DICOM example collection differs from the other."""

    name: str
    uri: str  # "Data Description URI" of metadata.csv
    patient_id: Callable[[int], str]  # 0-based ordinal -> PatientID
    plans: tuple[PatientPlan, ...]  # cycled over patients
    date_step: tuple[int, int]  # (days, modulo): later cycles of the plans shift their dates
    anatomy_tag: str  # seeds the phantom anatomy
    tumour_kind: str  # phantom tumour tissue
    study_time: str
    expert_segments: tuple[Segment, ...]
    expert_series_number: int
    expert_omits_empty_frames: bool
    flip_seg_over_flipped_ct: bool  # the SEG exporter writes IOP (1,0,0,0,1,0) regardless
    ai_seg: AiSeg | None
    # the ``missing_slice`` defect: "<study>/<SeriesNumber>/<acquisition>" of the first patient,
    # or None for the last CT volume written; ``avoid_segmented`` picks a slice without SEG content
    missing_slice_volume: str | None
    missing_slice_avoids_segmented: bool
    clinical_rows: Callable[..., list[dict[str, Any]]]
    write_clinical: Callable[[Path, list[dict[str, Any]]], Path]
    clinical_sheet: str
    clinical_id_column: str


# --------------------------------------------------------------------------- HCC-TACE-Seg

_NC = Acq("non_contrast", 1, time="101200")
_ART = Acq("arterial", 1, time="101930")
_PV = Acq("portal_venous", 2, time="102025")
_DEL = Acq("delayed", 3, time="102410")

_HCC_PLANS: tuple[PatientPlan, ...] = (
    PatientPlan(
        like="HCC_001",
        studies=(
            Study(
                "19991130",
                "CT-C/A/P W/WO CON",
                (
                    Series(2, "PRE LIVER", (_NC,), dz_factor=2.0, pixel_representation=0),
                    Series(
                        3,
                        "C-A-P",
                        (
                            Acq("arterial", 1, centre_shift=3.0, nz_factor=0.7, time="101930"),
                            Acq("portal_venous", 2, centre_shift=-0.5, time="102025"),
                        ),
                    ),
                ),
            ),
            Study(
                "20000421",
                "CT, ABD/PEL W/C",
                (
                    Series(100, "", (Acq("unknown", 1, time="093000"),)),
                    Series(3, "Recon 2: PRE LIVER", (_NC,), kernel="SOFT"),
                ),
            ),
        ),
        seg_series=3,
        seg_acqs=(1,),
        n_tumours=2,
        extra_segments=(Segment("Necrosis", "necrosis", MORPHOLOGY, NECROSIS),),
    ),
    PatientPlan(
        like="HCC_002",
        studies=(
            Study(
                "19970926",
                "ABD/PELVIS",
                (
                    Series(2, "PRE LIVER", (_NC,), dz_factor=1.5),
                    Series(4, "Recon 2: LIVER 3 PHASE (AP)", (_ART, _PV, _DEL)),
                ),
            ),
            Study(
                "19980305",
                "ABD/PEL  LIVER",
                (
                    Series(2, "PRE LIVER", (_NC,), dz_factor=1.5),
                    Series(4, "Recon 2: LIVER 3 PHASE (AP)", (_ART, _PV)),
                    Series(
                        7, "VENOUS", (Acq("portal_venous", None, time="102030"),), intercept=0.0
                    ),
                ),
            ),
        ),
        seg_series=4,
        seg_acqs=(0, 1, 2),
        n_tumours=2,
        referenced_series=False,
    ),
    PatientPlan(
        like="HCC_017",
        studies=(
            Study(
                "19981023",
                "ABDOMEN LIVER PROTOCOL",
                (
                    Series(2, "PRE LIVER", (_NC,), dz_factor=2.0),
                    Series(4, "Recon 2: 3 PHASE LIVER (ABD)", (_ART, _PV)),
                    Series(
                        5, "Recon 3: 3 PHASE LIVER (ABD)", (_ART, _PV), dz_factor=0.8, kernel="SOFT"
                    ),
                ),
            ),
            Study(
                "19981230",
                "CT ABD/PEL  LIVER",
                (
                    Series(2, "PRE LIVER", (_NC,), dz_factor=2.0),
                    Series(4, "Recon 2: LIVER 3 PHASE (AP)", (_ART, _PV, _DEL)),
                ),
            ),
        ),
        seg_series=4,
        seg_acqs=(0, 1),
        n_tumours=1,
        manufacturer=GE,
        model="LightSpeed Plus",
        age="079Y",
        sex="F",
        padding=True,
    ),
    PatientPlan(
        like="HCC_065",
        studies=(
            Study(
                "20030426",
                "OSF CT ABDOMEN",
                (
                    Series(2, "PRE CONTRAST", (_NC,)),
                    Series(6, "ARTERIAL", (Acq("arterial", 1, time="101930"),)),
                    Series(7, "VENOUS", (Acq("portal_venous", 1, time="102025"),)),
                ),
            ),
            Study(
                "20030620",
                "CT CAP LIVER",
                (
                    Series(3, "Recon 2: PRE LIVER", (_NC,)),
                    Series(5, "Recon 2: LIVER 2 PHASE (C/A/P)", (_ART, _PV)),
                    Series(6, "Recon 3: LIVER 2 PHASE (C/A/P)", (_ART, _PV), kernel="SOFT"),
                ),
            ),
        ),
        seg_series=7,
        seg_acqs=(0,),
        n_tumours=2,
    ),
)

HCC_TACE_SEG = CollectionSpec(
    name=HCC_COLLECTION,
    uri="https://doi.org/10.7937/TCIA.5FNA-0924",
    patient_id=lambda i: f"HCC_{i + 1:03d}",
    plans=_HCC_PLANS,
    date_step=(53, 1000),
    anatomy_tag="hcc",
    tumour_kind="tumor_hcc",
    study_time="100500",
    expert_segments=(
        Segment("Liver", "liver", ANATOMY, LIVER),
        Segment("Mass", "tumours", MORPHOLOGY, MASS),
        Segment("Portal vein", "portal_vein", ANATOMY, PORTAL_VEIN),
        Segment("Abdominal aorta", "aorta", ANATOMY, AORTA),
    ),
    expert_series_number=300,
    expert_omits_empty_frames=False,
    flip_seg_over_flipped_ct=False,
    ai_seg=AiSeg(AI_DESCRIPTION, 300, (("Liver", "erode"), ("Mass", "dilate"))),
    missing_slice_volume="1/3/1",  # HCC_001's post-TACE "Recon 2: PRE LIVER"
    missing_slice_avoids_segmented=False,
    clinical_rows=clinical.hcc_rows,
    write_clinical=clinical.write_hcc_clinical,
    clinical_sheet=clinical.HCC_SHEET,
    clinical_id_column=clinical.HCC_ID,
)

# --------------------------------------------------------------------------- CRLM


def _crlm_id(i: int) -> str:
    """``CRLM-CT-1001``…; ``CRLM-CT-1024`` does not exist in the real collection."""
    n = 1001 + i
    return f"CRLM-CT-{n + 1 if n >= 1024 else n}"


def _crlm(
    like: str, date: str, description: str, series: Series, model: str, age: str, sex: str,
    n_tumours: int, overlapping: bool = False,
) -> PatientPlan:  # fmt: skip
    """One study, one portal-venous GE CT, the expert SEG on it."""
    return PatientPlan(
        like=like,
        studies=(Study(date, description, (series,)),),
        seg_series=series.number,
        seg_acqs=(0,),
        n_tumours=n_tumours,
        manufacturer=GE,
        model=model,
        age=age,
        sex=sex,
        padding=True,
        overlapping=overlapping,
    )


_CRLM_PLANS: tuple[PatientPlan, ...] = (
    _crlm(
        "CRLM-CT-1001",
        "19920606",
        "CT ANGIO ABD WITH PEL",
        Series(
            101,
            "",
            (Acq("portal_venous", 1, time="110412"),),
            thickness_factor=1.25,
            first_instance=45,
        ),
        "LightSpeed16",
        "055Y",
        "M",
        n_tumours=2,
    ),
    _crlm(
        "CRLM-CT-1002",
        "19920712",
        "CT ANGIO ABD WITH CH AND PEL",
        Series(
            100,
            "Bind(17095/4/277..465)",
            (Acq("portal_venous", 2, time="094455"),),
            orientation=IOP_FLIPPED,
        ),
        "LightSpeed16",
        "067Y",
        "F",
        n_tumours=3,
        overlapping=True,
    ),
    _crlm(
        "CRLM-CT-1003",
        "19940924",
        "CT ANGIO LIVER WITH CH/PEL",
        Series(
            105, "", (Acq("portal_venous", 1, time="132201"),), dz_factor=0.5, first_instance=46
        ),
        "LightSpeed QX/i",
        "073Y",
        "M",
        n_tumours=2,
    ),
    _crlm(
        "CRLM-CT-1004",
        "19960213",
        "CT CH/ABD/PEL W/ CONTRAST",
        Series(2, "CT CH/AB/PEL", (Acq("portal_venous", 1, time="081530"),)),
        "LightSpeed VCT",
        "061Y",
        "F",
        n_tumours=4,
    ),
)

CRLM = CollectionSpec(
    name=CRLM_COLLECTION,
    uri="https://doi.org/10.7937/QXK2-QG03",
    patient_id=_crlm_id,
    plans=_CRLM_PLANS,
    date_step=(97, 1500),
    anatomy_tag="crlm",
    tumour_kind="tumor_met",
    study_time="093000",
    expert_segments=(
        Segment("Liver", "liver", ANATOMY, LIVER),
        Segment("Liver Remnant", "remnant", ANATOMY, LIVER),
        Segment("Hepatic", "hepatic_vein", ANATOMY, HEPATIC_VEIN),
        Segment("Portal", "portal_vein", ANATOMY, PORTAL_VEIN),
        Segment("Tumor_{k}", "tumour", MORPHOLOGY, NEOPLASM),
    ),
    expert_series_number=100,
    expert_omits_empty_frames=True,
    flip_seg_over_flipped_ct=True,
    ai_seg=None,
    missing_slice_volume=None,  # the last patient's CT
    missing_slice_avoids_segmented=True,
    clinical_rows=clinical.crlm_rows,
    write_clinical=clinical.write_crlm_clinical,
    clinical_sheet=clinical.CRLM_SHEET,
    clinical_id_column=clinical.CRLM_ID,
)
