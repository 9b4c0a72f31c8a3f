"""The job of the workers benchmark: a trial whose training is a fixed sleep, on evolver's path.

Run by `benchmarks/workers.py` as `python benchmarks/workers_app.py -m hydra/sweeper=evolver ...`,
so each worker is a real evolver loop worker (the evolver sweeper plugin, `LoopRunner`,
heartbeats, the diagnosis after each trial, MLflow tracking). Only the training is replaced: the
job sleeps `bench.train_seconds` in all, spread over the epochs of a synthetic K-fold curve, and
does per epoch what a training run does (report the validation loss to its Optuna trial, log the
epoch to MLflow). It writes the run-directory records the loop reads (config.yaml, history.csv,
summary.json), then the diagnosis (report.json, report.md, plots) and closes its MLflow run, as
`evolver.app.train_task` does.

With `EVOLVER_BENCH_TIMINGS=<folder>` set, the worker times its phases (`workers_timing.py`).
"""

from __future__ import annotations

import time

STARTED_AT = time.time()

import json  # noqa: E402  (the start time above is taken before any import)
import math  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import hydra  # noqa: E402
import optuna  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402
from workers_timing import DIAGNOSIS, TRAINING, start_worker_timings  # noqa: E402

from evolver.diagnosis import write_report  # noqa: E402
from evolver.fold_steps import FOLD_STEP_STRIDE  # noqa: E402
from evolver.loop.job import load_trial, may_prune  # noqa: E402
from evolver.tracking import make_tracker  # noqa: E402

TIMINGS = start_worker_timings(STARTED_AT)

Row = tuple[int, int, float, float]  # epoch, phase, train loss, validation loss


def fold_curve(cfg: DictConfig, fold: int) -> list[Row]:
    """A fine-tuning-like curve: best near a backbone LR of 1.5e-4, early stopping applied."""
    distance = math.log10(float(cfg.finetune.lr_backbone) / 1.5e-4)
    head = math.log10(float(cfg.finetune.lr_head) / 2e-3)
    floor = 0.08 + 0.03 * distance**2 + 0.01 * head**2 + 0.003 * fold
    speed = 1.0 / (1.0 + max(0.0, -distance) * 1.5)
    rows: list[Row] = [(1, 1, 0.9, 0.6 + 0.01 * fold)]
    best, since_best = rows[0][3], 0
    for k in range(1, int(cfg.finetune.phase2_epochs) + 1):
        val = floor + 0.4 * math.exp(-speed * k)
        if distance > 0.5 and k > 1:  # a backbone LR far too high degrades after an early best
            val = floor + 0.4 * math.exp(-speed) + 0.02 * distance * (k - 1)
        rows.append((1 + k, 2, round(max(0.02, floor - 0.01 * k), 6), round(val, 6)))
        if val < best - float(cfg.early_stop.min_delta):
            best, since_best = val, 0
        else:
            since_best += 1
        if cfg.early_stop.enabled and since_best >= int(cfg.early_stop.patience):
            break
    return rows


def fold_record(rows: list[Row], fold: int, max_phase2: int) -> dict[str, Any]:
    vals = [row[3] for row in rows]
    best = min(vals)
    return {
        "fold": fold,
        "best_val_loss": best,
        "best_epoch": vals.index(best) + 1,
        "final_val_loss": vals[-1],
        "degradation": vals[-1] - best,
        "epochs_trained": len(rows),
        "phase1_epochs": 1,
        "phase2_epochs": len(rows) - 1,
        "early_stopped": len(rows) - 1 < max_phase2,
        "stop_reason": None,
        "nonfinite": False,
    }


