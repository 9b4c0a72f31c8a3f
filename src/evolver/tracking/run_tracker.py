"""The MLflow run of one `evolver train` run (a loop trial or a single experiment).

Preflight creates the run and logs its parameters; each fold's Trainer gets a callback that logs
that epoch's values in one `log_batch`; `finish` logs the summary metrics, whatever epoch values
the callback did not log (from history.csv, the record of truth), the tags that tell the run's
state, and the run directory's records as artifacts. Anything failing after preflight is a
warning: the local records are already on disk and the run goes on. While the store cannot be
reached the calls wait in the run directory's buffer (evolver.tracking.resilient) and training
goes on; `tracking.on_error=fail` makes a failed call fail the run instead.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from mlflow.entities import RunStatus

from evolver.database_url import redact
from evolver.errors import ConfigError
from evolver.secrets import redact_text
from evolver.tracking import records
from evolver.tracking.backend import flatten_params, metric
from evolver.tracking.buffer import TrackingBuffer
from evolver.tracking.resilient import ResilientStore, TrackingError, is_placeholder, tag_filter
from evolver.tracking.store import TrackingSettings, check_reachable

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
    "interrupted": RunStatus.to_string(RunStatus.KILLED),
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
    return {
        k: redact_text(v)  # a shared server shows params to everyone: never a password
        for k, v in params.items()
        if not any(k.startswith(p) for p in VOLATILE_PARAMS)
    }


def sampled_params(values: Mapping[str, Any]) -> dict[str, str]:
    """`sampled.<name>` for the values Optuna chose for this job's trial."""
    return {f"sampled.{name}": str(value) for name, value in values.items()}


