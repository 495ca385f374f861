"""Contrast phase of each CT acquisition, from DICOM headers only (deterministic, documented).

Neither collection has a phase tag.  The phase is inferred from the SeriesDescription, the
structure of the series (how many acquisitions, their order in time), the contrast tags and
what the collection is documented to contain.  Vocabulary: ``non_contrast``, ``arterial``,
``portal_venous``, ``delayed``, ``unknown``.  Every call carries a short ``rule`` id and a
human-readable ``evidence`` string; the table is also in ``schemas/phase_rules.md``.

Normalising the description (``normalise_description``)
    Upper case; a leading ``Recon n:`` is removed (a second reconstruction of the same
    acquisition); a GE ``Bind(...)`` description (a bookkeeping name of a joined series) counts
    as empty.  Text in parentheses is a *region qualifier* in these collections ("LIVER 3 PHASE
    (AP)", "(C/A/P)", "(C/A)", "(ABD)"): it is searched for full words only, never for the
    two-letter ``AP``.  Words are split at any non-alphanumeric character and between digits
    and letters ("2PHASE" -> "2 PHASE"), so "C-A-P", "C/A/P" and "A/P" give the single letters
    C, A, P — anatomy (chest-abdomen-pelvis), never a phase — and "CAP" stays one word.

Phase keywords (whole words after normalisation)
    ``non_contrast``: PRE, NC, NON CON, NONCON, NON CONTRAST, NONCONTRAST, WITHOUT, WO, W O,
    PLAIN, UNENHANCED, NATIVE (WO is ignored in "W/WO", which means with and without).
    ``arterial``: ART, ARTERIAL, ARTERIELLE, EARLY, and AP outside parentheses when the
    description is not a multiphase protocol name.
    ``portal_venous``: PV, PVP, PORTAL, VENOUS, VEN.
    ``delayed``: DELAY, DELAYED, DEL, EQUIL, EQUILIBRIUM, LATE.
    Multiphase protocol: ``<n> PHASE`` in either order ("LIVER 3 PHASE", "3 PHASE LIVER",
    "LIVER 2PHASE CAP"), BIPHASIC, TRIPHASIC, MULTIPHASE.
    Contrast without phase: POST, WITH CON, W CON, W CONTRAST, CONTRAST (not after PRE/NON).

Rules, first match wins (acquisitions of one study are classified together):

1. ``description:<KW>`` — exactly one phase named in the description: that phase, for every
   acquisition of the series.  If the description names several phases and the series holds
   exactly that many acquisitions, they are assigned in the canonical order
   (non_contrast < arterial < portal_venous < delayed) to the acquisitions in time order
   (``description:ordered``); otherwise ``unknown`` (``description:conflict``).
2. ``acquisition-order`` — a series with 2 or more acquisitions that is a multiphase protocol
   by name, or (outside CRLM) has no phase word but repeats the same anatomy (z ranges
   overlap by at least half of the shorter one): acquisitions are ordered by AcquisitionTime,
   then AcquisitionNumber, then scan order.  An earliest acquisition without
   ContrastBolusAgent while later ones have it is ``non_contrast``; the remaining
   contrast-enhanced ones are arterial, portal_venous (2) or arterial, portal_venous, delayed
   (3) — one injection, successive passes.  More than 3 enhanced acquisitions: ``unknown``
   (``acquisition-order:too-many``).
3. ``timing:bolus-delay`` — ContrastBolusStartTime and AcquisitionTime both present: delay
   < 50 s arterial, 50–120 s portal_venous, >= 150 s delayed (120–150 s stays undecided).
4. ``contrast-tag:absent`` — no ContrastBolusAgent (or "NONE"/"NO"/"N/A") while another
   acquisition of the same study has one: ``non_contrast``.  An absent tag alone is not enough
   (many scanners never fill it in).
5. ``collection-default`` — CRLM is documented as one portal-venous CT per patient:
   ``portal_venous`` when nothing above contradicts (empty, ``Bind(...)``, region-only or
   "POST CON" descriptions).
6. ``description:multiphase-single-acquisition`` — a multiphase protocol name on a series with
   one acquisition: which pass it is cannot be told, ``unknown``.
7. ``no-evidence`` — ``unknown``.

A phase keyword contradicting the contrast tag (e.g. "PRE" with ContrastBolusAgent set) keeps
the description's phase and says so in the evidence.  Manual corrections come from an
overrides CSV (:func:`read_phase_overrides`, :func:`apply_overrides`), rule ``override``.
"""

