"""The offline pretrained task: bundled backbone weights (model=tiny_pretrained) fine-tuned on
shapes the backbone never saw (data=shapes_target), as an ImageNet backbone on dogs vs cats."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from training_support import compose_cfg, tiny

import evolver.weights as weights
from evolver.config import validate_settings
from evolver.data.shapes import SHAPES
from evolver.data.sources import load_image_set
from evolver.errors import ConfigError

NAME = "test_resnet_shapes"
# 2 folds, 1 + 2 epochs, 100 images per class: a few seconds per run.
QUICK = tiny(
    "model=tiny_pretrained",
    "data=shapes_target",
    "data.shapes.per_class=100",
    "data.batch_size=16",
    "data.limit=null",
    "finetune.phase1_epochs=1",
    "finetune.phase2_epochs=2",
    "diagnosis.enabled=false",
    "trainer.num_threads=1",
)


def test_bundled_weights_exist_are_small_and_match_their_hash() -> None:
    filename, expected = weights.PRETRAINED[NAME]
    path = weights.weights_path(NAME)
    assert path.name == filename and path.is_file()
    assert path.stat().st_size < 2_000_000
    assert hashlib.sha256(path.read_bytes()).hexdigest() == expected


def test_a_changed_file_or_unknown_name_is_a_one_line_config_error(monkeypatch) -> None:
    filename, _ = weights.PRETRAINED[NAME]
    monkeypatch.setitem(weights.PRETRAINED, NAME, (filename, "0" * 64))
    monkeypatch.setattr(weights, "_verified", set())
    with pytest.raises(ConfigError, match=r"^model\.pretrained_path: .*sha256") as error:
        weights.resolve_pretrained_path(f"bundled:{NAME}")
    assert "\n" not in str(error.value)
    with pytest.raises(ConfigError, match=r"no bundled weights 'nope'"):
        weights.resolve_pretrained_path("bundled:nope")


def test_target_task_differs_from_the_source_and_configs_validate_from_any_cwd(
    tmp_path: Path, monkeypatch
) -> None:
    cfg = compose_cfg(QUICK)
    images = load_image_set(cfg.data)
    assert images.class_names == ["heart", "crescent"]
    assert not set(images.class_names) & set(SHAPES)  # kinds the backbone never saw
    monkeypatch.chdir(tmp_path)
    assert cfg.model.pretrained_path == f"bundled:{NAME}"
    validate_settings(cfg)  # resolves the bundled file wherever the run starts
    assert os.path.isabs(weights.resolve_pretrained_path(cfg.model.pretrained_path))


def test_backbone_loads_the_file_with_a_new_head() -> None:
    from safetensors.torch import load_file

    from evolver.model import create_backbone

    cfg = compose_cfg(QUICK)
    state = load_file(weights.weights_path(NAME))
    assert not any(key.startswith("fc.") for key in state)  # a backbone only
    model = create_backbone(cfg.model.name, 2, cfg.model.pretrained, cfg.model.pretrained_path)
    assert torch.equal(model.conv1[0].weight, state["conv1.0.weight"])
    assert all(torch.equal(value, model.state_dict()[key]) for key, value in state.items())
    assert model.get_classifier().out_features == 2


@pytest.mark.slow
def test_pretrained_backbone_beats_training_from_scratch(tmp_path: Path) -> None:
    from evolver.app import train_task

    losses = {}
    for model in ("tiny_pretrained", "tiny"):
        cfg = compose_cfg([*QUICK, f"model={model}"])
        train_task(cfg, run_dir=tmp_path / model)
        summary = json.loads((tmp_path / model / "summary.json").read_text())
        assert summary["status"] == "complete" and len(summary["folds"]) == 2
        losses[model] = summary["cv"]["loss_best"]
    assert losses["tiny_pretrained"] < losses["tiny"] - 0.3, losses
