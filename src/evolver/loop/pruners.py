"""Pruning a proposal against the trial it was built from, at the same fold and epoch."""

from __future__ import annotations

import math
from typing import Any

import optuna
from optuna.pruners import BasePruner

from evolver.fold_steps import epoch_of


class BaseCurvePruner(BasePruner):
    """Prunes a proposal whose validation loss at fold f, epoch e is worse than its base trial's
    at the same fold and epoch by more than `tolerance` (relative), after `warmup_epochs`.

    A proposal changes one thing about its base, so the base's own curve is the fair yardstick:
    the median of unrelated trials would cut a train-longer proposal for looking like its base
    early on. Steps the base never reached (epochs past its end, or a fold it did not train) are
    never pruned: a proposal that continues its base is judged there by fold racing.

    Args:
        base_number: the number of the trial the proposal was built from.
        tolerance: how much worse than the base, relative to the base's value, is too much.
        warmup_epochs: epochs of each fold never pruned.
    """

    def __init__(self, base_number: int, tolerance: float, warmup_epochs: int = 0) -> None:
        self.base_number = base_number
        self.tolerance = tolerance
        self.warmup_epochs = warmup_epochs
        self._base_curve: dict[int, float] | None = None

    def base_curve(self, study: optuna.Study) -> dict[int, float]:
        if self._base_curve is None:
            matches = [t for t in study.get_trials(deepcopy=False) if t.number == self.base_number]
            # The base finished before the proposal was built: its curve no longer changes.
            self._base_curve = dict(matches[0].intermediate_values) if matches else {}
        return self._base_curve

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        step = trial.last_step
        if step is None:
            return False
        return too_far(
            step,
            trial.intermediate_values[step],
            self.base_curve(study).get(step),
            self.tolerance,
            self.warmup_epochs,
        )

    def verdict(self, step: int, value: float) -> str:
        """Why `prune` stopped a trial that reported `value` at `step`, for the prune reason."""
        base = (self._base_curve or {}).get(step, math.nan)
        return (
            f"val loss {value:.4g} vs base trial {self.base_number}'s {base:.4g} at epoch "
            f"{epoch_of(step)} (tolerance {self.tolerance:.0%})"
        )


def base_number(user_attrs: Any) -> int | None:
    """The trial a proposal was built from (None for the baseline and sampled trials)."""
    from evolver.loop.state import BASELINE

    by = user_attrs.get("proposed_by")
    if not by or by == BASELINE:
        return None
    number = (user_attrs.get("incumbent") or {}).get("number")
    return int(number) if isinstance(number, int) else None


def too_far(
    step: int, value: float, base: float | None, tolerance: float, warmup_epochs: int
) -> bool:
    """Whether a proposal's `value` at `step` is worse than its base's value there by more than
    `tolerance` of it (never within the warmup epochs, nor where the base has no value)."""
    if epoch_of(step) <= warmup_epochs or base is None:
        return False
    if not (math.isfinite(value) and math.isfinite(base)):
        return False
    return value > base + tolerance * abs(base)


def first_prune_step(
    curve: dict[int, float], base_curve: dict[int, float], tolerance: float, warmup_epochs: int
) -> int | None:
    """The step at which `BaseCurvePruner` would stop a proposal reporting `curve` against its
    base's `base_curve`, or None: the pruner's rule replayed on a proposal that ran to its end."""
    for step in sorted(curve):
        if too_far(step, curve[step], base_curve.get(step), tolerance, warmup_epochs):
            return step
    return None
