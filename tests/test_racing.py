"""Fold racing: the rule on fold scores, and a real job raced out (or not) against a study's
incumbent."""

from __future__ import annotations

import json
import math
from pathlib import Path

import optuna
import pytest
from training_support import compose_cfg, tiny

from evolver.loop.racing import (
    FOLD_SCORES_ATTR,
    RACE_ATTR,
    FoldRace,
    incumbent_race,
    replay,
    stored_fold_scores,
)
from evolver.records import fold_scores

INCUMBENT = {1: 0.50, 2: 0.52, 3: 0.54, 4: 0.51, 5: 0.53}  # spread 0.0158


def test_clearly_worse_trial_races_out_after_its_first_fold() -> None:
    race = FoldRace(7, INCUMBENT)
    verdict = race.verdict({1: 0.60})
    assert verdict is not None
    assert (verdict.after_fold, verdict.folds, verdict.incumbent) == (1, 5, 7)
    assert verdict.mean_gap == pytest.approx(0.10)
    assert verdict.margin == pytest.approx(2 * race.spread)
    assert verdict.reason.startswith("raced out after fold 1 of 5: +0.1 worse than trial 7")


def test_trial_within_the_incumbents_fold_spread_keeps_running() -> None:
    race = FoldRace(7, INCUMBENT)
    # Worse on fold 1 by less than 2 fold spreads: the other folds may still make it win.
    assert race.verdict({1: 0.52}) is None
    # Better folds never race out.
    assert race.verdict({1: 0.40, 2: 0.45}) is None


def test_margin_shrinks_as_folds_accumulate() -> None:
    race = FoldRace(7, INCUMBENT)
    gap = 1.8 * race.spread  # inside 2 spreads after one fold, outside 2 / sqrt(2) after two
    assert race.verdict({1: INCUMBENT[1] + gap}) is None
    verdict = race.verdict({1: INCUMBENT[1] + gap, 2: INCUMBENT[2] + gap})
    assert verdict is not None and verdict.after_fold == 2
    assert verdict.margin == pytest.approx(2 * race.spread / math.sqrt(2))


def test_no_verdict_once_every_fold_is_in_or_without_a_spread() -> None:
    assert FoldRace(7, INCUMBENT).verdict({fold: 9.0 for fold in INCUMBENT}) is None
    assert FoldRace(7, {1: 0.5, 2: 0.5}).verdict({1: 9.0}) is None
    assert FoldRace(7, INCUMBENT).verdict({1: math.nan}) is None


def test_incumbent_is_the_best_complete_trial_with_every_fold_scored() -> None:
    def trial(
        number: int, value: float | None, scores: dict, state=None
    ) -> optuna.trial.FrozenTrial:
        frozen = optuna.trial.create_trial(
            value=value,
            state=state or optuna.trial.TrialState.COMPLETE,
            user_attrs={FOLD_SCORES_ATTR: {str(k): v for k, v in scores.items()}},
        )
        frozen.number = number
        return frozen

    trials = [
        trial(0, 0.52, INCUMBENT),
        trial(1, 0.40, {1: 0.4, 2: 0.4}),  # another fold count
        trial(2, None, {1: 0.1}, optuna.trial.TrialState.PRUNED),
        trial(3, 0.51, {k: v - 0.01 for k, v in INCUMBENT.items()}),
    ]
    race = incumbent_race(trials, folds=5)
    assert race is not None and race.incumbent == 3
    assert race.incumbent_scores == {k: pytest.approx(v - 0.01) for k, v in INCUMBENT.items()}
    assert incumbent_race(trials, folds=5, exclude=3).incumbent == 0
    assert incumbent_race(trials, folds=3) is None
    assert stored_fold_scores({FOLD_SCORES_ATTR: {"2": 0.5}}) == {2: 0.5}


def test_fold_scores_follow_the_objective() -> None:
    folds = [
        {"fold": 1, "best_val_loss": 0.4, "final_val_loss": 0.5, "oof_log_loss": 0.45},
        {"fold": 2, "best_val_loss": 0.6, "final_val_loss": None, "oof_log_loss": None},
    ]
    assert fold_scores(folds, "cv.loss_best") == {1: 0.4, 2: 0.6}
    assert fold_scores(folds, "cv.loss_final") == {1: 0.5}
    assert fold_scores(folds, "cv.oof_log_loss") == {1: 0.45}
    assert fold_scores(folds, "cv.accuracy") == {}


def test_replay_counts_false_stops() -> None:
    base = (0, 0.52, INCUMBENT)
    hopeless = (1, 0.80, {k: v + 0.3 for k, v in INCUMBENT.items()})
    # Bad first fold, then much better: the rule stops it, and that stop was false.
    comeback = (2, 0.45, {1: 0.60, 2: 0.40, 3: 0.40, 4: 0.40, 5: 0.40})
    results = replay([base, hopeless, comeback])
    assert [number for number, verdict, _ in results if verdict] == [1, 2]
    assert [false for _, _, false in results] == [False, False, True]


# A real job: 2 folds of tiny training (val loss near 2) against a planted incumbent.
RACE_TRAINING = tiny(
    "finetune.phase2_epochs=1",
    "data.limit=160",
    "diagnosis.enabled=false",
    "loop.pruner=none",
)


def run_trial_against(tmp_path: Path, incumbent_scores: dict[int, float]) -> tuple:
    from evolver.app import train_task

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="race", storage=storage)
    value = sum(incumbent_scores.values()) / len(incumbent_scores)
    study.add_trial(
        optuna.trial.create_trial(
            value=value,
            user_attrs={FOLD_SCORES_ATTR: {str(k): v for k, v in incumbent_scores.items()}},
        )
    )
    trial = study.ask()
    cfg = compose_cfg(
        [
            *RACE_TRAINING,
            f"runs_dir={tmp_path}",
            "loop.name=race",
            f"loop.storage={storage}",
            f"loop.trial_number={trial.number}",
        ]
    )
    run_dir = tmp_path / "run"
    error = None
    try:
        train_task(cfg, run_dir=run_dir)
    except optuna.TrialPruned as pruned:
        error = pruned
    frozen = study.get_trials(deepcopy=False)[trial.number]
    return error, frozen, json.loads((run_dir / "summary.json").read_text())


@pytest.mark.slow
def test_job_far_behind_the_incumbent_races_out_after_fold_one(tmp_path: Path) -> None:
    error, trial, summary = run_trial_against(tmp_path, {1: 0.05, 2: 0.07})
    assert error is not None and str(error).startswith("raced out after fold 1 of 2")
    assert summary["status"] == "pruned"
    assert [fold["fold"] for fold in summary["folds"]] == [1]
    assert summary["folds"][0]["oof_log_loss"] > 0.5
    assert trial.user_attrs[RACE_ATTR]["after_fold"] == 1
    assert trial.user_attrs[RACE_ATTR]["incumbent"] == 0


@pytest.mark.slow
def test_job_ahead_of_the_incumbent_runs_every_fold(tmp_path: Path) -> None:
    error, trial, summary = run_trial_against(tmp_path, {1: 50.0, 2: 52.0})
    assert error is None
    assert summary["status"] == "complete"
    assert [fold["fold"] for fold in summary["folds"]] == [1, 2]
    assert RACE_ATTR not in trial.user_attrs
