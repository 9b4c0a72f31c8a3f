"""Generated colour images of geometric shapes: a second bundled task, unlike digits.

Each image draws one shape (its class) at a random position, size, rotation and colour, on a
random background with a colour gradient, pixel noise and a distracting stroke. The same
`seed` gives the same images on every machine (numpy's PCG64 and Pillow's rasteriser).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from evolver.data.generated import generate_balanced

SHAPES = ("circle", "square", "triangle", "cross", "ring", "star")
# More kinds, never in the default set: a target task unlike the source task of the bundled
# pretrained backbone (evolver.weights), which learned SHAPES.
EXTRA_SHAPES = ("pentagon", "diamond", "arrow", "heart", "crescent", "moon")
KINDS = SHAPES + EXTRA_SHAPES
STROKES = 1  # thin distracting lines per image
NOISE = 10.0  # standard deviation of the pixel noise (0-255 scale)


def polygon(kind: str, cx: float, cy: float, radius: float, angle: float) -> list[tuple]:
    """The outline points of a polygonal shape."""
    if kind == "square":
        corners = [angle + math.pi / 4 + k * math.pi / 2 for k in range(4)]
        return [(cx + radius * math.cos(a), cy + radius * math.sin(a)) for a in corners]
    if kind == "triangle":
        corners = [angle + k * 2 * math.pi / 3 for k in range(3)]
        return [(cx + radius * math.cos(a), cy + radius * math.sin(a)) for a in corners]
    if kind == "star":
        points = []
        for k in range(10):
            r = radius if k % 2 == 0 else radius * 0.45
            a = angle + k * math.pi / 5
            points.append((cx + r * math.cos(a), cy + r * math.sin(a)))
        return points
    if kind == "cross":
        arm, half = radius, radius * 0.3
        outline = [
            (half, arm), (half, half), (arm, half), (arm, -half), (half, -half), (half, -arm),
            (-half, -arm), (-half, -half), (-arm, -half), (-arm, half), (-half, half), (-half, arm),
        ]  # fmt: skip
        cos, sin = math.cos(angle), math.sin(angle)
        return [(cx + x * cos - y * sin, cy + x * sin + y * cos) for x, y in outline]
    outline = extra_outline(kind, radius)
    if outline is not None:
        cos, sin = math.cos(angle), math.sin(angle)
        return [(cx + x * cos - y * sin, cy + x * sin + y * cos) for x, y in outline]
    raise ValueError(f"unknown shape {kind!r}")


def extra_outline(kind: str, radius: float) -> list[tuple[float, float]] | None:
    """The outline of an EXTRA_SHAPES kind around (0, 0), unrotated; None for other kinds."""
    r = radius
    if kind == "pentagon":
        return [
            (r * math.cos(k * 2 * math.pi / 5), r * math.sin(k * 2 * math.pi / 5)) for k in range(5)
        ]
    if kind == "diamond":  # a rhombus, longer than wide
        return [(r, 0.0), (0.0, 0.55 * r), (-r, 0.0), (0.0, -0.55 * r)]
    if kind == "arrow":
        shaft, head = 0.22 * r, 0.6 * r
        return [
            (-r, shaft), (0.1 * r, shaft), (0.1 * r, head), (r, 0.0),
            (0.1 * r, -head), (0.1 * r, -shaft), (-r, -shaft),
        ]  # fmt: skip
    if kind == "heart":
        steps = [k * 2 * math.pi / 32 for k in range(32)]
        return [
            (
                r
                / 17
                * (13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)),
                r / 17 * 16 * math.sin(t) ** 3,
            )
            for t in steps
        ]
    if kind in ("crescent", "moon"):
        # The outer circle minus an inner one shifted along x: a thin crescent or a fat moon.
        shift, inner = (0.45 * r, 0.85 * r) if kind == "crescent" else (0.6 * r, 0.6 * r)
        # Where the two circles cross: x = (r^2 - inner^2 + shift^2) / (2 shift).
        x = (r * r - inner * inner + shift * shift) / (2 * shift)
        start = math.acos(max(-1.0, min(1.0, x / r)))
        inner_start = math.acos(max(-1.0, min(1.0, (x - shift) / inner)))
        outer = [start + k * (2 * math.pi - 2 * start) / 24 for k in range(25)]
        back = [
            2 * math.pi - inner_start - k * (2 * math.pi - 2 * inner_start) / 24 for k in range(25)
        ]
        return [(r * math.cos(a), r * math.sin(a)) for a in outer] + [
            (shift + inner * math.cos(a), inner * math.sin(a)) for a in back
        ]
    return None


def draw_shape(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """One HxWx3 uint8 image of `kind`."""
    from PIL import Image, ImageDraw

    scale = 4  # drawn large, then downsampled: smooth edges at small sizes
    canvas = size * scale
    top, bottom = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    ramp = np.linspace(0.0, 1.0, canvas)[:, None, None]
    background = (top * (1 - ramp) + bottom * ramp).repeat(canvas, axis=1)
    image = Image.fromarray(background.astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    colour = tuple(int(c) for c in rng.integers(0, 256, 3))
    while np.abs(np.array(colour) - (top + bottom) / 2).sum() < 120:  # keep the shape visible
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
    radius = canvas * rng.uniform(0.24, 0.4)
    cx, cy = rng.uniform(radius, canvas - radius, 2)
    angle = rng.uniform(0, 2 * math.pi)
    box = [cx - radius, cy - radius, cx + radius, cy + radius]
    if kind == "circle":
        draw.ellipse(box, fill=colour)
    elif kind == "ring":
        draw.ellipse(box, outline=colour, width=max(2, int(radius * 0.35)))
    else:
        draw.polygon(polygon(kind, cx, cy, radius, angle), fill=colour)
    for _ in range(STROKES):
        stroke = tuple(int(c) for c in rng.integers(0, 256, 3))
        ends = [tuple(rng.uniform(0, canvas, 2)) for _ in range(2)]
        draw.line(ends, fill=stroke, width=scale)
    small = np.asarray(image.resize((size, size), Image.Resampling.BILINEAR), dtype=np.float64)
    noisy = small + rng.normal(0.0, NOISE, small.shape)
    return np.clip(noisy, 0, 255).astype(np.uint8)


def generate_shapes(
    per_class: int, size: int = 32, seed: int = 0, kinds: Sequence[str] = SHAPES
) -> tuple[list[np.ndarray], np.ndarray]:
    """`per_class` images of each kind, interleaved by class; (images, targets)."""
    unknown = [kind for kind in kinds if kind not in KINDS]
    if unknown:
        raise ValueError(f"unknown shapes {unknown} (known: {', '.join(KINDS)})")
    return generate_balanced(draw_shape, per_class, size, seed, kinds)
