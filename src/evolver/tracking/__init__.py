"""Experiment tracking (MLflow). `make_tracker` is what a training run talks to.

Importing this package is cheap (no MLflow, no torch); MLflow loads when a tracker is made.
"""

from __future__ import annotations

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


def make_tracker(cfg: Any, run_dir: Path) -> Tracker:
    from evolver.tracking.store import TrackingSettings

    if not TrackingSettings.from_cfg(cfg).enabled:
        return NullTracker()
    from evolver.tracking.run_tracker import MlflowRunTracker

    return MlflowRunTracker(cfg, Path(run_dir))
