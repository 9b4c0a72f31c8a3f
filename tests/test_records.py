"""Statistics behind summary.json, without torch: computed from the same rows as history.csv."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from evolver.records import (
    HISTORY_COLUMNS,
    CvScores,
    RunSummary,
    StopInfo,
    cv_losses,
    objective_value,
    read_history,
    summarize_fold,
    write_history,
    write_summary,
)


def rows(fold: int, val_losses: list[float], phase1: int = 2) -> list[dict]:
    return [
        {
            "fold": fold,
            "epoch": e,
            "phase": 1 if e <= phase1 else 2,
            "train_loss": 0.5,
            "val_loss": v,
            "val_acc": 0.9,
            "lr_backbone": 0.0 if e <= phase1 else 1e-4,
            "lr_head": 1e-3,
        }
        for e, v in enumerate(val_losses, 1)
    ]


def test_best_final_and_degradation_come_from_the_same_rows() -> None:
    history = rows(1, [0.30, 0.20, 0.15, 0.18, 0.19])
    fold = summarize_fold(
        1, history, StopInfo(early_stopped=True, stop_reason="patience_exhausted")
    )
    assert fold.best_val_loss == 0.15
    assert fold.best_epoch == 3
    assert fold.final_val_loss == 0.19
    assert fold.degradation == pytest.approx(0.04)
    assert fold.best_val_loss <= fold.final_val_loss
    assert (fold.epochs_trained, fold.phase1_epochs, fold.phase2_epochs) == (5, 2, 3)
    assert fold.phase1_epochs + fold.phase2_epochs == fold.epochs_trained
    assert fold.early_stopped and fold.stop_reason == "patience_exhausted"
    assert not fold.nonfinite


def test_ties_take_the_earliest_epoch_and_only_the_named_fold_counts() -> None:
    history = rows(1, [0.2, 0.1, 0.1]) + rows(2, [0.05, 0.04])
    fold = summarize_fold(1, history, StopInfo())
    assert (fold.best_epoch, fold.epochs_trained, fold.degradation) == (2, 3, 0.0)


def test_nonfinite_loss_is_flagged_and_skipped_for_best() -> None:
    history = rows(1, [0.3, 0.2, math.nan])
    fold = summarize_fold(1, history, StopInfo())
    assert fold.nonfinite
    assert fold.best_val_loss == 0.2
    assert fold.final_val_loss is None and fold.degradation is None


def test_a_fold_without_epochs_has_no_losses() -> None:
    fold = summarize_fold(3, [], StopInfo(stop_reason="pruned"))
    assert fold.best_val_loss is None and fold.epochs_trained == 0
    assert fold.stop_reason == "pruned"


def test_cv_losses_average_best_and_final_separately() -> None:
    folds = [
        summarize_fold(k, rows(k, losses), StopInfo())
        for k, losses in [(1, [0.2, 0.1, 0.15]), (2, [0.3, 0.2, 0.2])]
    ]
    loss_best, loss_final = cv_losses(folds)
    assert loss_best == pytest.approx(0.15)
    assert loss_final == pytest.approx(0.175)
    assert loss_best <= loss_final


def test_cv_loss_is_none_when_a_fold_has_none() -> None:
    folds = [summarize_fold(1, rows(1, [0.2]), StopInfo()), summarize_fold(2, [], StopInfo())]
    assert cv_losses(folds) == (None, None)


def test_objective_reads_the_named_cv_score() -> None:
    cv = CvScores(loss_best=0.1, loss_final=0.2, oof_log_loss=math.nan)
    assert objective_value(cv, "cv.loss_best") == 0.1
    assert objective_value(cv, "cv.loss_final") == 0.2
    assert objective_value(cv, "cv.oof_log_loss") is None


def test_history_round_trip_has_the_exact_columns(tmp_path) -> None:
    history = rows(2, [0.3, 0.2]) + rows(1, [0.4])
    write_history(tmp_path, history)
    header = (tmp_path / "history.csv").read_text().splitlines()[0]
    assert tuple(header.split(",")) == HISTORY_COLUMNS
    back = read_history(tmp_path)
    assert [(r["fold"], r["epoch"]) for r in back] == [(1, 1), (2, 1), (2, 2)]


def test_summary_json_writes_nan_as_null(tmp_path) -> None:
    fold = summarize_fold(1, rows(1, [0.2, math.nan]), StopInfo())
    summary = RunSummary("failed", "boom", [fold], CvScores(loss_best=0.2), {}, "cv.loss_best", 1.0)
    data = json.loads(write_summary(tmp_path, summary).read_text())
    assert data["folds"][0]["final_val_loss"] is None
    assert data["objective"] == 0.2 and data["status"] == "failed" and data["error"] == "boom"


def test_records_import_without_torch() -> None:
    code = "import sys, evolver.records, evolver.config; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
