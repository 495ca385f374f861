"""Free-text DICOM descriptors, cleaned before they are stored (DICOM PS3.15 Clean Descriptors).

DICOM PS3.15's Basic Application Level Confidentiality Profile removes identifying attributes;
its *Clean Descriptors Option* keeps descriptive free text (Study/Series Description, Contrast
Bolus Agent, …) only after removing whatever could identify a person.  Scanners' descriptions
are mostly protocol vocabulary ("Recon 2: LIVER 3 PHASE (AP)", "CT C/A/P LIVER PROT",
"OMNIPAQUE 350"), but technologists type into them, and a name, a record number or a birth
date typed there would otherwise reach the catalog of a public store.

The rule (pure, deterministic, the same on every machine):

1. The text is split into words (runs of letters), numbers (runs of digits, with one decimal
   part) and everything else (spaces, ``/ - ( ) : . , &``), so "2PHASE" is "2" + "PHASE" and
   the kernel "B40s" is "B" + "40" + "s".
2. A word is kept when it is in :data:`VOCABULARY` (case-insensitive: phase words — every
   keyword :mod:`livercube.sources.dicom_phase` classifies by — body parts, protocol and
   reconstruction words, kernels, units, known contrast agents) or is a single letter
   (anatomy codes "C/A/P", kernels, "W/WO"; one letter identifies no one).
3. A number is kept unless it has more than :data:`MAX_DIGITS` digits (record, phone and
   accession numbers, compact dates); date-like runs ("3/14/1950", "1950-03-14", "14.03.1950")
   are removed whole.
4. Everything else is removed.  A text from which nothing was removed is returned verbatim
   (double spaces included); otherwise the removal points are tidied (no spaces pile up
   where a word went, emptied brackets are dropped, separators left dangling at either end
   are stripped).

Phase classification keeps using the raw text in memory; only what is stored is cleaned.
``convert --keep-descriptions`` turns the cleaning off for sources that are already
de-identified (the public TCIA/IDC releases are); the volume attributes and the conversion
report record which mode was used.

Cleaning a description is not enough where the raw text is quoted elsewhere (phase evidence,
notes, TCIA folder names built from the descriptions): :class:`Descriptors` also rewrites those
strings, replacing each raw description by its cleaned form and every removed word by
:data:`REMOVED`.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from livercube.sources.dicom_phase import _KEYWORDS as _PHASE_KEYWORDS

#: Mode names recorded in volume attributes and in the conversion report.
CLEANED, KEPT = "cleaned", "kept"

RULE = (
    "DICOM PS3.15 Basic Profile with Clean Descriptors Option: free-text descriptors keep "
    "only protocol vocabulary, single letters and numbers of at most 5 digits "
    "(livercube.sources.deid)"
)

#: Stand-in for a removed word where a raw description is quoted inside a longer message.
REMOVED = "[removed]"

#: Numbers with more digits than this are removed (MRNs, phone numbers, YYYYMMDD dates); GE's
#: ``Bind(17095/4/277..465)`` bookkeeping numbers have at most 5.
MAX_DIGITS = 5

#: DICOM attributes holding free-text descriptors (PS3.15 Table E.1-1, action "C" under the
#: Clean Descriptors Option), as keywords and as the snake_case keys livercube stores them under.
DESCRIPTOR_ATTRIBUTES: frozenset[str] = frozenset(
    {
        "StudyDescription",
        "SeriesDescription",
        "ContrastBolusAgent",
        "ContrastBolusRoute",
        "ProtocolName",
        "ImageComments",
        "AcquisitionComments",
        "DerivationDescription",
        "PerformedProcedureStepDescription",
        "RequestedProcedureDescription",
        "ContentDescription",
        "ContentLabel",
        "SegmentDescription",
        "TrackingID",
        "study_description",
        "series_description",
    }
)

_PROTOCOL_WORDS = """
    ABD ABDO ABDOMEN ABDOMINAL ABDPEL AB AABD AA ADRENAL AORTA AORTIC BILIARY BODY CHEST CH
    CAP TAP CBD HEAD NECK LUNG LUNGS KIDNEY KIDNEYS RENAL PANCREAS PANCREATIC SPLEEN
    LIVER LIV LIVE LI VER HEPATIC HEPAR PELVIS PELVIC PEL PELV THORAX THOR THORACIC WHOLE
    AP PA LAT CD UPPER LOWER ANGIO CTA CT CCT MR MRI PET TRIPLE DUAL SINGLE
    PHASE PHASES PHASIC BIPHASIC TRIPHASIC MULTIPHASE MULTI POST PRE CON CONT CONTRAST
    WITH WITHOUT W WO AND OR OF TO IN ON AT BY FOR NO YES NONE APPLIED ENH ENHANCED
    RECON RECONS RECONSTRUCTION PROTOCOL PROTOC PROTO PROT PRO PRT PR ROUTINE STANDARD STD
    STND SOFT TISSUE BONE SHARP SMOOTH DETAIL FINE ULTRA HIGH LOW RES RESOLUTION
    AXIAL AX AXL COR CORONAL SAG SAGITTAL OBL OBLIQUE MPR MIP MINIP VR RENDER THIN THICK
    SLICE SLICES HELICAL HELIX SPIRAL SEQ SEQUENCE SCOUT TOPO TOPOGRAM LOCALIZER LOCALISER
    SURVIEW SMARTPREP BOLUS TRACKING TRACKER MONITOR MONITORING TEST TIMING DOSE REPORT
    INFO SCREEN SAVE SERIES STUDY EXAM SCAN IMAGE IMAGES VOLUME VOL REFORMAT REFORMATS
    SEGMENTATION SEG AI AIMI TUMOR TUMOUR MASS LESION RADIOLOGIST CORRECTED MANUAL
    BIND IV ORAL RECTAL IODINE IODINATED NONIONIC AGENT
    IR IDOSE ASIR ASIRV SAFIRE ADMIRE IMR AIDR FBP KERNEL KERN FC BR HR BL QR UB YA YB YC
    MM CM ML CC MG MGI KV KVP MA MAS SEC S MIN SECOND SECONDS
    OMNIPAQUE OMNI VISIPAQUE ISOVUE IOHEXOL IODIXANOL IOPAMIDOL IOPROMIDE ULTRAVIST OPTIRAY
    IOVERSOL OXILAN IOXILAN IOMERON IOMEPROL HEXABRIX CONRAY GASTROGRAFIN READICAT BARIUM
    XENETIX IOBITRIDOL
