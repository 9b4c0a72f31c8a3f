"""One plain line per epoch: progress for logs and pipes, where a live bar would be noise."""

from __future__ import annotations

import sys
from typing import TextIO

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from typing_extensions import override


class EpochLinePrinter(Callback):
    """Prints fold, epoch, phase and the epoch's losses and accuracy at the end of every
    training epoch. Stateless: a resumed fit just goes on printing.

    Args:
        fold: the fold being trained (from 1).
        folds: how many folds the run has.
        stream: where the lines go; None is `sys.stdout` at the time of printing.
    """

    def __init__(self, fold: int, folds: int, stream: TextIO | None = None) -> None:
        self.fold = fold
        self.folds = folds
        self.stream = stream

    @override
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
