"""Lightning side of tracking: one `log_batch` per epoch so the MLflow UI shows curves live."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

if TYPE_CHECKING:
    from evolver.tracking.run_tracker import MlflowRunTracker

# Names the training module logs per epoch, and the history.csv column each one fills.
EPOCH_METRICS = {
    "train_loss_epoch": "train_loss",
    "train_loss": "train_loss",
    "val_loss": "val_loss",
    "val_acc": "val_acc",
}


class EpochMetricsLogger(Callback):
    """Sends a fold's epoch-level values to the run's tracker at the end of every epoch.

    Runs once per epoch, never per step. Values the module does not expose here (learning rates,
    anything logged later) are filled in from history.csv when the run finishes. Stateless: what
    was sent lives in the MLflow run (or its buffer), so a resumed fit just goes on sending.

    Args:
        tracker: the run's tracker; receives one `log_epoch(fold, epoch, values)` per epoch.
        fold: the fold being trained (from 1).
    """

    def __init__(self, tracker: MlflowRunTracker, fold: int) -> None:
        self.tracker = tracker
        self.fold = fold

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        values: dict[str, float] = {}
        for source, name in EPOCH_METRICS.items():
            if name in values or source not in trainer.callback_metrics:
                continue
            value = float(trainer.callback_metrics[source])
            if math.isfinite(value):
                values[name] = value
        self.tracker.log_epoch(self.fold, trainer.current_epoch + 1, values)
