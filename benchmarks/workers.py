"""Workers benchmark: N `evolver loop` worker processes on one PostgreSQL loop, with trials whose
training is a fixed sleep, so that what the table measures is the loop's coordination.

    python benchmarks/workers.py [--workers 1,2,4,8,16] [--sleep 10,60] [--trials-per-worker 4]
        [--iterations 3] [--storage URL] [--tracking-uri URL] [--quick] [--json PATH]

Each row starts N workers at the same moment on a fresh PostgreSQL database (created and dropped
here; `--storage` uses a given URL instead, with a new loop name per row). Every worker is the
real loop path: the evolver sweeper plugin, `LoopRunner`, heartbeats, the diagnosis after each
trial and MLflow tracking (by default on a second fresh PostgreSQL database, created once per
invocation). Only training is replaced, by `benchmarks/workers_app.py`: it sleeps the simulated
training time over a synthetic K-fold curve and writes the records the loop reads. The loop has
`--iterations` iterations of N x trials-per-worker / iterations trials, pruning off.

Per simulated time, a markdown table: trials per hour, the scaling ratio against N x the rate of
one worker (end to end, and after start-up), the start-up of the slowest worker, the seconds per
trial each phase took in the workers (measured by `benchmarks/workers_timing.py`), CPU seconds
per trial, duplicated configurations, trials run twice and planned trials not COMPLETE.
`--quick` is a smoke run (N = 1, 2; 2 s trials; 2 trials per worker).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from workers_timing import (  # noqa: E402
    DIAGNOSIS,
    HEARTBEATS,
    LAUNCH,
    MLFLOW,
    STORAGE,
    TIMINGS_ENV,
    TRAINING,
)

APP = HERE / "workers_app.py"
ADMIN_DSN = os.environ.get(
    "EVOLVER_BENCH_POSTGRES",
    os.environ.get("EVOLVER_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres"),
)
# Workers keep compiled bytecode here (as an installed environment keeps it next to its sources)
# even where PYTHONDONTWRITEBYTECODE is set: otherwise every worker compiles each module it
# imports, and start-up measures the compiler.
BYTECODE_CACHE = Path(tempfile.gettempdir()) / "evolver-bench-pycache"
COORDINATION = (STORAGE, HEARTBEATS, DIAGNOSIS, MLFLOW, LAUNCH)
COLUMNS = (
    "N",
    "trials",
    "wall s",
    "trials/h",
    "scaling",
    "scaling after start-up",
    "start-up s",
    "storage s/trial",
    "heartbeats s/trial",
    "diagnosis s/trial",
    "MLflow s/trial",
    "launch s/trial",
    "wait s/trial",
    "CPU s/trial",
    "peak DB connections",
    "duplicates",
    "re-runs",
    "lost",
)


# -- databases ------------------------------------------------------------------------------------
@contextlib.contextmanager
def fresh_database(admin_dsn: str, prefix: str) -> Iterator[str]:
    """A new PostgreSQL database, dropped afterwards; yields its SQLAlchemy URL."""
    import psycopg2
    from sqlalchemy.engine import make_url

    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = psycopg2.connect(admin_dsn)
    admin.autocommit = True
    with admin.cursor() as cursor:
        cursor.execute(f'CREATE DATABASE "{name}"')
    url = make_url(admin_dsn).set(drivername="postgresql+psycopg2", database=name)
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.cursor() as cursor:
            cursor.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                (name,),
            )
            cursor.execute(f'DROP DATABASE IF EXISTS "{name}"')
        admin.close()


def create_mlflow_store(uri: str) -> None:
    """Create the tracking store's tables once, before workers start together on it."""
    from mlflow.tracking import MlflowClient

    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    MlflowClient(tracking_uri=uri).search_experiments(max_results=1)


