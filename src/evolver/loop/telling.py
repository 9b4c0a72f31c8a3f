"""Telling Optuna how a launched trial ended: its records as trial attributes, its state and
value, and one progress line; a trial an interrupt stopped is retried instead."""

from __future__ import annotations

from evolver.errors import EvolverError
from evolver.loop.context import LoopContext, best_text
from evolver.loop.outcomes import CONSTRAINT_NAMES, INTERRUPTED, JobOutcome, record_attrs
from evolver.loop.retries import enqueue_retry
from evolver.loop.state import BASELINE, LoopState, is_scored_without_training, retried_numbers
from evolver.loop.trial_queue import PoppedTrial


class OutcomeTeller:
    def __init__(self, ctx: LoopContext) -> None:
        self.ctx = ctx

    def tell(self, item: PoppedTrial, outcome: JobOutcome) -> None:
        from optuna.trial import TrialState

        ctx, settings = self.ctx, self.ctx.settings
        trial = item.trial
        if outcome.interrupted_by is not None:
            self._tell_interrupted(item, outcome)
            return
        run_dir = outcome.run_dir or item.run_dir
        attrs = record_attrs(run_dir, settings.degradation_tolerance)
        for key, value in attrs.items():
            trial.set_user_attr(key, value)
        if (
            settings.constraints
            and attrs.get("constraints")
            and (outcome.error is None or outcome.pruned)
        ):
            for name, value in zip(CONSTRAINT_NAMES, attrs["constraints"], strict=True):
                trial.set_constraint(name, value)
        value = outcome.objective()
        if outcome.pruned:
            trial.set_user_attr("prune_reason", outcome.failure_reason())
            ctx.study.tell(trial, state=TrialState.PRUNED)
            result = f"pruned ({outcome.failure_reason()})"
        elif value is None:
            trial.set_user_attr("fail_reason", outcome.failure_reason())
            ctx.study.tell(trial, state=TrialState.FAIL)
            result = f"failed: {outcome.failure_reason()}"
            if (
                isinstance(outcome.error, EvolverError)
                and trial.user_attrs.get("proposed_by") == BASELINE
            ):
                # The configured baseline itself is invalid (a missing data folder, a bad
                # value): every trial would fail the same way.
                raise outcome.error
        else:
            ctx.study.tell(trial, value)
            result = f"{value:.5g}"
        state = LoopState.load(ctx.study)
        # Trials scored without training take no slot of the budget.
        done = len(
            [t for t in state.trials if t.state.is_finished() and not is_scored_without_training(t)]
        )
        total = settings.iterations * settings.trials_per_iteration
        ctx.say(
            f"{ctx.iteration_label(item.iteration)} trial {item.number} -> {result} | "
            f"{done}/{total} trials done | best {best_text(state)}"
        )

    def _tell_interrupted(self, item: PoppedTrial, outcome: JobOutcome) -> None:
        """Fail the trial as interrupted (its records so far are kept) and enqueue its retry.
        No line: the interrupt is reported once, by the entry point."""
        from optuna.trial import TrialState

        trial = item.trial
        attrs = record_attrs(
            outcome.run_dir or item.run_dir, self.ctx.settings.degradation_tolerance
        )
        attrs.update(fail_reason=INTERRUPTED, interrupted_by=outcome.interrupted_by)
        for key, value in attrs.items():
            trial.set_user_attr(key, value)
        self.ctx.study.tell(trial, state=TrialState.FAIL)
        self.retry_interrupted_trials()

    def retry_interrupted_trials(self) -> None:
        """Re-enqueue the trials Ctrl-C or SIGTERM stopped, with the same parameters in the same
        iteration (linked like Optuna's heartbeat retries, up to `loop.max_retry` times), once
        among all workers: a resume runs them first, without waiting for a stale heartbeat."""
        from optuna.trial import TrialState

        ctx = self.ctx
        failed = ctx.study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
        stopped = [t for t in failed if t.user_attrs.get("fail_reason") == INTERRUPTED]
        if not stopped:
            return
        retried = retried_numbers(ctx.study.get_trials(deepcopy=False))
        for trial in stopped:
            history = trial.system_attrs.get("retry_history") or []
            if trial.number in retried or len(history) >= ctx.settings.max_retry:
                continue
            if ctx.claim(f"evolver.retry.{trial.number}"):
                reason = f"interrupted ({trial.user_attrs.get('interrupted_by') or 'a signal'})"
                enqueue_retry(ctx.storage, ctx.study_id, trial, reason)
