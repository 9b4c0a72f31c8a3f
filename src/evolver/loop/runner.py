"""The evolver loop: iterations of trials run through a launcher, built from diagnoses, resumable.

Every worker (one `evolver loop` process) runs the same algorithm against the shared study:

1. fail trials whose heartbeat went stale (Optuna re-enqueues them with their parameters);
2. find the current iteration: the first one not built or not finished;
3. at an iteration boundary, check the stopping rules (iterations, target, patience, failures);
4. build the iteration once (an atomic claim in the storage picks the worker): proposals from the
   incumbent's diagnosis first, then empty slots for the sampler, all enqueued as WAITING trials
   so that the iteration's size is exact whatever the number of workers;
5. pop waiting trials of the iteration (an atomic state change), sample what they leave open,
   launch them (heartbeats beating meanwhile), and tell Optuna how each ended.
"""

from __future__ import annotations

import os
import socket
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evolver import interrupts
from evolver.errors import EvolverError
from evolver.loop.outcomes import (
    CONSTRAINT_NAMES,
    INTERRUPTED,
    JobOutcome,
    as_interrupted,
    record_attrs,
)
from evolver.loop.posthoc_trials import add_scored_trial
from evolver.loop.proposals import BASELINE, TrialPlan, baseline_plan, plan_iteration
from evolver.loop.retries import config_changed, config_digest, enqueue_retry, failed_trials
from evolver.loop.sampling import sample_distinct
from evolver.loop.space import SearchSpace, format_value
from evolver.loop.state import (
    SPACE_KEY,
    STOP_KEY,
    LoopState,
    closed_key,
    iteration_key,
    retried_numbers,
)
from evolver.loop.study import (
    HeartbeatThread,
    LoopSettings,
    claim,
    claim_age,
    make_sampler,
    open_study,
    release,
    trial_seed,
)
from evolver.secrets import strip_password

STATE_LABELS = {"COMPLETE": "complete", "PRUNED": "pruned", "FAIL": "failed"}
Launch = Callable[[list[list[str]], int], list[JobOutcome]]
Printer = Callable[[str], None]


@dataclass
class PoppedTrial:
    trial: Any
    iteration: int
    overrides: list[str]
    run_dir: Path

    @property
    def number(self) -> int:
        return int(self.trial.number)


class NullLoopTracking:
    """MLflow off: the loop tracking seams do nothing (and import nothing)."""

    def preflight(self) -> None:
        return None

    def start_iteration(self, iteration: int) -> str | None:
        return None

    def trial_overrides(self, parent: str | None, iteration: int, number: int, by: str | None):
        return []

    def end_iteration(self, parent: str | None, iteration: int, metrics: Any, folder: Path):
        return None

    def log_scored_trial(self, parent: str | None, iteration: int, trial: Any) -> None:
        return None

    def close_stale_runs(self) -> int:
        return 0


def make_loop_tracking(cfg: Any) -> Any:
    tracking = cfg.get("tracking") if hasattr(cfg, "get") else None
    if not tracking or not tracking.get("enabled", False):
        return NullLoopTracking()
    from evolver.tracking.loop_runs import LoopTracking

    return LoopTracking(cfg)


