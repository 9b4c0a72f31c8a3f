"""Experiment tracking (MLflow). `make_tracker` is what a training run talks to,
`make_loop_tracking` what a loop worker talks to.

Importing this package is cheap (no MLflow, no torch); MLflow loads when a tracker is made.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any, Protocol


class Tracker(Protocol):
    """What one `evolver train` run needs from tracking."""

    def preflight(self) -> None:
        """Fail fast (EvolverError, one line) when the tracking store cannot be reached."""

    def callbacks(self, fold: int) -> list[Any]:
        """Lightning callbacks for one fold's Trainer."""

    def finish(self, run_dir: Path, status: str, error: str | None = None) -> None:
        """Log the run's records (summary, history, report, artifacts) and close the run."""


class NullTracker:
    """Tracking switched off (`tracking.enabled=false`)."""

    def preflight(self) -> None:
        return None

    def callbacks(self, fold: int) -> list[Any]:
        return []

    def finish(self, run_dir: Path, status: str, error: str | None = None) -> None:
        return None


def make_tracker(
    cfg: Any, run_dir: Path, sampled: Callable[[], Mapping[str, Any]] | None = None
) -> Tracker:
    """The run's tracker; `sampled` reads the values a loop chose for this run's trial."""
    from evolver.tracking.store import TrackingSettings

    if not TrackingSettings.from_cfg(cfg).enabled:
        return NullTracker()
    from evolver.tracking.run_tracker import MlflowRunTracker

    return MlflowRunTracker(cfg, Path(run_dir), sampled)


class LoopTracker(Protocol):
    """What a loop worker needs from tracking: a run per iteration, its trials nested under it."""

    def preflight(self) -> None:
        """Fail fast (EvolverError, one line) when the tracking store cannot be reached."""

    def start_iteration(self, iteration: int) -> str | None:
        """The id of the iteration's parent run (created, or reopened on resume)."""

    def trial_overrides(
        self,
        parent_run_id: str | None,
        iteration: int,
        trial_number: int,
        proposed_by: str,
        extra_tags: Mapping[str, Any] | None = None,
    ) -> list[str]:
        """Hydra overrides that nest a trial's run under its iteration's run."""

    def end_iteration(
        self,
        parent_run_id: str | None,
        iteration: int,
        metrics: Mapping[str, float],
        artifacts_dir: Path,
        study: Any = None,
    ) -> None:
        """Log the iteration's numbers, report folder and (given the Optuna `study`) its plots,
        and close its run."""

    def log_scored_trial(self, parent_run_id: str | None, iteration: int, trial: Any) -> None:
        """A run for a trial scored without training (a post-hoc choice of another trial)."""

    def close_stale_runs(
        self, dead_trials: Collection[int], settled_iterations: Collection[int]
    ) -> int:
        """Close the runs of `dead_trials` and `settled_iterations` that a killed worker left
        running; returns how many."""


class NullLoopTracking:
    """Tracking switched off: the loop's tracking calls do nothing (and import nothing)."""

    def preflight(self) -> None:
        return None

    def start_iteration(self, iteration: int) -> str | None:
        return None

    def trial_overrides(
        self,
        parent_run_id: str | None,
        iteration: int,
        trial_number: int,
        proposed_by: str,
        extra_tags: Mapping[str, Any] | None = None,
    ) -> list[str]:
        return []

    def end_iteration(
        self,
        parent_run_id: str | None,
        iteration: int,
        metrics: Mapping[str, float],
        artifacts_dir: Path,
        study: Any = None,
    ) -> None:
        return None

    def log_scored_trial(self, parent_run_id: str | None, iteration: int, trial: Any) -> None:
        return None

    def close_stale_runs(
        self, dead_trials: Collection[int], settled_iterations: Collection[int]
    ) -> int:
        return 0


def make_loop_tracking(cfg: Any) -> LoopTracker:
    tracking = cfg.get("tracking") if hasattr(cfg, "get") else None
    if not tracking or not tracking.get("enabled", False):
        return NullLoopTracking()
    from evolver.tracking.loop_runs import LoopTracking

    return LoopTracking(cfg)
