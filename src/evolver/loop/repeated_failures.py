"""Remedies not worth training again: a proposal the pruner already stopped on settings that
train identically up to where it was stopped, and settings an earlier complete trial already
trained epoch for epoch to its end.

A trial trained from scratch repeats an earlier one epoch for epoch, up to the earlier one's end,
when the two differ only in what happens after it (more phase-2 epochs, more patience, early
stopping off) and the schedule does not depend on the number of epochs: the rule of
`evolver.continuable`. So when the pruner stopped an earlier trial of the same proposal for being
worse than its base at some epoch, a new trial of that proposal on such settings reaches the same
epoch with the same curve and is stopped there again. This happens in the seed's regime: bases
that differ only in their length (the base, its train-longer continuation) carry the same
from-scratch remedies, and each retry would pay the same epochs for the same verdict.

Raced-out trials are not repeats in this sense: they finished their folds, and more epochs could
have changed their fold scores. Continuations are not either: they start from their own base.

The same rule covers complete trials: when every fold of an earlier trial was
stopped early, a trial that differs from it only in a phase-2 epoch cap at or above the epochs
those folds trained is stopped by early stopping at the same epochs, and ends with the same
weights and scores. In the seed's regime the loop meets this often: a remedy such as a higher
head rate, proposed again on a base that only trains longer (or on its train-longer runner-up),
is the trial it already ran.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from evolver.continuable import CONTINUABLE_SCHEDULES, blockers, differing_keys, flatten
from evolver.loop.continued_trials import CONTINUES_ATTR
from evolver.loop.racing import RACE_ATTR
from evolver.loop.space import SearchSpace, format_value
from evolver.loop.state import parse_value
from evolver.records import CONTINUED_KEY, SUMMARY_FILE

EPOCHS_KEY = "finetune.phase2_epochs"


def configured_settings(cfg: Any) -> dict[str, Any]:
    """The loop's composed config as flat {dotted.key: value}: what a trial runs with where its
    parameters and fixed overrides say nothing."""
    from omegaconf import DictConfig, OmegaConf

    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_container(cfg, resolve=False)
    return flatten(cfg) if isinstance(cfg, Mapping) else {}


def trial_settings(
    params: Mapping[str, Any],
    fixed_overrides: Sequence[str] | None,
    space: SearchSpace,
    configured: Mapping[str, Any],
) -> dict[str, Any]:
    """A planned or finished trial's settings, flat: the configured ones with its parameters'
    overrides (choices mapped, `schedule=cosine` as `schedule.name`) and its fixed overrides."""
    lines = space.overrides({name: value for name, value in params.items() if name in space})
    lines += [f"{name}={format_value(v)}" for name, v in params.items() if name not in space]
    settings = dict(configured)
    for line in [*lines, *(fixed_overrides or [])]:
        key, _, text = str(line).partition("=")
        settings[key if "." in key else f"{key}.name"] = parse_value(text)
    return settings


def earlier_repeat(
    proposal: str,
    params: Mapping[str, Any],
    user_attrs: Mapping[str, Any],
    trials: Iterable[Any],
    space: SearchSpace,
    configured: Mapping[str, Any],
) -> Any | None:
    """The earlier trial that a new trial of `proposal` with `params` and `user_attrs` would
    repeat: one of the same proposal that the pruner stopped, repeated up to that point, or a
    complete one repeated epoch for epoch to its end. None when there is none (or the new trial
    continues its base)."""
    if CONTINUES_ATTR in user_attrs:
        return None
    planned: dict[str, Any] | None = None
    for trial in trials:
        pruned = _stopped_by_pruner(trial, proposal)
        stopped_within = None if pruned else _early_stopped_from_scratch(trial)
        if not pruned and stopped_within is None:
            continue
        if planned is None:
            planned = trial_settings(params, user_attrs.get("fixed_overrides"), space, configured)
        earlier = trial_settings(
            trial.params, trial.user_attrs.get("fixed_overrides"), space, configured
        )
        if pruned and not blockers(earlier, planned):
            return trial
        if stopped_within is not None and _trains_to_same_stops(earlier, planned, stopped_within):
            return trial
    return None


def _trains_to_same_stops(
    earlier: Mapping[str, Any], planned: Mapping[str, Any], stopped_within: int
) -> bool:
    """Whether `planned` differs from `earlier` only in a phase-2 cap at or above the epochs its
    early-stopped folds trained, under a schedule that does not depend on the cap."""
    if earlier.get("schedule.name") not in CONTINUABLE_SCHEDULES:
        return False
    cap = planned.get(EPOCHS_KEY)
    return (
        differing_keys(earlier, planned) == [EPOCHS_KEY]
        and isinstance(cap, int)
        and cap >= stopped_within
    )


def _early_stopped_from_scratch(trial: Any) -> int | None:
    if trial.state.name != "COMPLETE" or CONTINUES_ATTR in trial.user_attrs:
        return None
    return early_stopped_epochs(trial)


def early_stopped_epochs(trial: Any) -> int | None:
    """The most phase-2 epochs any fold of a trial trained from scratch when early stopping
    ended every fold; None when one ran to its cap, or the records do not say."""
    run_dir = trial.user_attrs.get("run_dir")
    if not run_dir:
        return None
    try:
        summary = json.loads((Path(run_dir) / SUMMARY_FILE).read_text())
    except (OSError, ValueError):
        return None
    folds = summary.get("folds") if isinstance(summary, dict) else None
    if not folds or summary.get(CONTINUED_KEY):
        return None
    epochs = [fold.get("phase2_epochs") for fold in folds if fold.get("early_stopped") is True]
    if len(epochs) != len(folds) or not all(isinstance(e, int) for e in epochs):
        return None
    return max(epochs)


def _stopped_by_pruner(trial: Any, proposal: str) -> bool:
    attrs = trial.user_attrs
    return (
        trial.state.name == "PRUNED"
        and attrs.get("proposal") == proposal
        and not attrs.get(RACE_ATTR)
        and CONTINUES_ATTR not in attrs
        and bool(trial.intermediate_values)
    )
