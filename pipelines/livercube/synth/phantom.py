"""A deterministic abdominal CT phantom: body, spine, liver, tumours, portal/hepatic veins, aorta.

Anatomy lives in patient (LPS) millimetres, so the same patient rendered on different grids
(phases, acquisitions, resolutions) is the same body; only the HU of contrast-taking tissue
changes with the phase.  The truth masks come out on the grid too, so every test can compare a
converted store voxel for voxel with what the generator meant.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from livercube.volumes.geometry import Grid

#: Mean HU per tissue and phase (non_contrast, arterial, portal_venous, delayed).
PHASE_HU: dict[str, tuple[int, int, int, int]] = {
    "air": (-1000, -1000, -1000, -1000),
    "fat": (-95, -95, -95, -95),
    "soft": (35, 45, 60, 50),
    "spine": (420, 420, 420, 420),
    "liver": (55, 70, 110, 85),
    "tumor_hcc": (40, 140, 80, 60),
    "tumor_met": (35, 50, 60, 55),
    "portal_vein": (45, 90, 180, 120),
    "hepatic_vein": (45, 60, 160, 120),
    "aorta": (45, 320, 160, 120),
}
PHASE_INDEX = {"non_contrast": 0, "arterial": 1, "portal_venous": 2, "delayed": 3, "unknown": 2}

#: Scanner-like noise: standard deviation in HU (abdominal CT at routine dose: 10–20 HU) and
#: in-plane correlation (Gaussian σ in voxels, as a reconstruction kernel correlates
#: neighbouring pixels).  The piecewise-constant phantom compresses ~6× with the store's codecs,
#: patient CT ~3×; with this noise the phantom is ~3× too, so benchmarks measure CT-like work.
SCANNER_NOISE_HU = 15.0
SCANNER_NOISE_CORRELATION = 1.0

#: Environment variable that turns scanner-like noise on for every :func:`render` whose caller
#: does not say (``"1"``): reaches the generators of every collection and child processes.
SCANNER_NOISE_ENV = "LIVERCUBE_SCANNER_NOISE"


def use_scanner_noise(on: bool = True) -> None:
    """Make :func:`render` add scanner-like noise by default (benchmarks, ``synth`` demos)."""
    os.environ[SCANNER_NOISE_ENV] = "1" if on else "0"


def scanner_noise_default() -> bool:
    """Whether :func:`render` adds scanner-like noise when its caller does not say."""
    return os.environ.get(SCANNER_NOISE_ENV, "0").strip().lower() in ("1", "true", "yes", "on")


def correlated_noise(
    rng: np.random.Generator,
    shape: tuple[int, ...],
    sigma_hu: float = SCANNER_NOISE_HU,
    correlation: float = SCANNER_NOISE_CORRELATION,
) -> np.ndarray:
    """Gaussian noise of standard deviation ``sigma_hu``, correlated in-plane (last two axes).

    White noise filtered by a separable Gaussian (σ = ``correlation`` voxels, periodic edges),
    rescaled exactly: the filtered variance is ``(Σ w²)²`` for unit white noise.
    """
    white = rng.standard_normal(shape, dtype=np.float32)
    if correlation <= 0:
        return white * np.float32(sigma_hu)
    radius = max(1, int(np.ceil(2 * correlation)))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / correlation) ** 2)
    taps = (taps / taps.sum()).astype(np.float32)
    out = white
    for axis in (-2, -1):
        acc = np.zeros_like(out)
        for k, w in zip(range(-radius, radius + 1), taps, strict=True):
            acc += w * np.roll(out, k, axis=axis)
        out = acc
    return out * np.float32(sigma_hu / float((taps**2).sum()))


@dataclass(frozen=True)
class Tube:
    """A vessel segment: a cylinder of ``radius`` mm between two LPS points (x, y, z)."""

    a: tuple[float, float, float]
    b: tuple[float, float, float]
    radius: float


@dataclass(frozen=True)
class Ball:
    centre: tuple[float, float, float]
    radii: tuple[float, float, float]


@dataclass(frozen=True)
class Anatomy:
    """One synthetic patient, in LPS millimetres."""

    body: tuple[float, float]  # semi-axes of the body ellipse in x, y
    liver: tuple[Ball, ...]
    tumours: tuple[Ball, ...]
    portal: tuple[Tube, ...]
    hepatic: tuple[Tube, ...]
    aorta: Tube
    spine: Tube
    remnant_x: float  # future liver remnant: liver voxels with x greater than this (left lobe)
    tumour_kind: str = "tumor_hcc"
    extent_z: tuple[float, float] = field(default=(-110.0, 110.0))


def make_anatomy(
    seed: int, *, n_tumours: int = 2, tumour_kind: str = "tumor_hcc", overlapping: bool = False
) -> Anatomy:
    """Draw one patient's anatomy; everything depends only on ``seed`` and the arguments."""
    rng = np.random.default_rng(seed)
    j = lambda s: float(rng.uniform(-s, s))  # noqa: E731 - tiny jitter helper
    liver_main = Ball((-55 + j(8), -5 + j(6), 20 + j(8)), (80 + j(8), 70 + j(6), 65 + j(8)))
    liver_left = Ball((25 + j(6), -35 + j(5), 40 + j(6)), (45 + j(5), 35 + j(4), 35 + j(4)))
    tumours: list[Ball] = []
    for t in range(n_tumours):
        if overlapping and t > 0 and t % 2 == 1:
            prev = tumours[-1]
            r = prev.radii[0] * 0.8
            c = (prev.centre[0] + prev.radii[0] * 0.9, prev.centre[1], prev.centre[2])
        else:
            r = float(rng.uniform(9, 24))
            u = rng.uniform(-0.5, 0.5, size=3)
            c = tuple(float(liver_main.centre[i] + u[i] * liver_main.radii[i]) for i in range(3))
        tumours.append(Ball(c, (r, r * float(rng.uniform(0.8, 1.2)), r)))  # type: ignore[arg-type]
    cx, cy, cz = liver_main.centre
    portal = (
        Tube((-15.0, 15.0, cz - 70), (cx + 20, cy + 10, cz - 5), 7.0),
        Tube((cx + 20, cy + 10, cz - 5), (cx - 30, cy + 5, cz + 10), 5.0),
        Tube(
            (cx + 20, cy + 10, cz - 5), (liver_left.centre[0], liver_left.centre[1], cz + 15), 4.5
        ),
    )
    ivc = (-25.0, 35.0, cz + 60)
    hepatic = tuple(
        Tube(ivc, (cx + dx, cy + dy, cz + 25), 4.0) for dx, dy in ((-40, 10), (-5, -25), (35, -35))
    )
    return Anatomy(
        body=(165.0 + j(10), 115.0 + j(8)),
        liver=(liver_main, liver_left),
        tumours=tuple(tumours),
        portal=portal,
        hepatic=hepatic,
        aorta=Tube((22.0, 42.0, -400.0), (22.0, 42.0, 400.0), 12.0),
        spine=Tube((0.0, 75.0, -400.0), (0.0, 75.0, 400.0), 20.0),
        remnant_x=float(cx + 30),
        tumour_kind=tumour_kind,
    )


