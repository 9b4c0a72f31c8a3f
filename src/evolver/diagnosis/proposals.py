"""Proposals: concrete config changes that answer a finding, computed from the run's settings.

A `Proposal` is both structured (`changes`: config key -> new value) and ready to run
(`overrides`: Hydra override strings that `evolver train` accepts as they are). A key without a
dot selects a config group (`schedule` -> `schedule=cosine`) and is always emitted before the keys
of that group. Builders return None when the records do not hold what the change would be
computed from, rather than guessing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from evolver.continuable import CONTINUABLE_SCHEDULES, LR_SCALE_KEY
from evolver.diagnosis.posthoc import Choice as PosthocChoice
from evolver.diagnosis.posthoc import tta_name
from evolver.diagnosis.records import RunSettings
from evolver.diagnosis.thresholds import Thresholds

# Optimizers for which the linear batch-size/LR scaling rule holds; adaptive ones scale by sqrt.
LINEAR_SCALING_OPTIMIZERS = frozenset({"sgd", "momentum", "nesterov"})
# The label smoothing `more_regularization` raises a lower one to.
RAISED_SMOOTHING = 0.1


@dataclass(frozen=True, eq=True)
class Proposal:
    """One change to try next.

    - `name`: stable id of the kind of change (e.g. `lower_learning_rates`).
    - `finding`: id of the finding it answers.
    - `changes`: config key -> new value, e.g. {"finetune.lr_backbone": 2e-05}; a key without a
      dot selects a group, e.g. {"schedule": "cosine"}.
    - `reason`: one sentence with the numbers it was computed from.
    - `expected_effect`: {"metric": <RunMetrics field>, "direction": "down"|"up"}.
    - `needs_training`: False for a change scored from the run's stored out-of-fold predictions
      (a post-hoc choice: temperature, clip, checkpoint, TTA).
    """

    name: str
    finding: str
    changes: dict[str, Any]
    reason: str
    expected_effect: dict[str, str] = field(default_factory=dict)
    needs_training: bool = True

    @property
    def overrides(self) -> list[str]:
        """Hydra overrides, group selections first: `schedule=cosine schedule.warmup_epochs=2`."""
        groups = [key for key in self.changes if "." not in key]
        keys = [key for key in self.changes if "." in key]
        return [f"{key}={format_override_value(self.changes[key])}" for key in groups + keys]

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "finding": self.finding,
            "changes": dict(self.changes),
            "overrides": self.overrides,
            "reason": self.reason,
            "expected_effect": dict(self.expected_effect),
            "needs_training": self.needs_training,
        }

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Proposal:
        return cls(
            name=values["name"],
            finding=values["finding"],
            changes=dict(values["changes"]),
            reason=values["reason"],
            expected_effect=dict(values.get("expected_effect") or {}),
            needs_training=bool(values.get("needs_training", True)),
        )


def format_override_value(value: Any) -> str:
    """A value as Hydra's override grammar reads it back to the same value."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def significant(value: float, digits: int = 3) -> float:
    """Round to a few significant digits so overrides stay readable (1e-4 / 5 -> 2e-05)."""
    if value == 0 or not math.isfinite(value):
        return value
    return float(f"{value:.{digits}g}")


def effect(metric: str, direction: str) -> dict[str, str]:
    return {"metric": metric, "direction": direction}


def scale_learning_rates(
    finding: str, settings: RunSettings, factor: float, name: str, reason: str, expected: dict
) -> Proposal | None:
    """Both learning rates multiplied by `factor` (only those the records know)."""
    changes: dict[str, Any] = {}
    used = []
    for key, value in (("lr_backbone", settings.lr_backbone), ("lr_head", settings.lr_head)):
        if value is not None and value > 0:
            changes[f"finetune.{key}"] = significant(value * factor)
            used.append(f"{key} {value:g} -> {changes[f'finetune.{key}']:g}")
    if not changes:
        return None
    return Proposal(name, finding, changes, f"{reason} ({', '.join(used)}).", expected)


def lower_learning_rates(
    finding: str, settings: RunSettings, thresholds: Thresholds, reason: str
) -> Proposal | None:
    return scale_learning_rates(
        finding,
        settings,
        1.0 / thresholds.lr_scale_down,
        "lower_learning_rates",
        f"{reason}; scale both learning rates down {thresholds.lr_scale_down:g}x",
        effect("mean_degradation", "down"),
    )


