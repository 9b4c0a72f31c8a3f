"""`tests/loop_fake_app.py` with evolver's real MLflow tracker, as `evolver train` drives it.

Each epoch's values go through `MlflowRunTracker.log_epoch` (what the Lightning callback calls),
the run starts with `preflight` and ends with `finish`. The seconds each `log_epoch` call took
(the time tracking adds to an epoch) go to `tracking_seconds.json` in the run directory.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import hydra
import optuna
from hydra.core.hydra_config import HydraConfig
from loop_fake_app import task as fake_task
from omegaconf import DictConfig

from evolver.loop.job import trial_params
from evolver.tracking import make_tracker

SECONDS_FILE = "tracking_seconds.json"


def task(cfg: DictConfig) -> float:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    tracker = make_tracker(cfg, run_dir, sampled=lambda: trial_params(cfg))
    tracker.preflight()
    seconds: list[float] = []

    def log_epoch(fold: int, epoch: int, train_loss: float, val_loss: float) -> None:
        start = time.perf_counter()
        tracker.log_epoch(fold, epoch, {"train_loss": train_loss, "val_loss": val_loss})
        seconds.append(time.perf_counter() - start)

    status, error = "complete", None
    try:
        return fake_task(cfg, on_epoch=log_epoch)
    except optuna.TrialPruned as pruned:
        status, error = "pruned", str(pruned)
        raise
    except Exception as failure:
        status, error = "failed", str(failure)
        raise
    finally:
        (run_dir / SECONDS_FILE).write_text(json.dumps(seconds))
        tracker.finish(run_dir, status, error)


@hydra.main(config_path="loop_conf", config_name="fake", version_base="1.3")
def main(cfg: DictConfig) -> float:
    return task(cfg)


if __name__ == "__main__":
    main()
