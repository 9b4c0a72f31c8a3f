"""The generated shapes task: deterministic, balanced, validated, and trainable end to end."""

from __future__ import annotations

import numpy as np
import pytest
from training_support import SMALL, compose_cfg

from evolver.data.shapes import SHAPES, generate_shapes
from evolver.data.sources import load_image_set
from evolver.errors import ConfigError


def test_same_seed_same_images_and_classes_balanced() -> None:
    first, targets = generate_shapes(3, size=24, seed=5)
    again, _ = generate_shapes(3, size=24, seed=5)
    other, _ = generate_shapes(3, size=24, seed=6)
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other, strict=True))
    assert first[0].shape == (24, 24, 3) and first[0].dtype == np.uint8
    assert np.bincount(targets).tolist() == [3] * len(SHAPES)


def test_data_config_builds_the_set_and_rejects_unknown_kinds() -> None:
    cfg = compose_cfg([*SMALL, "data=shapes", "data.shapes.per_class=2", "data.limit=null"])
    images = load_image_set(cfg.data)
    assert len(images) == 2 * len(SHAPES) and images.class_names == list(SHAPES)
    bad = compose_cfg([*SMALL, "data=shapes", "data.shapes.kinds=[circle,hexagon]"])
    with pytest.raises(ConfigError, match=r"data\.shapes\.kinds.*hexagon"):
        load_image_set(bad.data)


def test_shapes_train_end_to_end(tmp_path) -> None:
    import json

    from evolver.app import train_task

    cfg = compose_cfg([*SMALL, "data=shapes", "data.shapes.per_class=6", "data.limit=null"])
    objective = train_task(cfg, run_dir=tmp_path / "run")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "complete" and np.isfinite(objective)
    assert len(summary["folds"]) == 2
