"""Hydra entry points: `evolver train` (one K-fold experiment) and `evolver loop`.

`train_task(cfg)` is the Hydra task function every job runs, in single-run mode, under the basic
sweeper (`-m`) and under the evolver sweeper (`evolver loop`).
"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from evolver.errors import ConfigError, EvolverError

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


def main_train(argv: Sequence[str]) -> int:
    args = list(argv)
    flags = {a.split("=", 1)[0] for a in args if a.startswith("-")}
    if not flags & (_NO_JOB_FLAGS | _MULTIRUN_FLAGS | _CONFIG_FLAGS):
        precheck_composition([a for a in args if "=" in a and not a.startswith("-")])
    return run_hydra(args, program="evolver train")


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
            compose(config_name=CONFIG_NAME, overrides=overrides)
    except (ConfigCompositionException, MissingConfigException, OverrideParseException) as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        field = _override_field(message, overrides)
        raise ConfigError(field, message) from None
    finally:
        GlobalHydra.instance().clear()


def _override_field(message: str, overrides: list[str]) -> str:
    for override in overrides:
        key = override.lstrip("+~").split("=", 1)[0]
        if key and key in message:
            return key
    return "overrides"


def hydra_task(cfg: Any) -> float:
    """Runs `train_task`; in single-run mode a user error is one line and exit code 2."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    single_run = HydraConfig.get().mode == RunMode.RUN
    try:
        return train_task(cfg)
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


def job_output_dir() -> Path:
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir)


def train_task(cfg: Any, run_dir: Path | None = None) -> float:
    from omegaconf import OmegaConf

    from evolver.config import validate
    from evolver.tracking import make_tracker

    validate(cfg)
    run_dir = Path(run_dir) if run_dir is not None else job_output_dir()
    tracker = make_tracker(cfg, run_dir)
    # Before torch is imported and data is loaded: an unreachable server fails in seconds.
    tracker.preflight()
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    _quiet_lightning()

    from evolver.console import print_run_end
    from evolver.data.sources import load_image_set
    from evolver.loop.job import trial_callbacks
    from evolver.training import CrossValidation

    images = load_image_set(cfg.data)
    cv = CrossValidation(
        cfg,
        run_dir,
        images,
        extra_callbacks=lambda fold: [*tracker.callbacks(fold), *trial_callbacks(cfg, fold)],
    )
    status, error, failure = "complete", None, None
    try:
        cv.run()
    except BaseException as exc:
        failure = exc
        status = "pruned" if _is_pruned(exc) else "failed"
        error = str(exc) or type(exc).__name__
        cv.interrupted(status)
    finally:
        summary = cv.write_records(status, error)
    if cfg.get("diagnosis") is not None and cfg.diagnosis.get("enabled", True):
        _write_diagnosis(run_dir, cfg)
    tracker.finish(run_dir, status, error)
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
    ):
        logging.getLogger(name).setLevel(logging.WARNING)
