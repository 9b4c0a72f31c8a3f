"""Hydra entry points: `evolver train` (one K-fold experiment) and `evolver loop`.

`train_task(cfg)` is the Hydra task function every job runs, in single-run mode, under the basic
sweeper (`-m`) and under the evolver sweeper (`evolver loop`).
"""

from __future__ import annotations

import functools
import logging
import math
import shutil
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from evolver import interrupts
from evolver.errors import ConfigError, EvolverError
from evolver.records import (
    CONFIG_FILE,
    HISTORY_FILE,
    REPORT_JSON,
    REPORT_MD,
    STATUS_COMPLETE,
    STATUS_FAILED,
    STATUS_INTERRUPTED,
    STATUS_PRUNED,
    SUMMARY_FILE,
)
from evolver.secrets import guard_secrets, protect_job

log = logging.getLogger(__name__)

CONFIG_MODULE = "evolver.conf"
CONFIG_NAME = "train"
# Hydra flags that do not run a job: nothing to pre-check.
_NO_JOB_FLAGS = {"--help", "-h", "--hydra-help", "--info", "-i", "--shell-completion", "-sc"}
# Flags that change which config is composed: the pre-check would compose the wrong one.
_CONFIG_FLAGS = {
    "-cn",
    "--config-name",
    "-cp",
    "--config-path",
    "-cd",
    "--config-dir",
    "--experimental-rerun",
}
_MULTIRUN_FLAGS = {"-m", "--multirun"}


@guard_secrets
def main_train(argv: Sequence[str]) -> int:
    args = list(argv)
    flags = {a.split("=", 1)[0] for a in args if a.startswith("-")}
    if not flags & (_NO_JOB_FLAGS | _MULTIRUN_FLAGS | _CONFIG_FLAGS):
        precheck_composition([a for a in args if "=" in a and not a.startswith("-")])
    return run_hydra(args, program="evolver train")


@guard_secrets
def main_loop(argv: Sequence[str]) -> int:
    return run_hydra(["-m", "hydra/sweeper=evolver", *argv], program="evolver loop")


def run_hydra(args: list[str], program: str) -> int:
    import hydra

    @hydra.main(version_base="1.3", config_path=f"pkg://{CONFIG_MODULE}", config_name=CONFIG_NAME)
    def entry(cfg: Any) -> float:
        return hydra_task(cfg)

    saved = sys.argv
    sys.argv = [program, *args]
    try:
        entry()
    finally:
        sys.argv = saved
    return 0


def precheck_composition(overrides: list[str]) -> None:
    """Compose the config once so a misspelt group or key is one line (exit 2), not Hydra's
    traceback-style report."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import (
        ConfigCompositionException,
        MissingConfigException,
        OverrideParseException,
    )

    try:
        with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
            cfg = compose(config_name=CONFIG_NAME, overrides=overrides)
    except (ConfigCompositionException, MissingConfigException, OverrideParseException) as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        field = _override_field(message, overrides)
        raise ConfigError(field, message) from None
    finally:
        GlobalHydra.instance().clear()
    check_runs_dir(cfg)


def check_runs_dir(cfg: Any) -> None:
    """Every run writes below `runs_dir`: an unwritable one is a user error before anything runs,
    not Hydra's traceback when it creates the run folder."""
    from evolver.writable import unwritable_reason

    reason = unwritable_reason(Path(str(cfg.get("runs_dir") or "runs")))
    if reason is not None:
        raise ConfigError("runs_dir", reason)


def _override_field(message: str, overrides: list[str]) -> str:
    for override in overrides:
        key = override.lstrip("+~").split("=", 1)[0]
        if key and key in message:
            return key
    return "overrides"


def discard_failed_start(task: Callable[[Any], float]) -> Callable[[Any], float]:
    """In single-run mode, a run that fails (or is stopped) before recording an epoch leaves no
    run folder behind."""

    @functools.wraps(task)
    def run(cfg: Any) -> float:
        try:
            return task(cfg)
        except BaseException:
            from hydra.core.hydra_config import HydraConfig
            from hydra.types import RunMode

            hydra_cfg = HydraConfig.get()
            if hydra_cfg.mode == RunMode.RUN:
                discard_run_without_records(job_output_dir(), f"{hydra_cfg.job.name}.log")
            raise

    return run


def discard_run_without_records(run_dir: Path, log_name: str) -> None:
    """Remove the folder of a run that recorded no epoch. A folder with recorded epochs, or
    holding anything the run does not write itself (`hydra.run.dir` pointed at an existing
    folder), is left as it is."""
    if not run_dir.is_dir() or _has_epoch_rows(run_dir / HISTORY_FILE):
        return
    written_by_run = {".hydra", log_name, *_FILES_BEFORE_FIRST_EPOCH}
    if {entry.name for entry in run_dir.iterdir()} - written_by_run:
        return
    _close_log_files_in(run_dir)
    shutil.rmtree(run_dir, ignore_errors=True)


# What a run may write into its folder before (or without) recording an epoch.
_FILES_BEFORE_FIRST_EPOCH = (CONFIG_FILE, HISTORY_FILE, SUMMARY_FILE, REPORT_MD, REPORT_JSON)


def _has_epoch_rows(history: Path) -> bool:
    """Whether history.csv holds a row under its header."""
    try:
        with history.open() as handle:
            handle.readline()  # the header
            return bool(handle.readline().strip())
    except OSError:
        return False