class MlflowRunTracker:
    """Implements `evolver.tracking.Tracker` against an MLflow store."""

    def __init__(
        self,
        cfg: Any,
        run_dir: Path,
        sampled: Callable[[], Mapping[str, Any]] | None = None,
    ) -> None:
        """`sampled`: reads the values Optuna chose for this run's loop trial (logged as
        `sampled.<name>` params), exactly as the sampler or an enqueued proposal fixed them."""
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.sampled = sampled
        self.settings = TrackingSettings.from_cfg(cfg)
        self.store: ResilientStore | None = None
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self.live_points: set[tuple[int, int, str]] = set()
        self.log_batch_calls = 0

    # -- preflight: the only step allowed to stop the run ------------------------------------
    def preflight(self) -> None:
        # A trial of a running loop (whose own preflight passed) trains while the store is away
        # and is tracked when it is back; a run on its own stops here in one line.
        deferrable = self._in_loop() and self.settings.on_error == "buffer"
        unreachable = None
        try:
            check_reachable(self.settings.uri, self.settings.preflight_timeout_s)
        except ConfigError as error:
            if not deferrable:
                raise
            unreachable = str(error).removeprefix("tracking.uri: ")
        buffer = TrackingBuffer.of(self.run_dir).folder
        self.store = ResilientStore(self.settings, buffer, self.settings.experiment)
        if unreachable is not None:
            self.store.outage.failed(unreachable)
        self.run_id = self._start_deferrable_run() if deferrable else self._start_run()
        if self.run_id is None:
            where = redact(self.settings.uri)
            raise ConfigError("tracking.uri", f"cannot start an MLflow run at {where}")
        self._warn_on_error("log parameters", self._log_params)

    def _in_loop(self) -> bool:
        loop = self.cfg.get("loop") if hasattr(self.cfg, "get") else None
        return loop is not None and loop.get("trial_number") is not None

    def _start_run(self) -> str:
        assert self.store is not None
        try:
            self.experiment_id = self._experiment_id()
            return self.store.store.create_run(
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

    def _start_deferrable_run(self) -> str | None:
        """The trial's run, or a placeholder that the replay creates (once, found by run_dir)."""
        assert self.store is not None
        parent = self.settings.parent_run_id
        iteration = self.settings.tags.get("iteration")
        if is_placeholder(parent) and iteration is not None:
            # The iteration's run waits in the loop's buffer: found by its tags once replayed.
            self.store.expect(
                str(parent), tag_filter({"run_type": "iteration", "iteration": iteration}) or ""
            )
        tags = self._start_tags()
        return self.store.create_run(
            self.settings.run_name or self.run_dir.name,
            tags,
            parent,
            find=tag_filter({"run_type": tags["run_type"], "run_dir": tags["run_dir"]}),
        )

    def _experiment_id(self) -> str:
        assert self.store is not None
        if self.settings.parent_run_id:
            # A trial lives in its iteration's experiment, whatever experiment name it was given.
            parent = self.store.client.get_run(self.settings.parent_run_id)
            return parent.info.experiment_id
        return self.store.store.experiment_id(self.settings.experiment)

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
            params.update(sampled_params(self.sampled() if self.sampled else {}))
        except Exception as error:
            log.warning("MLflow: could not read the trial's sampled values: %s", error)
        self.log_batch_calls += self.store.log(self.run_id, params=params, what="log parameters")

    # -- during training ----------------------------------------------------------------------
    def callbacks(self, fold: int) -> list[Any]:
        if self.run_id is None:
            return []
        from evolver.callbacks.mlflow_metrics import EpochMetricsLogger

        return [EpochMetricsLogger(self, fold, self.settings.live_interval_s)]

    def log_epoch(self, fold: int, epoch: int, values: Mapping[str, float]) -> None:
        """One epoch's values of one fold in one `log_batch`."""
        self.log_epochs(fold, {epoch: values})

    def log_epochs(self, fold: int, epochs: Mapping[int, Mapping[str, float]]) -> None:
        """Some epochs' values of one fold in one `log_batch` (called by the callback); sent, or
        buffered at once while the store is away."""
        epochs = {epoch: values for epoch, values in epochs.items() if values}
        if self.store is None or self.run_id is None or not epochs:
            return
        numbers = sorted(epochs)
        span = str(numbers[0]) if len(numbers) == 1 else f"{numbers[0]}-{numbers[-1]}"
        what = f"log fold {fold} epoch {span}"

        def send() -> None:
            assert self.store is not None and self.run_id is not None
            points = [
                metric(records.fold_metric_key(fold, name), value, epoch)
                for epoch, values in epochs.items()
                for name, value in values.items()
            ]
            self.log_batch_calls += self.store.log(self.run_id, metrics=points, what=what)
            self.live_points.update(
                (fold, epoch, name) for epoch, values in epochs.items() for name in values
            )

        self._warn_on_error(what, send)

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
        self._warn_on_error("send the buffered tracking", self._flush_buffer)

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
        self.log_batch_calls += self.store.log(
            self.run_id, metrics=points, tags=tags, what="log results"
        )

    def _log_artifacts(self, run_dir: Path) -> None:
        assert self.store is not None and self.run_id is not None
        what = "upload the run's records"
        for folder, files in records.artifact_files(run_dir).items():
            self.store.log_files(self.run_id, files, folder or None, what)
        if self.settings.log_checkpoints:
            checkpoints = records.best_checkpoints(run_dir)
            self.store.log_files(self.run_id, checkpoints, "checkpoints", what)

    def _flush_buffer(self) -> None:
        """At the end of the run: one more try (whatever the retry interval), then say what
        waits and how to send it."""
        assert self.store is not None
        if self.store.sync(force=True):
            return
        waiting = self.store.pending()
        if waiting:
            log.warning(
                "MLflow: %d tracking call(s) of this run wait in %s; `evolver sync %s` sends "
                "them once %s answers (a loop also sends them as its iterations end)",
                waiting,
                self.store.buffer.folder,
                self.run_dir,
                redact(self.settings.uri),
            )

    def _warn_on_error(self, what: str, action: Any) -> None:
        try:
            action()
        except TrackingError:  # tracking.on_error=fail
            raise
        except Exception as error:  # tracking must never cost the run its local records
            log.warning("MLflow: could not %s (%s: %s)", what, type(error).__name__, error)