class ConnectionPeak:
    """The most connections the row's PostgreSQL databases held beyond those open when it
    started (this script's own), sampled every second."""

    def __init__(self, urls: Sequence[str], interval_s: float = 1.0) -> None:
        from sqlalchemy.engine import make_url

        self.urls = [url for url in urls if url.startswith("postgresql")]
        self.databases = [make_url(url).database for url in self.urls]
        self.interval_s = interval_s
        self.peak: int | None = None
        self.limit: int | None = None
        self._baseline = 0
        self._connection: Any = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="connection-peak", daemon=True)

    def __enter__(self) -> ConnectionPeak:
        if not self.urls:
            return self
        import sqlalchemy
        from sqlalchemy.pool import NullPool

        try:
            # Autocommit: inside one transaction pg_stat_activity would stay one snapshot.
            engine = sqlalchemy.create_engine(
                self.urls[0], poolclass=NullPool, isolation_level="AUTOCOMMIT"
            )
            self._connection = engine.connect()
            limit = self._connection.execute(sqlalchemy.text("SHOW max_connections")).scalar()
            self.limit = int(limit)
            self._baseline = self._count()
        except Exception as error:  # sampling is a figure, not a condition of the benchmark
            print(f"[bench] cannot sample database connections: {error}", file=sys.stderr)
            return self
        self.peak = 0
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        if self._connection is not None:
            self._connection.close()

    def _count(self) -> int:
        import sqlalchemy

        query = sqlalchemy.text(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = ANY(:names) "
            "AND pid <> pg_backend_pid()"
        )
        return int(self._connection.execute(query, {"names": self.databases}).scalar() or 0)

    def _run(self) -> None:
        try:
            while not self._stop.wait(self.interval_s):
                self.peak = max(self.peak or 0, self._count() - self._baseline)
        except Exception as error:
            print(f"[bench] connection sampling stopped: {error}", file=sys.stderr)


# -- one row --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RowPlan:
    workers: int
    train_seconds: float
    trials_per_worker: int
    iterations: int

    @property
    def trials_per_iteration(self) -> int:
        return max(1, math.ceil(self.workers * self.trials_per_worker / self.iterations))

    @property
    def planned(self) -> int:
        return self.iterations * self.trials_per_iteration

    @property
    def label(self) -> str:
        return f"n{self.workers}-s{self.train_seconds:g}"

    def timeout_s(self) -> float:
        """Generous: three times the row's training time per worker, plus start-up."""
        return 3 * self.trials_per_worker * self.train_seconds + 300 + 15 * self.workers


@dataclass
class Worker:
    process: subprocess.Popen[bytes]
    spawned_at: float
    log: Path


@dataclass
class RowResult:
    workers: int
    train_seconds: float
    planned: int
    complete: int
    wall_s: float
    startup_s: float
    phases_per_trial: dict[str, float]
    wait_per_trial: float
    cpu_per_trial: float
    cpu_by_phase: dict[str, float]
    duplicates: int
    reruns: int
    lost: int
    mlflow_finished: int | None
    jobs_timed: int
    peak_connections: int | None = None
    max_connections: int | None = None
    failures: list[str] = field(default_factory=list)
    untimed: list[str] = field(default_factory=list)

    @property
    def trials_per_hour(self) -> float:
        return 3600 * self.complete / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def trials_per_hour_after_startup(self) -> float:
        running = self.wall_s - self.startup_s
        return 3600 * self.complete / running if running > 0 else 0.0