from __future__ import annotations

import csv
import io
import re
from collections import defaultdict
from dataclasses import dataclass

from livercube import registry
from livercube.errors import UsageError
from livercube.schema import PHASES
from livercube.sources.dicom_scan import Acquisition

_ORDER = {p: i for i, p in enumerate(PHASES)}

def _portal_venous_only(collection: str) -> bool:
    """Whether the collection is documented as one portal-venous CT per patient (registry)."""
    cid = registry.canonical(collection)
    return cid is not None and registry.get(cid).single_portal_venous

#: Words of a description that name each phase (the de-identification vocabulary keeps them).
PHASE_KEYWORDS: dict[str, tuple[str, ...]] = {
    "non_contrast": (
        "PRE",
        "NC",
        "NON CON",
        "NONCON",
        "NON CONTRAST",
        "NONCONTRAST",
        "WITHOUT",
        "WO",
        "W O",
        "PLAIN",
        "UNENHANCED",
        "NATIVE",
    ),
    "arterial": ("ART", "ARTERIAL", "ARTERIELLE", "EARLY"),
    "portal_venous": ("PV", "PVP", "PORTAL", "VENOUS", "VEN"),
    "delayed": ("DELAY", "DELAYED", "DEL", "EQUIL", "EQUILIBRIUM", "LATE"),
}
_MULTIPHASE = re.compile(r"\b(\d+ PHASE|PHASE \d+|BIPHASIC|TRIPHASIC|MULTIPHASE|MULTI PHASE)\b")
_CONTRAST_WORDS = re.compile(r"\b(POST|WITH CON|W CON|W CONTRAST|WITH CONTRAST|CONTRAST)\b")
_RECON_PREFIX = re.compile(r"^\s*RECON\s*\d*\s*:\s*", re.IGNORECASE)
_GE_BIND = re.compile(r"^\s*BIND\(.*\)\s*$", re.IGNORECASE)
_NO_AGENT = {"", "NONE", "NO", "N/A", "NA", "0"}



@dataclass(frozen=True)
class PhaseCall:
    """The phase of one acquisition, the rule that decided it and the evidence it used."""

    phase: str
    rule: str
    evidence: str


@dataclass(frozen=True)
class DescriptionFacts:
    """What a SeriesDescription says (see the module docstring)."""

    text: str  # normalised
    phases: tuple[tuple[str, str], ...]  # (phase, keyword) in canonical phase order
    multiphase: bool
    contrast: bool  # a contrast-enhanced word without a phase


def acquisition_key(acq: Acquisition) -> tuple[str, int]:
    """Key of an acquisition in :func:`classify_study`'s result: (series UID, index in series)."""
    return (acq.series_uid, acq.index_in_series)


def _collection_id(collection: str) -> str:
    return registry.canonical(collection) or collection.strip().lower()


def _words(text: str) -> str:
    text = re.sub(r"[^A-Z0-9]+", " ", text.upper())
    text = re.sub(r"(?<=\d)(?=[A-Z])|(?<=[A-Z])(?=\d)", " ", text)
    return " ".join(text.split())


def normalise_description(description: str) -> tuple[str, str]:
    """(main text, parenthesised text) as word strings; Recon prefix and GE Bind removed."""
    d = description or ""
    if _GE_BIND.match(d):
        return "", ""
    d = _RECON_PREFIX.sub("", d)
    inside = " ".join(re.findall(r"\(([^)]*)\)", d))
    outside = re.sub(r"\([^)]*\)", " ", d)
    return _words(outside), _words(inside)


def _has(words: str, phrase: str) -> bool:
    return re.search(rf"(?<![A-Z0-9]){re.escape(phrase)}(?![A-Z0-9])", words) is not None


def describe(description: str) -> DescriptionFacts:
    """Phase keywords, multiphase protocol name and contrast words of a SeriesDescription."""
    outside, inside = normalise_description(description)
    full = " ".join(w for w in (outside, inside) if w)
    multiphase = _MULTIPHASE.search(full) is not None
    found: dict[str, str] = {}
    with_word = _has(re.sub(r"\bW O\b", " ", full), "W") or _has(full, "WITH")
    for phase, words in PHASE_KEYWORDS.items():
        for kw in words:
            if kw in ("WO", "W O") and with_word and not _has(full, "WITHOUT"):
                continue  # "W/WO": with and without
            if _has(full, kw):
                found.setdefault(phase, kw)
                break
    if "arterial" not in found and not multiphase and _has(outside, "AP"):
        found["arterial"] = "AP"
    contrast = "non_contrast" not in found and _CONTRAST_WORDS.search(full) is not None
    phases = tuple(sorted(found.items(), key=lambda kv: _ORDER[kv[0]]))
    return DescriptionFacts(full, phases, multiphase, contrast)


