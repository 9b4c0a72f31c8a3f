"""One plain line per epoch: progress for logs and pipes, where a live bar would be noise."""

from __future__ import annotations

import sys
from typing import TextIO

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback


class EpochLinePrinter(Callback):
    def __init__(self, fold: int, folds: int, stream: TextIO | None = None) -> None:
        self.fold = fold
        self.folds = folds
        self.stream = stream

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        metrics = trainer.callback_metrics
        parts = [
            f"fold {self.fold}/{self.folds}",
            f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs}",
        ]
        parts.append(f"phase {getattr(pl_module, 'phase', 2)}")
        for name in ("train_loss", "val_loss", "val_acc"):
            if name in metrics:
                parts.append(f"{name} {float(metrics[name]):.4f}")
        print("  ".join(parts), file=self.stream or sys.stdout, flush=True)
