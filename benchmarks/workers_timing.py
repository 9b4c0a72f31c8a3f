"""Where a loop worker's time goes: an opt-in clock for `benchmarks/workers.py`.

`install_hooks` wraps the seams a worker's time passes through (Optuna's RDB storage, Hydra's
launcher, evolver's MLflow trackers and planning) so that each call adds its duration to a phase.
Phases are exclusive: a timed call inside another one (a storage read inside an MLflow call)
counts once, for its own phase, and not again for the caller. Time on the main thread (which
blocks the loop) is kept apart from time on other threads (the heartbeat thread beats beside the
running trial). Nothing here changes what the wrapped code does.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import inspect
import json
import os
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

# Set by the benchmark for its workers: the folder each worker writes its timings into.
TIMINGS_ENV = "EVOLVER_BENCH_TIMINGS"
STORAGE, HEARTBEATS, DIAGNOSIS, MLFLOW, LAUNCH, TRAINING = (
    "storage",
    "heartbeats",
    "diagnosis",
    "mlflow",
    "launch",
    "training",
)


class PhaseClock:
    """Wall and CPU seconds per phase, exclusive of nested phases, for the main thread and the
    others (CPU seconds are the calling thread's own)."""

    def __init__(self) -> None:
        self._local = threading.local()
        self._lock = threading.Lock()
        self.main: dict[str, float] = defaultdict(float)
        self.background: dict[str, float] = defaultdict(float)
        self.cpu: dict[str, float] = defaultdict(float)

    def _stack(self) -> list[list[Any]]:
        if not hasattr(self._local, "stack"):
            self._local.stack = []
        return self._local.stack

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        stack = self._stack()
        frame = [name, 0.0, 0.0]  # the phase, and the wall and CPU seconds of nested phases
        stack.append(frame)
        start, start_cpu = time.perf_counter(), time.thread_time()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - start
            elapsed_cpu = time.thread_time() - start_cpu
            stack.pop()
            if stack:
                stack[-1][1] += elapsed
                stack[-1][2] += elapsed_cpu
            self._add(name, elapsed - frame[1], elapsed_cpu - frame[2])

    def _add(self, name: str, seconds: float, cpu_seconds: float) -> None:
        on_main = threading.current_thread() is threading.main_thread()
        with self._lock:
            (self.main if on_main else self.background)[name] += seconds
            self.cpu[name] += cpu_seconds

    def timed(self, function: Callable[..., Any], name: str) -> Callable[..., Any]:
        @functools.wraps(function)
        def call(*args: Any, **kwargs: Any) -> Any:
            with self.phase(name):
                return function(*args, **kwargs)

        return call

    def wrap(self, owner: Any, attribute: str, name: str) -> bool:
        """Time `owner.attribute` (a function or plain method) as phase `name`; False when the
        attribute is missing or not a plain function."""
        static = inspect.getattr_static(owner, attribute, None)
        if static is None or isinstance(static, staticmethod | classmethod | property):
            return False
        if not callable(static):
            return False
        setattr(owner, attribute, self.timed(getattr(owner, attribute), name))
        return True

    def totals(self) -> dict[str, dict[str, float]]:
        with self._lock:
            return {
                "main": dict(self.main),
                "background": dict(self.background),
                "cpu": dict(self.cpu),
            }


def public_methods(cls: type) -> list[str]:
    """The plain public methods a class defines itself."""
    return [
        name
        for name, value in vars(cls).items()
        if not name.startswith("_") and inspect.isfunction(value)
    ]


def install_hooks(clock: PhaseClock) -> list[str]:
    """Wrap the worker's seams; returns the seams that could not be wrapped (left untimed)."""
    import optuna
    from hydra.core.plugins import Plugins

    from evolver.loop import building, context, trial_queue
    from evolver.tracking.loop_runs import LoopTracking
    from evolver.tracking.run_tracker import MlflowRunTracker

    wanted: list[tuple[Any, str, str]] = []
    rdb = optuna.storages.RDBStorage
    for name in ["__init__", *public_methods(rdb)]:
        wanted.append((rdb, name, HEARTBEATS if name == "record_heartbeat" else STORAGE))
    wanted += [
        (optuna.storages, "fail_stale_trials", HEARTBEATS),
        (optuna.Study, "tell", STORAGE),
        (optuna.Study, "enqueue_trial", STORAGE),
        (optuna.Trial, "suggest_float", STORAGE),
        (optuna.Trial, "suggest_int", STORAGE),
        (optuna.Trial, "suggest_categorical", STORAGE),
        # The once-only steps' atomic claims go to the database directly. Each seam is wrapped
        # in the module that calls it, since those modules import the functions by name.
        (context, "claim", STORAGE),
        (context, "release", STORAGE),
        (trial_queue, "claim", STORAGE),
        (building, "claim_age", STORAGE),
        # Asking the sampler for a distinct configuration.
        (trial_queue, "sample_distinct", STORAGE),
        # Building an iteration from the incumbent's diagnosis.
        (building, "plan_iteration", DIAGNOSIS),
    ]
    for cls in (LoopTracking, MlflowRunTracker):
        wanted += [(cls, name, MLFLOW) for name in public_methods(cls)]
    missing = []
    for owner, attribute, name in wanted:
        if not clock.wrap(owner, attribute, name):
            missing.append(f"{getattr(owner, '__name__', owner)}.{attribute}")
    # Hydra re-executes its launcher modules when it scans plugins, so the launcher is timed
    # on the instance the sweeper gets.
    make_launcher = Plugins.instantiate_launcher

    @functools.wraps(make_launcher)
    def timed_launcher(plugins: Any, *args: Any, **kwargs: Any) -> Any:
        launcher = make_launcher(plugins, *args, **kwargs)
        launcher.launch = clock.timed(launcher.launch, LAUNCH)
        return launcher

    Plugins.instantiate_launcher = timed_launcher  # type: ignore[method-assign]
    return missing


class WorkerTimings:
    """One worker's timings file: a JSON line per job, and one for the worker when it exits."""

    def __init__(self, folder: Path, started_at: float) -> None:
        self.clock = PhaseClock()
        self.path = folder / f"worker-{os.getpid()}.jsonl"
        self.started_at = started_at
        self.runner_start: float | None = None
        self.runner_end: float | None = None
        self.startup_cpu: float | None = None
        self.untimed: list[str] = []
        folder.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")

    def job(self, trial_number: int | None, start: float, end: float, status: str) -> None:
        self.write(
            {
                "event": "job",
                "pid": os.getpid(),
                "trial": trial_number,
                "start": start,
                "end": end,
                "status": status,
            }
        )

    def time_runner(self) -> None:
        """Record when the worker's `LoopRunner.run` starts and ends."""
        from evolver.loop.runner import LoopRunner

        run = LoopRunner.run

        @functools.wraps(run)
        def timed_run(runner: Any, *args: Any, **kwargs: Any) -> Any:
            self.runner_start = time.time()
            self.startup_cpu = time.process_time()
            try:
                return run(runner, *args, **kwargs)
            finally:
                self.runner_end = time.time()

        LoopRunner.run = timed_run  # type: ignore[method-assign]

    def finish(self) -> None:
        self.write(
            {
                "event": "worker",
                "pid": os.getpid(),
                "started_at": self.started_at,
                "runner_start": self.runner_start,
                "runner_end": self.runner_end,
                "exit_at": time.time(),
                "cpu_s": time.process_time(),
                "startup_cpu_s": self.startup_cpu,
                "phases": self.clock.totals(),
                "untimed": self.untimed,
            }
        )


def start_worker_timings(started_at: float) -> WorkerTimings | None:
    """Timings for this process when the benchmark asked for them (`EVOLVER_BENCH_TIMINGS`)."""
    folder = os.environ.get(TIMINGS_ENV)
    if not folder:
        return None
    timings = WorkerTimings(Path(folder), started_at)
    timings.untimed = install_hooks(timings.clock)
    timings.time_runner()
    atexit.register(timings.finish)
    return timings
