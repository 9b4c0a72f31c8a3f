"""Two loop workers ride out a restart of their PostgreSQL server mid-trial.

The test runs a private server (initdb + pg_ctl, its own port and data directory) so that it can
restart it at will; the workers run the fake loop app through the real sweeper.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest

pytestmark = pytest.mark.serial

APP = Path(__file__).parent / "loop_fake_app.py"
LOST = "lost the connection to"
BACK = "is back after an outage of"


class PrivatePostgres:
    """A PostgreSQL server in a temporary directory, run as the `postgres` user when root."""

    def __init__(self, bin_dir: Path, base: Path, port: int) -> None:
        self.bin_dir = bin_dir
        self.base = base
        self.port = port
        self.data = base / "data"
        self.dsn = f"postgresql://postgres@127.0.0.1:{port}/postgres"
        self.url = f"postgresql+psycopg2://postgres@127.0.0.1:{port}/postgres"

    def run(self, tool: str, *args: str) -> None:
        command = [str(self.bin_dir / tool), *args]
        if os.geteuid() == 0:  # initdb and postgres refuse to run as root
            command = ["runuser", "-u", "postgres", "--", *command]
        subprocess.run(command, check=True, capture_output=True, timeout=60)

    def init(self) -> None:
        self.run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync")

    def start(self) -> None:
        options = f"-p {self.port} -k {self.base} -c listen_addresses=127.0.0.1 -c fsync=off"
        log = str(self.base / "server.log")
        self.run("pg_ctl", "-D", str(self.data), "-o", options, "-l", log, "-w", "start")

    def stop(self, mode: str = "fast") -> None:
        self.run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")


def postgres_bin_dir() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    return Path(found[-1]).parent if found else None


@pytest.fixture
def private_postgres() -> Iterator[PrivatePostgres]:
    bin_dir = postgres_bin_dir()
    if bin_dir is None or not (bin_dir / "initdb").exists():
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not found in /usr/lib/postgresql")
    if os.geteuid() == 0 and (shutil.which("runuser") is None or not _user_exists("postgres")):
        pytest.skip("running as root needs runuser and a 'postgres' user for initdb")
    base = Path(tempfile.mkdtemp(prefix="evolver-pg-"))  # outside pytest's root-only tmp tree
    if os.geteuid() == 0:
        shutil.chown(base, user="postgres")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    server = PrivatePostgres(bin_dir, base, port)
    try:
        server.init()
        server.start()
        yield server
    finally:
        with contextlib.suppress(subprocess.SubprocessError, OSError):  # never started
            server.stop("immediate")
        shutil.rmtree(base, ignore_errors=True)


def _user_exists(name: str) -> bool:
    import pwd

    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def two_trials_run(server: PrivatePostgres, deadline: float) -> bool:
    """Both workers are past start-up and each runs a trial that has reported."""
    import psycopg2

    query = (
        "SELECT count(DISTINCT t.trial_id) FROM trials t "
        "JOIN trial_intermediate_values v ON v.trial_id = t.trial_id WHERE t.state = 'RUNNING'"
    )
    while time.time() < deadline:
        time.sleep(0.3)
        try:
            connection = psycopg2.connect(server.dsn)
            with contextlib.closing(connection), connection.cursor() as cursor:
                cursor.execute(query)
                (running,) = cursor.fetchone()
        except psycopg2.Error:  # no tables yet
            continue
        if running >= 2:
            return True
    return False


@pytest.mark.slow
@pytest.mark.postgres
def test_workers_ride_out_a_postgres_restart_mid_trial(
    tmp_path: Path, private_postgres: PrivatePostgres
) -> None:
    url = private_postgres.url
    overrides = [
        "loop.name=restart",
        f"loop.storage={url}",
        "loop.pruner=none",
        # Heartbeats go stale during the outage: the workers must not fail each other's trials.
        "loop.heartbeat_interval=1",
        "loop.grace_period=3",
        "loop.poll_interval=0.3",
        "loop.storage_retry_s=60",
        "fake.epoch_seconds=0.15",
    ]
    command = [sys.executable, str(APP), "-m", "hydra/sweeper=evolver", f"runs_dir={tmp_path}"]
    workers = [
        subprocess.Popen(
            [*command, *overrides],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        for _ in range(2)
    ]
    try:
        if not two_trials_run(private_postgres, time.time() + 120):
            for worker in workers:
                worker.kill()
            outputs = [worker.communicate()[0] for worker in workers]
            raise AssertionError(f"the two workers never ran trials at once: {outputs}")
        private_postgres.stop("fast")
        time.sleep(4)  # longer than the grace period: every heartbeat is stale when it is back
        private_postgres.start()
        outputs = [worker.communicate(timeout=90)[0] for worker in workers]
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait()

    assert [worker.returncode for worker in workers] == [0, 0], outputs
    study = optuna.load_study(study_name="restart", storage=url)
    trials = study.trials
    # Exactly the loop's trials, all complete: none lost, failed, retried or run twice.
    assert sorted(t.number for t in trials) == list(range(6))
    assert [t.state.name for t in trials] == ["COMPLETE"] * 6
    assert not any("failed_trial" in t.system_attrs for t in trials)
    sampled = [t.params for t in trials if not t.user_attrs.get("proposed_by")]
    assert len({tuple(sorted(params.items())) for params in sampled}) == len(sampled) >= 2
    folders = sorted((tmp_path / "loops" / "restart").glob("trial_*"))
    assert [folder.name for folder in folders] == sorted(f"trial_{n}" for n in range(6))
    assert all((folder / "summary.json").is_file() for folder in folders)
    # Each worker met the outage and logged it once: when it began and when it ended.
    for output in outputs:
        assert output.count(LOST) == 1, output
        assert output.count(BACK) == 1, output
