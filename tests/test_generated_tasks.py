"""The generated tasks: shapes and textures deterministic, balanced and validated; textures
learnable by the bundled pretrained backbone (the equal-compute benchmark's third task)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from training_support import SMALL, compose_cfg

from evolver.data.shapes import SHAPES, generate_shapes
from evolver.data.sources import load_image_set
from evolver.data.textures import TEXTURES, generate_textures
from evolver.errors import ConfigError


@pytest.mark.parametrize(
    ("generate", "kinds"), [(generate_textures, TEXTURES), (generate_shapes, SHAPES)]
)
def test_same_seed_same_images_and_classes_balanced(generate, kinds) -> None:
    first, targets = generate(3, size=24, seed=5)
    again, _ = generate(3, size=24, seed=5)
    other, _ = generate(3, size=24, seed=6)
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other, strict=True))
    assert first[0].shape == (24, 24, 3) and first[0].dtype == np.uint8
    assert np.bincount(targets).tolist() == [3] * len(kinds)


@pytest.mark.parametrize(
    ("source", "kinds", "bad_kinds"),
    [("textures", TEXTURES, "[stripes,plaid]"), ("shapes", SHAPES, "[circle,hexagon]")],
)
def test_data_config_builds_the_set_and_names_a_bad_field(source, kinds, bad_kinds) -> None:
    cfg = compose_cfg([*SMALL, f"data={source}", f"data.{source}.per_class=2", "data.limit=null"])
    images = load_image_set(cfg.data)
    assert len(images) == 2 * len(kinds) and images.class_names == list(kinds)
    bad = compose_cfg([*SMALL, f"data={source}", f"data.{source}.kinds={bad_kinds}"])
    unknown = bad_kinds.strip("[]").split(",")[1]
    with pytest.raises(ConfigError, match=rf"^data\.{source}\.kinds.*{unknown}"):
        load_image_set(bad.data)
    empty = compose_cfg([*SMALL, f"data={source}", f"data.{source}.per_class=0"])
    with pytest.raises(ConfigError, match=rf"^data\.{source}\.per_class"):
        load_image_set(empty.data)
    unselected = compose_cfg([*SMALL, f"data.source={source}"])  # the digits group's node
    with pytest.raises(ConfigError, match=rf"^data\.{source}\.kinds: missing; select data="):
        load_image_set(unselected.data)


@pytest.mark.slow
def test_the_pretrained_backbone_learns_the_textures_well_above_chance(tmp_path) -> None:
    from evolver.app import train_task

    cfg = compose_cfg(
        [
            "model=tiny_pretrained",
            "data=textures",
            "data.textures.per_class=60",
            "cv.folds=2",
            "finetune.phase1_epochs=3",
            "finetune.phase2_epochs=4",
            "trainer.enable_progress_bar=false",
            "tracking.enabled=false",
            "diagnosis.enabled=false",
        ]
    )
    train_task(cfg, run_dir=tmp_path / "run")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "complete"
    assert summary["cv"]["accuracy"] > 2.0 / len(TEXTURES)  # twice chance
