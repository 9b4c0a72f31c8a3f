"""Lightning's EarlyStopping, restricted to phase 2 of a two-phase fine-tune."""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.callbacks import EarlyStopping
from lightning.pytorch.callbacks.early_stopping import EarlyStoppingReason


class PhaseTwoEarlyStopping(EarlyStopping):
    """Patience counts phase-2 epochs only: the frozen-backbone phase is short by design and
    its validation loss says nothing about when the full fine-tune stops improving."""

    def __init__(self, phase1_epochs: int, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.phase1_epochs = phase1_epochs

    def _should_skip_check(self, trainer: pl.Trainer) -> bool:
        return super()._should_skip_check(trainer) or trainer.current_epoch < self.phase1_epochs

    @property
    def fired(self) -> bool:
        return self.stopping_reason != EarlyStoppingReason.NOT_STOPPED

    @property
    def reason_code(self) -> str | None:
        """`patience_exhausted`, `non_finite_metric`, ... or None when it did not stop training."""
        return self.stopping_reason.name.lower() if self.fired else None
