"""The evolver loop: iterations of trials run through a launcher, built from diagnoses, resumable.

Every worker (one `evolver loop` process) runs the same algorithm against the shared study:

1. fail trials whose heartbeat went stale (Optuna re-enqueues them with their parameters);
2. find the current iteration: the first one not built or not finished;
3. at an iteration boundary, check the stopping rules (iterations, target, patience, failures);
4. build the iteration once (an atomic claim in the storage picks the worker): proposals from the
   incumbent's diagnosis first, then empty slots for the sampler, all enqueued as WAITING trials
   so that the iteration's size is exact whatever the number of workers;
5. pop waiting trials of the iteration (an atomic state change), sample what they leave open,
   launch them (heartbeats beating meanwhile), and tell Optuna how each ended. The first
   iteration's sampler slots still waiting when the baseline completes are skipped (with
   proposals on): they only keep other workers busy while the baseline trains.
"""

from __future__ import annotations

import os
import socket
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from evolver import interrupts
from evolver.loop.building import IterationBuilder
from evolver.loop.closing import IterationCloser, close_claim_key, settled_iterations
from evolver.loop.context import LoopContext, Printer, best_text
from evolver.loop.outcomes import JobOutcome, as_interrupted
from evolver.loop.retries import config_changed, config_digest, enqueue_retry, failed_trials
from evolver.loop.space import SearchSpace
from evolver.loop.state import (
    SPACE_KEY,
    STOP_KEY,
    LoopState,
    closed_key,
    training_seconds,
    trial_origin,
)
from evolver.loop.study import HeartbeatThread, LoopSettings, open_study
from evolver.loop.telling import OutcomeTeller
from evolver.loop.trial_queue import PoppedTrial, TrialQueue
from evolver.tracking import LoopTracker, make_loop_tracking