"""

#: Words kept in cleaned descriptors (upper case).  The phase classifier's keywords are part
#: of it by construction, so a cleaned description never loses a phase word.
VOCABULARY: frozenset[str] = frozenset(
    set(_PROTOCOL_WORDS.split())
    | {w for kws in _PHASE_KEYWORDS.values() for kw in kws for w in kw.split()}
)

_TOKEN = re.compile(r"[A-Za-z]+|\d+(?:\.\d+)?|[^A-Za-z\d]+")
_DATE = re.compile(
    r"(?<!\d)(\d{1,2}[/.-]\d{1,2}[/.-]\d{2,4}|\d{4}[/.-]\d{1,2}[/.-]\d{1,2})(?![\d.]*\d)"
)
_DANGLING = " \t-_,;:/&.|^"


def _kept(token: str) -> bool:
    if token[0].isalpha():
        return len(token) == 1 or token.upper() in VOCABULARY
    if token[0].isdigit():
        return len(token.split(".")[0]) <= MAX_DIGITS
    return True  # separators


def _pieces(text: str) -> list[tuple[str, bool]]:
    """(piece, kept) for every piece of ``text``; dates are one removed piece."""
    out: list[tuple[str, bool]] = []
    pos = 0
    for m in _DATE.finditer(text):
        out += [(t, _kept(t)) for t in _TOKEN.findall(text[pos : m.start()])]
        out.append((m.group(0), False))
        pos = m.end()
    out += [(t, _kept(t)) for t in _TOKEN.findall(text[pos:])]
    return out


def clean_description(text: str | None) -> str:
    """The stored form of one free-text descriptor (see the module docstring for the rule)."""
    if not text:
        return text or ""
    pieces = _pieces(text)
    if all(k for _, k in pieces):
        return text
    out = ""
    gap = False  # a piece was just removed: do not let spaces pile up at that point
    for piece, kept in pieces:
        if not kept:
            gap = True
            continue
        if gap and out[-1:].isspace():
            piece = piece.lstrip()
        out += piece
        gap = False
    out = re.sub(r"\s*(\(\s*\)|\[\s*\])", "", out)  # brackets emptied by the removal
    return out.strip(_DANGLING)


def removed_words(text: str | None) -> set[str]:
    """The words and numbers :func:`clean_description` removes from ``text``."""
    return {p for p, k in _pieces(text or "") if not k}


def clean_value(value: Any) -> Any:
    """:func:`clean_description` applied to a str or to each str of a list (DICOM VM > 1)."""
    if isinstance(value, str):
        return clean_description(value)
    if isinstance(value, list):
        return [clean_value(v) for v in value]
    return value


def clean_attrs(attrs: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``attrs`` with each descriptor (:data:`DESCRIPTOR_ATTRIBUTES`) cleaned."""
    return {k: clean_value(v) if k in DESCRIPTOR_ATTRIBUTES else v for k, v in attrs.items()}


