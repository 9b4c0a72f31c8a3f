"""The full training state of a fold at the end of its fit, kept so a later run can continue it."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from typing_extensions import override


class FitEndState(Callback):
    """Writes one full Lightning checkpoint when the fit ends (after its last epoch, or when
    early stopping ended it): weights, optimizer and LR-scheduler state, the loops' progress and
    every callback's state. A run continuing the fold (`checkpoint.continue_from`) resumes from
    it with Lightning's own `trainer.fit(..., ckpt_path=...)`.

    One write per fold, at its end, instead of optimizer state in every epoch's checkpoint: the
    per-epoch checkpoints stay weights-only. A fit that raised (pruned, failed, interrupted)
    writes nothing.

    Holds no state of its own.

    Args:
        path: the checkpoint file to write.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        trainer.save_checkpoint(self.path, weights_only=False)
