"""Optuna pruning of a loop trial, fold by fold."""

from __future__ import annotations

import lightning.pytorch as pl
import optuna
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from evolver.fold_steps import fold_step


class FoldPruningCallback(Callback):
    """Reports each validation score to the trial and stops the fit when the pruner says so,
    at a step that encodes the fold too: each fold restarts its epochs, and a pruner must
    compare like with like.

    The validation loss of fold `f`, epoch `e` (from 1) is reported at step
    `evolver.fold_steps.fold_step(f, e)`; a NaN is not reported (the training side reports the
    non-finite loss itself). The pruner's verdict raises `optuna.TrialPruned` with the reason
    (a pruner with a `verdict(step, value)` method, like `evolver.loop.pruners.BaseCurvePruner`,
    says why).

    With several processes (DDP) only global rank 0 reports and asks the pruner; its verdict is
    broadcast (`trainer.strategy.broadcast`) so every rank stops at the same epoch. Only public
    Lightning API is used (checked with Lightning 2.6).

    Holds no state of its own: the reported values live in the Optuna storage with the trial.

    Args:
        trial: the job's Optuna trial, loaded with the loop's pruner.
        monitor: the logged metric to report (`val_loss` unless `early_stop.monitor` says else).
        fold: the fold being trained (from 1).
        prune: whether a pruner's verdict stops the trial; False only reports the values.
    """

    def __init__(
        self, trial: optuna.trial.Trial, monitor: str, fold: int, prune: bool = True
    ) -> None:
        self.trial = trial
        self.monitor = monitor
        self.fold = fold
        self.prune = prune

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        score = trainer.callback_metrics.get(self.monitor)
        if score is None:
            return
        verdict = None
        if trainer.is_global_zero:
            verdict = self._verdict(float(score.item()), pl_module.current_epoch + 1)
        if trainer.world_size > 1:
            verdict = trainer.strategy.broadcast(verdict, src=0)
        if verdict is not None:
            raise optuna.TrialPruned(verdict)

    def _verdict(self, value: float, epoch: int) -> str | None:
        """Report `value` and say why the trial stops, or None to go on."""
        if value != value:  # NaN: the training side reports the non-finite loss itself
            return None
        step = fold_step(self.fold, epoch)
        self.trial.report(value, step=step)
        if not (self.prune and self.trial.should_prune()):
            return None
        # A pruner may say why (evolver.loop.pruners.BaseCurvePruner does).
        explain = getattr(self.trial.study.pruner, "verdict", None)
        if explain is not None:
            return f"pruned at fold {self.fold}: {explain(step, value)}"
        return f"pruned at fold {self.fold}, epoch {epoch} ({self.monitor} {value:.4g})"
