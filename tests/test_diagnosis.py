"""Diagnosis core: records, the seed's numbers, metrics and thresholds."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from diagnosis_fixtures import (
    SEED_SETTINGS,
    history_frame,
    records_for,
    seed_history,
    seed_table_summary,
    write_run,
)

from evolver.diagnosis import (
    RunRecords,
    ScoreReference,
    Thresholds,
    diagnose,
    load_run,
)
from evolver.errors import ConfigError, DataError

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_diagnosis_imports_without_torch() -> None:
    code = (
        "import sys, evolver.diagnosis, evolver.diagnosis.cli, evolver.diagnosis.report; "
        "assert 'torch' not in sys.modules, 'torch imported'; "
        "assert 'lightning' not in sys.modules, 'lightning imported'; "
        "assert 'matplotlib' not in sys.modules, 'matplotlib imported eagerly'"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_seed_progressions_give_the_hand_computed_fold_numbers() -> None:
    diagnosis = diagnose(RunRecords.from_parts(seed_history()))
    folds = {fold.fold: fold for fold in diagnosis.folds}

    fold1 = folds[1]
    assert fold1.best_val_loss == pytest.approx(0.0650)
    assert fold1.best_epoch == 4  # the first phase-2 epoch
    assert (fold1.best_phase, fold1.best_phase_epoch) == (2, 1)
    assert fold1.degradation == pytest.approx(0.0742 - 0.0650)

    fold4 = folds[4]
    assert fold4.best_val_loss == pytest.approx(0.0621)
    assert fold4.best_epoch == 5
    assert (fold4.best_phase, fold4.best_phase_epoch) == (2, 2)
    assert fold4.final_val_loss == pytest.approx(0.0735)
    assert fold4.degradation == pytest.approx(0.0114)
    assert fold4.epochs_trained == 8
    assert (fold4.phase1_epochs, fold4.phase2_epochs) == (3, 5)

    # The seed claims fold 2's best (0.0681) lies above its final (0.0679); from the records the
    # best is the minimum, so it can never exceed the final.
    fold2 = folds[2]
    assert fold2.best_val_loss == pytest.approx(0.0679)
    assert fold2.best_epoch == 11
    assert fold2.degradation == pytest.approx(0.0)
    assert all(f.best_val_loss <= f.final_val_loss for f in diagnosis.folds)

    metrics = diagnosis.metrics
    assert metrics.n_folds == 3
    assert metrics.max_degradation_fold == 4
    assert metrics.max_degradation == pytest.approx(0.0114)
    assert metrics.folds_degraded == 2
    assert metrics.folds_best_in_phase2 == 3
    # A hand-written history says nothing about early stopping: unknown, not guessed.
    assert metrics.folds_early_stopped is None
    assert all(f.early_stopped is None for f in diagnosis.folds)


def test_seed_fold_table_metrics_are_right_where_the_seed_was_wrong() -> None:
    records = RunRecords.from_parts(summary=seed_table_summary())
    diagnosis = diagnose(records, reference=ScoreReference(baseline=0.0736, target=0.03882))
    metrics = diagnosis.metrics

    assert metrics.n_folds == 5
    assert round(metrics.mean_final_val_loss, 4) == 0.0718
    assert round(metrics.std_final_val_loss, 4) == 0.0026
    assert round(metrics.mean_best_val_loss, 4) == 0.0665
    assert round(metrics.std_best_val_loss, 4) == 0.0030
    assert round(metrics.mean_degradation, 4) == 0.0053
    assert metrics.max_degradation == pytest.approx(0.0114)
    assert metrics.max_degradation_fold == 4
    # The seed's text said 3/5 folds degraded and "avg 4.8 epochs"; its own table says otherwise.
    assert metrics.folds_degraded == 4
    assert metrics.folds_early_stopped == 4
    assert metrics.mean_epochs_trained == pytest.approx(5.6)
    assert metrics.mean_epochs_trained_early_stopped == pytest.approx(5.0)
    assert metrics.mean_phase2_epochs_early_stopped == pytest.approx(2.0)

    assert metrics.score == pytest.approx(0.0718)
    assert metrics.score_source == "cv.loss_final"
    assert round(metrics.relative_improvement * 100, 1) == 2.4
    assert round(metrics.gap_to_target, 4) == 0.0330
    assert round(metrics.improvement_needed * 100, 1) == 45.9

    assert any("fold 2" in note and "0.0681" in note for note in diagnosis.notes)
    ids = diagnosis.finding_ids
    assert "final_weights_not_best" in ids
    assert "overfitting_after_best" in ids


def test_seed_history_with_settings_reproduces_the_seed_recommendations() -> None:
    summary = {"status": "complete", "settings": SEED_SETTINGS, "objective_name": "cv.loss_final"}
    diagnosis = diagnose(RunRecords.from_parts(seed_history(), summary))
    folds = {fold.fold: fold for fold in diagnosis.folds}
    # 3 + 8 epochs configured: folds 1 and 4 stopped early, fold 2 ran its full schedule.
    assert (folds[1].early_stopped, folds[2].early_stopped, folds[4].early_stopped) == (
        True,
        False,
        True,
    )
    by_id = {finding.id: finding for finding in diagnosis.findings}
    # Early stopping fired a full patience window after each stopped fold's best: right, not
    # eager (the notebook's own advice to raise patience would only have spent epochs).
    assert "early_stopping_too_eager" not in by_id
    assert {
        "backbone_lr_too_high",
        "training_too_short",
        "unstable_validation",
        "final_weights_not_best",
    } <= set(by_id)
    assert "lr_too_high" not in by_id

    # The notebook lowered both rates 5x. The head trained alone first and its phase never
    # spiked (its largest rise, fold 1, is 3.5%): only the backbone's rate is lowered.
    lower = by_id["backbone_lr_too_high"].proposals[0]
    assert lower.name == "lower_backbone_lr"
    assert lower.changes == {"finetune.lr_backbone": 2e-05}
    assert lower.overrides == ["finetune.lr_backbone=2e-05"]
    assert lower.expected_effect == {"metric": "mean_degradation", "direction": "down"}
    # The lower rates without paying the seed's epochs again: each fold goes on from where it
    # ended, for up to patience (3) more phase-2 epochs.
    continued = by_id["backbone_lr_too_high"].proposals[1]
    assert continued.name == "continue_at_lower_lr"
    assert continued.changes == {"checkpoint.continue_lr_scale": 0.2, "finetune.phase2_epochs": 11}
    cosine = by_id["backbone_lr_too_high"].proposals[2]
    assert cosine.overrides == ["schedule=cosine", "schedule.warmup_epochs=2"]

    assert by_id["training_too_short"].proposals[0].changes == {"finetune.phase2_epochs": 12}
    batch = by_id["unstable_validation"].proposals[0]
    assert batch.changes["data.batch_size"] == 64
    # Adam-style optimizers: learning rates re-scaled by sqrt(2) with the batch.
    assert batch.changes["finetune.lr_backbone"] == pytest.approx(1.41e-4)


def test_history_alone_is_enough(tmp_path: Path) -> None:
    frame = pd.DataFrame(
        {"fold": [1, 1, 1, 1], "epoch": [1, 2, 3, 4], "val_loss": [0.9, 0.7, 0.65, 0.66]}
    )
    run_dir = write_run(tmp_path / "hand", history=frame)
    records = load_run(run_dir)
    assert records.settings.patience is None and records.settings.max_epochs is None
    diagnosis = diagnose(records)
    (fold,) = diagnosis.folds
    assert (fold.best_epoch, fold.best_phase, fold.phase1_epochs) == (3, 2, 0)
    assert fold.early_stopped is None


def test_config_yaml_fills_settings_the_summary_lacks(tmp_path: Path) -> None:
    config = {
        "finetune": {"phase1_epochs": 2, "phase2_epochs": 6, "lr_backbone": 3e-4, "lr_head": 3e-3},
        "early_stop": {"enabled": False, "patience": 3, "min_delta": 0.0, "monitor": "val_loss"},
        "checkpoint": {"select": "last"},
        "data": {"batch_size": 16},
        "schedule": {"name": "cosine", "warmup_epochs": 1},
        "optim": {"name": "sgd", "weight_decay": 0.01},
        "regularization": {"mixup": 0.0, "random_erasing": 0.1, "label_smoothing": 0.0},
        "objective": "cv.loss_best",
    }
    run_dir = write_run(
        tmp_path / "run", history=history_frame({1: [1, 0.8, 0.7, 0.6]}), config=config
    )
    settings = load_run(run_dir).settings
    assert settings.max_epochs == 8
    assert settings.early_stop_enabled is False and settings.patience is None
    assert (settings.lr_backbone, settings.batch_size, settings.optimizer) == (3e-4, 16, "sgd")
    assert (settings.schedule, settings.warmup_epochs, settings.checkpoint) == ("cosine", 1, "last")
    assert settings.objective_name == "cv.loss_best"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("fold,epoch\n1,1\n", "missing column 'val_loss'"),
        ("fold,epoch,val_loss\n1,1,abc\n", "column 'val_loss' is not numeric"),
        ("fold,epoch,val_loss\n1,1,0.5\n1,1,0.4\n", "same epoch twice"),
        ("fold,epoch,phase,val_loss\n1,1,3,0.5\n", "'phase' must hold 1 or 2"),
        ("fold,epoch,val_loss\n0,1,0.5\n", "count from 1"),
    ],
)
def test_bad_history_is_a_one_line_data_error(tmp_path: Path, content: str, message: str) -> None:
    (tmp_path / "history.csv").write_text(content)
    with pytest.raises(DataError, match=message) as error:
        load_run(tmp_path)
    assert "history.csv" in str(error.value) and "\n" not in str(error.value)


def test_missing_run_directory_is_a_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not a run directory"):
        load_run(tmp_path / "nope")
    with pytest.raises(DataError, match=r"neither history\.csv nor summary\.json"):
        load_run(tmp_path)


def test_nonfinite_losses_are_counted_not_propagated() -> None:
    curves = {1: [1.0, 0.8, float("nan"), 0.7]}
    diagnosis = diagnose(records_for(curves, phase1_epochs=1))
    (fold,) = diagnosis.folds
    assert fold.nonfinite
    assert fold.best_val_loss == pytest.approx(0.7) and fold.final_val_loss == pytest.approx(0.7)
    assert diagnosis.finding_ids[0] == "diverged"


def test_default_yaml_documents_the_code_defaults() -> None:
    values = yaml.safe_load((REPO_ROOT / "conf/diagnosis/default.yaml").read_text())
    assert Thresholds.from_mapping(values) == Thresholds()
    assert values["enabled"] is True
    assert values["baseline_score"] is None and values["target_score"] is None


def test_thresholds_reject_unknown_keys_and_bad_values() -> None:
    with pytest.raises(ConfigError, match=r"diagnosis\.volatility_mx: unknown"):
        Thresholds.from_mapping({"volatility_mx": 0.1})
    with pytest.raises(ConfigError, match=r"diagnosis\.spike_rise: expected a finite number"):
        Thresholds.from_mapping({"spike_rise": -1})
    with pytest.raises(ConfigError, match=r"diagnosis\.lr_best_within_phase2_epochs"):
        Thresholds.from_mapping({"lr_best_within_phase2_epochs": 1.5})
    assert Thresholds.from_mapping({"spike_rise": 0.3}).spike_rise == 0.3


def test_partial_records_of_a_pruned_run_are_diagnosed() -> None:
    history = history_frame({1: [1.0, 0.8, 0.7, 0.65], 2: [float("nan")] * 2}, phase1_epochs=1)
    summary = {
        "status": "pruned",
        "error": "Trial was pruned at epoch 2.",
        "folds": [{"fold": 1, "early_stopped": False}],
        "settings": {**SEED_SETTINGS, "max_phase1_epochs": 1, "max_phase2_epochs": 3},
        "cv": {"loss_best": None, "loss_final": None},
        "objective": None,
    }
    diagnosis = diagnose(RunRecords.from_parts(history, summary))
    fold2 = diagnosis.folds[1]
    assert fold2.nonfinite and fold2.best_val_loss is None and fold2.degradation is None
    # Fold 2 stopped after 2 of 4 epochs because the run was pruned, not by early stopping.
    assert fold2.early_stopped is None
    assert diagnosis.metrics.n_folds == 2 and diagnosis.metrics.mean_best_val_loss == 0.65
    assert "diverged" in diagnosis.finding_ids
    assert any(note.startswith("run pruned: Trial was pruned") for note in diagnosis.notes)
    assert diagnosis.to_dict()["status"] == "pruned"