def lower_backbone_lr(
    finding: str, settings: RunSettings, thresholds: Thresholds, reason: str
) -> Proposal | None:
    """The backbone's rate `lr_scale_down` times lower, the head's kept."""
    if settings.lr_backbone is None or settings.lr_backbone <= 0:
        return None
    lr = significant(settings.lr_backbone / thresholds.lr_scale_down)
    return Proposal(
        "lower_backbone_lr",
        finding,
        {"finetune.lr_backbone": lr},
        f"{reason}; backbone learning rate {settings.lr_backbone:g} -> {lr:g}, the head's kept "
        f"({_known(settings.lr_head)}).",
        effect("mean_degradation", "down"),
    )


def raise_learning_rates(
    finding: str, settings: RunSettings, thresholds: Thresholds, reason: str
) -> Proposal | None:
    return scale_learning_rates(
        finding,
        settings,
        thresholds.lr_scale_up,
        "raise_learning_rates",
        f"{reason}; scale both learning rates up {thresholds.lr_scale_up:g}x",
        effect("mean_best_val_loss", "down"),
    )


def continue_at_lower_lr(
    finding: str, settings: RunSettings, thresholds: Thresholds, reason: str
) -> Proposal | None:
    """Each fold continued from where it ended with both rates `lr_scale_down` times lower,
    for up to `patience` (at least 2) more phase-2 epochs: the base's epochs are not paid again.

    Only for a run that can be continued (a schedule that does not depend on the number of
    epochs); the loop runs it as a continuation of its base, or not at all
    (`continues_base`)."""
    if settings.schedule not in CONTINUABLE_SCHEDULES or not settings.max_phase2_epochs:
        return None
    scale = significant(1.0 / thresholds.lr_scale_down)
    extra = max(2, settings.patience or 0) if settings.early_stop_enabled is not False else 2
    epochs = settings.max_phase2_epochs + extra
    return Proposal(
        "continue_at_lower_lr",
        finding,
        {LR_SCALE_KEY: scale, "finetune.phase2_epochs": epochs},
        f"{reason}; continue each fold from where it ended with both learning rates "
        f"{thresholds.lr_scale_down:g}x lower, for up to {extra} more phase-2 epochs.",
        effect("mean_best_val_loss", "down"),
    )


def continues_base(proposal: Proposal) -> bool:
    """Whether the proposal only makes sense as a continuation of the run it was made from."""
    return LR_SCALE_KEY in proposal.changes


def cosine_with_warmup(finding: str, settings: RunSettings, reason: str) -> Proposal | None:
    """Cosine decay with 2 warmup epochs, unless the run already used it."""
    warmup = max(2, settings.warmup_epochs or 0)
    if settings.schedule == "cosine" and (settings.warmup_epochs or 0) >= 2:
        return None
    changes: dict[str, Any] = {}
    if settings.schedule != "cosine":
        changes["schedule"] = "cosine"
    changes["schedule.warmup_epochs"] = warmup
    return Proposal(
        "cosine_with_warmup",
        finding,
        changes,
        f"{reason}; decay the learning rate with cosine after {warmup} warmup epochs "
        f"(schedule was {_known(settings.schedule)}, warmup {_known(settings.warmup_epochs)}).",
        effect("mean_volatility", "down"),
    )


def raise_patience(
    finding: str, settings: RunSettings, thresholds: Thresholds, reason: str
) -> Proposal | None:
    if settings.early_stop_enabled is False or settings.patience is None:
        return None
    scaled = math.ceil(settings.patience * thresholds.patience_scale_up)
    patience = max(scaled, settings.patience + 2)
    return Proposal(
        "raise_patience",
        finding,
        {"early_stop.patience": patience},
        f"{reason}; wait {patience} epochs instead of {settings.patience} before stopping.",
        effect("folds_early_stopped", "down"),
    )


