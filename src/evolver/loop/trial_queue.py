"""Taking an iteration's waiting trials: popped atomically among the workers, the values the
sampler leaves open drawn (never a configuration already tried), and the job's overrides made."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evolver.loop.context import LoopContext
from evolver.loop.continued_trials import CONTINUE_KEY, CONTINUES_ATTR
from evolver.loop.sampling import sample_distinct
from evolver.loop.space import ParamSpec, SearchSpace
from evolver.loop.state import BASELINE, SAMPLER, IterationView, iteration_key
from evolver.loop.study import claim, make_sampler, trial_seed
from evolver.secrets import strip_password


@dataclass
class PoppedTrial:
    """A trial taken by this worker (RUNNING), with the overrides its job runs with."""

    trial: Any
    iteration: int
    overrides: list[str]
    run_dir: Path

    @property
    def number(self) -> int:
        return int(self.trial.number)


class TrialQueue:
    """Pops one worker's trials; `base_overrides` are the user's overrides every job gets."""

    def __init__(self, ctx: LoopContext, base_overrides: Sequence[str]) -> None:
        self.ctx = ctx
        self.base_overrides = list(base_overrides)

    def pop(self, iteration: int, view: IterationView) -> list[PoppedTrial]:
        """Up to `loop.parallel` waiting trials of the iteration, taken and prepared."""
        import optuna

        ctx = self.ctx
        record = ctx.study.user_attrs.get(iteration_key(iteration)) or {}
        space = (
            SearchSpace.from_dict(record.get("space")) if record.get("space") else ctx.base_space
        )
        popped: list[PoppedTrial] = []
        # Retries first: they were started before, and an interrupted one resumes the loop.
        retries_first = sorted(
            view.waiting, key=lambda t: (t.system_attrs.get("failed_trial") is None, t.number)
        )
        for frozen in retries_first:
            if len(popped) >= ctx.settings.parallel:
                break
            try:
                if not ctx.storage.set_trial_state_values(
                    frozen._trial_id, optuna.trial.TrialState.RUNNING
                ):
                    continue
            except optuna.exceptions.UpdateFinishedTrialError:
                continue
            ctx.storage.record_heartbeat(frozen._trial_id)
            trial = optuna.trial.Trial(ctx.study, frozen._trial_id)
            prepared = self._prepare(trial, iteration, space)
            if prepared is not None:  # None: skipped, every draw repeated a tried configuration
                popped.append(prepared)
        return popped

    def skip_idle_blanks(self, iteration: int, view: IterationView) -> bool:
        """Skip the first iteration's sampler slots that no worker took before the baseline
        completed; True when any was skipped.

        The slots keep other workers busy while the baseline trains. Once it has completed, a
        slot is worth more to the proposals its diagnosis makes than to a blind draw: a single
        worker goes straight from the baseline to iteration 2 (`loop.baseline_first`; with
        proposals off there is nothing to wait for, and the slots run)."""
        import optuna

        settings = self.ctx.settings
        if iteration != 1 or not (settings.proposals and settings.baseline_first):
            return False
        if not any(
            t.user_attrs.get("proposed_by") == BASELINE and t.state.name == "COMPLETE"
            for t in view.trials
        ):
            return False
        skipped = False
        for frozen in view.waiting:
            if frozen.user_attrs.get("proposed_by") or frozen.system_attrs.get("failed_trial"):
                continue  # a proposal or a retry of a started trial: it still runs
            try:
                if not self.ctx.storage.set_trial_state_values(
                    frozen._trial_id, optuna.trial.TrialState.RUNNING
                ):
                    continue  # another worker took it
            except optuna.exceptions.UpdateFinishedTrialError:
                continue
            trial = optuna.trial.Trial(self.ctx.study, frozen._trial_id)
            self._skip(trial, iteration, "the baseline completed first; its proposals go next")
            skipped = True
        return skipped

    def _prepare(self, trial: Any, iteration: int, space: SearchSpace) -> PoppedTrial | None:
        ctx = self.ctx
        settings = ctx.settings
        attrs = trial.user_attrs
        fixed = list(attrs.get("fixed_overrides") or [])
        skip = set(attrs.get("excluded_params") or []) | {line.split("=", 1)[0] for line in fixed}
        trial = self._fix_sampled_values(trial, iteration, [s for s in space if s.name not in skip])
        if trial is None:
            return None
        trial.set_user_attr("config_digest", ctx.config_digest)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # proposals may fix values outside adapted ranges
            for spec in space:
                if spec.name in skip:
                    continue
                if spec.type == "float":
                    trial.suggest_float(spec.name, spec.low, spec.high, log=spec.log)
                elif spec.type == "int":
                    trial.suggest_int(spec.name, int(spec.low), int(spec.high), log=spec.log)
                else:
                    trial.suggest_categorical(spec.name, list(spec.choices))
        params = {name: value for name, value in trial.params.items() if name in space}
        run_dir = settings.loop_dir / f"trial_{trial.number}"
        trial_overrides = space.overrides(params) + fixed
        parent = ctx.parent_run(iteration)
        loop_overrides = [
            f"loop.name={settings.name}",
            f"loop.storage={quote(strip_password(settings.storage))}",
            f"loop.trial_number={trial.number}",
            f"hydra.sweep.dir={quote(str(settings.loop_dir))}",
            f"hydra.sweep.subdir=trial_{trial.number}",
        ]
        continues = attrs.get(CONTINUES_ATTR)
        extra_tags = {}
        if continues:
            loop_overrides.append(f"{CONTINUE_KEY}={quote(str(continues['run_dir']))}")
            extra_tags["continued_from_trial"] = continues["trial"]
        tracking = ctx.tracking.trial_overrides(
            parent, iteration, trial.number, attrs.get("proposed_by") or SAMPLER, extra_tags
        )
        own = trial_overrides + loop_overrides + list(tracking)
        overrides = without_keys(self.base_overrides, own) + own
        trial.set_user_attr("run_dir", str(run_dir))
        trial.set_user_attr("overrides", trial_overrides)
        return PoppedTrial(trial, iteration, overrides, run_dir)

    def _fix_sampled_values(self, trial: Any, iteration: int, specs: list[ParamSpec]) -> Any | None:
        """The trial with the values the sampler leaves open drawn and fixed (sampled trials
        never repeat a configuration already tried); None when it was skipped."""
        import optuna

        ctx = self.ctx
        number = trial.number
        seed = ctx.settings.seed
        ctx.study.sampler = make_sampler(ctx.settings, seed=trial_seed(seed, number))
        frozen = trial.storage.get_trial(trial._trial_id)
        held = {**(frozen.system_attrs.get("fixed_params") or {}), **frozen.params}
        open_specs = {spec.name: spec.distribution() for spec in specs if spec.name not in held}
        if not open_specs:
            return trial
        draw = sample_distinct(
            lambda attempt, kind: make_sampler(
                ctx.settings, seed=trial_seed(seed, number, attempt), kind=kind
            ),
            ctx.study,
            frozen,
            open_specs,
            # Proposals are never re-sampled.
            reserve=None if trial.user_attrs.get("proposed_by") else self._reserver(number),
        )
        if draw.values is None:
            self._skip(
                trial, iteration, f"{draw.attempts} draws all repeated configurations already tried"
            )
            return None
        if draw.attempts > 1:
            trial.set_user_attr("sample_attempts", draw.attempts)
        trial.storage.set_trial_system_attr(
            trial._trial_id, "fixed_params", {**held, **draw.values}
        )
        return optuna.trial.Trial(ctx.study, trial._trial_id)  # reads the fixed values

    def _reserver(self, number: int) -> Callable[[str], bool]:
        """Reserves a sampled configuration for trial `number` among all workers; one whose
        trial failed may be taken again."""
        storage, study_id = self.ctx.storage, self.ctx.study_id

        def reserve(digest: str) -> bool:
            key = f"evolver.config.{digest}"
            if claim(storage, study_id, key, str(number)):
                return True
            held = storage.get_study_system_attrs(study_id).get(key) or {}
            try:
                owner_id = storage.get_trial_id_from_study_id_trial_number(
                    study_id, int(held.get("owner"))
                )
                return storage.get_trial(owner_id).state.name == "FAIL"
            except (KeyError, TypeError, ValueError):
                return False

        return reserve

    def _skip(self, trial: Any, iteration: int, reason: str) -> None:
        from optuna.trial import TrialState

        trial.set_user_attr("skip_reason", reason)
        trial.set_user_attr("fail_reason", f"skipped: {reason}")
        self.ctx.study.tell(trial, state=TrialState.FAIL)
        self.ctx.say(
            f"{self.ctx.iteration_label(iteration)} trial {trial.number} skipped: {reason}"
        )


def quote(text: str) -> str:
    """A Hydra override value that stays one string (URLs and paths hold ':' and '/')."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def override_key(line: str) -> str:
    return line.lstrip("+~").split("=", 1)[0]


def without_keys(overrides: Sequence[str], own: Sequence[str]) -> list[str]:
    """The user's overrides minus the keys a trial sets itself (Hydra refuses duplicates)."""
    taken = {override_key(line) for line in own}
    return [line for line in overrides if override_key(line) not in taken]
