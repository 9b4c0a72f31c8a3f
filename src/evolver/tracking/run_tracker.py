"""The MLflow run of one `evolver train` run (a loop trial or a single experiment).

Preflight creates the run and logs its parameters; each fold's Trainer gets a callback that logs
that epoch's values in one `log_batch`; `finish` logs the summary metrics, whatever epoch values
the callback did not log (from history.csv, the record of truth), the tags that tell the run's
state, and the run directory's records as artifacts. Anything failing after preflight is a
warning: the local records are already on disk and the run goes on.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from mlflow.entities import RunStatus

from evolver.database_url import redact
from evolver.errors import ConfigError
from evolver.tracking import records
from evolver.tracking.backend import MlflowStore, flatten_params, metric
from evolver.tracking.store import (
    TrackingSettings,
    check_reachable,
    optuna_storage_url,
)

log = logging.getLogger("evolver.tracking")

# Per-trial bookkeeping that differs for every trial: kept out of the params so MLflow's
# "compare" view highlights only the settings that actually changed.
VOLATILE_PARAMS = (
    "tracking.parent_run_id",
    "tracking.run_name",
    "tracking.tags",
    "loop.trial_number",
)

STATUS_OF_STATE = {
    "complete": RunStatus.to_string(RunStatus.FINISHED),
    "pruned": RunStatus.to_string(RunStatus.KILLED),
    "failed": RunStatus.to_string(RunStatus.FAILED),
}


def resolved_config(cfg: Any) -> dict[str, Any]:
    from omegaconf import DictConfig, OmegaConf

    if not isinstance(cfg, DictConfig):
        return dict(cfg)
    try:
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    except Exception:  # an interpolation only Hydra can resolve: keep the raw text
        return OmegaConf.to_container(cfg, resolve=False)  # type: ignore[return-value]


def config_params(cfg: Any) -> dict[str, str]:
    params = flatten_params({k: v for k, v in resolved_config(cfg).items() if k != "hydra"})
    return {k: v for k, v in params.items() if not any(k.startswith(p) for p in VOLATILE_PARAMS)}


def sampled_params(cfg: Any) -> dict[str, str]:
    """`sampled.<name>` for the values Optuna chose for this job's trial (empty outside a loop).

    The trial's parameters are read back from the study's storage, so they are exactly what the
    sampler (or an enqueued proposal) fixed, under the names of the search space.
    """
    loop = cfg.get("loop") if hasattr(cfg, "get") else None
    trial_number = loop.get("trial_number") if loop is not None else None
    if trial_number is None:
        return {}
    import optuna

    storage = optuna.storages.get_storage(optuna_storage_url(cfg))
    study_id = storage.get_study_id_from_name(str(loop.get("name")))
    trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, int(trial_number))
    trial = storage.get_trial(trial_id)
    return {f"sampled.{name}": str(value) for name, value in trial.params.items()}


class MlflowRunTracker:
    """Implements `evolver.tracking.Tracker` against an MLflow store."""

    def __init__(self, cfg: Any, run_dir: Path) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.settings = TrackingSettings.from_cfg(cfg)
        self.store: MlflowStore | None = None
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self.live_points: set[tuple[int, int, str]] = set()
        self.log_batch_calls = 0

    # -- preflight: the only step allowed to stop the run ------------------------------------
    def preflight(self) -> None:
        check_reachable(self.settings.uri, self.settings.preflight_timeout_s)
        try:
            self.store = MlflowStore(self.settings.uri, self.settings.artifact_root)
            self.experiment_id = self._experiment_id()
            self.run_id = self.store.create_run(
                self.experiment_id,
                self.settings.run_name or self.run_dir.name,
                self._start_tags(),
                parent_run_id=self.settings.parent_run_id,
            )
        except ConfigError:
            raise
        except Exception as error:
            first = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
            where = redact(self.settings.uri)
            raise ConfigError(
                "tracking.uri", f"cannot start an MLflow run at {where}: {first}"
            ) from None
        self._warn_on_error("log parameters", self._log_params)

    def _experiment_id(self) -> str:
        assert self.store is not None
        if self.settings.parent_run_id:
            # A trial lives in its iteration's experiment, whatever experiment name it was given.
            parent = self.store.client.get_run(self.settings.parent_run_id)
            return parent.info.experiment_id
        return self.store.experiment_id(self.settings.experiment)

    def _start_tags(self) -> dict[str, str]:
        tags = {
            "run_type": "trial" if self.settings.parent_run_id else "train",
            "run_dir": str(self.run_dir.resolve()),
            "state": "running",
        }
        model = self.cfg.get("model") if hasattr(self.cfg, "get") else None
        if model is not None and model.get("name") is not None:
            tags["model"] = str(model.get("name"))
        tags.update(self.settings.tags)
        return tags

    def _log_params(self) -> None:
        assert self.store is not None and self.run_id is not None
        params = config_params(self.cfg)
        try:
            params.update(sampled_params(self.cfg))
        except Exception as error:
            log.warning("MLflow: could not read the trial's sampled values: %s", error)
        self.log_batch_calls += self.store.log(self.run_id, params=params)

    # -- during training ----------------------------------------------------------------------
    def callbacks(self, fold: int) -> list[Any]:
        if self.run_id is None:
            return []
        from evolver.tracking.callbacks import EpochMetricsLogger

        return [EpochMetricsLogger(self, fold)]

    def log_epoch(self, fold: int, epoch: int, values: dict[str, float]) -> None:
        """One `log_batch` with one epoch's values of one fold (called by the callback)."""
        if self.store is None or self.run_id is None or not values:
            return

        def send() -> None:
            assert self.store is not None and self.run_id is not None
            points = [metric(records.fold_metric_key(fold, k), v, epoch) for k, v in values.items()]
            self.log_batch_calls += self.store.log(self.run_id, metrics=points)
            self.live_points.update((fold, epoch, name) for name in values)

        self._warn_on_error(f"log fold {fold} epoch {epoch}", send)

    # -- the end ------------------------------------------------------------------------------
    def finish(self, run_dir: Path, status: str, error: str | None = None) -> None:
        if self.store is None or self.run_id is None:
            return
        run_dir = Path(run_dir)
        store, run_id = self.store, self.run_id
        mlflow_status = STATUS_OF_STATE.get(status, RunStatus.to_string(RunStatus.FAILED))
        self._warn_on_error("log results", lambda: self._log_results(run_dir, status, error))
        self._warn_on_error("upload the run's records", lambda: self._log_artifacts(run_dir))
        self._warn_on_error("close the run", lambda: store.terminate(run_id, mlflow_status))

    def _log_results(self, run_dir: Path, status: str, error: str | None) -> None:
        assert self.store is not None and self.run_id is not None
        summary = records.read_summary(run_dir) or {}
        points = [metric(k, v) for k, v in records.summary_metrics(summary).items()]
        history = records.read_history(run_dir)
        curves = records.history_points(history, self.live_points)
        points += [metric(key, value, step) for key, value, step in curves]
        tags = {"state": status, **records.stop_reasons(summary)}
        if error:
            tags["state_reason"] = error
        self.log_batch_calls += self.store.log(self.run_id, metrics=points, tags=tags)

    def _log_artifacts(self, run_dir: Path) -> None:
        assert self.store is not None and self.run_id is not None
        for folder, files in records.artifact_files(run_dir).items():
            self.store.log_files(self.run_id, files, folder or None)
        if self.settings.log_checkpoints:
            self.store.log_files(self.run_id, records.best_checkpoints(run_dir), "checkpoints")

    def _warn_on_error(self, what: str, action: Any) -> None:
        try:
            action()
        except Exception as error:  # tracking must never cost the run its local records
            log.warning("MLflow: could not %s (%s: %s)", what, type(error).__name__, error)