@dataclass
class Rendered:
    """A rendered volume and its truth masks on ``grid`` (all arrays z, y, x)."""

    grid: Grid
    image: np.ndarray  # int16 HU
    masks: dict[str, np.ndarray]  # 'body', 'liver', 'remnant', 'portal_vein', 'hepatic_vein',
    # 'aorta', 'tumor_1'..'tumor_n'


def _ball(P: tuple[np.ndarray, ...], b: Ball) -> np.ndarray:
    x, y, z = P
    return (
        ((x - b.centre[0]) / b.radii[0]) ** 2
        + ((y - b.centre[1]) / b.radii[1]) ** 2
        + ((z - b.centre[2]) / b.radii[2]) ** 2
    ) <= 1.0


def _tube(P: tuple[np.ndarray, ...], t: Tube) -> np.ndarray:
    a = np.asarray(t.a)
    ab = np.asarray(t.b) - a
    denom = float(ab @ ab)
    d = [P[i] - a[i] for i in range(3)]
    s = np.clip((d[0] * ab[0] + d[1] * ab[1] + d[2] * ab[2]) / denom, 0.0, 1.0)
    dist2 = sum((d[i] - s * ab[i]) ** 2 for i in range(3))
    return dist2 <= t.radius**2


def reconstruction_circle(ny: int, nx: int) -> np.ndarray:
    """(ny, nx) bool: the disc inscribed in the slice, where a scanner reconstructs (noise)."""
    j = (np.arange(ny) - (ny - 1) / 2) / (ny / 2)
    i = (np.arange(nx) - (nx - 1) / 2) / (nx / 2)
    return j[:, None] ** 2 + i[None, :] ** 2 <= 1.0


