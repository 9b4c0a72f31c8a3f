"""Credentials in URLs never leave the process: not in output, files, MLflow records or errors.

The end-to-end test runs `evolver loop` against a private PostgreSQL server that refuses
connections without the password, so the loop completing proves that every connection (the
sweeper's, and its jobs' in joblib worker processes) got the password back, while the grep proves
that nothing written or logged holds it.
"""

from __future__ import annotations

import base64
import glob
import http.server
import io
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
from omegaconf import OmegaConf
from training_support import tiny

from evolver.errors import ConfigError
from evolver.secrets import (
    MLFLOW_PASSWORD_ENV,
    MLFLOW_USERNAME_ENV,
    PASSWORDS_ENV,
    RedactingStream,
    http_address,
    install_log_redaction,
    password_for,
    redact,
    redact_text,
    sanitize_config,
    strip_password,
    strip_passwords,
)
from evolver.tracking.store import check_reachable
from hydra_plugins.evolver_sweeper.evolver_sweeper import overrides_without_passwords

EVOLVER = Path(sys.executable).parent / "evolver"
PLANTED = "pl4nted-S3cret"
SERVER_USER = "evolver"


@pytest.fixture(autouse=True)
def own_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts with no kept credentials, and what it keeps is dropped afterwards."""
    for name in (PASSWORDS_ENV, MLFLOW_USERNAME_ENV, MLFLOW_PASSWORD_ENV, "PGPASSWORD"):
        monkeypatch.setenv(name, "")  # recorded, so that teardown restores the original state
        monkeypatch.delenv(name)


# -- the functions ------------------------------------------------------------------------------
def test_a_database_password_is_taken_out_and_kept_for_its_server() -> None:
    url = f"postgresql+psycopg2://bob:{quote('p@ss' + PLANTED)}@DB.example:5433/loops"
    assert strip_password(url) == "postgresql+psycopg2://bob@DB.example:5433/loops"
    assert password_for("db.example", 5433, "bob") == "p@ss" + PLANTED
    assert password_for("db.example", 5432, "bob") is None
    assert password_for("db.example", 5433, "alice") is None
    # A socket folder in the query instead of a host: the user's only password.
    assert password_for("/var/run/postgresql", None, "bob") == "p@ss" + PLANTED
    assert (
        strip_password(url.replace("DB.example:5433", "h")) == "postgresql+psycopg2://bob@h/loops"
    )
    assert strip_password("sqlite:////tmp/optuna.db") == "sqlite:////tmp/optuna.db"
    query = f"postgresql://bob@h/db?sslmode=require&password={PLANTED}"
    assert strip_password(query) == "postgresql://bob@h/db?sslmode=require"
    assert PLANTED not in os.environ.get(MLFLOW_PASSWORD_ENV, "")


def test_http_credentials_move_to_mlflow_variables() -> None:
    assert strip_password(f"http://alice:{PLANTED}@mlflow.example:5000/") == (
        "http://mlflow.example:5000/"
    )
    assert os.environ[MLFLOW_USERNAME_ENV] == "alice"
    assert os.environ[MLFLOW_PASSWORD_ENV] == PLANTED
    address, headers = http_address("http://mlflow.example:5000/")
    assert address == "http://mlflow.example:5000/"
    assert base64.b64decode(headers["Authorization"].split()[1]).decode() == f"alice:{PLANTED}"


def test_redaction_masks_url_passwords_and_every_kept_secret() -> None:
    assert redact(f"postgresql://u:{PLANTED}@h/db") == "postgresql://u:***@h/db"
    assert redact(f"http://u:{PLANTED}@h:1/x") == "http://u:***@h:1/x"
    assert redact(f"postgresql://u@h/db?password={PLANTED}") == "postgresql://u@h/db?password=***"
    assert redact("postgresql://u@h/db") == "postgresql://u@h/db"
    strip_password(f"postgresql://u:{quote('a/b' + PLANTED, safe='')}@h/db")
    text = f"failed: a/b{PLANTED} or {quote('a/b' + PLANTED, safe='')} at mysql://x:other1@h/d"
    assert redact_text(text) == "failed: *** or *** at mysql://x:***@h/d"


def test_overrides_lose_their_passwords_and_config_values_get_one() -> None:
    line = f"loop.storage='postgresql://u:{PLANTED}@h:5432/db'"
    assert strip_passwords(line) == "loop.storage='postgresql://u@h:5432/db'"
    cleaned = {"tracking.uri": "postgresql://u@h/mlflow", "loop.storage": "postgresql://u@h/db"}
    assert overrides_without_passwords([line, "seed=3"], cleaned) == [
        "loop.storage='postgresql://u@h:5432/db'",
        "seed=3",
        "tracking.uri='postgresql://u@h/mlflow'",
    ]


def test_sanitize_config_cleans_values_interpolations_and_hydra_overrides(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("EVOLVER_TEST_DB", f"postgresql://u:{PLANTED}@h/mlflow")
    cfg = OmegaConf.create(
        {
            "loop": {"storage": f"postgresql://u:{PLANTED}@h/optuna", "name": "x"},
            "tracking": {"uri": "${oc.env:EVOLVER_TEST_DB}", "enabled": True},
            "hosts": [f"http://a:{PLANTED}@web:80"],
            "missing": "???",
            "hydra": {"overrides": {"task": [f"loop.storage=postgresql://u:{PLANTED}@h/optuna"]}},
        }
    )
    OmegaConf.set_readonly(cfg, True)
    changed = sanitize_config(cfg)
    assert changed == {
        "loop.storage": "postgresql://u@h/optuna",
        "tracking.uri": "postgresql://u@h/mlflow",
        "hosts.0": "http://web:80",
    }
    assert PLANTED not in OmegaConf.to_yaml(cfg)
    assert cfg.hydra.overrides.task == ["loop.storage=postgresql://u@h/optuna"]
    assert password_for("h", None, "u") == PLANTED


def test_log_records_and_output_streams_are_redacted(tmp_path: Path) -> None:
    strip_password(f"postgresql://u:{PLANTED}@h/db")
    install_log_redaction()
    handler = logging.FileHandler(tmp_path / "app.log")
    logger = logging.getLogger("evolver.test_secrets")
    logger.addHandler(handler)
    try:
        logger.warning("connecting to %s", f"postgresql://u:{PLANTED}@h/db")
        try:
            raise RuntimeError(f"server said {PLANTED}")
        except RuntimeError:
            logger.exception("failed")
    finally:
        logger.removeHandler(handler)
        handler.close()
    written = (tmp_path / "app.log").read_text()
    assert "connecting to postgresql://u:***@h/db" in written and "server said ***" in written
    assert PLANTED not in written
    buffer = io.StringIO()
    RedactingStream(buffer).write(f"job line: loop.storage={PLANTED}\n")
    assert buffer.getvalue() == "job line: loop.storage=***\n"


class _BasicAuthHealth(http.server.BaseHTTPRequestHandler):
    expected = "Basic " + base64.b64encode(f"alice:{PLANTED}".encode()).decode()

    def do_GET(self) -> None:
        ok = self.headers.get("Authorization") == self.expected
        self.send_response(200 if ok else 401)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        return None


@pytest.fixture
def basic_auth_server() -> Iterator[int]:
    server = http.server.HTTPServer(("127.0.0.1", 0), _BasicAuthHealth)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()


def test_check_http_sends_credentials_as_a_header_and_never_shows_them(
    basic_auth_server: int, free_port: int
) -> None:
    check_reachable(f"http://alice:{PLANTED}@127.0.0.1:{basic_auth_server}", timeout_s=5)
    with pytest.raises(ConfigError) as refused:
        check_reachable(f"http://alice:wrong-{PLANTED}@127.0.0.1:{basic_auth_server}", 5)
    assert "HTTP 401" in str(refused.value)
    with pytest.raises(ConfigError) as unreachable:
        check_reachable(f"http://alice:{PLANTED}@127.0.0.1:{free_port}", timeout_s=2)
    for error in (refused.value, unreachable.value):
        assert PLANTED not in str(error) and "alice:***@127.0.0.1" in str(error)
    # A stripped URL reaches the server with the credentials kept in the MLflow variables.
    check_reachable(strip_password(f"http://alice:{PLANTED}@127.0.0.1:{basic_auth_server}"), 5)


# -- a whole loop -------------------------------------------------------------------------------
def _postgres_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


@pytest.fixture
def password_postgres(free_port: int) -> Iterator[int]:
    """A private PostgreSQL server that accepts user `evolver` with PLANTED only; its port."""
    bin_dir = _postgres_bin()
    if bin_dir is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) are not installed")
    # Outside pytest's temporary folders, which only their owner may enter.
    root = Path(tempfile.mkdtemp(prefix="evolver-password-postgres-"))
    # The server refuses to run as root: run it as the `postgres` system user then.
    as_owner: list[str] = []
    if os.geteuid() == 0:
        if shutil.which("runuser") is None:
            pytest.skip("running as root without runuser to start PostgreSQL")
        shutil.chown(root, "postgres")
        as_owner = ["runuser", "-u", "postgres", "--"]
    (root / "pw").write_text(PLANTED + "\n")
    data = root / "data"
    subprocess.run(
        [*as_owner, str(bin_dir / "initdb"), "-D", str(data), "-U", SERVER_USER,
         "--auth=scram-sha-256", f"--pwfile={root / 'pw'}", "--no-sync", "-E", "UTF8"],
        check=True, capture_output=True,
    )  # fmt: skip
    options = f"-p {free_port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off"
    pg_ctl = [*as_owner, str(bin_dir / "pg_ctl"), "-D", str(data)]
    subprocess.run(
        [*pg_ctl, "-o", options, "-l", str(root / "server.log"), "-w", "start"],
        check=True, capture_output=True,
    )  # fmt: skip
    try:
        import psycopg2

        admin = psycopg2.connect(
            host="127.0.0.1", port=free_port, user=SERVER_USER, password=PLANTED, dbname="postgres"
        )
        admin.autocommit = True
        with admin.cursor() as cursor:
            cursor.execute("CREATE DATABASE optuna")
            cursor.execute("CREATE DATABASE mlflow")
        admin.close()
        yield free_port
    finally:
        subprocess.run([*pg_ctl, "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def _database(port: int, name: str, password: str | None = PLANTED) -> str:
    secret = f":{password}" if password else ""
    return f"postgresql+psycopg2://{SERVER_USER}{secret}@127.0.0.1:{port}/{name}"


def _hits(data: bytes) -> bool:
    return any(form.encode() in data for form in (PLANTED, quote(PLANTED, safe="")))


def _mlflow_records(uri: str) -> tuple[str, int, set[str]]:
    """Every experiment tag, run param, tag and artifact of the store, as one JSON text; the
    number of runs; the artifact paths of the trial runs."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    records: list[object] = []
    runs = 0
    trial_artifacts: set[str] = set()
    for experiment in client.search_experiments():
        records.append(experiment.tags)
        for run in client.search_runs([experiment.experiment_id]):
            runs += 1
            records += [run.data.params, run.data.tags]
            folders, paths = [""], []
            while folders:
                for item in client.list_artifacts(run.info.run_id, folders.pop() or None):
                    (folders if item.is_dir else paths).append(item.path)
            for path in paths:
                local = client.download_artifacts(run.info.run_id, path)
                records.append(Path(local).read_bytes().decode("utf-8", "replace"))
            if run.data.tags.get("run_type") == "trial":
                trial_artifacts.update(paths)
    return json.dumps(records, default=str), runs, trial_artifacts


