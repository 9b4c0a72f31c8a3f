"""Typed settings of the training config groups, built once from the composed config.

One frozen dataclass per group (`finetune`, `optim`, `schedule`, `early_stop`,
`regularization`), grouped by `TrainingSettings`. `from_cfg` checks every value and raises a
one-line ConfigError naming the config field; `to_dict`/`from_dict` carry the settings through
checkpoint hyperparameters (plain dicts, lists, numbers and strings). Defaults live in the YAML:
a field has a default here only when its key is optional there (present in some options of the
group only). Pure Python: a config node is a dict or an OmegaConf node.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from evolver.errors import ConfigError
from evolver.validation import choice, integer, non_negative, number, positive, setting

SCHEDULES = ("plateau", "cosine", "onecycle", "constant")
# The optimizers of checkpoints written before `optim` was a `_target_` node.
LEGACY_OPTIMIZERS = {"adamw": "torch.optim.AdamW", "sgd": "torch.optim.SGD"}
MONITORS = ("val_loss", "val_acc")


def _epochs(field: str, value: Any) -> int:
    return integer(field, value, minimum=0, whole_floats=True)


@dataclass(frozen=True)
class FinetuneSettings:
    """`finetune`: phase 1 trains the head only, phase 2 everything with its own rates."""

    phase1_epochs: int
    phase2_epochs: int
    lr_backbone: float
    lr_head: float

    @classmethod
    def from_cfg(cls, node: Any) -> FinetuneSettings:
        lr_backbone = positive("finetune.lr_backbone", setting(node, "lr_backbone"))
        lr_head = positive("finetune.lr_head", setting(node, "lr_head"))
        phase1 = _epochs("finetune.phase1_epochs", setting(node, "phase1_epochs"))
        phase2 = _epochs("finetune.phase2_epochs", setting(node, "phase2_epochs"))
        if phase1 + phase2 < 1:
            raise ConfigError(
                "finetune.phase2_epochs", "phase1_epochs + phase2_epochs must be >= 1"
            )
        return cls(phase1, phase2, lr_backbone, lr_head)

    @property
    def max_epochs(self) -> int:
        return self.phase1_epochs + self.phase2_epochs


@dataclass(frozen=True)
class OptimizerSettings:
    """`optim`: a `_target_` config node (lightning-hydra-template's shape), instantiated 1:1
    with Hydra given the module's parameter groups and `finetune.lr_head` (`model.py`).

    `target` is the optimizer class (`torch.optim.AdamW`), `options` its other keyword
    arguments as the option sets them (`betas` for adamw; `momentum`, `nesterov` for sgd), so
    any torch optimizer fits with a new option file or `optim._target_=...`. That the class
    exists and takes those arguments is checked by `evolver.config` (it imports torch)."""

    target: str
    weight_decay: float
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """The class name, lower case (adamw, sgd): what reports and the diagnosis show."""
        return self.target.rsplit(".", 1)[-1].lower()

    @property
    def betas(self) -> tuple[float, float] | None:
        betas = self.options.get("betas")
        return None if betas is None else (float(betas[0]), float(betas[1]))

    @classmethod
    def from_cfg(cls, node: Any) -> OptimizerSettings:
        target = setting(node, "_target_")
        if not isinstance(target, str) or "." not in target:
            raise ConfigError(
                "optim._target_",
                f"must name an optimizer class, e.g. torch.optim.AdamW, got {target!r}",
            )
        weight_decay = non_negative("optim.weight_decay", setting(node, "weight_decay"))
        options = {
            str(key): _plain(setting(node, key))
            for key in node
            if key not in ("_target_", "_partial_", "weight_decay")
        }
        if "betas" in options:
            betas = options["betas"]
            if not isinstance(betas, list) or len(betas) != 2:
                raise ConfigError("optim.betas", f"must be two numbers, got {betas!r}")
            options["betas"] = [number("optim.betas", b, convert=True) for b in betas]
        if "momentum" in options:
            options["momentum"] = non_negative("optim.momentum", options["momentum"])
        return cls(target=target, weight_decay=weight_decay, options=options)

    def to_dict(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "weight_decay": self.weight_decay,
            "name": self.name,
            "options": dict(self.options),
        }

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> OptimizerSettings:
        """Also reads the `name` form written before `_target_` (adamw with betas, sgd with
        momentum and nesterov)."""
        if "target" in values:
            return cls(values["target"], values["weight_decay"], dict(values.get("options") or {}))
        name = values["name"]
        keys = ("momentum", "nesterov") if name == "sgd" else ("betas",)
        options = {key: _plain(values[key]) for key in keys if key in values}
        return cls(LEGACY_OPTIMIZERS[name], values["weight_decay"], options)


def _plain(value: Any) -> Any:
    """A config value as plain Python (an OmegaConf list becomes a list)."""
    if hasattr(value, "items"):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)) or type(value).__name__ == "ListConfig":
        return [_plain(v) for v in value]
    return value


@dataclass(frozen=True)
class ScheduleSettings:
    """`schedule`. `warmup_epochs` is in every option; the others are optional, each set by
    the option that uses it: `factor` and `plateau_patience` (plateau), `min_lr` (plateau,
    cosine), `pct_start` (onecycle)."""

    name: str
    warmup_epochs: int
    factor: float = 0.5
    plateau_patience: int = 1
    min_lr: float = 1e-7
    pct_start: float = 0.3

    @classmethod
    def from_cfg(cls, node: Any) -> ScheduleSettings:
        name = choice("schedule.name", setting(node, "name"), SCHEDULES)
        return cls(
            name=name,
            warmup_epochs=_epochs("schedule.warmup_epochs", setting(node, "warmup_epochs")),
            factor=positive("schedule.factor", setting(node, "factor", cls.factor)),
            plateau_patience=integer(
                "schedule.plateau_patience",
                setting(node, "plateau_patience", cls.plateau_patience),
                minimum=0,
                whole_floats=True,
            ),
            min_lr=non_negative("schedule.min_lr", setting(node, "min_lr", cls.min_lr)),
            pct_start=positive("schedule.pct_start", setting(node, "pct_start", cls.pct_start)),
        )


@dataclass(frozen=True)
class EarlyStopSettings:
    """`early_stop`: `patience` is None when early stopping is off (`early_stop.enabled=false`).
    `monitor` also drives the plateau schedule, so it is kept when early stopping is off."""

    patience: int | None
    monitor: str
    min_delta: float

    @property
    def enabled(self) -> bool:
        return self.patience is not None

    @classmethod
    def from_cfg(cls, node: Any) -> EarlyStopSettings:
        monitor = setting(node, "monitor") or "val_loss"
        min_delta = setting(node, "min_delta")
        if not setting(node, "enabled"):
            # Off: the other keys stay as written, unchecked (they take effect only when on).
            return cls(None, str(monitor), float(min_delta or 0.0))
        patience = integer(
            "early_stop.patience", setting(node, "patience"), minimum=1, whole_floats=True
        )
        return cls(
            patience=patience,
            monitor=choice("early_stop.monitor", monitor, MONITORS),
            min_delta=non_negative("early_stop.min_delta", min_delta),
        )


@dataclass(frozen=True)
class RegularizationSettings:
    """`regularization`: the training loss (label smoothing, timm mixup/cutmix), the model's
    dropout and drop-path, and the RandomErasing probability of the training transforms."""

    label_smoothing: float
    mixup: float
    cutmix: float
    random_erasing: float
    drop_rate: float
    drop_path_rate: float

    @classmethod
    def from_cfg(cls, node: Any) -> RegularizationSettings:
        field = "regularization.label_smoothing"
        smoothing = number(field, setting(node, "label_smoothing"), convert=True)
        if not 0 <= smoothing < 1:
            raise ConfigError(field, f"must be in [0, 1), got {smoothing}")
        values: dict[str, float] = {}
        for key in ("mixup", "cutmix", "drop_rate", "drop_path_rate", "random_erasing"):
            values[key] = non_negative(f"regularization.{key}", setting(node, key))
        for key in ("drop_rate", "drop_path_rate", "random_erasing"):
            if values[key] >= 1:
                raise ConfigError(f"regularization.{key}", "must be below 1")
        return cls(label_smoothing=smoothing, **values)


@dataclass(frozen=True)
class TrainingSettings:
    """The settings of one experiment's training, one field per config group."""

    finetune: FinetuneSettings
    optim: OptimizerSettings
    schedule: ScheduleSettings
    early_stop: EarlyStopSettings
    regularization: RegularizationSettings

    @classmethod
    def from_cfg(cls, cfg: Any) -> TrainingSettings:
        """Check and convert the groups in this order; ConfigError for the first bad value."""
        return cls(
            finetune=FinetuneSettings.from_cfg(setting(cfg, "finetune")),
            optim=OptimizerSettings.from_cfg(setting(cfg, "optim")),
            schedule=ScheduleSettings.from_cfg(setting(cfg, "schedule")),
            regularization=RegularizationSettings.from_cfg(setting(cfg, "regularization")),
            early_stop=EarlyStopSettings.from_cfg(setting(cfg, "early_stop")),
        )

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Plain values only (betas as a list), as `torch.load(weights_only=True)` reads them."""
        groups = {f.name: asdict(getattr(self, f.name)) for f in fields(self)}
        groups["optim"] = self.optim.to_dict()
        return groups

    @classmethod
    def from_dict(cls, values: Mapping[str, Mapping[str, Any]]) -> TrainingSettings:
        return cls(
            finetune=FinetuneSettings(**values["finetune"]),
            optim=OptimizerSettings.from_dict(values["optim"]),
            schedule=ScheduleSettings(**values["schedule"]),
            early_stop=EarlyStopSettings(**values["early_stop"]),
            regularization=RegularizationSettings(**values["regularization"]),
        )
