"""How a K-fold trial's per-epoch values are numbered for Optuna: one step axis for all folds.

Each fold restarts its epochs, and a pruner must compare like with like, so fold `f`'s epoch `e`
(both from 1) is step `(f - 1) * FOLD_STEP_STRIDE + e`. The stride leaves room for any epoch
count a fold can have.
"""

from __future__ import annotations

FOLD_STEP_STRIDE = 1000


def fold_step(fold: int, epoch: int) -> int:
    """The step at which fold `fold` (from 1) reports its epoch `epoch` (from 1)."""
    return (fold - 1) * FOLD_STEP_STRIDE + epoch


def epoch_of(step: int) -> int:
    """The epoch within its fold of a step."""
    return step % FOLD_STEP_STRIDE
