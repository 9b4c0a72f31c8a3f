"""Closing an iteration once all its trials finished, once among all workers: its outcome
recorded in the study and in `iteration_<i>/iteration.json`, its tracking run ended, one line."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from evolver.loop.context import LoopContext, best_text
from evolver.loop.continued_trials import seconds_saved
from evolver.loop.space import format_value
from evolver.loop.state import LoopState, closed_key, training_seconds
from evolver.records import ITERATION_DIR_PREFIX, ITERATION_FILE

STATE_LABELS = {"COMPLETE": "complete", "PRUNED": "pruned", "FAIL": "failed"}
# A worker still closing an iteration (uploads, plots, MLflow retries) this long after claiming
# it is gone: the iteration's tracking run, if still RUNNING, was left by a dead worker.
CLOSE_SETTLE_S = 600.0


class IterationCloser:
    def __init__(self, ctx: LoopContext) -> None:
        self.ctx = ctx

    def close_finished(self, state: LoopState, current: int) -> None:
        """Close the iterations before `current` that no worker closed yet."""
        for iteration in range(1, current):
            if state.closed_record(iteration):
                continue
            if not self.ctx.claim(close_claim_key(iteration)):
                continue
            self.close(state, iteration)

    def close(self, state: LoopState, iteration: int) -> None:
        ctx = self.ctx
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
        spent = sum(training_seconds(trial) or 0.0 for trial in view.trials)
        loop_spent = sum(
            training_seconds(trial) or 0.0
            for trial in state.trials
            if int(trial.user_attrs.get("iteration") or 0) <= iteration
        )
        saved = sum(seconds_saved(trial.user_attrs) for trial in view.trials)
        record = {
            "iteration": iteration,
            "train_seconds": round(spent, 3),
            "seconds_saved": round(saved, 3),
            "best": {"number": best.number, "value": best.value} if best else None,
            "improved": bool(best and (previous is None or best.number != previous.number)),
            "states": states,
            "findings": findings,
        }
        ctx.study.set_user_attr(closed_key(iteration), record)
        folder = ctx.settings.loop_dir / f"{ITERATION_DIR_PREFIX}{iteration}"
        folder.mkdir(parents=True, exist_ok=True)
        write_iteration_summary(folder, record, state.iteration_record(iteration) or {})
        metrics = {f"trials_{name}": float(count) for name, count in states.items()}
        # Training seconds: this iteration's trials, the loop's so far, and those continuing a
        # base trial's folds did not have to repeat.
        metrics |= {
            "train_seconds": spent,
            "train_seconds_total": loop_spent,
            "seconds_saved": saved,
        }
        if best is not None:
            metrics["best_value"] = float(best.value)
            metrics["best_trial"] = float(best.number)
        parent = (state.iteration_record(iteration) or {}).get("parent_run_id")
        ctx.tracking.end_iteration(parent, iteration, metrics, folder, ctx.study)
        ctx.say(
            f"iteration {iteration} done: "
            + ", ".join(f"{count} {name}" for name, count in sorted(states.items()))
            + f"; best {best_text(state, best)}"
        )


def write_iteration_summary(
    folder: Path, closed: Mapping[str, Any], built: Mapping[str, Any]
) -> None:
    data = {"outcome": dict(closed), "plan": {k: v for k, v in built.items() if k != "space"}}
    (folder / ITERATION_FILE).write_text(json.dumps(data, indent=2, default=format_value) + "\n")


def close_claim_key(iteration: int) -> str:
    return f"evolver.close.{iteration}"


def settled_iterations(
    state: LoopState, claims: Mapping[str, Any], now: float, settle_s: float = CLOSE_SETTLE_S
) -> set[int]:
    """Iterations closed in the study whose close was claimed more than `settle_s` before `now`
    (`claims`: the study's system attributes): no live worker is still closing them."""
    settled = set()
    for iteration in state.built_iterations:
        claim = claims.get(close_claim_key(iteration))
        claimed_at = float(claim.get("at", now)) if isinstance(claim, dict) else now
        if state.closed_record(iteration) and now - claimed_at > settle_s:
            settled.add(iteration)
    return settled