def has_contrast_agent(acq: Acquisition) -> bool:
    """ContrastBolusAgent present and not a 'none' placeholder."""
    value = acq.attrs.get("ContrastBolusAgent")
    if isinstance(value, (list, tuple)):
        value = " ".join(str(v) for v in value)
    return str(value or "").strip().upper() not in _NO_AGENT


def _seconds(t: str | None) -> float | None:
    """DICOM TM (HHMMSS.ffffff, possibly shortened) -> seconds after midnight."""
    t = str(t or "").strip()
    m = re.match(r"^(\d{2})(\d{2})?(\d{2})?(\.\d+)?$", t)
    if not m:
        return None
    h, mi, s = int(m[1]), int(m[2] or 0), int(m[3] or 0)
    return h * 3600 + mi * 60 + s + float(m[4] or 0.0)


def _time_order(acqs: list[Acquisition]) -> list[Acquisition]:
    """Order by AcquisitionTime when all have one, else AcquisitionNumber, else scan order."""
    times = [_seconds(a.acquisition_time) for a in acqs]
    if all(t is not None for t in times):
        return [
            a
            for _, a in sorted(
                zip(times, acqs, strict=True),
                key=lambda p: (p[0], p[1].acquisition_number or 0, p[1].index_in_series),
            )
        ]
    if all(a.acquisition_number is not None for a in acqs):
        return sorted(acqs, key=lambda a: (a.acquisition_number, a.index_in_series))
    return sorted(acqs, key=lambda a: a.index_in_series)


def _overlapping(acqs: list[Acquisition]) -> bool:
    """Every pair of acquisitions covers at least half of the shorter one's z range."""
    ranges = []
    for a in acqs:
        off = a.offsets
        if not off:
            return False
        ranges.append((min(off), max(off)))
    for i, (lo1, hi1) in enumerate(ranges):
        for lo2, hi2 in ranges[i + 1 :]:
            shorter = min(hi1 - lo1, hi2 - lo2)
            common = min(hi1, hi2) - max(lo1, lo2)
            if shorter <= 0 or common < 0.5 * shorter:
                return False
    return True


def _bolus_delay(acq: Acquisition) -> float | None:
    start = _seconds(acq.attrs.get("ContrastBolusStartTime"))
    at = _seconds(acq.acquisition_time)
    if start is None or at is None:
        return None
    delay = at - start
    if delay < 0:
        delay += 24 * 3600  # crossed midnight
    return delay


def _desc_evidence(acq: Acquisition) -> str:
    return f"SeriesDescription {acq.series_description!r}"


def _agent_evidence(acq: Acquisition) -> str:
    value = acq.attrs.get("ContrastBolusAgent")
    return f"ContrastBolusAgent {value!r}" if has_contrast_agent(acq) else "no ContrastBolusAgent"


def _order_series(series: list[Acquisition], why: str) -> dict[tuple[str, int], PhaseCall]:
    ordered = _time_order(series)
    calls: dict[tuple[str, int], PhaseCall] = {}
    enhanced = [a for a in ordered if has_contrast_agent(a)]
    plain: list[Acquisition] = []
    if enhanced and not has_contrast_agent(ordered[0]):
        plain = [ordered[0]]
        enhanced = list(ordered[1:])
    elif not enhanced:
        enhanced = list(ordered)  # contrast not recorded: trust the protocol structure
    names = {
        1: None,
        2: ("arterial", "portal_venous"),
        3: ("arterial", "portal_venous", "delayed"),
    }.get(len(enhanced))
    order_txt = ", ".join(
        f"#{a.acquisition_number if a.acquisition_number is not None else '-'}"
        f"@{a.acquisition_time or '?'}"
        for a in ordered
    )
    base = (
        f"{_desc_evidence(series[0])}; {why}; {len(ordered)} acquisitions in time order {order_txt}"
    )
    for a in plain:
        calls[acquisition_key(a)] = PhaseCall(
            "non_contrast",
            "acquisition-order",
            f"{base}; earliest has no ContrastBolusAgent while later ones have one",
        )
    for i, a in enumerate(enhanced):
        if names is None:
            rule = "acquisition-order:too-many" if len(enhanced) > 3 else "acquisition-order"
            calls[acquisition_key(a)] = PhaseCall(
                "unknown", rule, f"{base}; {len(enhanced)} enhanced acquisitions: order undecidable"
            )
        else:
            calls[acquisition_key(a)] = PhaseCall(
                names[i],
                "acquisition-order",
                f"{base}; enhanced pass {i + 1} of {len(enhanced)} ({_agent_evidence(a)})",
            )
    return calls


