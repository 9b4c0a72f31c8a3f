"""The job side of a loop trial: what a training run does when a sweeper launched it."""

from __future__ import annotations

from typing import Any


def trial_callbacks(cfg: Any, fold: int) -> list[Any]:
    """Lightning callbacks that report to this job's Optuna trial (empty outside a loop)."""
    return []
