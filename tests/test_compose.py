"""docker-compose.yml's topology, run with real processes: its PostgreSQL databases (local server),
its `mlflow server` and optuna-dashboard commands, and two workers running its worker command on
one loop, one of them killed mid-trial and restarted as `restart: on-failure` does.

Only what a container network changes is rewritten: service host names become 127.0.0.1,
published ports become free ports, database names become fresh ones.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import REPO_ROOT, postgres_database
from process_support import OutputLines, answers
from sqlalchemy.engine import URL, make_url

from evolver.tracking.server import executable

pytestmark = pytest.mark.serial

COMPOSE = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
WORKERS = sorted(name for name in SERVICES if name.startswith("worker-"))
ENV_DIR = str(Path(sys.executable).parent)

# What a user puts in EVOLVER_ARGS, small enough for a test; short heartbeats so the killed
# worker's trial is handed on within seconds.
EVOLVER_ARGS = " ".join(
    [
        "model=tiny",
        "cv.folds=2",
        "finetune.phase1_epochs=1",
        "finetune.phase2_epochs=2",
        "data.limit=240",
        "data.num_workers=0",
        "loop.iterations=2",
        "loop.trials_per_iteration=3",
        "loop.pruner=none",
        "loop.race_sigmas=null",  # every trial runs both folds: the counts below stay exact
        "loop.baseline_first=false",  # ... and every trial of iteration 1 runs
        "loop.heartbeat_interval=1",
        "loop.grace_period=4",
        "loop.poll_interval=0.5",
        "diagnosis.plots=false",
        # Two workers, the MLflow server and PostgreSQL share 2 cores here: a slow answer must
        # not send an iteration's closing call to the outage buffer (tested on its own in
        # test_tracking_outage.py), where no later worker would replay it.
        "tracking.timeout_s=60",
    ]
)


def option(command: list[str], flag: str) -> str:
    return command[command.index(flag) + 1]


def with_option(command: list[str], flag: str, value: str) -> list[str]:
    index = command.index(flag) + 1
    return [*command[:index], value, *command[index + 1 :]]


def service_url(url: str) -> Any:
    parsed = make_url(url)
    assert parsed.host == "postgres", f"{url} does not point at the postgres service"
    return parsed


def local_database_url(compose_url: str, local_url: str) -> str:
    """The compose URL with the local server's host, user and database in place of its own."""
    local = make_url(local_url)
    moved = URL.create(
        service_url(compose_url).drivername, username=local.username, host=local.host,
        port=local.port, database=local.database,
    )  # fmt: skip
    return moved.render_as_string(hide_password=False)


def mlflow_url() -> str:
    return option(SERVICES["mlflow"]["command"], "--backend-store-uri")


def optuna_url() -> str:
    return SERVICES["worker-0"]["environment"]["OPTUNA_STORAGE"]


