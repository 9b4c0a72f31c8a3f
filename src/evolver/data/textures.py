"""Generated colour textures: a third bundled task, from another domain than digits and shapes.

Each image is one periodic or random pattern (its class) at a random scale, orientation, phase
and pair of colours, with a random contrast and pixel noise. The class is in the texture, not
in an object's outline: what a backbone pretrained on shapes learned transfers only partly. The
same `seed` gives the same images on every machine (numpy's PCG64 only).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from evolver.data.generated import generate_balanced

NOISE = 12.0  # standard deviation of the pixel noise (0-255 scale)

Pattern = Callable[[np.ndarray, np.ndarray, np.random.Generator], np.ndarray]


def _rotated(x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> tuple:
    angle = rng.uniform(0, math.pi)
    cos, sin = math.cos(angle), math.sin(angle)
    return x * cos + y * sin, -x * sin + y * cos


def _frequency(rng: np.random.Generator) -> float:
    """Cycles per image width, the same range for every periodic kind."""
    return 2 * math.pi * rng.uniform(2.0, 6.0)


def stripes(x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    u, _ = _rotated(x, y, rng)
    return np.sin(_frequency(rng) * u + rng.uniform(0, 2 * math.pi))


def checks(x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    u, v = _rotated(x, y, rng)
    f = _frequency(rng)
    return np.sign(np.sin(f * u + rng.uniform(0, 6.3)) * np.sin(f * v + rng.uniform(0, 6.3)))


def dots(x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    u, v = _rotated(x, y, rng)
    f = _frequency(rng)
    cells = (np.cos(f * u + rng.uniform(0, 6.3)) + 1) * (np.cos(f * v + rng.uniform(0, 6.3)) + 1)
    return np.where(cells > 2.2, 1.0, -1.0)


def rings(x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    cx, cy = rng.uniform(-0.6, 0.6, 2)
    radius = np.hypot(x - cx, y - cy)
    return np.sin(_frequency(rng) * radius + rng.uniform(0, 2 * math.pi))


def waves(x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    u, v = _rotated(x, y, rng)
    bend = rng.uniform(0.08, 0.2) * np.sin(2 * math.pi * rng.uniform(1.0, 2.5) * v)
    return np.sin(_frequency(rng) * (u + bend) + rng.uniform(0, 2 * math.pi))


def clouds(x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Smooth random blobs: a sum of a few random low-frequency waves, no period."""
    field = np.zeros_like(x)
    for _ in range(6):
        u, _ = _rotated(x, y, rng)
        field += np.sin(2 * math.pi * rng.uniform(0.5, 3.0) * u + rng.uniform(0, 2 * math.pi))
    return np.tanh(field)


TEXTURES: dict[str, Pattern] = {
    "stripes": stripes,
    "checks": checks,
    "dots": dots,
    "rings": rings,
    "waves": waves,
    "clouds": clouds,
}


def draw_texture(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """One HxWx3 uint8 image of `kind`."""
    coords = np.linspace(-1.0, 1.0, size)
    x, y = np.meshgrid(coords, coords)
    pattern = TEXTURES[kind](x, y, rng)  # in [-1, 1]
    contrast = rng.uniform(0.35, 1.0)
    mix = (1 + contrast * pattern)[..., None] / 2
    first, second = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    while np.abs(first - second).sum() < 150:  # keep the pattern visible
        second = rng.integers(0, 256, 3)
    image = first * (1 - mix) + second * mix + rng.normal(0.0, NOISE, (size, size, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def generate_textures(
    per_class: int, size: int = 32, seed: int = 0, kinds: Sequence[str] = tuple(TEXTURES)
) -> tuple[list[np.ndarray], np.ndarray]:
    """`per_class` images of each kind, interleaved by class; (images, targets)."""
    unknown = [kind for kind in kinds if kind not in TEXTURES]
    if unknown:
        raise ValueError(f"unknown textures {unknown} (known: {', '.join(TEXTURES)})")
    return generate_balanced(draw_texture, per_class, size, seed, kinds)