def disable_early_stopping(
    finding: str, settings: RunSettings, thresholds: Thresholds, reason: str, phase2_epochs: int
) -> Proposal | None:
    """Early stopping off, best checkpoint kept, phase 2 lengthened: the Playbook's advice."""
    if settings.early_stop_enabled is False:
        return None
    changes: dict[str, Any] = {"early_stop.enabled": False}
    if settings.checkpoint != "best":
        changes["checkpoint.select"] = "best"
    longer = longer_phase2_epochs(settings, thresholds, phase2_epochs)
    if longer is not None:
        changes["finetune.phase2_epochs"] = longer
    return Proposal(
        "disable_early_stopping",
        finding,
        changes,
        f"{reason}; train the full schedule and keep the best checkpoint instead of stopping.",
        effect("mean_best_val_loss", "down"),
    )


def longer_phase2_epochs(
    settings: RunSettings, thresholds: Thresholds, observed_phase2: int
) -> int | None:
    base = settings.max_phase2_epochs or observed_phase2
    if not base:
        return None
    return max(math.ceil(base * thresholds.epochs_scale_up), base + 1)


def train_longer(
    finding: str, settings: RunSettings, thresholds: Thresholds, reason: str, observed_phase2: int
) -> Proposal | None:
    epochs = longer_phase2_epochs(settings, thresholds, observed_phase2)
    if epochs is None:
        return None
    base = settings.max_phase2_epochs or observed_phase2
    return Proposal(
        "train_longer",
        finding,
        {"finetune.phase2_epochs": epochs},
        f"{reason}; train {epochs} phase-2 epochs instead of {base}.",
        effect("mean_best_val_loss", "down"),
    )


def train_shorter(
    finding: str, settings: RunSettings, reason: str, best_phase2_epoch: float, observed: int
) -> Proposal | None:
    base = settings.max_phase2_epochs or observed
    epochs = max(2, math.ceil(best_phase2_epoch * 2))
    if not base or epochs >= base:
        return None
    return Proposal(
        "train_shorter",
        finding,
        {"finetune.phase2_epochs": epochs},
        f"{reason}; {epochs} phase-2 epochs instead of {base} reach the same best for less time.",
        effect("mean_epochs_trained", "down"),
    )


def larger_batch(
    finding: str, settings: RunSettings, thresholds: Thresholds, reason: str
) -> Proposal | None:
    """Batch size up, learning rates re-scaled (linear rule for SGD, square root for Adam)."""
    if settings.batch_size is None:
        return None
    factor = thresholds.batch_scale_up
    batch = round(settings.batch_size * factor)
    linear = (settings.optimizer or "").lower() in LINEAR_SCALING_OPTIMIZERS
    lr_factor = factor if linear else math.sqrt(factor)
    changes: dict[str, Any] = {"data.batch_size": batch}
    for key, value in (("lr_backbone", settings.lr_backbone), ("lr_head", settings.lr_head)):
        if value is not None and value > 0:
            changes[f"finetune.{key}"] = significant(value * lr_factor)
    rule = "linear" if linear else "square-root"
    return Proposal(
        "larger_batch",
        finding,
        changes,
        f"{reason}; batch {settings.batch_size} -> {batch} averages out gradient noise, "
        f"learning rates re-scaled {lr_factor:.3g}x ({rule} rule).",
        effect("mean_volatility", "down"),
    )


def more_regularization(
    finding: str, settings: RunSettings, reason: str, *, raise_smoothing: bool = True
) -> Proposal:
    """Stronger augmentation: mixup and random erasing raised, label smoothing at least
    `RAISED_SMOOTHING` unless `raise_smoothing` is False (that smoothing would cap the
    validation loss)."""
    mixup = settings.mixup or 0.0
    erasing = settings.random_erasing or 0.0
    changes: dict[str, Any] = {
        "regularization.mixup": round(min(max(0.2, mixup + 0.2), 0.8), 3),
        "regularization.random_erasing": round(min(max(0.25, erasing + 0.15), 0.5), 3),
    }
    smoothing = settings.label_smoothing
    if raise_smoothing and smoothing is not None and smoothing < RAISED_SMOOTHING:
        changes["regularization.label_smoothing"] = RAISED_SMOOTHING
    return Proposal(
        "more_regularization",
        finding,
        changes,
        f"{reason}; regularize harder (mixup {_known(settings.mixup)}, random erasing "
        f"{_known(settings.random_erasing)} before).",
        effect("mean_degradation", "down"),
    )