Launch = Callable[[list[list[str]], int], list[JobOutcome]]


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
        tracking: LoopTracker | None = None,
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
        self.launched = 0  # trials this worker launched in this run
        self._failed_checked: set[int] | None = None  # failed trials whose runs were closed
        self._ctx: LoopContext | None = None  # set by `open`

    @property
    def ctx(self) -> LoopContext:
        if self._ctx is None:
            raise RuntimeError("LoopRunner.open() has not opened the study yet")
        return self._ctx

    @property
    def study(self) -> Any:
        """The loop's Optuna study (None until `open`)."""
        return self._ctx.study if self._ctx else None

    # -- set-up ---------------------------------------------------------------------------------
    def open(self) -> None:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study, storage = open_study(self.settings)
        study_id = storage.get_study_id_from_name(self.settings.name)
        if SPACE_KEY not in study.user_attrs:
            space = SearchSpace.from_cfg(self.cfg.get("search"))
            study.set_user_attr(SPACE_KEY, space.to_dict())
        base_space = SearchSpace.from_dict(study.user_attrs[SPACE_KEY])
        self.settings.loop_dir.mkdir(parents=True, exist_ok=True)
        ctx = LoopContext(
            settings=self.settings,
            study=study,
            storage=storage,
            study_id=study_id,
            base_space=base_space,
            worker=self.worker,
            tracking=self.tracking,
            print=self.print,
        )
        self._ctx = ctx
        self.builder = IterationBuilder(ctx, self.cfg, self.group_choices)
        self.queue = TrialQueue(ctx, self.base_overrides)
        self.teller = OutcomeTeller(ctx)
        self.closer = IterationCloser(ctx)

    def fail_stale_trials(self) -> None:
        """Fail and retry trials whose heartbeat went stale (Optuna's callback) or that an
        interrupt stopped."""
        import optuna

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            optuna.storages.fail_stale_trials(self.ctx.study)
        self.teller.retry_interrupted_trials()

    def close_stale_runs(self, state: LoopState) -> None:
        """Close the MLflow runs dead workers left RUNNING: those of failed trials (a killed
        worker's trial fails once its heartbeat is stale), checked again whenever a trial newly
        failed, and those of iterations closed long ago (`closing.settled_iterations`). A run a live
        worker may still use (a running trial's, an open iteration's) is never touched."""
        failed = {t.number for t in state.trials if t.state.name == "FAIL"} | state.replaced
        if self._failed_checked is not None and failed <= self._failed_checked:
            return
        claims = self.ctx.storage.get_study_system_attrs(self.ctx.study_id)
        settled = settled_iterations(state, claims, time.time())
        self.tracking.close_stale_runs(failed - (self._failed_checked or set()), settled)
        for iteration in settled:
            self.ctx.parent_runs.pop(iteration, None)
        self._failed_checked = failed

    # -- the loop -------------------------------------------------------------------------------
    def run(self) -> LoopState:
        self.open()
        ctx = self.ctx
        ctx.config_digest = config_digest(self.cfg, [spec.name for spec in ctx.base_space])
        self.tracking.preflight()
        self.fail_stale_trials()
        state = LoopState.load(ctx.study)
        resumed = len(state.trials)
        if resumed:
            ctx.say(f"resuming: {len(state.completed)} completed trial(s), best {best_text(state)}")
            self._replan_failed(state)
        while True:
            self.fail_stale_trials()
            state = LoopState.load(ctx.study)
            self.close_stale_runs(state)
            iteration = state.current_iteration()
            self.closer.close_finished(state, iteration)
            view = state.view(iteration)
            if not view.built:
                reason = self.stop_reason(state, iteration)
                if reason:
                    return self._stop(reason)
                if not self.builder.build(iteration, state):
                    time.sleep(self.settings.poll_interval)
                continue
            with interrupts.deferred():  # a popped trial is launched or told, never left RUNNING
                if self.queue.skip_idle_blanks(iteration, view):
                    continue
                popped = self.queue.pop(iteration, view)
            if not popped:  # the iteration's remaining trials run in other workers
                time.sleep(self.settings.poll_interval)
                continue
            self.launched += len(popped)
            self._run_batch(popped)
            after = LoopState.load(ctx.study)
            failure = self._failure_stop(after) or self._budget_stop(after)
            if failure:
                return self._stop(failure)

    def _stop(self, reason: str) -> LoopState:
        study = self.ctx.study
        study.set_user_attr(STOP_KEY, reason)
        if self.launched:
            self.ctx.say(f"stopped: {reason}")
        else:  # a rerun that did nothing says so, and why
            self.ctx.say(f"stopped without running a trial: {reason}")
        if reason == self._failure_stop(LoopState.load(study)) and self.settings.retry_failed:
            self.ctx.say(
                "fix the config and rerun: failed trials whose config changed "
                "run again (loop.retry_failed)"
            )
        return LoopState.load(study)

    def _replan_failed(self, state: LoopState) -> None:
        """Say which trials failed; retry those whose config changed since (a rerun after a
        fix), once among all workers."""
        ctx = self.ctx
        failed = failed_trials(state)
        if not failed:
            return
        ctx.say(f"{len(failed)} failed trial(s) so far:")
        reopened: set[int] = set()
        for trial in failed:
            head = (
                f"  trial {trial.number} ({trial_origin(trial.user_attrs)}, iteration "
                f"{trial.user_attrs.get('iteration')}): "
                f"{trial.user_attrs.get('fail_reason') or 'failed'}"
            )
            if not config_changed(trial, ctx.config_digest):
                ctx.print(f"{head}; same config now, not retried")
            elif not self.settings.retry_failed:
                ctx.print(f"{head}; config changed, not retried (loop.retry_failed=false)")
            elif ctx.claim(f"evolver.retry.{trial.number}"):
                retry = enqueue_retry(ctx.storage, ctx.study_id, trial, "config changed")
                ctx.print(f"{head}; config changed: runs again as trial {retry}")
                iteration = trial.user_attrs.get("iteration")
                if iteration is not None and state.closed_record(iteration):
                    reopened.add(int(iteration))
            else:
                ctx.print(f"{head}; config changed: another worker retries it")
        for iteration in sorted(reopened):
            # The retry belongs to a closed iteration: close it again once the retry finished.
            ctx.study.set_user_attr(closed_key(iteration), None)
            ctx.release(close_claim_key(iteration))

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
        return self._failure_stop(state) or self._budget_stop(state)

    def _budget_stop(self, state: LoopState) -> str | None:
        budget = self.settings.budget_seconds
        if budget is None:
            return None
        spent = sum(training_seconds(trial) or 0.0 for trial in state.trials)
        if spent < budget:
            return None
        return f"spent {spent:.1f} training seconds of {budget:g} (loop.budget_seconds)"

    def _failure_stop(self, state: LoopState) -> str | None:
        finished = [t for t in state.trials if t.state.is_finished()]
        if len(finished) < self.settings.trials_per_iteration:
            return None
        rate = state.failure_rate()
        if rate > self.settings.max_failure_rate:
            limit = self.settings.max_failure_rate
            return f"{rate:.0%} of trials failed (loop.max_failure_rate {limit:g})"
        return None

    # -- launching ------------------------------------------------------------------------------
    def _run_batch(self, popped: list[PoppedTrial]) -> None:
        ctx = self.ctx
        for item in popped:
            ctx.say(
                f"{ctx.iteration_label(item.iteration)} trial {item.number} "
                f"({trial_origin(item.trial.user_attrs)}) started: "
                f"{' '.join(item.trial.user_attrs.get('overrides') or []) or 'configured values'}"
            )
        ids = [item.trial._trial_id for item in popped]
        with HeartbeatThread(ctx.storage, ids, self.settings.heartbeat_interval):
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
                self.teller.tell(item, outcome)
        signum = interrupts.received()
        if signum is not None:
            pairs = zip(popped, outcomes, strict=True)
            stopped = [item.number for item, outcome in pairs if outcome.interrupted_by]
            where = f"trial {', '.join(map(str, stopped))}" if stopped else None
            raise interrupts.Interrupted(signum, where, "rerun the same command to resume")