def summary_record(
    cfg: DictConfig, folds: list[dict[str, Any]], status: str, error: str | None, seconds: float
) -> dict[str, Any]:
    best_mean = sum(f["best_val_loss"] for f in folds) / len(folds) if folds else None
    return {
        "status": status,
        "error": error,
        "folds": folds,
        "cv": {"loss_best": best_mean, "loss_final": None, "oof_log_loss": None, "accuracy": None},
        "settings": {
            "max_phase1_epochs": 1,
            "max_phase2_epochs": int(cfg.finetune.phase2_epochs),
            "patience": int(cfg.early_stop.patience) if cfg.early_stop.enabled else None,
            "min_delta": float(cfg.early_stop.min_delta),
            "monitor": "val_loss",
            "checkpoint": "best",
            "lr_backbone": float(cfg.finetune.lr_backbone),
            "lr_head": float(cfg.finetune.lr_head),
            "batch_size": int(cfg.data.batch_size),
            "schedule": "plateau",
            "warmup_epochs": 0,
            "n_folds": int(cfg.bench.folds),
            "model": "simulated",
        },
        "objective_name": "cv.loss_best",
        "objective": best_mean if status == "complete" else None,
        "duration_s": seconds,
    }


def simulated_training(cfg: DictConfig, run_dir: Path, tracker: Any) -> list[dict[str, Any]]:
    """Sleep `bench.train_seconds` over the folds' epochs, reporting each epoch as training
    would; writes history.csv as it goes and returns the folds' records."""
    curves = {fold: fold_curve(cfg, fold) for fold in range(1, int(cfg.bench.folds) + 1)}
    epoch_seconds = float(cfg.bench.train_seconds) / sum(len(rows) for rows in curves.values())
    history = ["fold,epoch,phase,train_loss,val_loss,val_acc,lr_backbone,lr_head"]
    folds = []
    try:
        for fold, rows in curves.items():
            trial = load_trial(cfg) if cfg.loop.trial_number is not None else None
            prune = trial is not None and may_prune(cfg, trial)
            for epoch, phase, train_loss, val_loss in rows:
                sleep(epoch_seconds)
                lr_backbone = 0.0 if phase == 1 else cfg.finetune.lr_backbone
                history.append(
                    f"{fold},{epoch},{phase},{train_loss},{val_loss},0.9,{lr_backbone},"
                    f"{cfg.finetune.lr_head}"
                )
                values = {"train_loss": train_loss, "val_loss": val_loss, "val_acc": 0.9}
                tracker.log_epoch(fold, epoch, values)
                if trial is not None:
                    trial.report(val_loss, (fold - 1) * FOLD_STEP_STRIDE + epoch)
                    if prune and trial.should_prune():
                        raise optuna.TrialPruned(f"pruned at fold {fold}, epoch {epoch}")
            folds.append(fold_record(rows, fold, int(cfg.finetune.phase2_epochs)))
    finally:
        (run_dir / "history.csv").write_text("\n".join(history) + "\n")
    return folds


def sleep(seconds: float) -> None:
    if TIMINGS is None:
        time.sleep(seconds)
        return
    with TIMINGS.clock.phase(TRAINING):
        time.sleep(seconds)


def diagnose(run_dir: Path, cfg: DictConfig) -> None:
    if TIMINGS is None:
        write_report(run_dir, cfg)
        return
    with TIMINGS.clock.phase(DIAGNOSIS):
        write_report(run_dir, cfg)


def task(cfg: DictConfig) -> float:
    started = time.time()
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    tracker = make_tracker(cfg, run_dir)
    tracker.preflight()
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    folds: list[dict[str, Any]] = []
    status, error = "complete", None
    try:
        folds = simulated_training(cfg, run_dir, tracker)
    except BaseException as failure:
        status = "pruned" if isinstance(failure, optuna.TrialPruned) else "failed"
        error = str(failure) or type(failure).__name__
        raise
    finally:
        summary = summary_record(cfg, folds, status, error, time.time() - started)
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        if folds:
            diagnose(run_dir, cfg)
        tracker.finish(run_dir, status, error)
        if TIMINGS is not None:
            TIMINGS.job(cfg.loop.trial_number, started, time.time(), status)
    return float(summary["objective"])


@hydra.main(config_path="workers_conf", config_name="workers", version_base="1.3")
def main(cfg: DictConfig) -> float:
    return task(cfg)


if __name__ == "__main__":
    main()
