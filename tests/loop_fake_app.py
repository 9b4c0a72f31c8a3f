"""A Hydra app whose task writes synthetic K-fold records, for testing the loop without training.

Validation curves depend on the learning rates the way fine-tuning curves do: a backbone LR far
above 1e-4 reaches its best early in phase 2 and then degrades; far below, it converges slowly.
Records follow the run-directory contract (history.csv, summary.json, config.yaml) and the real
diagnosis writes report.json, so the loop reads what it reads after real training.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import hydra
import optuna
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from evolver import interrupts
from evolver.app import runs_in_worker_process
from evolver.diagnosis import write_report
from evolver.errors import ConfigError
from evolver.fold_steps import FOLD_STEP_STRIDE
from evolver.loop.job import load_trial, may_prune

FOLDS = 2


def val_curve(cfg: DictConfig, fold: int) -> list[tuple[int, int, float, float]]:
    """(epoch, phase, train_loss, val_loss) rows of one fold, early stopping applied."""
    lr_b = float(cfg.finetune.lr_backbone)
    lr_h = float(cfg.finetune.lr_head)
    distance = math.log10(lr_b / 1.5e-4)
    floor = 0.08 + 0.03 * distance**2 + 0.01 * math.log10(lr_h / 2e-3) ** 2 + 0.003 * fold
    speed = 1.0 / (1.0 + max(0.0, -distance) * 1.5)
    rows = [(1, 1, 0.9, 0.6 + 0.01 * fold)]
    best, since_best = 0.6, 0
    for k in range(1, int(cfg.finetune.phase2_epochs) + 1):
        val = floor + 0.4 * math.exp(-speed * k)
        if distance > 0.5 and k > 1:  # too high a LR: degrades after an early best
            val = floor + 0.4 * math.exp(-speed) + 0.02 * distance * (k - 1)
        rows.append((1 + k, 2, max(0.02, floor - 0.01 * k), round(val, 6)))
        if val < best - float(cfg.early_stop.min_delta):
            best, since_best = val, 0
        else:
            since_best += 1
        if cfg.early_stop.enabled and since_best >= int(cfg.early_stop.patience):
            break
    return rows


EpochHook = Callable[[int, int, float, float], None]


def task(cfg: DictConfig, on_epoch: EpochHook | None = None) -> float:
    """One run's records; `on_epoch(fold, epoch, train_loss, val_loss)` after each epoch."""
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    number = cfg.loop.trial_number
    if int(cfg.data.batch_size) < 1:  # a config error, as training reports it before any epoch
        raise ConfigError("data.batch_size", f"must be >= 1, got {cfg.data.batch_size}")
    trial = load_trial(cfg) if number is not None else None
    with (run_dir / "starts.log").open("a") as starts:  # one line per run of this folder
        starts.write(f"{os.getpid()}\n")
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    history = ["fold,epoch,phase,train_loss,val_loss,val_acc,lr_backbone,lr_head"]
    folds, status, error = [], "complete", None
    try:
        if number in cfg.fake.raise_on:
            raise RuntimeError(f"synthetic failure in trial {number}")
        for fold in range(1, FOLDS + 1):
            rows = val_curve(cfg, fold)
            for epoch, phase, train, val in rows:
                time.sleep(float(cfg.fake.epoch_seconds))
                lr_b = 0.0 if phase == 1 else cfg.finetune.lr_backbone
                history.append(
                    f"{fold},{epoch},{phase},{train},{val},0.9,{lr_b},{cfg.finetune.lr_head}"
                )
                if on_epoch is not None:
                    on_epoch(fold, epoch, train, val)
                if trial is not None:
                    trial.report(val, (fold - 1) * FOLD_STEP_STRIDE + epoch)
                    if may_prune(cfg, trial) and trial.should_prune():
                        raise optuna.TrialPruned(f"pruned at fold {fold}, epoch {epoch}")
            vals = [row[3] for row in rows]
            best = min(vals)
            folds.append(
                {
                    "fold": fold,
                    "best_val_loss": best,
                    "best_epoch": vals.index(best) + 1,
                    "final_val_loss": vals[-1],
                    "degradation": vals[-1] - best,
                    "epochs_trained": len(rows),
                    "phase1_epochs": 1,
                    "phase2_epochs": len(rows) - 1,
                    "early_stopped": len(rows) - 1 < int(cfg.finetune.phase2_epochs),
                    "stop_reason": None,
                    "nonfinite": False,
                }
            )
    except optuna.TrialPruned as pruned:
        status, error = "pruned", str(pruned)
        raise
    except interrupts.Interrupted as interrupted:
        status, error = "interrupted", str(interrupted)
        raise
    except Exception as failure:
        status, error = "failed", str(failure)
        raise
    finally:
        (run_dir / "history.csv").write_text("\n".join(history) + "\n")
        best_mean = sum(f["best_val_loss"] for f in folds) / len(folds) if folds else None
        summary = {
            "status": status,
            "error": error,
            "folds": folds,
            "cv": {
                "loss_best": best_mean,
                "loss_final": None,
                "oof_log_loss": None,
                "accuracy": None,
            },
            "settings": {
                "max_phase1_epochs": 1,
                "max_phase2_epochs": int(cfg.finetune.phase2_epochs),
                "patience": int(cfg.early_stop.patience) if cfg.early_stop.enabled else None,
                "min_delta": 0.0,
                "monitor": "val_loss",
                "checkpoint": "best",
                "lr_backbone": float(cfg.finetune.lr_backbone),
                "lr_head": float(cfg.finetune.lr_head),
                "batch_size": int(cfg.data.batch_size),
                "schedule": "plateau",
                "warmup_epochs": 0,
                "n_folds": FOLDS,
                "model": "synthetic",
            },
            "objective_name": "cv.loss_best",
            "objective": best_mean if status == "complete" else None,
            "duration_s": 0.1,
        }
        if status == "complete" and cfg.fake.get("overconfident"):
            summary["posthoc"] = write_overconfident_oof(run_dir, best_mean, int(number or 0))
            summary["cv"]["oof_log_loss"] = summary["posthoc"]["candidates"]["best_none"][
                "log_loss"
            ]
            summary["cv"]["oof_log_loss_calibrated"] = summary["posthoc"]["log_loss"]
            summary["objective_name"] = str(cfg.objective)
            summary["objective"] = summary["cv"][str(cfg.objective).removeprefix("cv.")]
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        if folds:
            write_report(run_dir, cfg, plots=False)
    if number in cfg.fake.nan_on:
        return float("nan")
    return float(summary.get("objective") or best_mean)


