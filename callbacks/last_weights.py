"""The weights of a fold's last trained epoch, written once when its training ends."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from typing_extensions import override


class LastEpochWeights(Callback):
    """Writes one weights-only checkpoint when training ends (after its last epoch, or when
    early stopping ended it): the fold's `last` weights, which `checkpoint.select=last|average`
    and `evolver predict` read.

    Lightning's `ModelCheckpoint` without a monitor would write the same file after every epoch
    (resnet18: a 45 MB write per epoch, about 1% of a CPU epoch and more of a GPU one) although
    only the final one is ever read. A fit that raised (pruned, failed, interrupted) writes
    nothing. Checked against Lightning 2.6: `on_train_end` runs after the last epoch's
    checkpoint and early-stopping hooks.

    Holds no state of its own (`written` is this fit's outcome, not resumable state).

    Args:
        path: the checkpoint file to write.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.written = False

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        trainer.save_checkpoint(self.path, weights_only=True)
        self.written = True