def less_regularization(finding: str, settings: RunSettings, reason: str) -> Proposal | None:
    changes: dict[str, Any] = {}
    for key in ("mixup", "cutmix", "random_erasing", "label_smoothing", "drop_path_rate"):
        value = getattr(settings, key)
        if value:
            changes[f"regularization.{key}"] = round(value / 2, 4)
    if not changes:
        return None
    return Proposal(
        "less_regularization",
        finding,
        changes,
        f"{reason}; halve the regularization that keeps the training loss up.",
        effect("mean_best_val_loss", "down"),
    )


def smoothing_floor(label_smoothing: float, num_classes: int) -> float:
    """The lowest validation cross-entropy that training towards smoothed targets leads to: the
    loss of predicting the smoothed target 1 - e(K-1)/K for the true class of every image."""
    return -math.log(1.0 - label_smoothing * (num_classes - 1) / num_classes)


def lower_label_smoothing(
    finding: str, settings: RunSettings, thresholds: Thresholds, reason: str
) -> Proposal | None:
    """Label smoothing `smoothing_scale_down` times lower (validation loss is plain
    cross-entropy, so the smoothed targets' floor is paid in full)."""
    smoothing = settings.label_smoothing
    if not smoothing:
        return None
    lowered = significant(smoothing / thresholds.smoothing_scale_down)
    floor = (
        f", its floor {smoothing_floor(smoothing, settings.num_classes):.3g} -> "
        f"{smoothing_floor(lowered, settings.num_classes):.3g}"
        if settings.num_classes and settings.num_classes >= 2
        else ""
    )
    return Proposal(
        "lower_label_smoothing",
        finding,
        {"regularization.label_smoothing": lowered},
        f"{reason}; label smoothing {smoothing:g} -> {lowered:g}{floor}.",
        effect("mean_best_val_loss", "down"),
    )


def select_best_checkpoint(finding: str, settings: RunSettings, reason: str) -> Proposal | None:
    if settings.checkpoint == "best":
        return None
    return Proposal(
        "select_best_checkpoint",
        finding,
        {"checkpoint.select": "best"},
        f"{reason}; score each fold with its best checkpoint instead of its last weights.",
        effect("score", "down"),
    )


def raise_head_lr(
    finding: str, settings: RunSettings, thresholds: Thresholds, reason: str
) -> Proposal | None:
    if settings.lr_head is None or settings.lr_head <= 0:
        return None
    lr = significant(settings.lr_head * thresholds.lr_scale_down / 2)
    return Proposal(
        "raise_head_lr",
        finding,
        {"finetune.lr_head": lr},
        f"{reason}; head learning rate {settings.lr_head:g} -> {lr:g}.",
        effect("mean_best_val_loss", "down"),
    )


def more_head_epochs(finding: str, settings: RunSettings, reason: str) -> Proposal | None:
    if settings.max_phase1_epochs is None:
        return None
    epochs = settings.max_phase1_epochs + 2
    return Proposal(
        "more_head_epochs",
        finding,
        {"finetune.phase1_epochs": epochs},
        f"{reason}; give the head {epochs} epochs instead of {settings.max_phase1_epochs}.",
        effect("mean_best_val_loss", "down"),
    )


def posthoc_choice(
    finding: str,
    choice: PosthocChoice,
    configured_checkpoint: str | None,
    configured_views: Sequence[str] | None,
    reason: str,
) -> Proposal | None:
    """The post-hoc choice as overrides `evolver predict` applies: temperature and clip, and the
    checkpoint and TTA where they differ from the run's."""
    changes: dict[str, Any] = {}
    if choice.tta != tta_name(configured_views or ()):
        changes["tta"] = choice.tta
    if choice.checkpoint != configured_checkpoint:
        changes["checkpoint.select"] = choice.checkpoint
    changes["predict.temperature"] = significant(choice.temperature)
    if choice.clip is not None:
        changes["predict.clip"] = choice.clip
    return Proposal(
        "posthoc_choice",
        finding,
        changes,
        f"{reason}; predict with {choice.checkpoint} weights, TTA {choice.tta}, temperature "
        f"{choice.temperature:.3g}" + (f", clip {choice.clip:g}." if choice.clip else "."),
        effect("score", "down"),
        needs_training=False,
    )


def compact(proposals: list[Proposal | None]) -> list[Proposal]:
    return [proposal for proposal in proposals if proposal is not None]


def _known(value: Any) -> str:
    return "unknown" if value is None else f"{value:g}" if isinstance(value, float) else str(value)
