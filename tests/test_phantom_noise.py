"""Scanner-like noise of the example generator: off by default, seeded, CT-like when on."""

from __future__ import annotations

import numpy as np
import pytest

from livercube.synth import phantom
from livercube.synth.phantom import (
    SCANNER_NOISE_HU,
    abdomen_grid,
    correlated_noise,
    make_anatomy,
    reconstruction_circle,
    render,
)

GRID = abdomen_grid((4, 128, 128), (5.0, 3.0, 3.0))


def test_correlated_noise_has_the_requested_sigma_and_correlation():
    n = correlated_noise(np.random.default_rng(0), (6, 128, 128), 15.0, 1.0)
    assert n.std() == pytest.approx(15.0, rel=0.05)
    for axis in (1, 2):
        a, b = np.moveaxis(n, axis, 0)[1:], np.moveaxis(n, axis, 0)[:-1]
        assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.5  # white noise: ~0
    white = correlated_noise(np.random.default_rng(0), (6, 128, 128), 15.0, 0.0)
    assert abs(np.corrcoef(white[:, 1:].ravel(), white[:, :-1].ravel())[0, 1]) < 0.05


def test_default_render_is_unchanged_and_noise_is_opt_in(monkeypatch):
    monkeypatch.delenv(phantom.SCANNER_NOISE_ENV, raising=False)
    anatomy = make_anatomy(2)
    plain = render(anatomy, GRID, "portal_venous", seed=1)
    off = render(anatomy, GRID, "portal_venous", seed=1, scanner_noise=False)
    np.testing.assert_array_equal(plain.image, off.image)
    air = ~plain.masks["body"] & reconstruction_circle(*GRID.shape[1:])
    assert np.all(plain.image[air] == phantom.PHASE_HU["air"][0])  # tests' phantom: clean air

    on = render(anatomy, GRID, "portal_venous", seed=1, scanner_noise=True)
    again = render(anatomy, GRID, "portal_venous", seed=1, scanner_noise=True)
    np.testing.assert_array_equal(on.image, again.image)  # seeded
    other = render(anatomy, GRID, "portal_venous", seed=2, scanner_noise=True)
    assert not np.array_equal(on.image, other.image)
    for name in plain.masks:
        np.testing.assert_array_equal(on.masks[name], plain.masks[name])  # same anatomy
    # noise everywhere the scanner reconstructs, air included; padding outside stays constant
    air_hu = on.image[air].astype(float)
    assert air_hu.std() == pytest.approx(SCANNER_NOISE_HU, rel=0.2)
    outside = ~reconstruction_circle(*GRID.shape[1:])
    assert np.all(on.image[:, outside] == phantom.PHASE_HU["air"][0])

    phantom.use_scanner_noise(True)
    np.testing.assert_array_equal(render(anatomy, GRID, "portal_venous", seed=1).image, on.image)
    phantom.use_scanner_noise(False)
    np.testing.assert_array_equal(render(anatomy, GRID, "portal_venous", seed=1).image, off.image)
