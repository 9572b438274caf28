"""Synthetic hand radiographs whose "bone age" is readable only from a known region.

A phantom is a PA hand radiograph drawn from simple shapes: forearm with radius and ulna,
palm with five metacarpals, fingers with phalanges, soft tissue, noise, and a random pose,
size, brightness and side. Only two things depend on age, both inside
``Phantom.informative_mask``:

- the carpal ossification centres: they appear one after another in the real order
  (capitate and hamate first, pisiform last) and grow;
- the distal radius and ulna epiphyses: they appear, grow, and their growth plates (the
  dark gap to the shaft) narrow until they fuse.

Everything else (hand size, finger lengths, pose, exposure, noise) is drawn independently
of age, so a model can only read age where the mask says, which is what tests of training
and Grad-CAM rely on. Girls mature faster than boys, as in the atlas.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

logger = logging.getLogger(__name__)

MAX_AGE_MONTHS = 228.0
"""Phantom ages run from 0 to this (19 years); the skeleton is mature at the end."""

# Age (months) at which the phantom skeleton is fully mature; girls mature earlier.
_MATURE_AGE_BOYS = 228.0
_MATURE_AGE_GIRLS = 204.0

# Informative region in canonical coordinates (x right, y down, hand spans y -1..1).
_INFO_X = (-0.30, 0.32)
_INFO_Y = (0.10, 0.58)


@dataclass(frozen=True)
class _Carpal:
    x: float
    y: float
    a: float  # half-axes at maturity
    b: float
    onset: float  # maturity at which it appears
    span: float  # maturity range over which it grows to full size


# Ossification order as in the atlas: capitate, hamate, triquetrum, lunate, trapezium,
# trapezoid, scaphoid, pisiform. The thumb side is +x.
_CARPALS: tuple[_Carpal, ...] = (
    _Carpal(0.01, 0.24, 0.055, 0.075, 0.00, 0.55),
    _Carpal(-0.11, 0.25, 0.050, 0.065, 0.01, 0.55),
    _Carpal(-0.16, 0.37, 0.045, 0.040, 0.12, 0.50),
    _Carpal(-0.03, 0.39, 0.050, 0.040, 0.18, 0.50),
    _Carpal(0.20, 0.25, 0.045, 0.045, 0.25, 0.50),
    _Carpal(0.11, 0.22, 0.035, 0.040, 0.27, 0.50),
    _Carpal(0.13, 0.38, 0.060, 0.040, 0.25, 0.50),
    _Carpal(-0.22, 0.33, 0.025, 0.025, 0.45, 0.35),
)


@dataclass
class Phantom:
    """A synthetic radiograph.

    Attributes
    ----------
    image : numpy.ndarray
        float32 ``(size, size)`` in [0, 1], bone bright on a dark background.
    informative_mask : numpy.ndarray
        bool ``(size, size)``: where the age can be read (carpus, distal radius and ulna).
    """

    image: np.ndarray
    informative_mask: np.ndarray


def maturity(age_months: float, *, male: bool) -> float:
    """Return the phantom skeleton's maturity in [0, 1] at an age.

    Parameters
    ----------
    age_months : float
        Age in months.
    male : bool
        Boys mature more slowly than girls.

    Returns
    -------
    float
        0 at birth, 1 when mature.
    """
    mature = _MATURE_AGE_BOYS if male else _MATURE_AGE_GIRLS
    return float(np.clip(age_months / mature, 0.0, 1.0))


def _growth(m: float, onset: float, span: float) -> float:
    """0 before onset, then a smooth rise to 1 over ``span``."""
    t = float(np.clip((m - onset) / span, 0.0, 1.0))
    return t * t * (3 - 2 * t) if t < 1 else 1.0


def _segment_distance(
    x: np.ndarray, y: np.ndarray, p0: tuple[float, float], p1: tuple[float, float]
) -> np.ndarray:
    dx, dy = p1[0] - p0[0], p1[1] - p0[1]
    length2 = dx * dx + dy * dy
    t = np.clip(((x - p0[0]) * dx + (y - p0[1]) * dy) / length2, 0.0, 1.0)
    return np.hypot(x - (p0[0] + t * dx), y - (p0[1] + t * dy))


def _tube(d: np.ndarray, r: float) -> np.ndarray:
    """Projected thickness of a bone (cortex brighter than marrow), peak about 1."""
    outer = np.sqrt(np.clip(r * r - d * d, 0.0, None))
    ri = 0.6 * r
    inner = np.sqrt(np.clip(ri * ri - d * d, 0.0, None))
    return (outer - 0.45 * inner) / (r * 0.75)


def _ellipsoid(
    x: np.ndarray, y: np.ndarray, cx: float, cy: float, a: float, b: float
) -> np.ndarray:
    q = ((x - cx) / a) ** 2 + ((y - cy) / b) ** 2
    return np.sqrt(np.clip(1.0 - q, 0.0, None))


def _soft(depth: np.ndarray, width: float) -> np.ndarray:
    """Soft-tissue thickness from the depth inside the outline."""
    return np.sqrt(np.clip(depth / width, 0.0, 1.0))


def _finger_chain(
    base: tuple[float, float], angle: float, lengths: list[float], widths: list[float]
) -> list[tuple[tuple[float, float], tuple[float, float], float]]:
    """Segments of a finger pointing at ``angle`` (radians from straight up, + to thumb)."""
    ux, uy = math.sin(angle), -math.cos(angle)
    gap = 0.022
    segments = []
    x0, y0 = base[0] + ux * gap, base[1] + uy * gap
    for length, width in zip(lengths, widths, strict=True):
        # Capsule ends are rounded: keep the bone length net of its caps.
        x1, y1 = x0 + ux * length, y0 + uy * length
        segments.append(
            ((x0 + ux * width, y0 + uy * width), (x1 - ux * width, y1 - uy * width), width)
        )
        x0, y0 = x1 + ux * gap, y1 + uy * gap
    return segments


def make_phantom(
    age_months: float,
    *,
    male: bool,
    size: int = 512,
    rng: np.random.Generator,
) -> Phantom:
    """Draw a hand-like radiograph of a given skeletal age.

    Parameters
    ----------
    age_months : float
        Skeletal age in months (0 … :data:`MAX_AGE_MONTHS`).
    male : bool
        Sex; shifts the age-to-maturity mapping.
    size : int
        Side of the square image, pixels.
    rng : numpy.random.Generator
        Source of all randomness (pose, anatomy, exposure, noise).

    Returns
    -------
    Phantom
        Image and informative mask.
    """
    if size < 16:
        raise ValueError(f"size must be at least 16, got {size}")
    m = maturity(age_months, male=male)

    # Pose: canonical coordinates (x right, y down; hand spans y ≈ -1 … 1) of each pixel.
    scale = rng.uniform(0.78, 0.95)
    theta = math.radians(rng.uniform(-15.0, 15.0))
    shift = rng.uniform(-0.08, 0.08, size=2)
    flip = bool(rng.random() < 0.5)  # left or right hand
    grid = (np.arange(size, dtype=np.float32) + 0.5) / size * 2.0 - 1.0
    py, px = np.meshgrid(grid, grid, indexing="ij")
    px, py = px - shift[0], py - shift[1]
    c, s = math.cos(theta), math.sin(theta)
    x = (c * px + s * py) / scale
    y = (-s * px + c * py) / scale
    if flip:
        x = -x

    bones = np.zeros((size, size), dtype=np.float32)
    tissue = np.zeros((size, size), dtype=np.float32)

    def add_bone(values: np.ndarray) -> None:
        np.maximum(bones, values, out=bones)

    # Forearm soft tissue and shafts of radius (+x, thumb side) and ulna.
    forearm_half = rng.uniform(0.26, 0.31)
    np.maximum(tissue, _soft(np.minimum(forearm_half - np.abs(x), y - 0.30), 0.08), out=tissue)
    radius_x, ulna_x = 0.12 + rng.uniform(-0.01, 0.01), -0.13 + rng.uniform(-0.01, 0.01)
    radius_end, ulna_end = 0.54, 0.57
    add_bone(_tube(_segment_distance(x, y, (radius_x, 1.8), (radius_x, radius_end)), 0.06))
    add_bone(_tube(_segment_distance(x, y, (ulna_x, 1.8), (ulna_x, ulna_end)), 0.045))

    # Palm: a rounded box.
    palm_half_w = rng.uniform(0.31, 0.35)
    depth = np.minimum.reduce(
        [palm_half_w - np.abs(x - 0.01), y + 0.36, 0.50 - y]
    ) + 0.04 * _ellipsoid(x, y, 0.0, 0.05, 0.6, 0.6)
    np.maximum(tissue, _soft(depth, 0.08), out=tissue)

    # Metacarpals and fingers (little, ring, middle, index), thumb.
    finger_scale = rng.uniform(0.9, 1.1)
    base_x = np.array([-0.22, -0.08, 0.06, 0.2]) + rng.uniform(-0.01, 0.01, size=4)
    spread = np.radians(np.array([-12.0, -4.0, 3.0, 10.0]) + rng.uniform(-4.0, 4.0, size=4))
    length_factor = np.array([0.78, 0.93, 1.0, 0.92])
    for i in range(4):
        base = (float(base_x[i]), 0.13)
        head = (float(base_x[i]) + 0.05 * math.sin(spread[i]), -0.32 + 0.03 * (i in (0, 3)))
        add_bone(_tube(_segment_distance(x, y, base, head), 0.033))
        lengths = [f * length_factor[i] * finger_scale for f in (0.25, 0.16, 0.11)]
        segments = _finger_chain(head, float(spread[i]), lengths, [0.030, 0.025, 0.021])
        tip = segments[-1][1]
        finger_depth = 0.075 - _segment_distance(x, y, head, tip)
        np.maximum(tissue, _soft(finger_depth, 0.05), out=tissue)
        for p0, p1, w in segments:
            add_bone(_tube(_segment_distance(x, y, p0, p1), w))
    thumb_angle = math.radians(rng.uniform(40.0, 55.0))
    thumb_base = (0.26, 0.14)
    thumb_len = 0.24 * finger_scale
    thumb_head = (
        thumb_base[0] + thumb_len * math.sin(thumb_angle),
        thumb_base[1] - thumb_len * math.cos(thumb_angle),
    )
    add_bone(_tube(_segment_distance(x, y, thumb_base, thumb_head), 0.034))
    tip_angle = thumb_angle - math.radians(rng.uniform(10.0, 20.0))
    segments = _finger_chain(
        thumb_head, tip_angle, [0.17 * finger_scale, 0.12 * finger_scale], [0.03, 0.025]
    )
    np.maximum(
        tissue,
        _soft(0.075 - _segment_distance(x, y, thumb_base, segments[-1][1]), 0.06),
        out=tissue,
    )
    # Thenar eminence joining the thumb to the palm.
    thenar = _ellipsoid(x, y, 0.27, 0.08, 0.12, 0.2)
    np.maximum(tissue, np.sqrt(thenar), out=tissue)
    for p0, p1, w in segments:
        add_bone(_tube(_segment_distance(x, y, p0, p1), w))

    # Age signal 1: carpal ossification centres.
    # Draw the jitter of every centre whatever the age, so that two phantoms from the same
    # generator state differ only where age shows.
    jitter = rng.uniform(-0.008, 0.008, size=(len(_CARPALS), 2))
    for carpal, (jx, jy) in zip(_CARPALS, jitter, strict=True):
        g = _growth(m, carpal.onset, carpal.span)
        if g <= 0:
            continue
        k = 0.25 + 0.75 * g  # a centre appears small and grows
        add_bone(_ellipsoid(x, y, carpal.x + jx, carpal.y + jy, carpal.a * k, carpal.b * k))

    # Age signal 2: distal radius and ulna epiphyses and their growth plates.
    for shaft_x, shaft_end, half_w, onset in (
        (radius_x, radius_end, 0.068, 0.04),
        (ulna_x, ulna_end, 0.048, 0.38),
    ):
        g = _growth(m, onset, 0.55)
        if g <= 0:
            continue
        gap = 0.04 * (1.0 - m)  # the physis narrows, closed at maturity
        eh = 0.015 + 0.025 * g
        cy = shaft_end - gap - eh + 0.01 * (1.0 - g)
        add_bone(_ellipsoid(x, y, shaft_x, cy, half_w * (0.35 + 0.65 * g), eh))

    informative = (x >= _INFO_X[0]) & (x <= _INFO_X[1]) & (y >= _INFO_Y[0]) & (y <= _INFO_Y[1])

    # Exposure: background, soft tissue and bone levels, gamma, noise, blur-free.
    background = rng.uniform(0.02, 0.15)
    tissue_level = rng.uniform(0.18, 0.3)
    bone_level = rng.uniform(0.3, 0.45)
    image = (
        background + tissue_level * tissue + bone_level * np.clip(bones, 0.0, 1.2) * (tissue > 0)
    )
    # A film-like gradient across the plate, independent of age.
    image = image * (1.0 + rng.uniform(-0.1, 0.1) * py)
    if rng.random() < 0.3:
        _add_marker(image, rng, size)
    image = np.clip(image, 0.0, 1.0) ** rng.uniform(0.8, 1.2)
    image = image + rng.normal(0.0, rng.uniform(0.005, 0.03), size=image.shape)
    image = np.clip(image, 0.0, 1.0).astype(np.float32)
    return Phantom(image=image, informative_mask=informative)


def _add_marker(image: np.ndarray, rng: np.random.Generator, size: int) -> None:
    """A bright side marker or ruler near a top corner, as on real plates."""
    h = max(2, int(size * rng.uniform(0.04, 0.08)))
    w = max(2, int(size * rng.uniform(0.03, 0.05)))
    top = int(size * rng.uniform(0.02, 0.08))
    left = int(size * rng.choice([rng.uniform(0.02, 0.08), rng.uniform(0.86, 0.92)]))
    image[top : top + h, left : left + w] = rng.uniform(0.7, 0.95)


def make_dataset(
    n: int,
    *,
    size: int = 128,
    rng: np.random.Generator,
    max_age_months: float = MAX_AGE_MONTHS,
) -> list[tuple[Phantom, float, bool]]:
    """Draw ``n`` phantoms with ages uniform in ``[0, max_age_months]`` and random sex.

    Parameters
    ----------
    n : int
        Number of phantoms.
    size : int
        Image side, pixels.
    rng : numpy.random.Generator
        Source of randomness.
    max_age_months : float
        Upper end of the age range.

    Returns
    -------
    list of tuple
        ``(phantom, age_months, male)`` triples.
    """
    out: list[tuple[Phantom, float, bool]] = []
    for _ in range(n):
        age = float(rng.uniform(0.0, max_age_months))
        male = bool(rng.random() < 0.5)
        out.append((make_phantom(age, male=male, size=size, rng=rng), age, male))
    return out
