"""Loop state, kept in the Optuna study so that the study alone is enough to resume.

Study user attributes (JSON):
- `evolver.space`: the base search space (from `conf/search/`) the loop started with.
- `evolver.iteration.<i>`: how iteration i was built: its size, the incumbent at the time, the
  findings it answers, its proposals, the adaptations made to the space and the space itself,
  and the MLflow parent run.
- `evolver.closed.<i>`: the iteration's outcome: best so far, trials by state, findings (null
  while a retry of one of its failed trials reopens it).
- `evolver.stop`: why the loop stopped, when it did.
Study system attributes hold the workers' atomic claims: `evolver.build.<i>`, `evolver.close.<i>`,
`evolver.retry.<trial>` and `evolver.config.<digest>` (a sampled configuration, taken once).
Trial user attributes: `iteration`, `proposed_by` (finding id, `baseline`, or absent for sampled
trials), `proposal`, `fixed_overrides`, `excluded_params`, `incumbent`, `run_dir`, the
run's CV and dynamics statistics, `findings`, `constraints`, `fail_reason`, `config_digest` (the
job config it ran with, see `evolver.loop.retries`), `skip_reason` (a sampled trial whose every
draw repeated a configuration already tried; it never ran), `sample_attempts` (draws a sampled
trial needed to find a new configuration, when more than one) and `retry_of` (the failed trial a
retry re-runs), `needs_training` (false for a post-hoc choice scored from its base trial's
out-of-fold predictions, `posthoc_of` naming that trial) and `duration_s` (training seconds).
Trial system attributes `failed_trial` and `retry_history` link a retry to the trials it
replaces (Optuna's heartbeat retries use the same two).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from evolver.diagnosis.proposals import format_override_value

SPACE_KEY = "evolver.space"
STOP_KEY = "evolver.stop"
ITERATION_PREFIX = "evolver.iteration."
CLOSED_PREFIX = "evolver.closed."

BASELINE = "baseline"  # `proposed_by` of the configured baseline trial
SAMPLER = "sampler"  # the origin of a trial no proposal made (no `proposed_by`)


def iteration_key(iteration: int) -> str:
    return f"{ITERATION_PREFIX}{iteration}"


def closed_key(iteration: int) -> str:
    return f"{CLOSED_PREFIX}{iteration}"


def is_finished(trial: Any) -> bool:
    return trial.state.is_finished()


def retried_numbers(trials: Iterable[Any]) -> set[int]:
    """Failed trials that were re-enqueued (for a stale heartbeat or a changed config): each
    retry replaces them, a retry of a retry replaces both."""
    numbers: set[int] = set()
    for trial in trials:
        if trial.system_attrs.get("failed_trial") is not None:
            numbers.add(int(trial.system_attrs["failed_trial"]))
        numbers.update(int(number) for number in trial.system_attrs.get("retry_history") or [])
    return numbers


def trial_origin(attrs: Mapping[str, Any]) -> str:
    """Where a trial came from, for people to read: the sampler, the baseline, or
    `<finding>: <proposal>`."""
    by = attrs.get("proposed_by")
    if not by:
        return SAMPLER
    if by == BASELINE:
        return BASELINE
    return f"{by}: {attrs.get('proposal')}"


def is_interrupted(trial: Any) -> bool:
    """A trial that Ctrl-C or SIGTERM stopped (re-run on resume while retries remain)."""
    return trial.user_attrs.get("fail_reason") == "interrupted"


def is_scored_without_training(trial: Any) -> bool:
    """A post-hoc choice (temperature, clip, checkpoint, TTA) of another trial, scored from
    that trial's stored out-of-fold predictions (see `evolver.loop.posthoc_trials`)."""
    return trial.user_attrs.get("needs_training") is False


def is_skipped(trial: Any) -> bool:
    """A sampled trial that never ran: every draw repeated a configuration already tried."""
    return bool(trial.user_attrs.get("skip_reason"))


def configuration_key(values: Mapping[str, Any], fixed_overrides: Iterable[str] = ()) -> tuple:
    """What makes two trials the same configuration: their searched values and fixed overrides."""
    rendered = tuple(sorted((name, format_override_value(v)) for name, v in values.items()))
    return rendered, tuple(sorted(str(line) for line in fixed_overrides))


def trial_configuration(trial: Any) -> tuple | None:
    """A trial's configuration key: its values so far (suggested, or fixed by an enqueue) and
    its fixed overrides; None for a trial that holds no value yet (a blank sampler slot)."""
    values = {**(trial.system_attrs.get("fixed_params") or {}), **trial.params}
    fixed = trial.user_attrs.get("fixed_overrides") or []
    if not values and not fixed:
        return None
    return configuration_key(values, fixed)


@dataclass(frozen=True)
class IterationView:
    """The trials of one iteration, by state."""

    iteration: int
    size: int | None  # None until the iteration is built
    trials: list[Any]

    @property
    def built(self) -> bool:
        return self.size is not None

    def _state(self, name: str) -> list[Any]:
        return [trial for trial in self.trials if trial.state.name == name]

    @property
    def waiting(self) -> list[Any]:
        return self._state("WAITING")

    @property
    def running(self) -> list[Any]:
        return self._state("RUNNING")

    @property
    def finished(self) -> list[Any]:
        return [trial for trial in self.trials if is_finished(trial)]

    @property
    def done(self) -> bool:
        return self.built and not self.waiting and not self.running


