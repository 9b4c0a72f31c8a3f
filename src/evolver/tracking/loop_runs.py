"""MLflow structure of a loop: experiment `loop.name` -> run `iteration-<i>` -> run `trial-<n>`.

The sweeper calls these; every method is a no-op when `tracking.enabled` is false. Trials are
training jobs in their own processes: `trial_overrides` gives each the Hydra overrides that make
its run nest under the iteration's run with its name and tags.
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from collections.abc import Collection, Mapping
from functools import partial
from pathlib import Path
from typing import Any

from evolver.database_url import redact
from evolver.storage_url import optuna_storage_url, runs_dir_of
from evolver.tracking.store import TrackingSettings, check_reachable

log = logging.getLogger("evolver.tracking")

ITERATION_NOTE = (
    "One evolver loop. Each `iteration-<i>` run holds that iteration's report (trials table, "
    "findings, proposals, search-space changes) and Optuna plots; expand it for its `trial-<n>` "
    "runs, which hold the sampled values (`sampled.*` params), CV metrics, per-fold curves "
    "(`fold<k>/val_loss`, step = epoch) and the run's records."
)


def hydra_quote(value: Any) -> str:
    """A Hydra override value that stays a string whatever it contains (quotes, commas, ${})."""
    text = str(value).replace("\\", "\\\\").replace("'", "\\'").replace("${", "\\${")
    return f"'{text}'"


class LoopTracking:
    """The loop-level runs of one loop (experiment named `cfg.loop.name`).

    After the preflight, a store that goes away never stops the loop: iteration runs are then
    created, filled and closed from the loop folder's buffer when the store is back (see
    evolver.tracking.resilient), and each iteration's end also sends what its trials left
    buffered.
    """

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg
        self.settings = TrackingSettings.from_cfg(cfg)
        self.enabled = self.settings.enabled
        self.loop_name = str(cfg.loop.name)
        self.study_name = str(cfg.loop.name)
        self.loop_dir = (runs_dir_of(cfg) / "loops" / self.loop_name).resolve()
        self._store: Any = None
        self._experiment_id: str | None = None

    # -- set-up -------------------------------------------------------------------------------
    def preflight(self) -> None:
        """Check the store and create the loop's experiment (raises ConfigError, one line)."""
        if not self.enabled:
            return
        check_reachable(self.settings.uri, self.settings.preflight_timeout_s)
        from evolver.errors import ConfigError

        try:
            self.experiment_id()
        except Exception as error:
            first = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
            raise ConfigError(
                "tracking.uri", f"cannot use MLflow store {redact(self.settings.uri)}: {first}"
            ) from None

    @property
    def store(self) -> Any:
        """The loop's `ResilientStore` (its buffer is `mlflow-buffer/` in the loop folder)."""
        if self._store is None:
            from evolver.tracking.buffer import TrackingBuffer
            from evolver.tracking.resilient import ResilientStore

            buffer = TrackingBuffer.of(self.loop_dir).folder
            self._store = ResilientStore(self.settings, buffer, self.loop_name)
        return self._store

    def experiment_id(self) -> str:
        if self._experiment_id is None:
            from evolver.tracking.backend import NOTE_TAG

            tags = {
                "loop": self.loop_name,
                "optuna.study": self.study_name,
                "optuna.storage": redact(optuna_storage_url(self.cfg)),
                NOTE_TAG: ITERATION_NOTE,
            }
            self._experiment_id = self.store.store.experiment_id(self.loop_name, tags=tags)
        return self._experiment_id

    # -- iterations ---------------------------------------------------------------------------
    def start_iteration(self, iteration: int) -> str | None:
        """The parent run of `iteration`: the existing one on resume (reopened), else a new one;
        a placeholder id while the store is away."""
        if not self.enabled:
            return None
        tags = {
            "run_type": "iteration",
            "loop": self.loop_name,
            "iteration": str(iteration),
            "optuna.study": self.study_name,
            "state": "running",
        }
        return self.store.create_run(
            f"iteration-{iteration}",
            tags,
            find=iteration_filter(iteration),
            reopen=True,
            what=f"start the run of iteration {iteration}",
        )

    def trial_overrides(
        self,
        parent_run_id: str | None,
        iteration: int,
        trial_number: int,
        proposed_by: str,
        extra_tags: Mapping[str, Any] | None = None,
    ) -> list[str]:
        """Hydra overrides for a trial's job: nest under the iteration, name and tag the run
        (`proposed_by`: the finding behind the trial, `baseline` or `sampler`)."""
        if not self.enabled:
            return []
        parent_run_id = self._resolved(parent_run_id, iteration)
        tags = {
            "loop": self.loop_name,
            "iteration": iteration,
            "trial": trial_number,
            "optuna.study": self.study_name,
            "proposed_by": proposed_by,
            **(extra_tags or {}),
        }
        overrides = [
            f"tracking.experiment={hydra_quote(self.loop_name)}",
            f"tracking.run_name={hydra_quote(f'trial-{trial_number}')}",
        ]
        if parent_run_id:
            overrides.append(f"tracking.parent_run_id={hydra_quote(parent_run_id)}")
        overrides += [f"++tracking.tags.{key}={hydra_quote(value)}" for key, value in tags.items()]
        return overrides

    def log_scored_trial(self, parent_run_id: str | None, iteration: int, trial: Any) -> None:
        """A trial scored without training (a post-hoc choice of another trial): a child run of
        its iteration with the choice as params, its scores and 0 training seconds."""
        if not self.enabled:
            return
        from evolver.tracking.backend import metric

        attrs = trial.user_attrs
        parent_run_id = self._resolved(parent_run_id, iteration) if parent_run_id else None
        tags = {
            "run_type": "trial",
            "loop": self.loop_name,
            "iteration": str(iteration),
            "trial": str(trial.number),
            "optuna.study": self.study_name,
            "proposed_by": str(attrs.get("proposed_by")),
            "posthoc_of": str(attrs.get("posthoc_of")),
            "needs_training": "false",
        }
        store = self.store
        run_id = store.create_run(
            f"trial-{trial.number}",
            tags,
            parent_run_id,
            find=f"tags.trial = '{trial.number}' AND tags.run_type = 'trial'",
            what=f"start the run of trial {trial.number}",
        )
        if run_id is None:
            return
        cv = attrs.get("cv") or {}
        points = [metric("objective", float(trial.value), 0), metric("train_seconds", 0.0, 0)]
        points += [metric(f"cv.{key}", float(value), 0) for key, value in cv.items()]
        params = {key: str(value) for key, value in (attrs.get("changes") or {}).items()}
        store.log(run_id, metrics=points, params=params, what="log the scored trial")
        store.terminate(run_id, "FINISHED", "close the scored trial's run")

    def _resolved(self, run_id: str | None, iteration: int) -> str | None:
        """The real id of an iteration run created from the buffer, once the store is back."""
        from evolver.tracking.resilient import is_placeholder

        if not is_placeholder(run_id):
            return run_id
        self.store.expect(str(run_id), iteration_filter(iteration))
        self.store.sync()
        return self.store.resolve(run_id)

    def end_iteration(
        self,
        parent_run_id: str | None,
        iteration: int,
        metrics: Mapping[str, float],
        artifacts_dir: Path,
        study: Any = None,
    ) -> None:
        """Log the iteration's numbers, report files and (given the Optuna `study`) its plots;
        close its run; send what the loop's runs left buffered."""
        if not self.enabled or not parent_run_id:
            return
        from evolver.tracking.backend import metric

        store = self.store
        parent_run_id = self._resolved(parent_run_id, iteration)
        assert parent_run_id is not None
        points = [metric(k, v, iteration) for k, v in metrics.items() if v is not None]
        tags = {"state": "complete"}
        store.log(parent_run_id, metrics=points, tags=tags, what="log the iteration's metrics")
        artifacts_dir = Path(artifacts_dir)
        if artifacts_dir.is_dir():
            store.log_folder(parent_run_id, artifacts_dir, None, "upload the iteration report")
        if study is not None:
            self._warn_on_error(
                "upload Optuna plots", lambda: self._log_optuna_plots(parent_run_id, study)
            )
        store.terminate(parent_run_id, "FINISHED", "close the iteration run")
        self._warn_on_error("send the buffered tracking", self.sync_buffers)

    def _log_optuna_plots(self, run_id: str, study: Any) -> None:
        with tempfile.TemporaryDirectory(prefix="evolver-optuna-") as folder:
            files = write_optuna_plots(study, Path(folder))
            self.store.log_files(run_id, files, "optuna", "upload Optuna plots", temporary=True)

    def sync_buffers(self) -> int:
        """Replay the loop's buffer, then those its trials left (a trial that ended while the
        store was away); returns how many buffers still wait, and says how to send them."""
        from evolver.tracking.buffer import find_buffers

        self.store.sync(force=True)
        waiting = 0
        for buffer in find_buffers(self.loop_dir):
            store = self.store if buffer.folder == self.store.buffer.folder else None
            store = store or self.store.sibling(buffer.folder)
            # A trial still running (another worker) holds its buffer's lock: not ours to send.
            if not store.sync(wait=False) and store.buffer.pending():
                waiting += 1
        if waiting:
            log.warning(
                "MLflow: tracking of %d run(s) of loop %s waits in mlflow-buffer folders; "
                "`evolver sync %s` sends it once %s answers",
                waiting,
                self.loop_name,
                self.loop_dir,
                redact(self.settings.uri),
            )
        return waiting

    # -- resume -------------------------------------------------------------------------------
    def close_stale_runs(
        self, dead_trials: Collection[int], settled_iterations: Collection[int]
    ) -> int:
        """Runs a dead worker left RUNNING become KILLED; returns how many.

        Only runs no live worker can own: the runs of `dead_trials` (trials Optuna holds failed
        or finished, never running or waiting) and of `settled_iterations` (closed in the study
        long enough ago that no worker is still closing them). An iteration run that is still
        open belongs to the loop: whoever closes the iteration reopens and finishes it.
        """
        if not self.enabled or not (dead_trials or settled_iterations):
            return 0
        stale = partial(self._close_stale_runs, set(dead_trials), set(settled_iterations))
        return self.store.attempt("close runs left running", stale, 0)

    def _close_stale_runs(self, dead_trials: set[int], settled_iterations: set[int]) -> int:
        client = self.store.client
        running = client.search_runs(
            [self.experiment_id()], filter_string="attributes.status = 'RUNNING'", max_results=10000
        )
        closed = 0
        for run in running:
            tags = run.data.tags
            if tags.get("run_type") == "iteration":
                number, owners = _int_tag(tags, "iteration"), settled_iterations
            else:
                number, owners = _int_tag(tags, "trial"), dead_trials
            if number is None or number not in owners:
                continue
            client.set_tag(run.info.run_id, "state", "killed")
            client.set_tag(run.info.run_id, "state_reason", "left running by an interrupted loop")
            self.store.store.terminate(run.info.run_id, "KILLED")
            closed += 1
        if closed:
            log.info("MLflow: %d run(s) left running by a stopped worker marked KILLED", closed)
        return closed

    def _warn_on_error(self, what: str, action: Any) -> None:
        from evolver.tracking.resilient import TrackingError

        try:
            action()
        except TrackingError:  # tracking.on_error=fail
            raise
        except Exception as error:  # the loop's own records matter more than its MLflow copy
            log.warning("MLflow: could not %s (%s: %s)", what, type(error).__name__, error)


def _int_tag(tags: Mapping[str, str], key: str) -> int | None:
    try:
        return int(tags[key])
    except (KeyError, ValueError):
        return None


def iteration_filter(iteration: int) -> str:
    """The search filter of an iteration's parent run."""
    return f"tags.run_type = 'iteration' AND tags.iteration = '{iteration}'"


def write_optuna_plots(study: Any, folder: Path) -> list[Path]:
    """Optimization history and parameter importances of an Optuna study as PNG (those the
    study can support)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    from optuna.visualization import matplotlib as optuna_plots

    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    plots = {"optimization_history": optuna_plots.plot_optimization_history}
    if len(complete) >= 2 and any(trial.params for trial in complete):
        plots["param_importances"] = optuna_plots.plot_param_importances
    written: list[Path] = []
    for name, plot in plots.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # experimental-API and equal-importance notes
                axes = plot(study)
        except (ValueError, RuntimeError) as error:  # e.g. every value identical
            log.info("Optuna %s plot skipped: %s", name, error)
            continue
        figure = axes.figure if hasattr(axes, "figure") else axes.flat[0].figure
        path = folder / f"{name}.png"
        figure.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(figure)
        written.append(path)
    return written
