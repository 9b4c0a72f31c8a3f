"""Lightning side of tracking: epoch values sent while a fold trains, so the MLflow UI shows
curves live, in one `log_batch` at most every `interval_s` seconds."""

from __future__ import annotations

import math
import time
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
    """Sends a fold's epoch-level values to the run's tracker: the first epoch's at once, later
    ones together once `interval_s` has passed since the last send, and whatever waits when
    training ends or raises.

    Runs once per epoch, never per step. With epochs shorter than `interval_s` (small models,
    fast GPUs) one call covers several epochs: an MLflow call per epoch costs about 1% of a
    one-second epoch (benchmarks/overhead.py). Values the module does not expose here (learning
    rates) and values that never left (a process killed mid-fold) are filled in from
    history.csv when the run finishes. Holds no resumable state: what was sent lives in the
    MLflow run (or its buffer).

    Args:
        tracker: the run's tracker; receives `log_epochs(fold, {epoch: values})`.
        fold: the fold being trained (from 1).
        interval_s: the least seconds between two sends; 0 sends every epoch.
    """

    def __init__(self, tracker: MlflowRunTracker, fold: int, interval_s: float = 0.0) -> None:
        self.tracker = tracker
        self.fold = fold
        self.interval_s = interval_s
        self.pending: dict[int, dict[str, float]] = {}
        self._last_sent: float | None = None

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
        self.pending[trainer.current_epoch + 1] = values
        now = time.monotonic()
        if self._last_sent is None or now - self._last_sent >= self.interval_s:
            self.send()

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.send()

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self.send()

    def send(self) -> None:
        """Everything that waits, in one call."""
        if self.pending:
            pending, self.pending = self.pending, {}
            self.tracker.log_epochs(self.fold, pending)
        self._last_sent = time.monotonic()
