"""Thresholds of the diagnosis rules: defaults documented in `conf/diagnosis/default.yaml`."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from evolver.errors import ConfigError
from evolver.validation import is_number, is_whole

# Keys of the `diagnosis` config group that are not thresholds.
OPTION_KEYS = frozenset({"enabled", "plots", "baseline_score", "target_score"})


@dataclass(frozen=True)
class Thresholds:
    """Every number a finding rule compares against. Relative values are fractions of a loss."""

    degradation_tolerance: float = 0.01
    overfit_min_rise: float = 0.03
    overfit_min_fold_fraction: float = 0.5
    lr_best_within_phase2_epochs: int = 2
    spike_rise: float = 0.15
    phase_switch_jump: float = 0.05
    lr_min_fold_fraction: float = 0.5
    eager_noise_factor: float = 2.0
    short_best_position: float = 0.75
    long_best_position: float = 0.1
    position_min_fold_fraction: float = 0.5
    volatility_max: float = 0.05
    fold_spread_max: float = 0.1
    final_vs_best_gap: float = 0.02
    head_min_improvement: float = 0.02
    head_still_learning_gain: float = 0.1
    underfit_min_train_drop: float = 0.3
    explode_factor: float = 3.0
    lr_scale_down: float = 5.0
    lr_scale_up: float = 3.0
    patience_scale_up: float = 2.0
    epochs_scale_up: float = 1.5
    batch_scale_up: float = 2.0
    calibration_min_gain: float = 0.02
    smoothing_floor_share: float = 0.5
    smoothing_min_fold_fraction: float = 0.5
    smoothing_scale_down: float = 10.0

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | None) -> Thresholds:
        """Thresholds from a `diagnosis` config mapping; unknown keys and bad values raise."""
        if not values:
            return cls()
        fields = {field.name: field for field in dataclasses.fields(cls)}
        chosen: dict[str, Any] = {}
        for key, value in values.items():
            if key in OPTION_KEYS:
                continue
            if key not in fields:
                raise ConfigError(f"diagnosis.{key}", "unknown diagnosis setting")
            chosen[key] = _number(f"diagnosis.{key}", value, integer=fields[key].type == "int")
        return cls(**chosen)

    def to_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class ScoreReference:
    """A baseline to beat and a target to reach (lower is better), either may be unknown."""

    baseline: float | None = None
    target: float | None = None

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | None) -> ScoreReference:
        values = values or {}
        return cls(
            baseline=_optional_score("diagnosis.baseline_score", values.get("baseline_score")),
            target=_optional_score("diagnosis.target_score", values.get("target_score")),
        )

    def merged(self, baseline: float | None, target: float | None) -> ScoreReference:
        """This reference with explicitly given values taking precedence."""
        return ScoreReference(
            baseline=self.baseline if baseline is None else baseline,
            target=self.target if target is None else target,
        )


def _number(field: str, value: Any, *, integer: bool) -> float | int:
    if not is_number(value):
        raise ConfigError(field, f"expected a number, got {value!r}")
    if not math.isfinite(value) or value < 0:
        raise ConfigError(field, f"expected a finite number >= 0, got {value!r}")
    if integer:
        if not is_whole(value):
            raise ConfigError(field, f"expected an integer, got {value!r}")
        return int(value)
    return float(value)


def _optional_score(field: str, value: Any) -> float | None:
    if value is None:
        return None
    return float(_number(field, value, integer=False))