#: Keys of a DICOM-SEG SegmentSequence item (as copied into a segment's ``codes``) that are
#: stored; anything else — private tags, unexpected nested sequences — is not.
SEGMENT_ITEM_KEYS: frozenset[str] = frozenset(
    {
        "SegmentNumber",
        "SegmentLabel",
        "SegmentDescription",
        "SegmentAlgorithmType",
        "SegmentAlgorithmName",
        "SegmentedPropertyCategoryCodeSequence",
        "SegmentedPropertyTypeCodeSequence",
        "SegmentedPropertyTypeModifierCodeSequence",
        "AnatomicRegionSequence",
        "AnatomicRegionModifierSequence",
        "PrimaryAnatomicStructureSequence",
        "RecommendedDisplayCIELabValue",
        "RecommendedDisplayGrayscaleValue",
        "TrackingID",
        "TrackingUID",
        "AlgorithmIdentificationSequence",
        "AlgorithmFamilyCodeSequence",
        "AlgorithmNameCodeSequence",
        "AlgorithmName",
        "AlgorithmVersion",
        "AlgorithmSource",
    }
)
#: Keys of a coded concept as the SEG reader writes it.
_CODE_KEYS = frozenset({"scheme", "value", "meaning", "version"})


def clean_segment_item(item: dict[str, Any], keep_descriptions: bool = False) -> dict[str, Any]:
    """Allow-listed copy of a segment's source item: coded concepts and algorithm identity."""
    is_code = "scheme" in item and "value" in item
    out: dict[str, Any] = {}
    for key, value in item.items():
        if is_code and key in _CODE_KEYS:
            out[key] = value
        elif key not in SEGMENT_ITEM_KEYS:
            continue
        elif isinstance(value, list) and all(isinstance(v, dict) for v in value):
            out[key] = [clean_segment_item(v, keep_descriptions) for v in value]
        elif key in DESCRIPTOR_ATTRIBUTES and not keep_descriptions:
            out[key] = clean_value(value)
        else:
            out[key] = value
    return out


@dataclass(frozen=True)
class Descriptors:
    """How one conversion run stores descriptors: cleaned (default) or kept verbatim.

    Built at planning time from every raw descriptor of the run (:meth:`collect`), so that
    messages quoting a raw description — phase evidence, notes, skipped inputs, TCIA folder
    names made from descriptions — can be rewritten with :meth:`scrub`.  Small and picklable:
    it travels with every volume task.
    """

    keep: bool = False
    texts: tuple[tuple[str, str], ...] = ()  # (raw, cleaned), longest raw first
    words: frozenset[str] = field(default_factory=frozenset)  # removed anywhere in the run

    @classmethod
    def collect(cls, raw_texts: Iterable[str | None], *, keep: bool = False) -> Descriptors:
        if keep:
            return cls(keep=True)
        pairs: dict[str, str] = {}
        words: set[str] = set()
        for raw in raw_texts:
            if not raw or raw in pairs:
                continue
            cleaned = clean_description(raw)
            if cleaned != raw:
                pairs[raw] = cleaned
                words |= removed_words(raw)
        texts = tuple(sorted(pairs.items(), key=lambda kv: -len(kv[0])))
        return cls(keep=False, texts=texts, words=frozenset(words))

    @property
    def mode(self) -> str:
        return KEPT if self.keep else CLEANED

    def clean(self, value: Any) -> Any:
        return value if self.keep else clean_value(value)

    def clean_attrs(self, attrs: dict[str, Any]) -> dict[str, Any]:
        return dict(attrs) if self.keep else clean_attrs(attrs)

    def scrub(self, message: str) -> str:
        """``message`` with raw descriptions replaced by their cleaned form, removed words by
        :data:`REMOVED` (whole words, case-insensitive)."""
        if self.keep or not message or not self.words:
            return message
        for raw, cleaned in self.texts:
            message = message.replace(raw, cleaned)
        pattern = _words_pattern(self.words)
        return pattern.sub(REMOVED, message)

    def scrub_record(self, record: dict[str, Any]) -> dict[str, Any]:
        """A report record (``input``/``reason`` …) with every string value scrubbed."""
        return {k: self.scrub(v) if isinstance(v, str) else v for k, v in record.items()}

    def summary(self) -> dict[str, Any]:
        """What the volume attributes and the report record about the mode."""
        if self.keep:
            return {
                "descriptions": KEPT,
                "rule": "stored verbatim (--keep-descriptions: source declared de-identified)",
            }
        return {"descriptions": CLEANED, "rule": RULE}


@functools.lru_cache(maxsize=8)
def _words_pattern(words: frozenset[str]) -> re.Pattern[str]:
    alternatives = sorted((re.escape(w) for w in words), key=len, reverse=True)
    return re.compile(
        r"(?<![A-Za-z0-9])(?:" + "|".join(alternatives) + r")(?![A-Za-z0-9])", re.IGNORECASE
    )


__all__ = [
    "CLEANED",
    "DESCRIPTOR_ATTRIBUTES",
    "KEPT",
    "REMOVED",
    "RULE",
    "SEGMENT_ITEM_KEYS",
    "VOCABULARY",
    "Descriptors",
    "clean_attrs",
    "clean_description",
    "clean_segment_item",
    "clean_value",
    "removed_words",
]