def classify_study(
    acquisitions: list[Acquisition], collection: str
) -> dict[tuple[str, int], PhaseCall]:
    """Phase of every acquisition of ONE study (``acquisitions`` all share a StudyInstanceUID).

    Several studies may be passed at once; they are classified study by study.
    """
    by_study: dict[str, list[Acquisition]] = defaultdict(list)
    for a in acquisitions:
        by_study[a.study_uid].append(a)
    out: dict[tuple[str, int], PhaseCall] = {}
    for study in by_study.values():
        out.update(_classify_one_study(study, _collection_id(collection)))
    return out


def _classify_one_study(
    acquisitions: list[Acquisition], collection: str
) -> dict[tuple[str, int], PhaseCall]:
    series: dict[str, list[Acquisition]] = defaultdict(list)
    for a in acquisitions:
        series[a.series_uid].append(a)
    study_has_agent = any(has_contrast_agent(a) for a in acquisitions)
    calls: dict[tuple[str, int], PhaseCall] = {}
    for members in series.values():
        members = sorted(members, key=lambda a: a.index_in_series)
        facts = describe(members[0].series_description)
        n = len(members)
        # rule 1: phase keywords
        if len(facts.phases) == 1:
            phase, kw = facts.phases[0]
            for a in members:
                ev = f"{_desc_evidence(a)} contains {kw!r}"
                if phase == "non_contrast" and has_contrast_agent(a):
                    ev += f"; note: {_agent_evidence(a)} contradicts it, description kept"
                elif phase != "non_contrast" and not has_contrast_agent(a) and study_has_agent:
                    ev += "; note: no ContrastBolusAgent on this acquisition"
                if n > 1:
                    ev += f"; applies to all {n} acquisitions of the series"
                calls[acquisition_key(a)] = PhaseCall(phase, f"description:{kw}", ev)
            continue
        if len(facts.phases) > 1:
            kws = "/".join(kw for _, kw in facts.phases)
            if n == len(facts.phases):
                for a, (phase, kw) in zip(_time_order(members), facts.phases, strict=True):
                    calls[acquisition_key(a)] = PhaseCall(
                        phase,
                        "description:ordered",
                        f"{_desc_evidence(a)} names {kws}; {n} acquisitions in time order, "
                        f"this one {kw!r}",
                    )
            else:
                for a in members:
                    calls[acquisition_key(a)] = PhaseCall(
                        "unknown",
                        "description:conflict",
                        f"{_desc_evidence(a)} names {kws} but the series has {n} acquisition(s)",
                    )
            continue
        # rule 2: acquisition order in a multiphase series
        if n >= 2:
            if facts.multiphase:
                calls.update(_order_series(members, "multiphase protocol name"))
                continue
            if not _portal_venous_only(collection) and _overlapping(members):
                calls.update(
                    _order_series(members, "no phase word; acquisitions repeat the same z range")
                )
                continue
        for a in members:
            calls[acquisition_key(a)] = _single(a, facts, collection, study_has_agent)
    return calls


