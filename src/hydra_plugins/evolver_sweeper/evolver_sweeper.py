"""The evolver sweeper: an Optuna ask/tell loop that launches trials through Hydra's launcher.

`evolver train -m hydra/sweeper=evolver [overrides]` (or `evolver loop [overrides]`) runs the loop
configured by `loop` and `search` in the primary config. Overrides on the command line apply to
every trial; sweep syntax (`a=1,2`) is refused: the search space belongs in `conf/search/`.
"""

import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.plugins import Plugins
from hydra.core.utils import JobStatus
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

log = logging.getLogger(__name__)


@dataclass
class EvolverSweeperConf:
    _target_: str = "hydra_plugins.evolver_sweeper.evolver_sweeper.EvolverSweeper"


ConfigStore.instance().store(
    group="hydra/sweeper", name="evolver", node=EvolverSweeperConf, provider="evolver"
)


class EvolverSweeper(Sweeper):
    """Runs `evolver.loop.LoopRunner` with Hydra's configured launcher."""

    def __init__(self) -> None:
        self.config: DictConfig | None = None
        self.launcher: Any = None
        self.hydra_context: HydraContext | None = None
        # Config values whose URL lost its password, for the jobs' overrides.
        self.without_passwords: dict[str, str] = {}

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        from evolver.app import check_runs_dir
        from evolver.errors import EvolverError
        from evolver.loop import LoopSettings, SearchSpace
        from evolver.secrets import install_guards, sanitize_config

        # Before anything reads, logs or saves the config: URL passwords stay in the process.
        self.without_passwords = sanitize_config(config)
        install_guards()
        try:
            check_runs_dir(config)  # the loop's trials and records all go below it
            loop_dir = LoopSettings.from_cfg(config).loop_dir
            SearchSpace.from_cfg(config.get("search"))
        except EvolverError as error:
            exit_with(error)
        # Trials write into runs_dir/loops/<name>/trial_<n>; the launcher's own files go there too.
        with read_write(config), open_dict(config):
            config.hydra.sweep.dir = str(loop_dir)
        self.config = config
        self.hydra_context = hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def sweep(self, arguments: list[str]) -> Any:
        from evolver.errors import EvolverError
        from evolver.interrupts import Interrupted

        try:
            return self._sweep(arguments)
        except EvolverError as error:
            exit_with(error)
        except Interrupted as interrupted:  # reported (one line, 130 or 143) by the entry point
            interrupted.hint = interrupted.hint or "rerun the same command to resume"
            raise

    def _sweep(self, arguments: list[str]) -> Any:
        from evolver.errors import ConfigError
        from evolver.loop import LoopRunner, print_summary

        assert self.config is not None
        arguments = overrides_without_passwords(arguments, self.without_passwords)
        parsed = OverridesParser.create().parse_overrides(arguments)
        sweeps = [override.input_line for override in parsed if override.is_sweep_override()]
        if sweeps:
            raise ConfigError(
                "overrides",
                f"sweep syntax is not used by the evolver loop ({', '.join(sweeps)}); "
                "put searched values in a search config (conf/search/)",
            )
        choices = OmegaConf.to_container(self.config.hydra.runtime.choices, resolve=True)
        runner = LoopRunner(
            self.config,
            self._launch,
            base_overrides=arguments,
            group_choices=choices,  # type: ignore[arg-type]
        )
        state = runner.run()
        print_summary(runner.study, runner.settings, state=state)
        return state

    def _launch(self, job_overrides: list[list[str]], first_index: int) -> list[Any]:
        from evolver import interrupts

        jobs = [tuple(overrides) for overrides in job_overrides]
        kind = type(self.launcher).__name__
        if kind == "BasicLauncher":
            return self._launch_in_process(jobs, first_index)
        if kind == "JoblibLauncher":
            # Raising in the middle of joblib would kill its workers while they write their
            # records: the workers get the signal and end their jobs; it is raised afterwards.
            with interrupts.deferred(forward=True):
                returns = self.launcher.launch(jobs, initial_job_idx=first_index)
            return [_outcome(job) for job in returns]
        return [_outcome(job) for job in self.launcher.launch(jobs, initial_job_idx=first_index)]

    def _launch_in_process(self, jobs: list[tuple[str, ...]], first_index: int) -> list[Any]:
        """One job at a time, so that the jobs that ended before an interrupt keep their
        outcome, and no job starts after it."""
        from evolver import interrupts
        from evolver.loop import JobOutcome

        outcomes: list[Any] = []
        for offset, job in enumerate(jobs):
            try:
                interrupts.raise_if_received()
                returns = self.launcher.launch([job], initial_job_idx=first_index + offset)
            except interrupts.Interrupted as interrupted:
                return outcomes + [JobOutcome(error=interrupted)] * (len(jobs) - offset)
            outcomes += [_outcome(job) for job in returns]
        return outcomes


def overrides_without_passwords(arguments: list[str], cleaned: dict[str, str]) -> list[str]:
    """The user's overrides with no URL password, plus one for each config value that lost its
    password without an override (a config file's URL): the jobs compose their config afresh."""
    from evolver.loop import override_key, quote
    from evolver.secrets import strip_passwords

    clean = [strip_passwords(line) for line in arguments]
    given = {override_key(line) for line in clean}
    return clean + [f"{key}={quote(value)}" for key, value in cleaned.items() if key not in given]


def exit_with(error: Exception) -> NoReturn:
    """A user error: one line on stderr and its exit code, not Hydra's traceback report."""
    print(f"evolver loop: error: {error}", file=sys.stderr)
    sys.exit(getattr(error, "exit_code", 2))


def _outcome(job: Any) -> Any:
    from evolver.loop import JobOutcome

    run_dir = _output_dir(job)
    if job.status == JobStatus.COMPLETED:
        return JobOutcome(value=job.return_value, run_dir=run_dir)
    return JobOutcome(error=_job_error(job), run_dir=run_dir)


def _output_dir(job: Any) -> Path | None:
    hydra_cfg = getattr(job, "hydra_cfg", None)
    output_dir = OmegaConf.select(hydra_cfg, "hydra.runtime.output_dir") if hydra_cfg else None
    return Path(output_dir) if output_dir else None


def _job_error(job: Any) -> BaseException:
    # A failed JobReturn holds the job's exception; its `return_value` property would re-raise
    # it after printing a line per job to stderr, which the loop reports better itself.
    error = getattr(job, "_return_value", None)
    if isinstance(error, BaseException):
        return error
    return RuntimeError(f"the job ended with status {job.status.name} and no exception")