class LoopState:
    """A snapshot of the study: trials grouped by iteration, plus the recorded loop state."""

    def __init__(self, trials: list[Any], attrs: Mapping[str, Any]) -> None:
        # A trial failed for a stale heartbeat is replaced by its retry; it no longer counts.
        self.replaced = retried_numbers(trials)
        self.trials = [trial for trial in trials if trial.number not in self.replaced]
        self.attrs = dict(attrs)

    @classmethod
    def load(cls, study: Any) -> LoopState:
        return cls(study.get_trials(deepcopy=False), study.user_attrs)

    def iteration_record(self, iteration: int) -> dict[str, Any] | None:
        return self.attrs.get(iteration_key(iteration))

    def closed_record(self, iteration: int) -> dict[str, Any] | None:
        return self.attrs.get(closed_key(iteration))

    @property
    def stop_reason(self) -> str | None:
        return self.attrs.get(STOP_KEY)

    def view(self, iteration: int) -> IterationView:
        record = self.iteration_record(iteration)
        trials = [t for t in self.trials if t.user_attrs.get("iteration") == iteration]
        return IterationView(iteration, record["size"] if record else None, trials)

    @property
    def built_iterations(self) -> list[int]:
        numbers = [
            int(key.removeprefix(ITERATION_PREFIX))
            for key in self.attrs
            if key.startswith(ITERATION_PREFIX)
        ]
        return sorted(numbers)

    def current_iteration(self) -> int:
        """The first iteration that is not built or not done."""
        iteration = 1
        while self.view(iteration).done:
            iteration += 1
        return iteration

    @property
    def completed(self) -> list[Any]:
        return [t for t in self.trials if t.state.name == "COMPLETE" and t.value is not None]

    def best(self, trained: bool = False) -> Any | None:
        """The incumbent: the completed trial with the lowest objective (first on ties);
        `trained`: among the trials that trained (what new training trials build on)."""
        ranked = self.ranked(trained)
        return ranked[0] if ranked else None

    def ranked(self, trained: bool = False) -> list[Any]:
        """Completed trials, best objective first (earlier trial first on ties); `trained`
        leaves out the trials scored from another trial's predictions without training."""
        completed = [t for t in self.completed if not (trained and is_scored_without_training(t))]
        return sorted(completed, key=lambda t: (t.value, t.number))

    def best_before(self, iteration: int) -> Any | None:
        earlier = [t for t in self.completed if (t.user_attrs.get("iteration") or 0) < iteration]
        return min(earlier, key=lambda t: (t.value, t.number)) if earlier else None

    def failure_rate(self) -> float:
        """Failed trials among finished ones; skipped trials never ran, and interrupted ones
        (Ctrl-C, SIGTERM) did not fail: they count in neither."""
        finished = [
            t for t in self.trials if is_finished(t) and not is_skipped(t) and not is_interrupted(t)
        ]
        failed = [t for t in finished if t.state.name == "FAIL"]
        return len(failed) / len(finished) if finished else 0.0

    def skipped_repeats(self) -> dict[tuple[Any, Any], dict[str, Any]]:
        """(proposal, base trial) -> the iteration records' `repeats` entry: each remedy left out
        as a repeat, once, though later iterations may find it again."""
        return {
            (repeat.get("proposal"), repeat.get("incumbent")): repeat
            for iteration in self.built_iterations
            for repeat in (self.iteration_record(iteration) or {}).get("repeats") or []
        }

    def iterations_without_improvement(self, min_improvement: float) -> int:
        """Closed iterations in a row, counted back from the last, that did not improve the
        best score by more than `min_improvement` (relative)."""
        closed = sorted(
            int(key.removeprefix(CLOSED_PREFIX))
            for key, record in self.attrs.items()
            if key.startswith(CLOSED_PREFIX) and record is not None
        )
        streak = 0
        for iteration in reversed(closed):
            before = self.best_before(iteration)
            after = self.best_before(iteration + 1)
            if before is None or after is None:
                if after is not None:
                    break
                streak += 1
                continue
            if after.value < before.value * (1 - min_improvement) and after.number != before.number:
                break
            streak += 1
        return streak


def trial_values(trial: Any) -> dict[str, Any]:
    """A trial's parameter values plus its fixed overrides, parsed back into values."""
    values: dict[str, Any] = dict(trial.params)
    for line in trial.user_attrs.get("fixed_overrides") or []:
        key, _, text = str(line).partition("=")
        values.setdefault(key, parse_value(text))
    return values


def parse_value(text: str) -> Any:
    lowered = text.strip().lower()
    if lowered in {"true", "false"}:
        return lowered == "true"
    if lowered in {"null", "none"}:
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            continue
    return text.strip("'\"")


def training_seconds(trial: Any) -> float | None:
    """Wall-clock seconds the trial's job spent (0 for a trial scored without training)."""
    value = trial.user_attrs.get("duration_s")
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None
