"""Pure decision of which phase runs opposite to the rest of its patient."""

from __future__ import annotations

import numpy as np
import pytest

from livercube.sources.slice_order import (
    INTENSITY_BASIS,
    LIVER_BASIS,
    decide,
    liver_area_profile,
    normalise_profile,
)


def _liver_profile(n: int, start: float = 0.0, stop: float = 1.0) -> np.ndarray:
    """A lopsided liver area profile (wide near the dome, long tail), superior slice first."""
    t = np.linspace(start, stop, n)
    return np.clip(1000 * t**0.4 * (1 - t) ** 2.0, 0, None) + (t < 1)


@pytest.mark.parametrize("odd", ["P", "C1", "C2", "C3"])
def test_one_reversed_phase_of_four_is_found(odd):
    rng = np.random.default_rng(len(odd))
    profiles = {}
    for i, code in enumerate(("P", "C1", "C2", "C3")):
        p = _liver_profile(30 + 7 * i) * rng.uniform(0.9, 1.1, 30 + 7 * i)  # spacing differs
        profiles[code] = p[::-1] if code == odd else p
    d = decide(profiles, LIVER_BASIS)
    assert d.reversed == {c: c == odd for c in profiles}
    assert d.notes == [] and d.margin > 0.15


def test_consistent_patient_flips_nothing():
    d = decide({c: _liver_profile(40 + i) for i, c in enumerate("ABC")}, LIVER_BASIS)
    assert not any(d.reversed.values()) and d.notes == []


def test_two_against_two_is_a_tie_and_keeps_default():
    p = _liver_profile(40)
    d = decide({"P": p, "C1": p, "C2": p[::-1], "C3": p[::-1]}, LIVER_BASIS)
    assert not any(d.reversed.values())
    assert "tie" in d.notes[0]


def test_two_phases_disagreeing_cannot_tell_which():
    p = _liver_profile(40)
    d = decide({"C1": p, "C2": p[::-1]}, LIVER_BASIS)
    assert not any(d.reversed.values()) and "tie" in d.notes[0]


def test_single_phase_and_empty_masks_are_not_checked():
    d = decide({"C2": _liver_profile(30)}, LIVER_BASIS)
    assert d.reversed == {"C2": False} and "one phase" in d.notes[0]
    empty = liver_area_profile(np.zeros((20, 8, 8), np.uint8))
    assert normalise_profile(empty) is None
    d = decide({"P": empty, "C1": _liver_profile(30), "C2": None}, LIVER_BASIS)
    assert not any(d.reversed.values()) and "not cross-checked" in d.notes[0]


def test_symmetric_profiles_are_weak_evidence():
    t = np.linspace(-1, 1, 41)
    sym = 1 - t**2 + 0.01
    d = decide({"P": sym, "C1": sym, "C2": sym[::-1] * 1.01, "C3": sym}, INTENSITY_BASIS)
    assert not any(d.reversed.values())
    assert d.notes  # says the evidence is weak rather than guessing


def test_nan_in_mask_counts_as_background():
    m = np.zeros((5, 4, 4), np.float32)
    m[2, :2, :2] = 1
    m[3, 0, 0] = np.nan
    np.testing.assert_array_equal(liver_area_profile(m), [0, 0, 4, 0, 0])
