"""The pattern move: a remedy that beat its base, taken again from the incumbent."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
from test_loop import SPACE, _plan_settings

from evolver.loop.proposals import baseline_plan, plan_iteration
from evolver.loop.repeated_steps import step_again
from evolver.loop.space import SearchSpace
from evolver.loop.state import LoopState

STEP_SPACE = {
    **SPACE,
    "finetune.lr_head": {"type": "float", "low": 1e-4, "high": 3e-2, "log": True},
    "regularization.mixup": {"type": "float", "low": 0.0, "high": 0.4},
    "data.batch_size": {"type": "categorical", "choices": [16, 32, 64]},
}


def _trial(number: int, value: float, params: dict, **attrs) -> optuna.trial.FrozenTrial:
    space = SearchSpace.from_dict(STEP_SPACE)
    trial = optuna.trial.create_trial(
        params=params,
        distributions={name: space[name].distribution() for name in params},
        value=value,
        user_attrs={"iteration": 1, **attrs},
    )
    trial.number = number
    return trial


def _remedy(number: int, value: float, params: dict, name: str, changes: dict, base: int = 0):
    return _trial(
        number,
        value,
        params,
        proposal=name,
        proposed_by="head_still_learning",
        changes=changes,
        incumbent={"number": base, "value": 0.3},
        expected_effect={"metric": "mean_best_val_loss", "direction": "down"},
    )


BASE = {"finetune.lr_backbone": 1e-4, "finetune.lr_head": 1e-3, "regularization.mixup": 0.1}


def _again(incumbent, base=None):
    base = base or _trial(0, 0.3, BASE)
    trials = {base.number: base, incumbent.number: incumbent}
    return step_again(incumbent, trials, SearchSpace.from_dict(STEP_SPACE))


def test_a_log_scale_step_that_paid_is_taken_again_as_the_same_ratio() -> None:
    raised = _remedy(
        1, 0.2, {**BASE, "finetune.lr_head": 2.5e-3}, "raise_head_lr", {"finetune.lr_head": 2.5e-3}
    )
    again = _again(raised)
    assert again.name == "raise_head_lr_again"
    assert again.finding == "head_still_learning"
    assert again.changes == {"finetune.lr_head": pytest.approx(6.25e-3)}
    assert "0.3 -> 0.2" in again.reason and "lr_head 0.0025 -> 0.00625" in again.reason
    # Taken again from the repeated step: the name does not grow.
    twice = _remedy(
        2, 0.1, {**BASE, "finetune.lr_head": 6.25e-3}, again.name, again.changes, base=1
    )
    assert step_again(twice, {1: raised, 2: twice}, SearchSpace.from_dict(STEP_SPACE)).name == (
        "raise_head_lr_again"
    )


def test_a_linear_step_repeats_its_difference_and_stops_at_the_bound() -> None:
    mixup = {"regularization.mixup": 0.3}
    again = _again(_remedy(1, 0.2, {**BASE, **mixup}, "more_regularization", mixup))
    assert again.changes == {"regularization.mixup": 0.4}  # 0.5 clipped to the space's 0.4
    at_bound = {"regularization.mixup": 0.4}
    assert _again(_remedy(1, 0.2, {**BASE, **at_bound}, "more_regularization", at_bound)) is None


@pytest.mark.parametrize(
    ("params", "changes"),
    [
        # A categorical has no "again" (and half of larger_batch's step would be another change).
        (
            {**BASE, "data.batch_size": 64, "finetune.lr_head": 1.41e-3},
            {"data.batch_size": 64, "finetune.lr_head": 1.41e-3},
        ),
        # A key the space does not hold.
        (BASE, {"checkpoint.continue_lr_scale": 0.2}),
        # A value outside the space, held as a fixed override, not as a parameter.
        (BASE, {"finetune.phase2_epochs": 12}),
    ],
)
def test_a_step_that_cannot_be_repeated_whole_is_not_repeated(params, changes) -> None:
    base = _trial(0, 0.3, {**BASE, "data.batch_size": 32})
    assert _again(_remedy(1, 0.2, params, "a_remedy", changes), base) is None


def test_only_a_trained_proposal_that_beat_its_base_is_repeated() -> None:
    raised = {**BASE, "finetune.lr_head": 2.5e-3}
    changes = {"finetune.lr_head": 2.5e-3}
    assert _again(_remedy(1, 0.3, raised, "raise_head_lr", changes)) is None  # no better
    assert _again(_trial(1, 0.2, raised)) is None  # the sampler's
    scored = _remedy(1, 0.2, raised, "posthoc_choice", changes)
    scored.user_attrs["needs_training"] = False
    assert _again(scored) is None


def test_the_incumbents_repeated_step_is_planned_before_its_findings_proposals(
    tmp_path: Path,
) -> None:
    space = SearchSpace.from_dict(STEP_SPACE)
    base = _trial(0, 0.3, BASE)
    raised = _remedy(
        1, 0.2, {**BASE, "finetune.lr_head": 2.5e-3}, "raise_head_lr", {"finetune.lr_head": 2.5e-3}
    )
    (tmp_path / "report.json").write_text(
        json.dumps(
            {
                "findings": [
                    {
                        "id": "training_too_short",
                        "severity": "medium",
                        "explanation": "e",
                        "proposals": [
                            {
                                "name": "train_longer",
                                "finding": "training_too_short",
                                "changes": {"finetune.phase2_epochs": 6},
                                "reason": "r",
                            }
                        ],
                    }
                ]
            }
        )
    )
    raised.user_attrs["run_dir"] = str(tmp_path)
    attrs = {"evolver.iteration.1": {"size": 3, "space": space.to_dict()}, "evolver.closed.1": {}}
    state = LoopState([base, raised], attrs)
    plan = plan_iteration(2, state, _plan_settings(1), space, baseline_plan(space, {}, {}))
    first, second, sampled = plan.trials
    assert first.user_attrs["proposal"] == "raise_head_lr_again"
    assert first.params["finetune.lr_head"] == pytest.approx(6.25e-3)
    assert first.user_attrs["incumbent"]["number"] == 1
    assert second.user_attrs["proposal"] == "train_longer"
    assert sampled.params == {}


def test_the_step_is_read_from_fixed_overrides_and_bound_by_the_declared_space() -> None:
    # The loop had narrowed the sampler's head-rate range below 0.0025, so the raised rate ran
    # as a fixed override; the declared space still allows the next step.
    changes = {"finetune.lr_head": 2.5e-3}
    outside = _remedy(1, 0.2, {"finetune.lr_backbone": 1e-4}, "raise_head_lr", changes)
    outside.user_attrs["fixed_overrides"] = ["finetune.lr_head=0.0025"]
    assert _again(outside).changes == {"finetune.lr_head": pytest.approx(6.25e-3)}
    # Beyond the declared ceiling already: clipping would step back, so there is no "again".
    beyond = _remedy(1, 0.2, {"finetune.lr_backbone": 1e-4}, "raise_head_lr", changes)
    beyond.user_attrs["fixed_overrides"] = ["finetune.lr_head=0.04"]
    assert _again(beyond) is None


def test_a_key_at_its_bound_stays_while_the_others_move() -> None:
    raised = {"finetune.lr_backbone": 3e-4, "finetune.lr_head": 3e-2}
    base = _trial(0, 0.3, {**BASE, "finetune.lr_head": 1e-2})
    again = _again(_remedy(1, 0.2, {**BASE, **raised}, "raise_learning_rates", raised), base)
    assert again.changes == {"finetune.lr_backbone": pytest.approx(9e-4)}
