"""Canonical reorientation: every voxel keeps its patient position; HU never change."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from livercube.errors import GeometryError
from livercube.volumes.geometry import (
    canonical_reorientation,
    decompose_affine,
    ras_to_lps_affine,
    voxel_positions_lps,
)

PERMS = list(itertools.permutations(range(3)))


@st.composite
def axis_aligned(draw):
    perm = draw(st.sampled_from(PERMS))
    signs = draw(st.tuples(*[st.sampled_from([-1.0, 1.0])] * 3))
    direction = np.zeros((3, 3))
    for a, w in enumerate(perm):  # index axis a points along world axis w
        direction[w, a] = signs[a]
    shape = draw(st.tuples(*[st.integers(1, 6)] * 3))  # (k, j, i)
    spacing = draw(st.tuples(*[st.floats(0.3, 7.5)] * 3))
    origin = draw(st.tuples(*[st.floats(-400, 400)] * 3))
    return direction, shape, spacing, origin


@settings(max_examples=200, deadline=None)
@given(axis_aligned())
def test_every_voxel_keeps_its_patient_position(case):
    direction, shape, spacing, origin = case
    reo = canonical_reorientation(shape, direction, spacing, origin)
    src = np.arange(np.prod(shape)).reshape(shape)
    out = reo.apply(src)
    assert sorted(out.ravel()) == sorted(src.ravel())  # a permutation: nothing resampled
    # for every canonical voxel: its grid position == the source position of the value it holds
    kji = np.stack(np.unravel_index(out.ravel(), shape), axis=-1)
    src_pos = voxel_positions_lps(kji, direction, spacing, origin)  # (x, y, z)
    zyx = np.stack(np.indices(out.shape), axis=-1).reshape(-1, 3)
    canon_pos = np.asarray(reo.grid.origin) + zyx * np.asarray(reo.grid.spacing)  # (z, y, x)
    np.testing.assert_allclose(canon_pos[:, ::-1], src_pos, atol=1e-6)


@settings(max_examples=50, deadline=None)
@given(axis_aligned())
def test_canonical_axes_increase_toward_left_posterior_superior(case):
    direction, shape, spacing, origin = case
    reo = canonical_reorientation(shape, direction, spacing, origin)
    assert all(s > 0 for s in reo.grid.spacing)
    # the source direction is kept verbatim for provenance
    np.testing.assert_allclose(np.asarray(reo.source_direction), direction)


def test_small_tilt_is_snapped_and_reported():
    t = np.radians(0.3)
    d = np.array([[1, 0, 0], [0, np.cos(t), -np.sin(t)], [0, np.sin(t), np.cos(t)]])
    reo = canonical_reorientation((4, 4, 4), d, (1, 1, 1), (0, 0, 0))
    assert reo.obliquity_deg == pytest.approx(0.3, abs=1e-6)


def test_degenerate_direction_is_a_clear_error():
    d = np.array([[1, 1, 0], [0, 0, 0], [0, 0, 1]], dtype=float)
    with pytest.raises(GeometryError, match=r"do not map one-to-one|zero column"):
        canonical_reorientation((2, 2, 2), d, (1, 1, 1), (0, 0, 0))


def test_nonpositive_spacing_is_refused():
    with pytest.raises(GeometryError, match="spacing must be positive"):
        canonical_reorientation((2, 2, 2), np.eye(3), (1, 0, 1), (0, 0, 0))


def test_nifti_identity_is_right_anterior_in_lps():
    d, spacing, origin = decompose_affine(ras_to_lps_affine(np.eye(4)))
    assert origin == (0.0, 0.0, 0.0)
    np.testing.assert_array_equal(d, np.diag([-1.0, -1.0, 1.0]))
    assert spacing == (1.0, 1.0, 1.0)