def test_compose_file_is_consistent() -> None:
    """What the process test cannot see: names that only mean something inside compose."""
    postgres = SERVICES["postgres"]["environment"]
    for url in (optuna_url(), mlflow_url(), SERVICES["dashboard"]["command"][-1]):
        parsed = service_url(url)
        # No password in a URL: each service that connects gets the server's one as PGPASSWORD.
        assert (parsed.username, parsed.password) == (postgres["POSTGRES_USER"], None)
    for name in ("mlflow", "dashboard", *WORKERS):
        assert SERVICES[name]["environment"]["PGPASSWORD"] == postgres["POSTGRES_PASSWORD"]
    assert make_url(optuna_url()).database == postgres["POSTGRES_DB"]
    assert SERVICES["dashboard"]["command"][-1] == optuna_url()
    init_sql = (REPO_ROOT / "docker" / "postgres-init.sql").read_text()
    assert f"CREATE DATABASE {make_url(mlflow_url()).database};" in init_sql
    # The workers reach the server by its service name, which its allowed hosts must accept.
    worker_uri = re.search(r"tracking\.uri=(\S+)", SERVICES["worker-0"]["command"][-1])
    assert worker_uri is not None
    netloc = worker_uri.group(1).split("://", 1)[1]
    allowed = option(SERVICES["mlflow"]["command"], "--allowed-hosts").split(",")
    assert netloc in allowed and netloc.split(":")[0] in allowed
    assert SERVICES["mlflow"]["environment"]["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    # Every worker runs the same command on its own GPU.
    assert len(WORKERS) >= 2
    commands = {json.dumps(SERVICES[name]["command"]) for name in WORKERS}
    assert len(commands) == 1
    devices = [
        SERVICES[name]["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"]
        for name in WORKERS
    ]
    assert len({tuple(ids) for ids in devices}) == len(WORKERS)
    assert all(SERVICES[name]["restart"] == "on-failure" for name in WORKERS)


def test_dockerfile_copies_every_package_folder() -> None:
    """The image installs the project from the folders pyproject.toml maps packages to."""
    import tomllib

    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    folders = {path.split("/")[0] for path in project["tool"]["setuptools"]["package-dir"].values()}
    copied = re.findall(r"^COPY (\S+) ", (REPO_ROOT / "Dockerfile").read_text(), re.MULTILINE)
    assert folders <= set(copied), folders - set(copied)


class Service(OutputLines):
    """One compose service as a local process group; a thread keeps its output lines."""

    def __init__(self, name: str, command: list[str], env: dict[str, str], cwd: Path) -> None:
        self.name = name
        process = subprocess.Popen(
            command,
            cwd=cwd,
            env={**os.environ, "PATH": f"{ENV_DIR}:{os.environ['PATH']}", **env},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        super().__init__(process)

    def wait_for(self, pattern: str, timeout_s: float) -> re.Match[str]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for line in list(self.lines):
                found = re.search(pattern, line)
                if found:
                    return found
            if self.process.poll() is not None:
                break
            time.sleep(0.2)
        raise AssertionError(f"{self.name}: no line matching {pattern!r}:\n{self.output()}")

    def wait(self, timeout_s: float) -> int:
        code = self.process.wait(timeout=timeout_s)
        self.join_reader()
        return code

    def output(self, last: int | None = 60) -> str:
        return "\n".join(self.lines[-last:] if last else self.lines)

    def wait_until_answers(self, url: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not answers(url):
            assert self.process.poll() is None, f"{self.name} exited:\n{self.output()}"
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name} did not answer at {url}:\n{self.output()}")
            time.sleep(0.5)

    def stop(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, sig)
            try:
                self.process.wait(timeout=15)
                return
            except subprocess.TimeoutExpired:
                continue


def fetch_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


@pytest.fixture
def databases() -> Any:
    with postgres_database("compose") as optuna, postgres_database("compose_ml") as mlflow:
        yield local_database_url(optuna_url(), optuna), local_database_url(mlflow_url(), mlflow)


@pytest.mark.slow
@pytest.mark.postgres
def test_compose_topology_with_real_processes(
    tmp_path: Path, databases: tuple[str, str], free_port: int
) -> None:
    optuna_storage, mlflow_backend = databases
    services: list[Service] = []
    try:
        # mlflow: its compose command and environment; backend, artifacts and port made local.
        spec = SERVICES["mlflow"]
        command = with_option(spec["command"], "--backend-store-uri", mlflow_backend)
        command = with_option(command, "--artifacts-destination", str(tmp_path / "mlartifacts"))
        command = with_option(command, "--host", "127.0.0.1")
        command = with_option(command, "--port", str(free_port))
        allowed = option(command, "--allowed-hosts") + f",127.0.0.1:{free_port}"
        command = with_option(command, "--allowed-hosts", allowed)
        command[0] = executable(command[0])
        mlflow = Service("mlflow", command, spec["environment"], tmp_path)
        services.append(mlflow)
        tracking_url = f"http://127.0.0.1:{free_port}"
        mlflow.wait_until_answers(f"{tracking_url}/health", 180)

        # dashboard: the same, on the Optuna database.
        dashboard_port = _another_free_port(free_port)
        command = list(SERVICES["dashboard"]["command"])
        command = with_option(command, "--host", "127.0.0.1")
        command = with_option(command, "--port", str(dashboard_port))
        command[-1] = optuna_storage
        dashboard = Service("dashboard", command, {}, tmp_path)
        services.append(dashboard)

        # Workers: the shared command, $$ unescaped and the mlflow service name resolved as
        # compose's network would; one working directory stands for the shared runs volume.
        app_dir = tmp_path / "app"
        app_dir.mkdir()
        worker_command = [
            part.replace("$$", "$").replace("http://mlflow:5000", tracking_url)
            for part in SERVICES["worker-0"]["command"]
        ]
        env = {
            "LOOP_NAME": "compose",
            "OPTUNA_STORAGE": optuna_storage,
            "EVOLVER_ARGS": EVOLVER_ARGS,
            "PYTHONUNBUFFERED": "1",
        }

        def start_worker(name: str) -> Service:
            worker = Service(name, worker_command, env, app_dir)
            services.append(worker)
            return worker

        workers = {name: start_worker(name) for name in WORKERS[:2]}
        # worker-1 dies mid-trial (SIGKILL: no clean-up at all); compose restarts it.
        victim = workers[WORKERS[1]]
        started = victim.wait_for(r"trial (\d+) \(.*\) started", 300)
        killed_number = int(started.group(1))
        victim.wait_for(r"fold 1/2\s+epoch 1/", 120)  # its MLflow run is logging by now
        os.killpg(victim.process.pid, signal.SIGKILL)
        assert victim.wait(30) == -signal.SIGKILL
        workers[WORKERS[1]] = start_worker(f"{WORKERS[1]} (restarted)")

        codes = {name: worker.wait(600) for name, worker in workers.items()}
        assert codes == dict.fromkeys(workers, 0), {n: w.output() for n, w in workers.items()}

        import optuna

        study = optuna.load_study(study_name="compose", storage=optuna_storage)
        numbers = [t.number for t in study.trials]
        assert len(numbers) == len(set(numbers))
        complete = [t for t in study.trials if t.state.name == "COMPLETE"]
        assert len(complete) == 6
        killed = next(t for t in study.trials if t.number == killed_number)
        assert killed.state.name == "FAIL"
        retried = [t for t in complete if t.system_attrs.get("failed_trial") == killed_number]
        assert len(retried) == 1
        # Both workers (the restarted one included) ran trials.
        for worker in workers.values():
            assert re.search(r"trial \d+ -> ", worker.output(last=None)), worker.output()

        _assert_mlflow_holds_the_loop(tracking_url, complete, killed_number, tmp_path)

        # The dashboard reads the same study from the same database.
        dashboard.wait_until_answers(f"http://127.0.0.1:{dashboard_port}/api/meta", 60)
        studies = fetch_json(f"http://127.0.0.1:{dashboard_port}/api/studies")["study_summaries"]
        assert [s["study_name"] for s in studies] == ["compose"]
    finally:
        for service in reversed(services):
            service.stop()


def _assert_mlflow_holds_the_loop(
    tracking_url: str, complete: list[Any], killed_number: int, tmp_path: Path
) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_url)
    experiment = client.get_experiment_by_name("compose")
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    iterations = {r.info.run_name: r for r in runs if r.data.tags.get("run_type") == "iteration"}
    assert sorted(iterations) == ["iteration-1", "iteration-2"]
    assert all(run.info.status == "FINISHED" for run in iterations.values()), {
        name: (run.info.status, run.data.tags.get("state"), sorted(run.data.metrics))
        for name, run in iterations.items()
    }
    trial_runs = [r for r in runs if r.data.tags.get("run_type") == "trial"]
    finished = sorted(int(r.data.tags["trial"]) for r in trial_runs if r.info.status == "FINISHED")
    assert finished == sorted(t.number for t in complete)
    # The killed trial's run was left RUNNING by the dead worker and closed on the restart.
    killed = [r for r in trial_runs if r.data.tags["trial"] == str(killed_number)]
    assert [r.info.status for r in killed] == ["KILLED"]
    assert killed[0].data.tags["state"] == "killed"
    parent_ids = {run.info.run_id for run in iterations.values()}
    assert all(r.data.tags["mlflow.parentRunId"] in parent_ids for r in trial_runs)
    # Artifacts went through the server's proxy into its destination folder.
    stored = list((tmp_path / "mlartifacts").rglob("summary.json"))
    assert len(stored) >= len(complete)


def _another_free_port(taken: int) -> int:
    import socket

    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port != taken:
            return port
