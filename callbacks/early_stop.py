"""Lightning's EarlyStopping, restricted to phase 2 of a two-phase fine-tune."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import EarlyStopping
from lightning.pytorch.callbacks.early_stopping import EarlyStoppingReason
from typing_extensions import override


class PhaseTwoEarlyStopping(EarlyStopping):
    """Patience counts phase-2 epochs only: the frozen-backbone phase is short by design and
    its validation loss says nothing about when the full fine-tune stops improving.

    During phase 1 both check hooks return without calling EarlyStopping's; from phase 2 on they
    defer to it, so its `check_on_train_epoch_end` still picks which of the two runs the check.
    Its state (wait count, best score, stopping reason) is EarlyStopping's `state_dict`.

    Args:
        phase1_epochs: epochs of phase 1; no check runs while `trainer.current_epoch` is below it.
        **kwargs: passed to `EarlyStopping` (`monitor`, `patience`, `min_delta`, `mode`,
            `check_finite`, ...).
    """

    def __init__(self, phase1_epochs: int, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.phase1_epochs = phase1_epochs

    def in_phase_two(self, trainer: pl.Trainer) -> bool:
        return trainer.current_epoch >= self.phase1_epochs

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.in_phase_two(trainer):
            super().on_train_epoch_end(trainer, pl_module)

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.in_phase_two(trainer):
            super().on_validation_end(trainer, pl_module)

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """EarlyStopping's state, keeping this callback's own patience: a run continuing
        another's fold with more patience must not get the old patience back. A fold whose wait
        is now below the patience has not stopped."""
        patience = self.patience
        super().load_state_dict(state_dict)
        self.patience = patience
        if self.wait_count < self.patience:
            self.stopped_epoch = 0
            self.stopping_reason = EarlyStoppingReason.NOT_STOPPED
            self.stopping_reason_message = None

    @property
    def fired(self) -> bool:
        return self.stopping_reason != EarlyStoppingReason.NOT_STOPPED

    @property
    def reason_code(self) -> str | None:
        """`patience_exhausted`, `non_finite_metric`, ... or None when it did not stop training."""
        return self.stopping_reason.name.lower() if self.fired else None