def render(
    anatomy: Anatomy,
    grid: Grid,
    phase: str,
    *,
    seed: int = 0,
    noise_hu: float = 8.0,
    slab: int = 16,
    scanner_noise: bool | None = None,
) -> Rendered:
    """Render ``anatomy`` on ``grid`` for a contrast phase, with seeded Gaussian noise.

    By default the noise is white, ``noise_hu`` inside the body only (the tests' phantom).
    ``scanner_noise=True`` (default: :func:`scanner_noise_default`) instead adds correlated
    noise of :data:`SCANNER_NOISE_HU` over the reconstruction circle, air included, as a
    scanner does (outside the circle it writes constant padding), so the volume compresses
    like patient CT (~3× with the store's codecs, 512² slices).  Both are seeded.
    """
    if scanner_noise is None:
        scanner_noise = scanner_noise_default()
    pi = PHASE_INDEX[phase]
    hu = {k: v[pi] for k, v in PHASE_HU.items()}
    nz, ny, nx = grid.shape
    zc, yc, xc = grid.centres(0), grid.centres(1), grid.centres(2)
    image = np.empty(grid.shape, dtype=np.int16)
    names = ["body", "liver", "remnant", "portal_vein", "hepatic_vein", "aorta"] + [
        f"tumor_{i + 1}" for i in range(len(anatomy.tumours))
    ]
    masks = {n: np.zeros(grid.shape, dtype=bool) for n in names}
    rng = np.random.default_rng([seed, pi, nz, ny, nx])
    bx, by = anatomy.body
    fov = reconstruction_circle(ny, nx).astype(np.float32)
    for z0 in range(0, nz, slab):
        z1 = min(nz, z0 + slab)
        Z, Y, X = np.meshgrid(zc[z0:z1], yc, xc, indexing="ij")
        P = (X, Y, Z)
        body = (X / bx) ** 2 + (Y / by) ** 2 <= 1.0
        inner = (X / (bx - 18)) ** 2 + (Y / (by - 15)) ** 2 <= 1.0
        liver = (_ball(P, anatomy.liver[0]) | _ball(P, anatomy.liver[1])) & inner
        portal = np.zeros_like(body)
        for t in anatomy.portal:
            portal |= _tube(P, t)
        portal &= inner
        hepatic = np.zeros_like(body)
        for t in anatomy.hepatic:
            hepatic |= _tube(P, t)
        hepatic &= liver
        aorta = _tube(P, anatomy.aorta) & inner
        spine = _tube(P, anatomy.spine) & inner
        tumours = [_ball(P, b) & liver for b in anatomy.tumours]

        vol = np.full(Z.shape, hu["air"], dtype=np.float32)
        vol[body] = hu["fat"]
        vol[inner] = hu["soft"]
        vol[spine] = hu["spine"]
        vol[aorta] = hu["aorta"]
        vol[liver] = hu["liver"]
        vol[hepatic] = hu["hepatic_vein"]
        vol[portal] = hu["portal_vein"]
        for tm in tumours:
            vol[tm] = hu[anatomy.tumour_kind]
        if scanner_noise:
            vol += correlated_noise(rng, vol.shape) * fov
        else:
            vol[body] += rng.normal(0.0, noise_hu, size=int(body.sum())).astype(np.float32)
        image[z0:z1] = np.clip(np.rint(vol), -1024, 3071).astype(np.int16)
        sl = slice(z0, z1)
        masks["body"][sl] = body
        masks["liver"][sl] = liver
        masks["remnant"][sl] = liver & (anatomy.remnant_x < X)
        masks["portal_vein"][sl] = portal
        masks["hepatic_vein"][sl] = hepatic
        masks["aorta"][sl] = aorta
        for i, tm in enumerate(tumours):
            masks[f"tumor_{i + 1}"][sl] = tm
    return Rendered(grid, image, masks)


def abdomen_grid(
    shape_zyx: tuple[int, int, int],
    spacing_zyx: tuple[float, float, float],
    *,
    centre_z: float = 20.0,
) -> Grid:
    """A grid of ``shape`` centred on the body in x/y and on ``centre_z`` (the liver) in z."""
    nz, ny, nx = shape_zyx
    sz, sy, sx = spacing_zyx
    origin = (
        centre_z - sz * (nz - 1) / 2.0,
        -sy * (ny - 1) / 2.0,
        -sx * (nx - 1) / 2.0,
    )
    return Grid(tuple(shape_zyx), tuple(spacing_zyx), origin)  # type: ignore[arg-type]
