"""What the generated tasks (shapes, textures) share: balanced sets drawn from one seed."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

Draw = Callable[[str, int, np.random.Generator], np.ndarray]


def generate_balanced(
    draw: Draw, per_class: int, size: int, seed: int, kinds: Sequence[str]
) -> tuple[list[np.ndarray], np.ndarray]:
    """`per_class` images of each kind (`draw(kind, size, rng)`), interleaved by class, from one
    seeded generator; (images, targets)."""
    rng = np.random.default_rng(seed)
    images, targets = [], []
    for _ in range(per_class):
        for target, kind in enumerate(kinds):
            images.append(draw(kind, size, rng))
            targets.append(target)
    return images, np.asarray(targets, dtype=np.int64)