class LoopRunner:
    """One worker of a loop. `launch(job_overrides, first_job_index)` runs jobs and returns
    their outcomes in order; `base_overrides` are the user's overrides every job gets."""

    def __init__(
        self,
        cfg: Any,
        launch: Launch,
        *,
        base_overrides: Sequence[str] = (),
        group_choices: Mapping[str, Any] | None = None,
        tracking: Any = None,
        printer: Printer = print,
        settings: LoopSettings | None = None,
    ) -> None:
        self.cfg = cfg
        self.settings = settings or LoopSettings.from_cfg(cfg)
        self.launch = launch
        self.base_overrides = list(base_overrides)
        self.group_choices = dict(group_choices or {})
        self.tracking = tracking if tracking is not None else make_loop_tracking(cfg)
        self.print = printer
        self.worker = f"{socket.gethostname()}:{os.getpid()}:{time.time_ns()}"
        self.job_index = 0
        self.parent_runs: dict[int, str | None] = {}
        self.study: Any = None
        self.storage: Any = None
        self.study_id: int | None = None
        self.launched = 0  # trials this worker launched in this run
        self.config_digest = ""

    # -- set-up ---------------------------------------------------------------------------------
    def open(self) -> None:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.study, self.storage = open_study(self.settings)
        self.study_id = self.storage.get_study_id_from_name(self.settings.name)
        if SPACE_KEY not in self.study.user_attrs:
            space = SearchSpace.from_cfg(self.cfg.get("search"))
            self.study.set_user_attr(SPACE_KEY, space.to_dict())
        self.base_space = SearchSpace.from_dict(self.study.user_attrs[SPACE_KEY])
        self.settings.loop_dir.mkdir(parents=True, exist_ok=True)

    def fail_stale_trials(self) -> None:
        """Fail and retry trials whose heartbeat went stale (Optuna's callback) or that an
        interrupt stopped."""
        import optuna

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            optuna.storages.fail_stale_trials(self.study)
        self.retry_interrupted_trials()

    # -- the loop -------------------------------------------------------------------------------
    def run(self) -> LoopState:
        self.open()
        self.config_digest = config_digest(self.cfg, [spec.name for spec in self.base_space])
        self.tracking.preflight()
        self.fail_stale_trials()
        state = LoopState.load(self.study)
        resumed = len(state.trials)
        if resumed:
            self.print(
                f"[loop {self.settings.name}] resuming: {len(state.completed)} completed trial(s), "
                f"best {self._best_text(state)}"
            )
            self._replan_failed(state)
        stale_runs_closed = False
        while True:
            self.fail_stale_trials()
            state = LoopState.load(self.study)
            if not stale_runs_closed and not any(t.state.name == "RUNNING" for t in state.trials):
                # MLflow runs left RUNNING by a killed loop, closed once no trial runs anywhere
                # (so no live trial run is touched); iteration runs reopen when next used.
                self.tracking.close_stale_runs()
                self.parent_runs.clear()
                stale_runs_closed = True
            iteration = state.current_iteration()
            self._close_finished_iterations(state, iteration)
            view = state.view(iteration)
            if not view.built:
                reason = self.stop_reason(state, iteration)
                if reason:
                    return self._stop(reason)
                if not self._build(iteration, state):
                    time.sleep(self.settings.poll_interval)
                continue
            with interrupts.deferred():  # a popped trial is launched or told, never left RUNNING
                popped = self._pop(iteration, view)
            if not popped:  # the iteration's remaining trials run in other workers
                time.sleep(self.settings.poll_interval)
                continue
            self.launched += len(popped)
            self._run_batch(popped)
            failure = self._failure_stop(LoopState.load(self.study))
            if failure:
                return self._stop(failure)

    def _stop(self, reason: str) -> LoopState:
        self.study.set_user_attr(STOP_KEY, reason)
        name = self.settings.name
        if self.launched:
            self.print(f"[loop {name}] stopped: {reason}")
        else:  # a rerun that did nothing says so, and why
            self.print(f"[loop {name}] stopped without running a trial: {reason}")
        if reason == self._failure_stop(LoopState.load(self.study)) and self.settings.retry_failed:
            self.print(
                f"[loop {name}] fix the config and rerun: failed trials whose config changed "
                "run again (loop.retry_failed)"
            )
        return LoopState.load(self.study)

    def _replan_failed(self, state: LoopState) -> None:
        """Say which trials failed; retry those whose config changed since (a rerun after a
        fix), once among all workers."""
        failed = failed_trials(state)
        if not failed:
            return
        name = self.settings.name
        self.print(f"[loop {name}] {len(failed)} failed trial(s) so far:")
        reopened: set[int] = set()
        for trial in failed:
            head = (
                f"  trial {trial.number} ({describe(trial.user_attrs)}, iteration "
                f"{trial.user_attrs.get('iteration')}): "
                f"{trial.user_attrs.get('fail_reason') or 'failed'}"
            )
            if not config_changed(trial, self.config_digest):
                self.print(f"{head}; same config now, not retried")
            elif not self.settings.retry_failed:
                self.print(f"{head}; config changed, not retried (loop.retry_failed=false)")
            elif claim(self.storage, self.study_id, f"evolver.retry.{trial.number}", self.worker):
                retry = enqueue_retry(self.storage, self.study_id, trial, "config changed")
                self.print(f"{head}; config changed: runs again as trial {retry}")
                iteration = trial.user_attrs.get("iteration")
                if iteration is not None and state.closed_record(iteration):
                    reopened.add(int(iteration))
            else:
                self.print(f"{head}; config changed: another worker retries it")
        for iteration in sorted(reopened):
            # The retry belongs to a closed iteration: close it again once the retry finished.
            self.study.set_user_attr(closed_key(iteration), None)
            release(self.storage, self.study_id, f"evolver.close.{iteration}")

    def stop_reason(self, state: LoopState, iteration: int) -> str | None:
        settings = self.settings
        best = state.best()
        if iteration > settings.iterations:
            return f"ran the {settings.iterations} iteration(s) asked for (loop.iterations)"
        if settings.target is not None and best is not None and best.value <= settings.target:
            return f"trial {best.number} reached the target {settings.target:g} ({best.value:.5g})"
        if settings.patience is not None:
            streak = state.iterations_without_improvement(settings.min_improvement)
            if streak >= settings.patience:
                return f"{streak} iteration(s) without improvement (loop.patience)"
        return self._failure_stop(state)

    def _failure_stop(self, state: LoopState) -> str | None:
        finished = [t for t in state.trials if t.state.is_finished()]
        if len(finished) < self.settings.trials_per_iteration:
            return None
        rate = state.failure_rate()
        if rate > self.settings.max_failure_rate:
            limit = self.settings.max_failure_rate
            return f"{rate:.0%} of trials failed (loop.max_failure_rate {limit:g})"
        return None

    # -- building an iteration ------------------------------------------------------------------
    def _build(self, iteration: int, state: LoopState) -> bool:
        """Build the iteration if this worker wins the claim; False when another one builds it."""
        if iteration_key(iteration) in state.attrs:
            return True
        key = f"evolver.build.{iteration}"
        if not claim(self.storage, self.study_id, key, self.worker):
            # A builder killed between its claim and its record would block the loop forever.
            age = claim_age(self.storage, self.study_id, key)
            if age is not None and age > 2 * self.settings.grace_period:
                release(self.storage, self.study_id, key)
            return False
        try:
            baseline = baseline_plan(self.base_space, self.cfg, self.group_choices)
            plan = plan_iteration(
                iteration,
                state,
                self.settings,
                self.base_space,
                baseline,
                self.cfg,
                self.group_choices,
            )
        except BaseException:
            release(self.storage, self.study_id, key)
            raise
        parent = self.tracking.start_iteration(iteration)
        self.parent_runs[iteration] = parent
        record = plan.record()
        record["parent_run_id"] = parent
        record["built_by"] = self.worker
        for trial_plan in plan.trials:
            self._enqueue(iteration, trial_plan)
        scored = [(plan_, add_scored_trial(self.study, iteration, plan_)) for plan_ in plan.scored]
        # Recorded last: workers wait for this record before popping the iteration's trials.
        self.study.set_user_attr(iteration_key(iteration), record)
        self._print_plan(plan, record)
        self._print_scored(iteration, scored)
        return True

    def _print_scored(self, iteration: int, scored: list[tuple[TrialPlan, int | None]]) -> None:
        if not scored:
            return
        trials = {t.number: t for t in self.study.get_trials(deepcopy=False)}
        for trial_plan, number in scored:
            trial = trials.get(number) if number is not None else None
            if trial is None:
                continue
            self.tracking.log_scored_trial(self.parent_runs.get(iteration), iteration, trial)
            best = self._best_text(LoopState.load(self.study))
            self.print(
                f"[loop {self.settings.name}] iteration {iteration}/{self.settings.iterations} "
                f"trial {trial.number} -> {trial.value:.5g} ({trial_plan.user_attrs['proposal']} "
                f"of trial {trial_plan.user_attrs['posthoc_of']}, scored on its out-of-fold "
                f"predictions, 0 training seconds) | best {best}"
            )

    def _enqueue(self, iteration: int, plan: TrialPlan) -> None:
        attrs = {"iteration": iteration, **plan.user_attrs}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.study.enqueue_trial(plan.params, user_attrs=attrs)

    def _print_plan(self, plan: Any, record: Mapping[str, Any]) -> None:
        name = self.settings.name
        head = f"[loop {name}] iteration {plan.iteration}/{self.settings.iterations}: "
        head += f"{plan.size} trial(s)"
        proposals = record["proposals"]
        if plan.incumbent:
            head += f", incumbent trial {plan.incumbent['number']} ({plan.incumbent['value']:.5g})"
        self.print(head)
        for finding in plan.findings:
            self.print(
                f"  finding {finding['id']} ({finding.get('severity')}): "
                f"{finding.get('explanation')}"
            )
        for proposal in proposals:
            base = ""
            if proposal.get("base_rank"):
                base = f" (on runner-up trial {proposal['incumbent']['number']})"
            self.print(
                f"  proposal {proposal['proposed_by']}/{proposal['proposal']}{base}: "
                f"{proposal['reason']}"
            )
        for adaptation in plan.adaptations:
            self.print(f"  search space {adaptation.param}: {adaptation.reason}")

    # -- running trials -------------------------------------------------------------------------
    def _pop(self, iteration: int, view: Any) -> list[PoppedTrial]:
        import optuna

        record = self.study.user_attrs.get(iteration_key(iteration)) or {}
        space = (
            SearchSpace.from_dict(record.get("space")) if record.get("space") else self.base_space
        )
        popped: list[PoppedTrial] = []
        # Retries first: they were started before, and an interrupted one resumes the loop.
        retries_first = sorted(
            view.waiting, key=lambda t: (t.system_attrs.get("failed_trial") is None, t.number)
        )
        for frozen in retries_first:
            if len(popped) >= self.settings.parallel:
                break
            try:
                if not self.storage.set_trial_state_values(
                    frozen._trial_id, optuna.trial.TrialState.RUNNING
                ):
                    continue
            except optuna.exceptions.UpdateFinishedTrialError:
                continue
            self.storage.record_heartbeat(frozen._trial_id)
            trial = optuna.trial.Trial(self.study, frozen._trial_id)
            prepared = self._prepare(trial, iteration, space)
            if prepared is not None:  # None: skipped, every draw repeated a tried configuration
                popped.append(prepared)
        return popped

    def _prepare(self, trial: Any, iteration: int, space: SearchSpace) -> PoppedTrial | None:
        attrs = trial.user_attrs
        fixed = list(attrs.get("fixed_overrides") or [])
        skip = set(attrs.get("excluded_params") or []) | {line.split("=", 1)[0] for line in fixed}
        trial = self._fix_sampled_values(trial, iteration, [s for s in space if s.name not in skip])
        if trial is None:
            return None
        trial.set_user_attr("config_digest", self.config_digest)
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
        run_dir = self.settings.loop_dir / f"trial_{trial.number}"
        trial_overrides = space.overrides(params) + fixed
        parent = self._parent_run(iteration)
        loop_overrides = [
            f"loop.name={self.settings.name}",
            f"loop.storage={quote(strip_password(self.settings.storage))}",
            f"loop.trial_number={trial.number}",
            f"hydra.sweep.dir={quote(str(self.settings.loop_dir))}",
            f"hydra.sweep.subdir=trial_{trial.number}",
        ]
        tracking = self.tracking.trial_overrides(
            parent, iteration, trial.number, attrs.get("proposed_by")
        )
        own = trial_overrides + loop_overrides + list(tracking)
        overrides = without_keys(self.base_overrides, own) + own
        trial.set_user_attr("run_dir", str(run_dir))
        trial.set_user_attr("overrides", trial_overrides)
        return PoppedTrial(trial, iteration, overrides, run_dir)

    def _fix_sampled_values(self, trial: Any, iteration: int, specs: list[Any]) -> Any | None:
        """The trial with the values the sampler leaves open drawn and fixed (sampled trials
        never repeat a configuration already tried); None when it was skipped."""
        import optuna

        number = trial.number
        seed = self.settings.seed
        self.study.sampler = make_sampler(self.settings, seed=trial_seed(seed, number))
        frozen = trial.storage.get_trial(trial._trial_id)
        held = {**(frozen.system_attrs.get("fixed_params") or {}), **frozen.params}
        open_specs = {spec.name: spec.distribution() for spec in specs if spec.name not in held}
        if not open_specs:
            return trial
        draw = sample_distinct(
            lambda attempt, kind: make_sampler(
                self.settings, seed=trial_seed(seed, number, attempt), kind=kind
            ),
            self.study,
            frozen,
            open_specs,
            # Proposals are never re-sampled.
            reserve=None if trial.user_attrs.get("proposed_by") else self._reserver(number),
        )
        if draw.values is None:
            self._skip(trial, iteration, draw.attempts)
            return None
        if draw.attempts > 1:
            trial.set_user_attr("sample_attempts", draw.attempts)
        trial.storage.set_trial_system_attr(
            trial._trial_id, "fixed_params", {**held, **draw.values}
        )
        return optuna.trial.Trial(self.study, trial._trial_id)  # reads the fixed values

    def _reserver(self, number: int) -> Callable[[str], bool]:
        """Reserves a sampled configuration for trial `number` among all workers; one whose
        trial failed may be taken again."""

        def reserve(digest: str) -> bool:
            key = f"evolver.config.{digest}"
            if claim(self.storage, self.study_id, key, str(number)):
                return True
            held = self.storage.get_study_system_attrs(self.study_id).get(key) or {}
            try:
                owner_id = self.storage.get_trial_id_from_study_id_trial_number(
                    self.study_id, int(held.get("owner"))
                )
                return self.storage.get_trial(owner_id).state.name == "FAIL"
            except (KeyError, TypeError, ValueError):
                return False

        return reserve

    def _skip(self, trial: Any, iteration: int, attempts: int) -> None:
        from optuna.trial import TrialState

        reason = f"{attempts} draws all repeated configurations already tried"
        trial.set_user_attr("skip_reason", reason)
        trial.set_user_attr("fail_reason", f"skipped: {reason}")
        self.study.tell(trial, state=TrialState.FAIL)
        self.print(
            f"[loop {self.settings.name}] iteration {iteration}/{self.settings.iterations} "
            f"trial {trial.number} skipped: {reason}"
        )

    def _parent_run(self, iteration: int) -> str | None:
        if iteration not in self.parent_runs:
            self.parent_runs[iteration] = self.tracking.start_iteration(iteration)
        return self.parent_runs[iteration]

    def _run_batch(self, popped: list[PoppedTrial]) -> None:
        for item in popped:
            self.print(
                f"[loop {self.settings.name}] iteration {item.iteration}/"
                f"{self.settings.iterations} trial {item.number} "
                f"({describe(item.trial.user_attrs)}) started: "
                f"{' '.join(item.trial.user_attrs.get('overrides') or []) or 'configured values'}"
            )
        ids = [item.trial._trial_id for item in popped]
        with HeartbeatThread(self.storage, ids, self.settings.heartbeat_interval):
            try:
                interrupts.raise_if_received()  # one held back while the trials were popped
                outcomes = self.launch([item.overrides for item in popped], self.job_index)
            except Exception as error:  # e.g. an override Hydra cannot compose
                outcomes = [JobOutcome(error=error) for _ in popped]
            except interrupts.Interrupted as interrupted:
                outcomes = [JobOutcome(error=interrupted) for _ in popped]
        self.job_index += len(popped)
        signum = interrupts.received()
        if signum is not None:
            # After Ctrl-C or SIGTERM, a job that did not finish was stopped by it (a worker
            # process may even have died of it): re-run it rather than count it as failed.
            outcomes = [as_interrupted(outcome, signum) for outcome in outcomes]
        # Every trial is told before stopping; a second signal meanwhile exits at once.
        with interrupts.deferred():
            for item, outcome in zip(popped, outcomes, strict=True):
                self._tell(item, outcome)
        signum = interrupts.received()
        if signum is not None:
            pairs = zip(popped, outcomes, strict=True)
            stopped = [item.number for item, outcome in pairs if outcome.interrupted_by]
            where = f"trial {', '.join(map(str, stopped))}" if stopped else None
            raise interrupts.Interrupted(signum, where, "rerun the same command to resume")

    def retry_interrupted_trials(self) -> None:
        """Re-enqueue the trials Ctrl-C or SIGTERM stopped, with the same parameters in the same
        iteration (linked like Optuna's heartbeat retries, up to `loop.max_retry` times), once
        among all workers: a resume runs them first, without waiting for a stale heartbeat."""
        from optuna.trial import TrialState

        failed = self.study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
        stopped = [t for t in failed if t.user_attrs.get("fail_reason") == INTERRUPTED]
        if not stopped:
            return
        retried = retried_numbers(self.study.get_trials(deepcopy=False))
        for trial in stopped:
            history = trial.system_attrs.get("retry_history") or []
            if trial.number in retried or len(history) >= self.settings.max_retry:
                continue
            if claim(self.storage, self.study_id, f"evolver.retry.{trial.number}", self.worker):
                reason = f"interrupted ({trial.user_attrs.get('interrupted_by') or 'a signal'})"
                enqueue_retry(self.storage, self.study_id, trial, reason)

    def _tell(self, item: PoppedTrial, outcome: JobOutcome) -> None:
        from optuna.trial import TrialState

        trial = item.trial
        if outcome.interrupted_by is not None:
            self._tell_interrupted(item, outcome)
            return
        run_dir = outcome.run_dir or item.run_dir
        attrs = record_attrs(run_dir, self.settings.degradation_tolerance)
        for key, value in attrs.items():
            trial.set_user_attr(key, value)
        if (
            self.settings.constraints
            and attrs.get("constraints")
            and (outcome.error is None or outcome.pruned)
        ):
            for name, value in zip(CONSTRAINT_NAMES, attrs["constraints"], strict=True):
                trial.set_constraint(name, value)
        value = outcome.objective()
        if outcome.pruned:
            trial.set_user_attr("prune_reason", outcome.failure_reason())
            self.study.tell(trial, state=TrialState.PRUNED)
            result = f"pruned ({outcome.failure_reason()})"
        elif value is None:
            trial.set_user_attr("fail_reason", outcome.failure_reason())
            self.study.tell(trial, state=TrialState.FAIL)
            result = f"failed: {outcome.failure_reason()}"
            if (
                isinstance(outcome.error, EvolverError)
                and trial.user_attrs.get("proposed_by") == BASELINE
            ):
                # The configured baseline itself is invalid (a missing data folder, a bad
                # value): every trial would fail the same way.
                raise outcome.error
        else:
            self.study.tell(trial, value)
            result = f"{value:.5g}"
        state = LoopState.load(self.study)
        done = len([t for t in state.trials if t.state.is_finished()])
        total = self.settings.iterations * self.settings.trials_per_iteration
        self.print(
            f"[loop {self.settings.name}] iteration {item.iteration}/{self.settings.iterations} "
            f"trial {item.number} -> {result} | {done}/{total} trials done | "
            f"best {self._best_text(state)}"
        )

    def _tell_interrupted(self, item: PoppedTrial, outcome: JobOutcome) -> None:
        """Fail the trial as interrupted (its records so far are kept) and enqueue its retry.
        No line: the interrupt is reported once, by the entry point."""
        from optuna.trial import TrialState

        trial = item.trial
        attrs = record_attrs(outcome.run_dir or item.run_dir, self.settings.degradation_tolerance)
        attrs.update(fail_reason=INTERRUPTED, interrupted_by=outcome.interrupted_by)
        for key, value in attrs.items():
            trial.set_user_attr(key, value)
        self.study.tell(trial, state=TrialState.FAIL)
        self.retry_interrupted_trials()

    # -- closing an iteration -------------------------------------------------------------------
    def _close_finished_iterations(self, state: LoopState, current: int) -> None:
        for iteration in range(1, current):
            if state.closed_record(iteration):
                continue
            if not claim(self.storage, self.study_id, f"evolver.close.{iteration}", self.worker):
                continue
            self._close(state, iteration)

    def _close(self, state: LoopState, iteration: int) -> None:
        view = state.view(iteration)
        best = state.best_before(iteration + 1)
        previous = state.best_before(iteration)
        states: dict[str, int] = {}
        findings: dict[str, int] = {}
        for trial in view.trials:
            label = STATE_LABELS.get(trial.state.name, trial.state.name.lower())
            states[label] = states.get(label, 0) + 1
            for finding in trial.user_attrs.get("findings") or []:
                findings[finding] = findings.get(finding, 0) + 1
        record = {
            "iteration": iteration,
            "best": {"number": best.number, "value": best.value} if best else None,
            "improved": bool(best and (previous is None or best.number != previous.number)),
            "states": states,
            "findings": findings,
        }
        self.study.set_user_attr(closed_key(iteration), record)
        folder = self.settings.loop_dir / f"iteration_{iteration}"
        folder.mkdir(parents=True, exist_ok=True)
        write_iteration_summary(folder, record, state.iteration_record(iteration) or {})
        metrics = {f"trials_{name}": float(count) for name, count in states.items()}
        if best is not None:
            metrics["best_value"] = float(best.value)
            metrics["best_trial"] = float(best.number)
        parent = (state.iteration_record(iteration) or {}).get("parent_run_id")
        self.tracking.end_iteration(parent, iteration, metrics, folder)
        self.print(
            f"[loop {self.settings.name}] iteration {iteration} done: "
            + ", ".join(f"{count} {name}" for name, count in sorted(states.items()))
            + f"; best {self._best_text(state, best)}"
        )

    def _best_text(self, state: LoopState, best: Any = None) -> str:
        best = best or state.best()
        return "none yet" if best is None else f"{best.value:.5g} (trial {best.number})"


def describe(attrs: Mapping[str, Any]) -> str:
    by = attrs.get("proposed_by")
    if not by:
        return "sampled"
    if by == "baseline":
        return "baseline"
    return f"proposal {attrs.get('proposal')} for {by}"


def quote(text: str) -> str:
    """A Hydra override value that stays one string (URLs and paths hold ':' and '/')."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def override_key(line: str) -> str:
    return line.lstrip("+~").split("=", 1)[0]


def without_keys(overrides: Sequence[str], own: Sequence[str]) -> list[str]:
    """The user's overrides minus the keys a trial sets itself (Hydra refuses duplicates)."""
    taken = {override_key(line) for line in own}
    return [line for line in overrides if override_key(line) not in taken]


def write_iteration_summary(
    folder: Path, closed: Mapping[str, Any], built: Mapping[str, Any]
) -> None:
    import json

    data = {"outcome": dict(closed), "plan": {k: v for k, v in built.items() if k != "space"}}
    (folder / "iteration.json").write_text(json.dumps(data, indent=2, default=format_value) + "\n")