@pytest.mark.slow
def test_a_loop_with_passwords_in_its_urls_writes_and_logs_none(
    tmp_path: Path, password_postgres: int
) -> None:
    runs_dir = tmp_path / "runs"
    port = password_postgres
    overrides = tiny(
        "finetune.phase2_epochs=1",
        "data.limit=160",
        "loop.name=secret",
        "loop.iterations=1",
        "loop.trials_per_iteration=1",
        # The job runs in a worker process: it gets the passwords through the environment.
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=1",
        f"loop.storage={_database(port, 'optuna')}",
        "tracking.enabled=true",
        f"tracking.uri={_database(port, 'mlflow')}",
        f"runs_dir={runs_dir}",
    )
    # No other way to the password: no PGPASSWORD, no ~/.pgpass.
    env = {k: v for k, v in os.environ.items() if k not in ("PGPASSWORD", PASSWORDS_ENV)}
    env.update(PGPASSFILE=str(tmp_path / "no-pgpass"), COLUMNS="250")
    # Its own process group, so that a timeout also ends the launcher's worker processes.
    process = subprocess.Popen(
        [str(EVOLVER), "loop", *overrides], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, cwd=tmp_path, env=env, start_new_session=True,
    )  # fmt: skip
    try:
        stdout, stderr = process.communicate(timeout=600)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
    output = stdout + stderr
    assert process.returncode == 0, output[-4000:]

    # The loop completed, so every connection got its password; Optuna agrees.
    import optuna

    study = optuna.load_study(study_name="secret", storage=_database(port, "optuna"))
    assert [t.state.name for t in study.trials] == ["COMPLETE"]
    # The launcher's job line was printed, without the password.
    assert f"loop.storage='{_database(port, 'optuna', password=None)}'" in output
    assert not _hits(output.encode())

    written = [path for path in tmp_path.rglob("*") if path.is_file()]
    names = {path.name for path in written}
    assert {"config.yaml", "overrides.yaml", "hydra.yaml", "summary.json"} <= names
    assert [str(path) for path in written if _hits(path.read_bytes())] == []

    system_attrs = study._storage.get_study_system_attrs(study._study_id)
    optuna_records = json.dumps(
        [study.user_attrs, system_attrs]
        + [[t.params, t.user_attrs, t.system_attrs] for t in study.trials],
        default=str,
    )
    assert not _hits(optuna_records.encode())

    mlflow_text, runs, trial_artifacts = _mlflow_records(_database(port, "mlflow"))
    assert runs == 2  # iteration-1 and its trial
    assert "config.yaml" in trial_artifacts and "summary.json" in trial_artifacts
    assert _database(port, "optuna", password=None) in mlflow_text  # the loop.storage param
    assert not _hits(mlflow_text.encode())


def test_server_command_lines_carry_no_database_password() -> None:
    from evolver.secrets import command_without_passwords

    command = ["optuna-dashboard", "postgresql+psycopg2://u:pl4nted-pw@db:5432/x", "--port", "1"]
    cleaned, env = command_without_passwords(command)
    assert cleaned == ["optuna-dashboard", "postgresql+psycopg2://u@db:5432/x", "--port", "1"]
    assert env == {"PGPASSWORD": "pl4nted-pw"}
    # A second, different password cannot share PGPASSWORD: that URL is left as it is.
    other = "postgresql://v:other-pw@db2/y"
    cleaned, env = command_without_passwords([*command, other])
    assert cleaned[-1] == other and env == {"PGPASSWORD": "pl4nted-pw"}
