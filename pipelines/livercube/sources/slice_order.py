"""Which phase of a patient has its slices the other way round: a pure decision from z-profiles.

PLC-CECT stores almost every volume superior-first while its header says inferior-first, but
"sometimes only one phase of a patient is flipped".  No header can tell, the anatomy can: the
phases of one patient image the same liver, so a per-slice profile along z (liver-mask area, or
mean intensity when masks are missing or empty) has the same shape in every phase — up to the
unknown, per-phase slice spacing and z crop.  A phase whose profile matches the others only when
reversed is the exception.

Method: each profile is cut to its non-zero extent, resampled to :data:`PROFILE_POINTS` samples
(removing the unknown spacing) and standardised; two phases are compared by the best Pearson
correlation over small shifts (different crops), once as stored and once with one reversed.
The orientation assignment that best agrees with all pairwise evidence is chosen; the minority
is flipped.  Ties (2 against 2, or 1 against 1) and weak evidence keep the default and say so.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np

PROFILE_POINTS = 64
#: Shifts tried when comparing two profiles, as a fraction of their length (crops differ).
MAX_SHIFT = 0.05
#: Smallest mean correlation advantage (of the chosen orientation over the other) that counts
#: as evidence.  Correlations lie in [-1, 1]; below this the profiles cannot tell.
MIN_MARGIN = 0.15
#: Below this mean agreement a consistent patient still gets a note (profiles barely informative).
WEAK_AGREEMENT = 0.1
LIVER_BASIS = "liver mask area"
INTENSITY_BASIS = "mean intensity"


@dataclass
class SliceOrderDecision:
    """Per phase code: stored reversed relative to the patient's other phases (True) or not."""

    reversed: dict[str, bool]
    basis: str  # "liver mask area", "mean intensity", or "not checked"
    notes: list[str] = field(default_factory=list)
    margin: float | None = None


def normalise_profile(profile: np.ndarray, *, trim: bool = True) -> np.ndarray | None:
    """Resample a per-slice profile to a fixed length and standardise it; None if flat/short."""
    p = np.asarray(profile, dtype=np.float64)
    p = np.nan_to_num(p, nan=0.0)
    if trim:
        nz = np.flatnonzero(p > 0)
        if nz.size == 0:
            return None
        p = p[nz[0] : nz[-1] + 1]
    if p.size < 3 or np.ptp(p) == 0:
        return None
    x = np.linspace(0.0, 1.0, p.size)
    q = np.interp(np.linspace(0.0, 1.0, PROFILE_POINTS), x, p)
    return (q - q.mean()) / q.std()


def best_correlation(a: np.ndarray, b: np.ndarray, max_shift: float = MAX_SHIFT) -> float:
    """Highest Pearson correlation of ``a`` and ``b`` over relative shifts up to ``max_shift``."""
    n = min(a.size, b.size)
    best = -1.0
    for s in range(-int(max_shift * n), int(max_shift * n) + 1):
        x, y = (a[s:], b[: n - s]) if s >= 0 else (a[: n + s], b[-s:])
        if x.size < 3 or x.std() == 0 or y.std() == 0:
            continue
        best = max(best, float(np.corrcoef(x, y)[0, 1]))
    return best


def orientation_evidence(a: np.ndarray, b: np.ndarray) -> float:
    """> 0 when ``a`` and ``b`` run the same way, < 0 when one is reversed (in [-2, 2])."""
    return best_correlation(a, b) - best_correlation(a, b[::-1])


def decide(
    profiles: dict[str, np.ndarray | None], basis: str, *, min_margin: float = MIN_MARGIN
) -> SliceOrderDecision:
    """Which phases run opposite to the others, from their profiles in stored slice order.

    ``profiles`` maps phase code → per-slice profile as stored in the file (or None when the
    phase has none).  Never flips a majority: with a tie or weak evidence nothing is flipped
    and the decision carries a note saying why.
    """
    codes = sorted(profiles)
    none = dict.fromkeys(codes, False)
    trim = basis == LIVER_BASIS
    usable = {c: p for c in codes if (p := normalise_profile(profiles[c], trim=trim)) is not None}
    if len(codes) < 2:
        return SliceOrderDecision(
            none, "not checked", ["only one phase: slice order cannot be cross-checked"]
        )
    if len(usable) < 2:
        return SliceOrderDecision(
            none,
            "not checked",
            [f"fewer than two phases with a usable {basis} profile: slice order not cross-checked"],
        )
    names = sorted(usable)
    ev = {
        (a, b): orientation_evidence(usable[a], usable[b])
        for a, b in itertools.combinations(names, 2)
    }

    def score(flip: dict[str, bool]) -> float:
        return sum(v if flip[a] == flip[b] else -v for (a, b), v in ev.items())

    assignments = [
        dict(zip(names, (False, *rest), strict=True))
        for rest in itertools.product((False, True), repeat=len(names) - 1)
    ]
    best = max(assignments, key=score)
    n_true = sum(best.values())
    if n_true * 2 > len(names):  # the minority is the exception
        best = {c: not f for c, f in best.items()}
        n_true = len(names) - n_true
    pairs = len(ev)
    margin = (score(best) - score(dict.fromkeys(names, False))) / pairs if n_true else 0.0
    agreement = score(best) / pairs
    if n_true == 0:
        note = (
            []
            if agreement >= WEAK_AGREEMENT
            else [
                f"phases agree only weakly on slice order ({basis} profiles, evidence "
                f"{agreement:.2f}): default kept"
            ]
        )
        return SliceOrderDecision(none, basis, note, agreement)
    flipped = sorted(c for c, f in best.items() if f)
    if n_true * 2 == len(names):
        return SliceOrderDecision(
            none,
            basis,
            [
                f"phases {', '.join(flipped)} run opposite to "
                f"{', '.join(c for c in names if not best[c])} ({basis} profiles): a tie, "
                "cannot tell which is reversed; default kept for all"
            ],
            margin,
        )
    if margin < min_margin or agreement < min_margin:
        return SliceOrderDecision(
            none,
            basis,
            [
                f"phase {', '.join(flipped)} may be reversed but the {basis} evidence is weak "
                f"({margin:.2f}): default kept"
            ],
            margin,
        )
    out = dict(none)
    out.update(dict.fromkeys(flipped, True))
    return SliceOrderDecision(out, basis, [], margin)


def liver_area_profile(mask_kji: np.ndarray) -> np.ndarray:
    """Voxels of the (non-zero, non-NaN) mask per slice, slices in stored order."""
    a = np.asarray(mask_kji)
    m = (np.nan_to_num(a, nan=0.0) if a.dtype.kind == "f" else a) > 0
    return np.count_nonzero(m.reshape(m.shape[0], -1), axis=1).astype(np.float64)


def intensity_profile(ct_kji: np.ndarray) -> np.ndarray:
    """Mean stored value per slice (fallback when liver masks cannot be used)."""
    a = np.asarray(ct_kji, dtype=np.float64)
    return np.nan_to_num(np.nanmean(a.reshape(a.shape[0], -1), axis=1), nan=0.0)