def _close_log_files_in(folder: Path) -> None:
    """Detach and close the log file handlers (Hydra's `<job>.log`) writing into `folder`."""
    loggers = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
    for logger in loggers:
        for handler in list(getattr(logger, "handlers", [])):
            if isinstance(handler, logging.FileHandler) and Path(
                handler.baseFilename
            ).is_relative_to(folder.absolute()):
                logger.removeHandler(handler)
                handler.close()


@discard_failed_start
def hydra_task(cfg: Any) -> float:
    """Runs `train_task`; in single-run mode a user error is one line and exit code 2."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    single_run = HydraConfig.get().mode == RunMode.RUN
    try:
        in_worker = not single_run and runs_in_worker_process()
        return interrupts.run_job(lambda: train_task(cfg), in_worker_process=in_worker)
    except EvolverError as error:
        if not single_run:
            raise
        print(f"evolver train: error: {error}", file=sys.stderr)
        sys.exit(error.exit_code)
    except Exception as error:
        from evolver.callbacks.dynamics import NonFiniteLossError

        if single_run and isinstance(error, NonFiniteLossError):
            print(f"evolver train: training failed: {error}", file=sys.stderr)
            sys.exit(1)
        raise


def runs_in_worker_process() -> bool:
    """True for a launcher that runs jobs in its own processes (joblib, submitit), not in the
    sweeper's (Hydra's basic launcher)."""
    from hydra.core.hydra_config import HydraConfig

    target = str(HydraConfig.get().launcher.get("_target_") or "")
    return not target.endswith(".BasicLauncher")


def job_output_dir() -> Path:
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir)


def train_task(cfg: Any, run_dir: Path | None = None) -> float:
    from omegaconf import OmegaConf

    from evolver.config import validate
    from evolver.loop.job import trial_params
    from evolver.tracking import make_tracker

    protect_job(cfg)  # before anything records the config or opens a connection
    settings = validate(cfg)
    run_dir = Path(run_dir) if run_dir is not None else job_output_dir()
    tracker = make_tracker(cfg, run_dir, sampled=lambda: trial_params(cfg))
    # Before Lightning is imported and the data loaded: an unreachable server fails in seconds.
    tracker.preflight()
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / CONFIG_FILE).write_text(OmegaConf.to_yaml(cfg, resolve=True))
    _quiet_lightning()

    from evolver.console import print_run_end
    from evolver.data.sources import load_image_set
    from evolver.loop.job import fold_race, trial_callbacks
    from evolver.training import CrossValidation

    images = load_image_set(cfg.data)
    cv = CrossValidation(
        cfg,
        run_dir,
        images,
        extra_callbacks=lambda fold: [*tracker.callbacks(fold), *trial_callbacks(cfg, fold)],
        after_fold=fold_race(cfg),
        checked_settings=settings,
    )
    status, error, failure, cut_fold = STATUS_COMPLETE, None, None, None
    try:
        cv.run()
    except BaseException as exc:
        failure = _as_interrupted(exc)
        status = _run_status(failure)
        error = str(failure) or type(failure).__name__
        cut_fold = cv.interrupted(status)
    # A signal while the records are written waits for them (a second one exits at once).
    with interrupts.deferred():
        summary = cv.write_records(status, error)
        diagnosis = cfg.get("diagnosis")
        diagnose = diagnosis is not None and diagnosis.get("enabled", True)
        if diagnose and status != STATUS_INTERRUPTED:  # a run cut short by the user: no findings
            _write_diagnosis(run_dir, cfg)
        tracker.finish(run_dir, status, error)
    if isinstance(failure, interrupts.Interrupted):
        failure.where = failure.where or (f"fold {cut_fold}" if cut_fold is not None else None)
        if cv.rows:
            failure.hint = failure.hint or f"records in {run_dir}"
        raise failure
    print_run_end(summary, run_dir)
    if failure is not None:
        raise failure
    objective = summary.objective
    return math.nan if objective is None else float(objective)


def _write_diagnosis(run_dir: Path, cfg: Any) -> None:
    try:
        from evolver.diagnosis import write_report

        write_report(run_dir, cfg)
    except Exception as error:  # the records matter more than their report
        log.warning("diagnosis failed for %s: %s", run_dir, error)


def _as_interrupted(error: BaseException) -> BaseException:
    """Lightning's own SIGTERM exit (raised when its handler saw SIGTERM but ours did not
    raise) is an interrupt like any other."""
    if type(error).__name__ == "SIGTERMException":
        return interrupts.Interrupted(signal.SIGTERM)
    return error


def _run_status(error: BaseException) -> str:
    if interrupts.interrupt_signal(error) is not None:
        return STATUS_INTERRUPTED
    return STATUS_PRUNED if _is_pruned(error) else STATUS_FAILED


def _is_pruned(error: BaseException) -> bool:
    try:
        import optuna
    except ImportError:
        return False
    return isinstance(error, optuna.TrialPruned)


def _quiet_lightning() -> None:
    import warnings

    # A deprecation inside Lightning itself; nothing a user can act on.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    for name in (
        "lightning.pytorch.utilities.rank_zero",
        "lightning.pytorch.accelerators.cuda",
        "lightning.fabric.utilities.seed",
        # "Received SIGTERM" at INFO: the interrupt has its own line.
        "lightning.pytorch.trainer.connectors.signal_connector",
    ):
        logging.getLogger(name).setLevel(logging.WARNING)