def write_overconfident_oof(run_dir: Path, best_mean: float, number: int) -> dict:
    """Out-of-fold candidates of an over-confident 3-class model (every checkpoint and view the
    same, so that only a temperature helps) whose accuracy follows the run's best loss; the
    post-hoc summary the real training writes beside them."""
    import numpy as np

    from evolver.diagnosis import posthoc

    rng = np.random.default_rng(number)
    samples, classes = 60 * FOLDS, 3
    target = rng.integers(0, classes, samples)
    logits = rng.normal(0.0, 1.0, (samples, classes))
    logits[np.arange(samples), target] += 1.0 / max(best_mean, 0.05) * 0.3
    log_probs = posthoc.log_probabilities(
        np.exp(logits * 4.0) / np.exp(logits * 4.0).sum(1)[:, None]
    )
    candidates = posthoc.OofCandidates(
        index=np.arange(samples),
        fold=np.repeat(np.arange(1, FOLDS + 1), samples // FOLDS),
        target=target,
        log_probs=np.broadcast_to(
            log_probs, (len(posthoc.CHECKPOINTS), len(posthoc.VIEWS), samples, classes)
        ).copy(),
    )
    candidates.save(run_dir / "oof_candidates.npz")
    return posthoc.study_candidates(candidates, "best", ("identity",)).summary()


@hydra.main(config_path="loop_conf", config_name="fake", version_base="1.3")
def main(cfg: DictConfig) -> float:
    in_worker = HydraConfig.get().mode == RunMode.MULTIRUN and runs_in_worker_process()
    return interrupts.run_job(lambda: task(cfg), in_worker_process=in_worker)


if __name__ == "__main__":
    # As the `evolver` entry point: Ctrl-C or SIGTERM stops the trial, one line, 130 or 143.
    try:
        with interrupts.handled():
            main()
    except interrupts.Interrupted as stopped:
        print(stopped.line("evolver loop"), file=sys.stderr)
        sys.exit(stopped.exit_code)
