"""The typed settings of the training config groups: built once, checked, carried as dicts."""

from __future__ import annotations

import pytest
from training_support import compose_cfg

from evolver.errors import ConfigError
from evolver.settings import TrainingSettings


def test_settings_from_the_default_config() -> None:
    settings = TrainingSettings.from_cfg(compose_cfg([]))
    assert settings.finetune.lr_backbone == 1e-4 and settings.finetune.max_epochs == 11
    assert settings.schedule.name == "plateau" and settings.schedule.plateau_patience == 1
    assert settings.early_stop.patience == 3 and settings.early_stop.enabled
    assert settings.optim.betas == (0.9, 0.999) and settings.optim.name == "adamw"
    assert settings.optim.target == "torch.optim.AdamW"


@pytest.mark.parametrize(
    "overrides", [[], ["optim=sgd", "schedule=cosine", "early_stop=off", "finetune.lr_head=3e-3"]]
)
def test_settings_survive_a_dict_round_trip(overrides: list[str]) -> None:
    settings = TrainingSettings.from_cfg(compose_cfg(overrides))
    assert TrainingSettings.from_dict(settings.to_dict()) == settings


def test_early_stopping_off_is_no_patience() -> None:
    settings = TrainingSettings.from_cfg(compose_cfg(["early_stop=off"]))
    assert settings.early_stop.patience is None and not settings.early_stop.enabled
    assert settings.early_stop.monitor == "val_loss"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("schedule.plateau_patience=-1", "schedule.plateau_patience: must be >= 0, got -1"),
        ("finetune.lr_backbone=0", "finetune.lr_backbone: must be positive, got 0"),
        ("optim.weight_decay=-1", "optim.weight_decay: must not be negative, got -1"),
    ],
)
def test_a_bad_value_names_its_field(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        TrainingSettings.from_cfg(compose_cfg([override]))
    assert str(caught.value) == message


def test_checkpoints_from_before_the_settings_still_describe_their_model() -> None:
    from evolver.model import current_hyper_parameters

    optim = {
        "optimizer": "sgd",
        "lr_backbone": 1e-4,
        "lr_head": 1e-3,
        "weight_decay": 0.01,
        "momentum": 0.9,
        "nesterov": True,
        "betas": [0.9, 0.999],
        "schedule": "plateau",
        "warmup_epochs": 0,
        "plateau_factor": 0.5,
        "plateau_patience": 1,
        "min_lr": 1e-7,
        "pct_start": 0.3,
        "phase1_epochs": 3,
        "phase2_epochs": 8,
        "monitor": "val_loss",
    }
    saved = {
        "model_name": "resnet18",
        "num_classes": 2,
        "class_names": ["a", "b"],
        "optim": optim,
        "loss": {"label_smoothing": 0.1, "mixup": 0.0, "cutmix": 0.0},
        "drop_rate": 0.0,
        "drop_path_rate": 0.1,
        "channels_last": False,
    }
    current = current_hyper_parameters(saved)
    settings = TrainingSettings.from_dict(current["settings"])
    assert settings.optim.name == "sgd" and settings.regularization.drop_path_rate == 0.1
    assert settings.finetune.phase1_epochs == 3 and settings.schedule.factor == 0.5
    assert current["class_names"] == ["a", "b"] and "optim" not in current
    assert current_hyper_parameters(current) == current


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ([], {"class": "AdamW", "betas": (0.9, 0.999), "weight_decay": 0.01}),
        (["optim=sgd"], {"class": "SGD", "nesterov": True, "momentum": 0.9}),
        # Any torch optimizer: a new class and its own arguments, no code change.
        (
            ["optim._target_=torch.optim.RAdam", "optim.betas=[0.8,0.99]"],
            {"class": "RAdam", "betas": (0.8, 0.99), "weight_decay": 0.01},
        ),
    ],
)
def test_the_optim_node_is_instantiated_one_to_one(overrides: list[str], expected: dict) -> None:
    import torch

    from evolver.config import validate_settings
    from evolver.optimizers import make_optimizer

    settings = validate_settings(compose_cfg(overrides))
    weights = torch.nn.Parameter(torch.zeros(2))
    groups = [{"params": [weights], "lr": 1e-4, "name": "lr_backbone"}]
    optimizer = make_optimizer(settings.optim, groups, lr=1e-3)
    assert type(optimizer).__name__ == expected.pop("class")
    assert settings.optim.name == type(optimizer).__name__.lower()
    group = optimizer.param_groups[0]
    assert group["lr"] == 1e-4 and group["name"] == "lr_backbone"
    for key, value in expected.items():
        assert tuple(group[key]) == value if key == "betas" else group[key] == value
    assert TrainingSettings.from_dict(settings.to_dict()) == settings


def test_settings_written_before_the_target_node_still_load() -> None:
    legacy = TrainingSettings.from_cfg(compose_cfg(["optim=sgd"])).to_dict()
    legacy["optim"] = {
        "name": "sgd",
        "weight_decay": 1e-4,
        "momentum": 0.9,
        "nesterov": True,
        "betas": [0.9, 0.999],
    }
    optim = TrainingSettings.from_dict(legacy).optim
    assert optim.target == "torch.optim.SGD"
    assert optim.options == {"momentum": 0.9, "nesterov": True}
