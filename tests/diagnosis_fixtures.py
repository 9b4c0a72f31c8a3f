"""History and summary builders shared by the diagnosis and report tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from evolver.diagnosis import RunRecords

# Validation losses of the seed's training logs (folds 1, 2, 4 in full; phase 1 = epochs 1-3,
# phase-2 epochs continue the count).
SEED_PROGRESSIONS = {
    1: [0.0943, 0.0976, 0.0927, 0.0650, 0.0800, 0.0692, 0.0742],
    2: [0.1011, 0.0957, 0.0971, 0.0826, 0.0724, 0.0681, 0.0718, 0.0718, 0.0692, 0.0683, 0.0679],
    4: [0.0987, 0.0954, 0.0942, 0.0785, 0.0621, 0.0698, 0.0705, 0.0735],
}
SEED_PHASE1_EPOCHS = 3

# The seed's fold table, as its notebook printed it (fold 2's best above its final included).
SEED_FOLD_TABLE = {
    "fold": [1, 2, 3, 4, 5],
    "final_val_loss": [0.0742, 0.0679, 0.0705, 0.0735, 0.0728],
    "best_val_loss": [0.0650, 0.0681, 0.0673, 0.0621, 0.0700],
    "epochs_trained": [4, 8, 4, 5, 7],
    "phase1_epochs": [3, 3, 3, 3, 3],
    "phase2_epochs": [1, 5, 1, 2, 4],
}

SEED_SETTINGS = {
    "max_phase1_epochs": 3,
    "max_phase2_epochs": 8,
    "patience": 3,
    "min_delta": 0.0,
    "monitor": "val_loss",
    "checkpoint": "last",
    "lr_backbone": 1e-4,
    "lr_head": 1e-3,
    "batch_size": 32,
    "schedule": "plateau",
    "warmup_epochs": 0,
    "n_folds": 5,
    "model": "resnet50",
}

# A curve that falls, flattens and wobbles a little: what a well-tuned fine-tune looks like.
HEALTHY_PHASE1 = [1.0, 0.9, 0.85]
HEALTHY_PHASE2 = [0.7, 0.6, 0.52, 0.47, 0.44, 0.425, 0.418, 0.4150, 0.4155, 0.4160, 0.4158, 0.4162]


def history_frame(
    curves: dict[int, list[float]],
    phase1_epochs: int = 3,
    train: dict[int, list[float]] | None = None,
    lr_backbone: float = 1e-4,
    lr_head: float = 1e-3,
) -> pd.DataFrame:
    """A history.csv frame from val-loss curves; train loss defaults to a steady decline."""
    rows = []
    for fold, values in curves.items():
        train_curve = (train or {}).get(fold) or [1.2 * 0.9**index for index in range(len(values))]
        for index, value in enumerate(values):
            phase = 1 if index < phase1_epochs else 2
            rows.append(
                {
                    "fold": fold,
                    "epoch": index + 1,
                    "phase": phase,
                    "train_loss": train_curve[index],
                    "val_loss": value,
                    "val_acc": 0.9,
                    "lr_backbone": 0.0 if phase == 1 else lr_backbone,
                    "lr_head": lr_head,
                }
            )
    return pd.DataFrame(rows)


def healthy_curves(n_folds: int = 3) -> dict[int, list[float]]:
    scales = [1.0, 1.02, 0.98, 1.01, 0.99]
    curve = HEALTHY_PHASE1 + HEALTHY_PHASE2
    return {fold: [v * scales[fold - 1] for v in curve] for fold in range(1, n_folds + 1)}


def summary_for(
    curves: dict[int, list[float]],
    early_stopped: dict[int, bool] | None = None,
    **settings: Any,
) -> dict[str, Any]:
    """A summary.json-like mapping with settings matching a healthy 3+12 epoch run."""
    base = {
        "max_phase1_epochs": 3,
        "max_phase2_epochs": 12,
        "patience": 5,
        "min_delta": 0.0,
        "monitor": "val_loss",
        "checkpoint": "best",
        "lr_backbone": 1e-4,
        "lr_head": 1e-3,
        "batch_size": 32,
        "schedule": "plateau",
        "warmup_epochs": 0,
        "n_folds": len(curves),
        "model": "test_resnet",
    }
    base.update(settings)
    early_stopped = early_stopped or {}
    return {
        "status": "complete",
        "error": None,
        "folds": [
            {"fold": fold, "early_stopped": early_stopped.get(fold, False), "stop_reason": None}
            for fold in curves
        ],
        "settings": base,
        "objective_name": "cv.loss_best",
        "objective": None,
    }


def records_for(
    curves: dict[int, list[float]],
    early_stopped: dict[int, bool] | None = None,
    phase1_epochs: int = 3,
    train: dict[int, list[float]] | None = None,
    **settings: Any,
) -> RunRecords:
    history = history_frame(curves, phase1_epochs=phase1_epochs, train=train)
    return RunRecords.from_parts(history, summary_for(curves, early_stopped, **settings))


def seed_history() -> pd.DataFrame:
    rows = [
        {
            "fold": fold,
            "epoch": index + 1,
            "phase": 1 if index < SEED_PHASE1_EPOCHS else 2,
            "val_loss": value,
        }
        for fold, values in SEED_PROGRESSIONS.items()
        for index, value in enumerate(values)
    ]
    return pd.DataFrame(rows)


def seed_table_summary() -> dict[str, Any]:
    table = SEED_FOLD_TABLE
    folds = [
        {
            "fold": fold,
            "best_val_loss": table["best_val_loss"][i],
            "final_val_loss": table["final_val_loss"][i],
            "epochs_trained": table["epochs_trained"][i],
            "phase1_epochs": table["phase1_epochs"][i],
            "phase2_epochs": table["phase2_epochs"][i],
            "early_stopped": table["epochs_trained"][i] < 8,
            "stop_reason": "patience" if table["epochs_trained"][i] < 8 else "max_epochs",
        }
        for i, fold in enumerate(table["fold"])
    ]
    return {
        "status": "complete",
        "error": None,
        "folds": folds,
        "settings": SEED_SETTINGS,
        "objective_name": "cv.loss_final",
        "objective": 0.0718,
    }


def write_run(
    run_dir: Path,
    history: pd.DataFrame | None = None,
    summary: dict[str, Any] | None = None,
    config: dict[str, Any] | None = None,
) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    if history is not None:
        history.to_csv(run_dir / "history.csv", index=False)
    if summary is not None:
        import json

        (run_dir / "summary.json").write_text(json.dumps(summary))
    if config is not None:
        (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    return run_dir
