"""Building an iteration: its plan (proposals first, then empty slots for the sampler) enqueued
as WAITING trials once among all workers, its post-hoc choices scored at once, and the plan
printed."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

from evolver.loop.context import LoopContext, best_text
from evolver.loop.posthoc_trials import add_scored_trial
from evolver.loop.proposals import IterationPlan, TrialPlan, baseline_plan, plan_iteration
from evolver.loop.state import LoopState, iteration_key
from evolver.loop.study import claim_age


class IterationBuilder:
    """Builds iterations for one worker; `cfg` and `group_choices` give the baseline's values."""

    def __init__(self, ctx: LoopContext, cfg: Any, group_choices: Mapping[str, Any]) -> None:
        self.ctx = ctx
        self.cfg = cfg
        self.group_choices = group_choices

    def build(self, iteration: int, state: LoopState) -> bool:
        """Build the iteration if this worker wins the claim; False when another one builds it."""
        ctx = self.ctx
        if iteration_key(iteration) in state.attrs:
            return True
        key = f"evolver.build.{iteration}"
        if not ctx.claim(key):
            # A builder killed between its claim and its record would block the loop forever.
            age = claim_age(ctx.storage, ctx.study_id, key)
            if age is not None and age > 2 * ctx.settings.grace_period:
                ctx.release(key)
            return False
        try:
            baseline = baseline_plan(ctx.base_space, self.cfg, self.group_choices)
            plan = plan_iteration(
                iteration,
                state,
                ctx.settings,
                ctx.base_space,
                baseline,
                self.cfg,
                self.group_choices,
            )
        except BaseException:
            ctx.release(key)
            raise
        parent = ctx.tracking.start_iteration(iteration)
        ctx.parent_runs[iteration] = parent
        record = plan.record()
        record["parent_run_id"] = parent
        record["built_by"] = ctx.worker
        for trial_plan in plan.trials:
            self._enqueue(iteration, trial_plan)
        scored = [(plan_, add_scored_trial(ctx.study, iteration, plan_)) for plan_ in plan.scored]
        # Recorded last: workers wait for this record before popping the iteration's trials.
        ctx.study.set_user_attr(iteration_key(iteration), record)
        self._print_plan(plan, record)
        self._print_scored(iteration, scored)
        return True

    def _enqueue(self, iteration: int, plan: TrialPlan) -> None:
        attrs = {"iteration": iteration, **plan.user_attrs}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.ctx.study.enqueue_trial(plan.params, user_attrs=attrs)

    def _print_plan(self, plan: IterationPlan, record: Mapping[str, Any]) -> None:
        ctx = self.ctx
        head = f"{ctx.iteration_label(plan.iteration)}: {plan.size} trial(s)"
        if plan.incumbent:
            head += f", incumbent trial {plan.incumbent['number']} ({plan.incumbent['value']:.5g})"
        ctx.say(head)
        for finding in plan.findings:
            ctx.print(f"  finding {finding.id} ({finding.severity}): {finding.explanation}")
        for proposal in record["proposals"]:
            base = ""
            if proposal.get("base_rank"):
                base = f" (on runner-up trial {proposal['incumbent']['number']})"
            ctx.print(
                f"  proposal {proposal['proposed_by']}/{proposal['proposal']}{base}: "
                f"{proposal['reason']}"
            )
        for adaptation in plan.adaptations:
            ctx.print(f"  search space {adaptation.param}: {adaptation.reason}")

    def _print_scored(self, iteration: int, scored: list[tuple[TrialPlan, int | None]]) -> None:
        ctx = self.ctx
        if not scored:
            return
        trials = {t.number: t for t in ctx.study.get_trials(deepcopy=False)}
        for trial_plan, number in scored:
            trial = trials.get(number) if number is not None else None
            if trial is None:
                continue
            ctx.tracking.log_scored_trial(ctx.parent_runs.get(iteration), iteration, trial)
            best = best_text(LoopState.load(ctx.study))
            ctx.say(
                f"{ctx.iteration_label(iteration)} trial {trial.number} -> {trial.value:.5g} "
                f"({trial_plan.user_attrs['proposal']} of trial "
                f"{trial_plan.user_attrs['posthoc_of']}, scored on its out-of-fold "
                f"predictions, 0 training seconds) | best {best}"
            )