def _single(
    a: Acquisition, facts: DescriptionFacts, collection: str, study_has_agent: bool
) -> PhaseCall:
    desc = _desc_evidence(a)
    # rule 3: bolus timing
    delay = _bolus_delay(a)
    if delay is not None:
        t = f"{desc}; AcquisitionTime − ContrastBolusStartTime = {delay:.0f} s"
        if delay < 50:
            return PhaseCall("arterial", "timing:bolus-delay", t)
        if delay <= 120:
            return PhaseCall("portal_venous", "timing:bolus-delay", t)
        if delay >= 150:
            return PhaseCall("delayed", "timing:bolus-delay", t)
    # rule 4: no contrast agent where the study records one elsewhere
    if not has_contrast_agent(a) and study_has_agent and not facts.contrast:
        return PhaseCall(
            "non_contrast",
            "contrast-tag:absent",
            f"{desc}; no ContrastBolusAgent while other acquisitions of the study have one",
        )
    # rule 5: collection default
    if _portal_venous_only(collection):
        return PhaseCall(
            "portal_venous",
            "collection-default",
            f"{desc} names no phase; {collection} is documented as one portal-venous CT per "
            f"patient; {_agent_evidence(a)}",
        )
    if facts.multiphase:
        return PhaseCall(
            "unknown",
            "description:multiphase-single-acquisition",
            f"{desc} names a multiphase protocol but the series holds one acquisition",
        )
    return PhaseCall(
        "unknown",
        "no-evidence",
        f"{desc} names no phase; {_agent_evidence(a)}"
        + ("; description says contrast-enhanced" if facts.contrast else ""),
    )


# --------------------------------------------------------------------------- overrides


def read_phase_overrides(text: str, source: str = "overrides") -> dict[tuple[str, int | None], str]:
    """Parse ``series_uid,acquisition_number,phase``; an empty acquisition_number = whole series."""
    reader = csv.DictReader(io.StringIO(text.lstrip("\ufeff")))
    header = [h.strip() for h in (reader.fieldnames or [])]
    reader.fieldnames = header
    need = {"series_uid", "acquisition_number", "phase"}
    if not need <= set(header):
        raise UsageError(
            f"{source}: header must be series_uid,acquisition_number,phase; found {header}"
        )
    out: dict[tuple[str, int | None], str] = {}
    for lineno, row in enumerate(reader, start=2):
        uid = (row.get("series_uid") or "").strip()
        number_text = (row.get("acquisition_number") or "").strip()
        phase = (row.get("phase") or "").strip()
        if not uid and not number_text and not phase:
            continue
        if not uid:
            raise UsageError(f"{source}:{lineno}: series_uid is empty")
        if phase not in PHASES:
            raise UsageError(
                f"{source}:{lineno}: phase {phase!r} is not one of {', '.join(PHASES)}"
            )
        number: int | None = None
        if number_text:
            try:
                number = int(float(number_text))
            except ValueError as exc:
                raise UsageError(
                    f"{source}:{lineno}: acquisition_number {number_text!r} is not an integer"
                ) from exc
        key = (uid, number)
        if key in out and out[key] != phase:
            raise UsageError(f"{source}:{lineno}: {uid} {number_text or '(series)'} given twice")
        out[key] = phase
    return out


def apply_overrides(
    calls: dict[tuple[str, int], PhaseCall],
    acquisitions: list[Acquisition],
    overrides: dict[tuple[str, int | None], str],
) -> dict[tuple[str, int], PhaseCall]:
    """Replace calls by manual phases; a per-acquisition entry beats a whole-series one."""
    out = dict(calls)
    for a in acquisitions:
        key = acquisition_key(a)
        phase = None
        scope = ""
        if a.acquisition_number is not None and (a.series_uid, a.acquisition_number) in overrides:
            phase = overrides[(a.series_uid, a.acquisition_number)]
            scope = f"acquisition {a.acquisition_number}"
        elif (a.series_uid, None) in overrides:
            phase = overrides[(a.series_uid, None)]
            scope = "whole series"
        if phase is None:
            continue
        orig = calls.get(key)
        was = f"{orig.phase} by {orig.rule} ({orig.evidence})" if orig else "no call"
        out[key] = PhaseCall(phase, "override", f"manual override ({scope}); was {was}")
    return out


def unused_overrides(
    acquisitions: list[Acquisition], overrides: dict[tuple[str, int | None], str]
) -> list[str]:
    """Notes for override entries that match no acquisition (typo in a UID or number)."""
    have = {(a.series_uid, a.acquisition_number) for a in acquisitions}
    series = {a.series_uid for a in acquisitions}
    notes = []
    for uid, number in overrides:
        if (number is None and uid not in series) or (
            number is not None and (uid, number) not in have
        ):
            what = "series" if number is None else f"acquisition {number} of series"
            notes.append(f"phase override for {what} {uid} matches no acquisition")
    return notes


__all__ = [
    "PHASES",
    "PhaseCall",
    "acquisition_key",
    "apply_overrides",
    "classify_study",
    "describe",
    "read_phase_overrides",
    "unused_overrides",
]
