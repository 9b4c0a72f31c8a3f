"""Optuna pruning of a loop trial, fold by fold.

Importing this module loads optuna-integration: import it where a trial needs it, not eagerly.
"""

from __future__ import annotations

import lightning.pytorch as pl
import optuna
from optuna_integration import PyTorchLightningPruningCallback
from typing_extensions import override

from evolver.fold_steps import fold_step


class FoldPruningCallback(PyTorchLightningPruningCallback):
    """Optuna's Lightning pruning callback, reporting at a step that encodes the fold too:
    each fold restarts its epochs, and a pruner must compare like with like.

    The validation loss of fold `f`, epoch `e` (from 1) is reported at step
    `evolver.fold_steps.fold_step(f, e)`; a NaN is not reported (the training side reports the
    non-finite loss itself). Under DDP it defers to optuna-integration's own handling.

    Holds no state of its own: the reported values live in the Optuna storage with the trial.

    The inherited `on_fit_start` (optuna-integration 5.0.0) reads Lightning's private
    `trainer._accelerator_connector.is_distributed` to detect DDP; Lightning 2.6.6 exposes no
    public equivalent (the strategy classes it checks vary), so that part is left to the base.

    Args:
        trial: the job's Optuna trial, loaded with the loop's pruner.
        monitor: the logged metric to report (`val_loss` unless `early_stop.monitor` says else).
        fold: the fold being trained (from 1).
        prune: whether a pruner's verdict stops the trial; False only reports the values.
    """

    def __init__(
        self, trial: optuna.trial.Trial, monitor: str, fold: int, prune: bool = True
    ) -> None:
        super().__init__(trial, monitor=monitor)
        self.trial = trial
        self.fold = fold
        self.prune = prune

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or self.is_ddp_backend:
            if not trainer.sanity_checking:
                super().on_validation_end(trainer, pl_module)
            return
        score = trainer.callback_metrics.get(self.monitor)
        if score is None:
            return
        value = float(score.item())
        step = fold_step(self.fold, pl_module.current_epoch + 1)
        if value != value:  # NaN: the training part reports the non-finite loss itself
            return
        self.trial.report(value, step=step)
        if self.prune and self.trial.should_prune():
            message = (
                f"pruned at fold {self.fold}, epoch {pl_module.current_epoch + 1} "
                f"({self.monitor} {value:.4g})"
            )
            # A pruner may say why (evolver.loop.pruners.BaseCurvePruner does).
            explain = getattr(self.trial.study.pruner, "verdict", None)
            if explain is not None:
                message = f"pruned at fold {self.fold}: {explain(step, value)}"
            raise optuna.TrialPruned(message)
