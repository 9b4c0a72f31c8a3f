"""Two-phase fine-tuning on Lightning's BaseFinetuning: head only first, then everything."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import BaseFinetuning
from torch.optim import Optimizer
from typing_extensions import override


class TwoPhaseFinetuning(BaseFinetuning):
    """Freezes the backbone for `phase1_epochs`, then unfreezes it and switches the module to
    phase 2, whose optimizer (backbone and head groups, own LRs, the schedule) replaces phase 1's.

    The module must expose `phase`, `backbone_modules()` and build its optimizer from `phase` in
    `configure_optimizers`. Its checkpoints carry the phase, so a resume rebuilds the right one.

    Holds no state of its own: the optimizer is rebuilt from the phase, not patched group by
    group, so there are no added parameter groups for BaseFinetuning to record in checkpoints
    or restore at fit start. `state_dict` is empty, `load_state_dict` ignores what an older
    checkpoint holds, and `on_fit_start` restores nothing.

    Args:
        phase1_epochs: epochs with the backbone frozen and only the head trained; 0 starts the
            fit in phase 2.
    """

    def __init__(self, phase1_epochs: int) -> None:
        super().__init__()
        self.phase1_epochs = phase1_epochs

    @override
    def state_dict(self) -> dict[str, Any]:
        return {}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        return None

    @override
    def freeze_before_training(self, pl_module: pl.LightningModule) -> None:
        if self.phase1_epochs > 0 and pl_module.phase == 1:
            self.freeze(pl_module.backbone_modules(), train_bn=True)
        else:
            pl_module.phase = 2

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        return None

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.finetune_function(pl_module, trainer.current_epoch, trainer.optimizers[0])

    @override
    def finetune_function(
        self, pl_module: pl.LightningModule, epoch: int, optimizer: Optimizer
    ) -> None:
        if pl_module.phase == 2 or epoch < self.phase1_epochs:
            return
        self.make_trainable(pl_module.backbone_modules())
        pl_module.phase = 2
        trainer: Any = pl_module.trainer
        trainer.strategy.setup_optimizers(trainer)
