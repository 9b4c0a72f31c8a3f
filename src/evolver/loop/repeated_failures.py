"""Remedies not worth training again: a proposal the pruner already stopped on settings that
train identically up to where it was stopped.

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
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from evolver.continuable import blockers, flatten
from evolver.loop.continued_trials import CONTINUES_ATTR
from evolver.loop.racing import RACE_ATTR
from evolver.loop.space import SearchSpace, format_value
from evolver.loop.state import parse_value


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


def pruned_repeat(
    proposal: str,
    params: Mapping[str, Any],
    user_attrs: Mapping[str, Any],
    trials: Iterable[Any],
    space: SearchSpace,
    configured: Mapping[str, Any],
) -> Any | None:
    """The earlier trial of `proposal` that the pruner stopped and that a new trial with `params`
    and `user_attrs` would repeat up to that point; None when there is none (or the new trial
    continues its base)."""
    if CONTINUES_ATTR in user_attrs:
        return None
    planned: dict[str, Any] | None = None
    for trial in trials:
        if not _stopped_by_pruner(trial, proposal):
            continue
        if planned is None:
            planned = trial_settings(params, user_attrs.get("fixed_overrides"), space, configured)
        earlier = trial_settings(
            trial.params, trial.user_attrs.get("fixed_overrides"), space, configured
        )
        if not blockers(earlier, planned):
            return trial
    return None


def _stopped_by_pruner(trial: Any, proposal: str) -> bool:
    attrs = trial.user_attrs
    return (
        trial.state.name == "PRUNED"
        and attrs.get("proposal") == proposal
        and not attrs.get(RACE_ATTR)
        and CONTINUES_ATTR not in attrs
        and bool(trial.intermediate_values)
    )
