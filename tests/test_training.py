"""Train 2 folds of a tiny model on digits and check the records against each other."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from training_support import TINY, compose_cfg

from evolver.app import train_task
from evolver.records import HISTORY_COLUMNS

pytestmark = pytest.mark.slow


def train(run_dir: Path, *overrides: str) -> tuple[float, dict, list[dict]]:
    cfg = compose_cfg([*TINY, f"runs_dir={run_dir.parent}", *overrides])
    objective = train_task(cfg, run_dir=run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    with (run_dir / "history.csv").open() as handle:
        history = list(csv.DictReader(handle))
    return objective, summary, history


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, float, dict, list[dict]]:
    run_dir = tmp_path_factory.mktemp("digits") / "run"
    objective, summary, history = train(run_dir, "early_stop=off")
    return run_dir, objective, summary, history


def test_run_directory_holds_every_record(digits_run) -> None:
    run_dir, _, _, _ = digits_run
    for name in ("config.yaml", "history.csv", "summary.json", "oof.csv", "report.json"):
        assert (run_dir / name).is_file(), name
    for fold in (1, 2):
        for kind in ("best", "last"):
            assert (run_dir / "checkpoints" / f"fold{fold}-{kind}.ckpt").is_file()


def test_history_rows_match_the_fold_summaries(digits_run) -> None:
    _, _, summary, history = digits_run
    assert tuple(history[0].keys()) == HISTORY_COLUMNS
    assert summary["status"] == "complete" and summary["error"] is None
    for fold in summary["folds"]:
        rows = [r for r in history if int(r["fold"]) == fold["fold"]]
        epochs = [int(r["epoch"]) for r in rows]
        assert epochs == list(range(1, len(rows) + 1))
        losses = [float(r["val_loss"]) for r in rows]
        assert fold["best_val_loss"] == pytest.approx(min(losses))
        assert fold["final_val_loss"] == pytest.approx(losses[-1])
        assert fold["best_val_loss"] <= fold["final_val_loss"]
        assert fold["degradation"] == pytest.approx(fold["final_val_loss"] - fold["best_val_loss"])
        assert losses[fold["best_epoch"] - 1] == pytest.approx(fold["best_val_loss"])
        assert fold["epochs_trained"] == len(rows) == 4
        assert fold["phase1_epochs"] + fold["phase2_epochs"] == fold["epochs_trained"]
        assert (fold["phase1_epochs"], fold["phase2_epochs"]) == (1, 3)
        assert not fold["early_stopped"] and fold["stop_reason"] == "max_epochs"
        assert fold["nonfinite"] is False
        phase1 = [r for r in rows if r["phase"] == "1"]
        phase2 = [r for r in rows if r["phase"] == "2"]
        assert all(float(r["lr_backbone"]) == 0 for r in phase1)
        assert all(float(r["lr_backbone"]) > 0 for r in phase2)
        assert all(float(r["lr_head"]) > 0 for r in rows)


def test_cv_scores_and_objective(digits_run) -> None:
    _, objective, summary, _ = digits_run
    cv = summary["cv"]
    folds = summary["folds"]
    assert cv["loss_best"] == pytest.approx(sum(f["best_val_loss"] for f in folds) / 2)
    assert cv["loss_final"] == pytest.approx(sum(f["final_val_loss"] for f in folds) / 2)
    assert cv["loss_best"] <= cv["loss_final"]
    assert 0 < cv["oof_log_loss"] < 10 and 0 <= cv["accuracy"] <= 1
    assert objective == pytest.approx(cv["loss_best"]) == summary["objective"]
    settings = summary["settings"]
    assert settings["n_folds"] == 2 and settings["patience"] is None
    assert settings["checkpoint"] == "best" and settings["model"] == "test_resnet"


def test_out_of_fold_predictions_cover_every_sample(digits_run) -> None:
    run_dir, _, _, _ = digits_run
    with (run_dir / "oof.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["index"]) for r in rows] == list(range(400))
    assert {r["fold"] for r in rows} == {"1", "2"}
    assert list(rows[0].keys())[:3] == ["index", "fold", "target"]
    for row in rows[:20]:
        assert sum(float(row[f"p_{c}"]) for c in range(10)) == pytest.approx(1, abs=1e-4)


def test_early_stopping_fires_in_phase_two_with_its_reason(tmp_path: Path) -> None:
    # min_delta larger than any loss: the first phase-2 epoch sets the best, the next one fails.
    _, summary, history = train(
        tmp_path / "run",
        "early_stop.patience=1",
        "early_stop.min_delta=100",
        "finetune.phase1_epochs=2",
        "finetune.phase2_epochs=4",
        "data.limit=200",
    )
    for fold in summary["folds"]:
        assert fold["early_stopped"] is True
        assert fold["stop_reason"] == "patience_exhausted"
        assert (fold["phase1_epochs"], fold["phase2_epochs"], fold["epochs_trained"]) == (2, 2, 4)
        assert "did not improve" in fold["stop_message"]
    assert len(history) == 8
    assert summary["settings"]["patience"] == 1


def test_pruned_run_keeps_partial_records_and_reraises(tmp_path: Path, monkeypatch) -> None:
    import optuna
    from lightning.pytorch.callbacks import Callback

    class PruneSecondFold(Callback):
        def __init__(self, fold: int) -> None:
            self.fold = fold

        def on_train_epoch_end(self, trainer, pl_module) -> None:
            if self.fold == 2 and trainer.current_epoch == 1:
                raise optuna.TrialPruned("pruned at fold 2, epoch 2")

    monkeypatch.setattr(
        "evolver.loop.job.trial_callbacks", lambda cfg, fold: [PruneSecondFold(fold)]
    )
    run_dir = tmp_path / "run"
    with pytest.raises(optuna.TrialPruned):
        train(run_dir, "data.limit=200")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "pruned" and "fold 2" in summary["error"]
    assert [f["epochs_trained"] for f in summary["folds"]] == [4, 2]
    assert summary["folds"][1]["stop_reason"] == "pruned"
    assert summary["cv"]["oof_log_loss"] is None and summary["objective"] is None
    history = (run_dir / "history.csv").read_text().strip().splitlines()
    assert len(history) == 1 + 4 + 2


def test_schedules_train_and_record_their_rates(tmp_path: Path) -> None:
    for schedule in ("cosine", "onecycle", "constant"):
        _, summary, history = train(
            tmp_path / schedule,
            f"schedule={schedule}",
            "data.limit=160",
            "cv.folds=2",
            "finetune.phase2_epochs=2",
            "tta=none",
            "diagnosis.enabled=false",
        )
        assert summary["status"] == "complete", schedule
        assert summary["settings"]["schedule"] == schedule
        assert all(float(r["lr_head"]) > 0 for r in history)


def test_mixup_and_label_smoothing_keep_val_loss_plain(tmp_path: Path) -> None:
    _, summary, _ = train(
        tmp_path / "run",
        "regularization.mixup=0.2",
        "regularization.cutmix=0.2",
        "regularization.random_erasing=0.25",
        "data.limit=160",
        "finetune.phase2_epochs=1",
        "diagnosis.enabled=false",
    )
    assert summary["status"] == "complete"


def test_recorder_state_survives_a_checkpoint_resume(tmp_path: Path) -> None:
    import lightning.pytorch as pl
    from evolver.callbacks import DynamicsRecorder, TwoPhaseFinetuning
    from lightning.pytorch.callbacks import ModelCheckpoint

    from evolver.data.loaders import TransformSettings, fold_splits, make_fold_loaders
    from evolver.data.sources import load_image_set
    from evolver.model import FineTuneClassifier
    from evolver.settings import TrainingSettings

    cfg = compose_cfg([*TINY, "data.limit=120", "finetune.phase1_epochs=1"])
    settings = TrainingSettings.from_cfg(cfg)
    images = load_image_set(cfg.data)
    _, train_idx, val_idx = next(fold_splits(images.targets, 2, True, 0))
    loaders = make_fold_loaders(
        images, train_idx, val_idx, TransformSettings.from_cfg(cfg), 32, 0, 0
    )

    def fit(max_epochs: int, ckpt_path: Path | None) -> DynamicsRecorder:
        module = FineTuneClassifier.from_settings(cfg, settings, 10, images.class_names, False)
        recorder = DynamicsRecorder(fold=1)
        checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_on_train_epoch_end=True)
        trainer = pl.Trainer(
            max_epochs=max_epochs,
            callbacks=[TwoPhaseFinetuning(1), recorder, checkpoint],
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            accelerator="cpu",
        )
        trainer.fit(module, loaders.train, loaders.val, ckpt_path=ckpt_path)
        return recorder

    first = fit(2, None)
    resumed = fit(3, tmp_path / "last.ckpt")
    assert [r.epoch for r in resumed.records] == [1, 2, 3]
    assert resumed.records[:2] == first.records
    assert [r.phase for r in resumed.records] == [1, 2, 2]
    assert resumed.records[2].lr_backbone > 0


def test_recorder_flags_a_nonfinite_loss() -> None:
    import torch
    from evolver.callbacks import DynamicsRecorder, NonFiniteLossError

    recorder = DynamicsRecorder(fold=3)
    trainer = SimpleNamespace(
        callback_metrics={
            "train_loss": torch.tensor(math.nan),
            "val_loss": torch.tensor(0.5),
            "val_acc": torch.tensor(0.1),
        },
        current_epoch=4,
        optimizers=[],
    )
    with pytest.raises(NonFiniteLossError, match="fold 3, epoch 5"):
        recorder.on_train_epoch_end(trainer, SimpleNamespace(phase=2))
    assert recorder.nonfinite and math.isnan(recorder.records[0].train_loss)
    assert recorder.state_dict()["nonfinite"] is True


def test_hydra_multirun_with_the_basic_sweeper(tmp_path: Path) -> None:
    args = [
        *TINY,
        "data.limit=100",
        "finetune.phase1_epochs=0",
        "finetune.phase2_epochs=1",
        "diagnosis.enabled=false",
        f"runs_dir={tmp_path}",
    ]
    result = subprocess.run(
        [sys.executable, "-m", "evolver.cli", "train", "-m", *args, "optim.weight_decay=0,0.01"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    summaries = sorted(tmp_path.glob("multirun/*/*/summary.json"))
    assert len(summaries) == 2
    decays = {json.loads(p.read_text())["status"] for p in summaries}
    assert decays == {"complete"}


def test_predicted_probabilities_average_the_views_softmax() -> None:
    import torch

    from evolver.training import predict_probabilities

    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 5))
    images = torch.randn(6, 3, 4, 4)
    loader = [(images[:4], None), (images[4:], None)]
    got = predict_probabilities(module, loader, ["identity", "hflip"], torch.device("cpu"))
    with torch.no_grad():
        expected = (module(images).softmax(1) + module(images.flip(3)).softmax(1)) / 2
    assert got.shape == (6, 5) and got.dtype.name == "float64"
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-5)
    np.testing.assert_allclose(got.sum(axis=1), 1.0)
