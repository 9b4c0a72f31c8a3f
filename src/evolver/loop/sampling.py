"""Sampling a trial's open parameters: seeded per trial, never a configuration already tried.

The values are drawn through the public sampler API before any of them is recorded on the trial
(Optuna stores a parameter at its first `suggest_*`), compared with every finished, running or
waiting configuration of the study, and drawn again with the next derived seed when they repeat
one. Workers sampling at the same moment cannot both take one configuration: a draw is kept only
once its reservation (an atomic insert in the storage) succeeds. The chosen values are then fixed
on the trial the way `Study.enqueue_trial` fixes them, so the trial's `suggest_*` calls return
them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from evolver.loop.state import configuration_key, trial_configuration

# Draws with the configured sampler, then with a random one: a model-based sampler given the
# same history often proposes the same values whatever its seed (TPE on a few categories).
SAMPLER_TRIES = 3
RANDOM_TRIES = 5
# States whose configurations a new trial must not repeat (failed trials may be tried again).
TAKEN_STATES = ("COMPLETE", "PRUNED", "RUNNING", "WAITING")

_MISSING = object()
SamplerFactory = Callable[[int, str | None], Any]  # (attempt, sampler kind or None) -> sampler
Reserve = Callable[[str], bool]  # configuration digest -> whether this trial may take it


@dataclass(frozen=True)
class Draw:
    """The values chosen for a trial's open parameters (None when every try repeated one)."""

    values: dict[str, Any] | None
    attempts: int


def draw_params(
    sampler: Any, study: Any, trial: Any, distributions: Mapping[str, Any]
) -> dict[str, Any]:
    """The values `trial.suggest_*` would return for `distributions` with `sampler`, in the
    order `Trial._suggest` asks for them (relative sample first, then independent), without
    recording them on the trial. `trial` is the trial's FrozenTrial."""
    sampler.before_trial(study, trial)
    relative_space = sampler.infer_relative_search_space(study, trial)
    relative = sampler.sample_relative(study, trial, relative_space) if relative_space else {}
    values: dict[str, Any] = {}
    for name, distribution in distributions.items():
        if distribution.single():
            values[name] = _single_value(distribution)
        elif name in relative_space and _contains(distribution, relative.get(name, _MISSING)):
            values[name] = relative[name]
        else:
            values[name] = sampler.sample_independent(study, trial, name, distribution)
    return values


def taken_configurations(trials: list[Any], number: int) -> set[tuple]:
    """Configuration keys of the study's trials other than `number` that a draw must avoid."""
    taken = set()
    for trial in trials:
        if trial.number == number or trial.state.name not in TAKEN_STATES:
            continue
        key = trial_configuration(trial)
        if key is not None:
            taken.add(key)
    return taken


def sample_distinct(
    make_sampler: SamplerFactory,
    study: Any,
    trial: Any,
    distributions: Mapping[str, Any],
    *,
    reserve: Reserve | None = None,
) -> Draw:
    """Values for the open `distributions` of `trial` (a FrozenTrial) that, with the values it
    already holds, form a configuration no other trial of the study holds. `make_sampler(i,
    kind)` gives the sampler of attempt i; `reserve(digest)` takes a configuration for good.
    Without `reserve` the first draw is kept as it is."""
    distinct = reserve is not None
    preset = {**(trial.system_attrs.get("fixed_params") or {}), **trial.params}
    fixed_overrides = trial.user_attrs.get("fixed_overrides") or []
    taken: set[tuple] = set()
    if distinct:
        taken = taken_configurations(study.get_trials(deepcopy=False), trial.number)
    kinds = [None] * SAMPLER_TRIES + ["random"] * RANDOM_TRIES
    for attempt, kind in enumerate(kinds if distinct else kinds[:1]):
        values = draw_params(make_sampler(attempt, kind), study, trial, distributions)
        key = configuration_key({**preset, **values}, fixed_overrides)
        if reserve is None or (key not in taken and reserve(configuration_digest(key))):
            return Draw(values, attempt + 1)
    return Draw(None, len(kinds))


def configuration_digest(key: tuple) -> str:
    return hashlib.sha256(repr(key).encode()).hexdigest()[:24]


def _single_value(distribution: Any) -> Any:
    choices = getattr(distribution, "choices", None)
    return choices[0] if choices is not None else distribution.low


def _contains(distribution: Any, value: Any) -> bool:
    if value is _MISSING:
        return False
    choices = getattr(distribution, "choices", None)
    if choices is not None:
        return value in choices
    return distribution.low <= value <= distribution.high
