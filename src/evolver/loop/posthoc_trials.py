"""Trials that need no training: a proposal that changes only what prediction does with a
trained run (temperature, clip bound, checkpoint, TTA; the `miscalibrated` finding's) is scored
from its base trial's stored out-of-fold candidates and added to the study as a complete trial
with 0 training seconds.

Such a trial competes with trained ones only where the objective is the raw out-of-fold log
loss (`cv.oof_log_loss`): the post-hoc choice is then what the submission would score. Under
`cv.oof_log_loss_calibrated` every trained trial already carries its best post-hoc choice, so the
proposal would repeat its base's score; a validation-loss objective does not see prediction at
all. In both cases the proposal is skipped, with a line that says why.

A scored trial has no parameters for the sampler (its base's are in `posthoc_of`), so the
sampler's model is not fed a second score for the same configuration, and new training trials
build on trained trials only (`LoopState.ranked(trained=True)`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from evolver.records import POSTHOC_KEY, SUMMARY_FILE

if TYPE_CHECKING:
    from evolver.loop.proposals import TrialPlan

log = logging.getLogger("evolver.loop")

SCORED_OBJECTIVE = "cv.oof_log_loss"
CALIBRATED_OBJECTIVE = "cv.oof_log_loss_calibrated"
# The proposal keys a scored trial may change; anything else needs training.
POSTHOC_KEYS = frozenset({"predict.temperature", "predict.clip", "checkpoint.select", "tta"})


def unsupported_reason(objective: str) -> str | None:
    """Why proposals scored without training cannot be ranked under `objective` (None: they can)."""
    if objective == SCORED_OBJECTIVE:
        return None
    if objective == CALIBRATED_OBJECTIVE:
        return f"objective {objective} already scores every trial with its post-hoc choice"
    return f"objective {objective} does not see prediction choices (use {SCORED_OBJECTIVE})"


def configured_choice(run_dir: str | Path) -> tuple[str, tuple[str, ...]] | None:
    """(checkpoint, views) the run predicted its out-of-fold set with, from its summary."""
    from evolver.diagnosis.posthoc import parse_candidate_name

    try:
        summary = json.loads((Path(run_dir) / SUMMARY_FILE).read_text())
    except (OSError, ValueError):
        return None
    name = (summary.get(POSTHOC_KEY) or {}).get("configured")
    return parse_candidate_name(str(name)) if name else None


def score(plan: TrialPlan) -> tuple[float, float] | None:
    """(OOF log loss, accuracy) of a scored plan from its base run's candidates; None when the
    run has none stored or the changes are not post-hoc ones."""
    from evolver.diagnosis.posthoc import TTA_CHOICES, score_choice

    attrs = plan.user_attrs
    changes = dict(attrs.get("changes") or {})
    run_dir = attrs.get("base_run_dir")
    if not run_dir or set(changes) - POSTHOC_KEYS:
        return None
    configured = configured_choice(run_dir)
    if configured is None:
        return None
    checkpoint = str(changes.get("checkpoint.select") or configured[0])
    views = TTA_CHOICES.get(str(changes["tta"])) if "tta" in changes else configured[1]
    if views is None:
        return None
    calibrated = changes.get("predict.temperature") is not None
    return score_choice(Path(run_dir), checkpoint, views, calibrated)


def add_scored_trial(study: Any, iteration: int, plan: TrialPlan) -> int | None:
    """Score the plan and add it as a complete trial; its number, or None when it could not be
    scored (logged)."""
    import optuna

    scored = score(plan)
    if scored is None:
        log.info(
            "proposal %s on trial %s skipped: the trial stored no out-of-fold candidates",
            plan.user_attrs.get("proposal"),
            plan.user_attrs.get("posthoc_of"),
        )
        return None
    value, accuracy = scored
    attrs = {
        "iteration": iteration,
        **plan.user_attrs,
        "duration_s": 0.0,
        "run_status": "complete",
        "cv": {"oof_log_loss": value, "accuracy": accuracy},
        "findings": [],
    }
    trial = optuna.trial.create_trial(
        state=optuna.trial.TrialState.COMPLETE,
        value=value,
        params={},
        distributions={},
        user_attrs=attrs,
    )
    study.add_trial(trial)
    added = [t for t in study.get_trials(deepcopy=False) if t.user_attrs == trial.user_attrs]
    return added[-1].number if added else None