def hydra_quote(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def worker_command(
    plan: RowPlan, loop_name: str, storage: str, tracking_uri: str, row_dir: Path
) -> list[str]:
    return [
        sys.executable,
        str(APP),
        "-m",
        "hydra/sweeper=evolver",
        f"runs_dir={hydra_quote(str(row_dir))}",
        f"loop.name={loop_name}",
        f"loop.storage={hydra_quote(storage)}",
        f"loop.iterations={plan.iterations}",
        f"loop.trials_per_iteration={plan.trials_per_iteration}",
        "loop.pruner=none",
        f"tracking.uri={hydra_quote(tracking_uri)}",
        f"bench.train_seconds={plan.train_seconds}",
    ]


def worker_environment(timings_dir: Path) -> dict[str, str]:
    env = {
        **os.environ,
        TIMINGS_ENV: str(timings_dir),
        "PYTHONPYCACHEPREFIX": str(BYTECODE_CACHE),
        "OMP_NUM_THREADS": "1",
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
        "GIT_PYTHON_REFRESH": "quiet",
    }
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def start_workers(command: Sequence[str], count: int, row_dir: Path) -> list[Worker]:
    env = worker_environment(row_dir / "timings")
    workers = []
    for index in range(count):
        log = row_dir / f"worker-{index}.log"
        with log.open("wb") as handle:
            spawned_at = time.time()
            process = subprocess.Popen(
                list(command), cwd=row_dir, env=env, stdout=handle, stderr=subprocess.STDOUT
            )
        workers.append(Worker(process, spawned_at, log))
    return workers


def wait_for(workers: list[Worker], timeout_s: float) -> list[str]:
    """Wait for every worker; returns one line per worker that failed or had to be stopped."""
    deadline = time.time() + timeout_s
    failures = []
    for index, worker in enumerate(workers):
        try:
            code = worker.process.wait(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            stop(worker.process)
            failures.append(f"worker {index} stopped after the {timeout_s:.0f} s timeout")
            continue
        if code != 0:
            tail = worker.log.read_text(errors="replace").strip().splitlines()[-1:] or [""]
            failures.append(f"worker {index} exited {code}: {tail[0][:200]} ({worker.log})")
    return failures


def stop(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def read_timings(folder: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(job records, worker records) the workers wrote."""
    jobs, workers = [], []
    for path in sorted(folder.glob("worker-*.jsonl")):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            (jobs if record["event"] == "job" else workers).append(record)
    return jobs, workers


def configuration(trial: Any) -> tuple[str, ...] | None:
    """What a trial trained with: its Hydra overrides, once a worker prepared it."""
    overrides = trial.user_attrs.get("overrides")
    if overrides is None:
        return None
    return tuple(sorted(overrides))


def trial_counts(storage: str, loop_name: str, jobs: list[dict[str, Any]]) -> dict[str, int]:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=loop_name, storage=storage)
    trials = study.get_trials(deepcopy=False)
    configurations = [c for c in map(configuration, trials) if c is not None]
    runs = Counter(job["trial"] for job in jobs)
    return {
        "complete": sum(t.state.name == "COMPLETE" for t in trials),
        "duplicates": len(configurations) - len(set(configurations)),
        "reruns": sum(count - 1 for count in runs.values()),
    }


def mlflow_finished_trials(tracking_uri: str, experiment: str) -> int | None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return None
    runs = client.search_runs(
        [found.experiment_id],
        filter_string="tags.run_type = 'trial' AND attributes.status = 'FINISHED'",
        max_results=10000,
    )
    return len(runs)


def summarize(
    plan: RowPlan,
    workers: list[Worker],
    wall_s: float,
    counts: dict[str, int],
    timings: tuple[list[dict[str, Any]], list[dict[str, Any]]],
) -> RowResult:
    jobs, records = timings
    spawned = {worker.process.pid: worker.spawned_at for worker in workers}
    phases: Counter[str] = Counter()
    cpu_phases: Counter[str] = Counter()
    startups, waits, cpu, untimed = [], 0.0, 0.0, set()
    for record in records:
        main, background = record["phases"]["main"], record["phases"]["background"]
        phases.update(main)
        phases.update(background)
        cpu_phases.update(record["phases"]["cpu"])
        cpu_phases["start-up"] += record["startup_cpu_s"] or 0.0
        cpu += record["cpu_s"]
        untimed.update(record["untimed"])
        if record["runner_start"] is None:
            continue
        startups.append(record["runner_start"] - spawned.get(record["pid"], record["started_at"]))
        if record["runner_end"] is not None:
            waits += record["runner_end"] - record["runner_start"] - sum(main.values())
    complete = counts["complete"]
    per_trial = max(complete, 1)
    return RowResult(
        workers=plan.workers,
        train_seconds=plan.train_seconds,
        planned=plan.planned,
        complete=complete,
        wall_s=wall_s,
        startup_s=max(startups, default=math.nan),
        phases_per_trial={name: phases[name] / per_trial for name in (*COORDINATION, TRAINING)},
        wait_per_trial=waits / per_trial,
        cpu_per_trial=cpu / per_trial,
        cpu_by_phase={
            **{name: cpu_phases[name] / per_trial for name in ("start-up", *COORDINATION)},
            "other": (cpu - sum(cpu_phases.values())) / per_trial,
        },
        duplicates=counts["duplicates"],
        reruns=counts["reruns"],
        lost=max(0, plan.planned - complete),
        mlflow_finished=None,
        jobs_timed=len(jobs),
        untimed=sorted(untimed),
    )


def run_row(
    plan: RowPlan, storage: str, tracking_uri: str, row_dir: Path, extra: Sequence[str]
) -> RowResult:
    loop_name = f"workers-{plan.label}-{uuid.uuid4().hex[:6]}"
    row_dir.mkdir(parents=True, exist_ok=True)
    command = [*worker_command(plan, loop_name, storage, tracking_uri, row_dir), *extra]
    with ConnectionPeak([storage, tracking_uri]) as connections:
        workers = start_workers(command, plan.workers, row_dir)
        first = min(worker.spawned_at for worker in workers)
        failures = wait_for(workers, plan.timeout_s())
        wall_s = time.time() - first
    timings = read_timings(row_dir / "timings")
    counts = trial_counts(storage, loop_name, timings[0])
    result = summarize(plan, workers, wall_s, counts, timings)
    result.failures = failures
    result.mlflow_finished = mlflow_finished_trials(tracking_uri, loop_name)
    result.peak_connections = connections.peak
    result.max_connections = connections.limit
    return result


def warm_up(args: argparse.Namespace, tracking_uri: str, runs_dir: Path) -> None:
    """One single-trial loop first, so that every row finds the workers' bytecode compiled."""
    plan = RowPlan(workers=1, train_seconds=0.0, trials_per_worker=1, iterations=1)
    print("[bench] warm-up: one worker, one trial", file=sys.stderr, flush=True)
    with loop_storage(args) as storage:
        result = run_row(plan, storage, tracking_uri, runs_dir / "warm-up", args.override)
    if result.failures or result.lost:
        raise SystemExit(f"workers benchmark: the warm-up loop failed: {result.failures}")


# -- the table ------------------------------------------------------------------------------------
def seconds(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.2f}"


def scaling(rate: float, workers: int, reference_rate: float | None) -> str:
    """`rate` against `workers` times one worker's rate."""
    if not reference_rate:
        return "-"
    return f"{rate / (workers * reference_rate):.2f}"


def table_row(result: RowResult, reference: RowResult | None) -> list[str]:
    one = reference.trials_per_hour if reference else None
    one_after = reference.trials_per_hour_after_startup if reference else None
    phases = result.phases_per_trial
    return [
        str(result.workers),
        str(result.complete),
        f"{result.wall_s:.1f}",
        f"{result.trials_per_hour:.0f}",
        scaling(result.trials_per_hour, result.workers, one),
        scaling(result.trials_per_hour_after_startup, result.workers, one_after),
        f"{result.startup_s:.1f}",
        *(seconds(phases[name]) for name in COORDINATION),
        seconds(result.wait_per_trial),
        seconds(result.cpu_per_trial),
        "-" if result.peak_connections is None else str(result.peak_connections),
        str(result.duplicates),
        str(result.reruns),
        str(result.lost),
    ]


def markdown(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def markdown_table(results: Sequence[RowResult]) -> str:
    reference = next((r for r in results if r.workers == 1), None)
    return markdown(COLUMNS, [table_row(r, reference) for r in results])


def cpu_table(results: Sequence[RowResult]) -> str:
    """CPU seconds per trial of the workers' processes, by phase (PostgreSQL's not included)."""
    names = ("start-up", *COORDINATION, "other")
    columns = ["N", "CPU s/trial", *(f"{name}" for name in names)]
    rows = [
        [str(r.workers), seconds(r.cpu_per_trial), *(seconds(r.cpu_by_phase[n]) for n in names)]
        for r in results
    ]
    return markdown(columns, rows)


def cpu_bound_workers(reference: RowResult, cores: int) -> float | None:
    """Workers whose own CPU use fills `cores`, from one worker's row: each worker burns its
    CPU seconds per trial (start-up left out) once per simulated training time plus those
    seconds. Machine load does not enter, unlike a wall-clock estimate."""
    steady_cpu = reference.cpu_per_trial - reference.cpu_by_phase["start-up"]
    if steady_cpu <= 0:
        return None
    return cores * (reference.train_seconds + steady_cpu) / steady_cpu


def checks(results: Sequence[RowResult]) -> list[str]:
    """Lines about anything that makes a row's numbers doubtful."""
    lines = []
    for result in results:
        where = f"N={result.workers}, {result.train_seconds:g} s"
        lines += [f"{where}: {failure}" for failure in result.failures]
        if result.mlflow_finished != result.complete:
            lines.append(
                f"{where}: {result.mlflow_finished} MLflow trial run(s) FINISHED "
                f"for {result.complete} complete trial(s)"
            )
        if result.jobs_timed < result.complete:
            lines.append(
                f"{where}: timings of {result.jobs_timed} job(s) for {result.complete} complete "
                "trial(s)"
            )
        if result.untimed:
            lines.append(f"{where}: not timed (seams missing): {', '.join(result.untimed)}")
    return lines


def print_section(train_seconds: float, plan: RowPlan, results: Sequence[RowResult]) -> None:
    print(
        f"\n### Simulated training {train_seconds:g} s per trial "
        f"({plan.trials_per_worker} trials per worker: {plan.iterations} iterations of "
        f"N x {plan.trials_per_worker}/{plan.iterations} trials)\n"
    )
    print(markdown_table(results))
    limits = {r.max_connections for r in results if r.max_connections}
    if limits:
        print(f"\nPostgreSQL max_connections: {', '.join(map(str, sorted(limits)))}")
    print("\nCPU seconds per trial of the worker processes, by phase:\n")
    print(cpu_table(results))
    reference = next((r for r in results if r.workers == 1), None)
    cores = os.cpu_count() or 1
    limit = cpu_bound_workers(reference, cores) if reference else None
    if limit is not None:
        print(
            f"\nCPU-bound limit from N=1: the workers alone fill this machine's {cores} core(s) "
            f"at about N = {limit:.1f} (PostgreSQL's own CPU comes on top)."
        )
    for line in checks(results):
        print(f"\n- {line}")
    sys.stdout.flush()


# -- command line ---------------------------------------------------------------------------------
def numbers(text: str, kind: type) -> list[Any]:
    try:
        values = [kind(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {text!r}"
        ) from None
    if not values or any(value <= 0 for value in values):
        raise argparse.ArgumentTypeError(f"expected positive numbers, got {text!r}")
    return values


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=lambda t: numbers(t, int), default=[1, 2, 4, 8, 16])
    parser.add_argument(
        "--sleep",
        type=lambda t: numbers(t, float),
        default=[10.0, 60.0],
        help="simulated training seconds per trial (comma-separated)",
    )
    parser.add_argument("--trials-per-worker", type=int, default=3)
    parser.add_argument(
        "--iterations",
        type=int,
        default=3,
        help="loop iterations per row; with trials-per-worker a multiple of it, every iteration"
        " has a multiple of N trials and no worker idles at its barrier",
    )
    parser.add_argument(
        "--storage", help="Optuna storage URL (default: a fresh PostgreSQL database per row)"
    )
    parser.add_argument(
        "--tracking-uri",
        help="MLflow store (default: a fresh PostgreSQL database; with --storage, a SQLite file)",
    )
    parser.add_argument("--admin-dsn", default=ADMIN_DSN, help="PostgreSQL to create databases on")
    parser.add_argument("--runs-dir", type=Path, help="where rows run (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the runs directory")
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    parser.add_argument(
        "--override", action="append", default=[], help="extra Hydra override for the workers"
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: N=1,2, 2 s trials")
    args = parser.parse_args(argv)
    if args.quick:
        args.workers, args.sleep = [1, 2], [2.0]
        args.trials_per_worker, args.iterations = 2, 2
    if args.trials_per_worker < 1 or args.iterations < 1:
        parser.error("--trials-per-worker and --iterations must be >= 1")
    return args


@contextlib.contextmanager
def tracking_store(args: argparse.Namespace, runs_dir: Path) -> Iterator[str]:
    if args.tracking_uri:
        yield args.tracking_uri
    elif args.storage:
        yield f"sqlite:///{runs_dir / 'mlflow.db'}"
    else:
        with fresh_database(args.admin_dsn, "evolver_bench_mlflow") as url:
            yield url


@contextlib.contextmanager
def loop_storage(args: argparse.Namespace) -> Iterator[str]:
    if args.storage:
        yield args.storage
    else:
        with fresh_database(args.admin_dsn, "evolver_bench_workers") as url:
            yield url


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    runs_dir = args.runs_dir or Path(tempfile.mkdtemp(prefix="evolver-bench-workers-"))
    runs_dir = runs_dir.resolve()
    runs_dir.mkdir(parents=True, exist_ok=True)
    results: list[RowResult] = []
    try:
        with tracking_store(args, runs_dir) as tracking_uri:
            create_mlflow_store(tracking_uri)
            if not args.quick:
                warm_up(args, tracking_uri, runs_dir)
            for train_seconds in args.sleep:
                section = []
                for count in args.workers:
                    plan = RowPlan(count, train_seconds, args.trials_per_worker, args.iterations)
                    print(
                        f"[bench] N={count}, {train_seconds:g} s trials: {plan.planned} trials "
                        f"({plan.iterations} x {plan.trials_per_iteration})",
                        file=sys.stderr,
                        flush=True,
                    )
                    with loop_storage(args) as storage:
                        result = run_row(
                            plan, storage, tracking_uri, runs_dir / plan.label, args.override
                        )
                    print(
                        f"[bench] N={count}: {result.complete}/{plan.planned} complete "
                        f"in {result.wall_s:.1f} s",
                        file=sys.stderr,
                        flush=True,
                    )
                    section.append(result)
                results += section
                print_section(train_seconds, plan, section)
    finally:
        if args.json:
            args.json.write_text(json.dumps([asdict(r) for r in results], indent=2) + "\n")
        failed = any(r.failures for r in results)
        if args.keep or args.runs_dir or failed:
            print(f"\nRuns directory: {runs_dir}", file=sys.stderr)
        else:
            shutil.rmtree(runs_dir, ignore_errors=True)
    return 1 if any(r.failures or r.lost or r.duplicates or r.reruns for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
