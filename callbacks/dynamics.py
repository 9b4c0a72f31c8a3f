"""Records a fold's training dynamics, one row per epoch, from Lightning's epoch metrics.

Reads only the epoch-aggregated metrics Lightning already holds (`callback_metrics`), once per
epoch, so the per-step hot path stays free of host syncs. Its rows travel in Lightning
checkpoints (`state_dict`/`load_state_dict`), so a resumed fit keeps its earlier epochs.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from typing_extensions import override


class NonFiniteLossError(RuntimeError):
    """The training or validation loss became NaN or infinite."""


@dataclass
class EpochRecord:
    fold: int
    epoch: int  # from 1, counting through phase 1 then phase 2
    phase: int
    train_loss: float
    val_loss: float
    val_acc: float
    lr_backbone: float  # 0 while the backbone is frozen
    lr_head: float


class DynamicsRecorder(Callback):
    """One `EpochRecord` per training epoch of one fold; raises `NonFiniteLossError` (after
    recording the epoch) when its training or validation loss is NaN or infinite.

    State kept across a resume: `records` and `nonfinite`. Its `state_key` carries the fold, so
    the recorders of different folds never read each other's rows.

    Args:
        fold: the fold the records belong to (from 1).
    """

    def __init__(self, fold: int) -> None:
        self.fold = fold
        self.records: list[EpochRecord] = []
        self.nonfinite = False
        self._epoch_lrs: dict[str, float] = {}

    @property
    @override
    def state_key(self) -> str:
        # The format of Callback._generate_state_key, so the checkpoints' keys stay the same.
        return f"{type(self).__qualname__}{ {'fold': self.fold}!r}"

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_lrs = learning_rates(trainer)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        metrics = trainer.callback_metrics
        record = EpochRecord(
            fold=self.fold,
            epoch=trainer.current_epoch + 1,
            phase=int(getattr(pl_module, "phase", 2)),
            train_loss=_value(metrics.get("train_loss")),
            val_loss=_value(metrics.get("val_loss")),
            val_acc=_value(metrics.get("val_acc")),
            lr_backbone=self._epoch_lrs.get("lr_backbone", 0.0),
            lr_head=self._epoch_lrs.get("lr_head", 0.0),
        )
        self.records = [r for r in self.records if r.epoch != record.epoch] + [record]
        if not (math.isfinite(record.train_loss) and math.isfinite(record.val_loss)):
            self.nonfinite = True
            raise NonFiniteLossError(
                f"fold {self.fold}, epoch {record.epoch}: loss is not finite "
                f"(train {record.train_loss}, val {record.val_loss})"
            )

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"records": [asdict(r) for r in self.records], "nonfinite": self.nonfinite}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.records = [EpochRecord(**row) for row in state_dict.get("records", [])]
        self.nonfinite = bool(state_dict.get("nonfinite", False))


def learning_rates(trainer: pl.Trainer) -> dict[str, float]:
    """Current LR of each named parameter group (`lr_backbone`, `lr_head`) of the first
    optimizer."""
    if not trainer.optimizers:
        return {}
    groups = trainer.optimizers[0].param_groups
    return {str(g.get("name", i)): float(g["lr"]) for i, g in enumerate(groups)}


def _value(metric: Any) -> float:
    if metric is None:
        return math.nan
    return float(metric.item()) if hasattr(metric, "item") else float(metric)
