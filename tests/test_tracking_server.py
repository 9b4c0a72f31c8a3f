"""The same loop structure through a real `mlflow server` process, artifacts proxied by it."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from tracking_support import assert_loop_structure, run_tiny_loop, tracking_cfg

from evolver.errors import ConfigError
from evolver.tracking import make_tracker
from evolver.tracking.server import ServerProcess, start_mlflow_server

pytestmark = pytest.mark.slow


def start_server(server_dir: Path) -> ServerProcess:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return start_mlflow_server(
        f"sqlite:///{server_dir / 'mlflow.db'}",
        port,
        artifacts_destination=str(server_dir / "artifacts"),
        log_path=server_dir / "server.log",
    )


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A shared tracking server (SQLite backend, proxied artifacts) in its own folder."""
    server = start_server(tmp_path_factory.mktemp("server"))
    try:
        yield server
    finally:
        server.stop()
        assert not server.running()


def test_loop_logs_the_same_structure_through_a_tracking_server(
    tmp_path: Path, mlflow_server: ServerProcess
) -> None:
    runs_dir = tmp_path / "runs"
    runs_dir.mkdir()
    run_tiny_loop(runs_dir, f"tracking.uri={mlflow_server.url}")
    assert_loop_structure(mlflow_server.url, "demo", {1: 2})
    # Artifacts went through the server's proxy into its own folder, not the client's runs_dir.
    server_dir = Path(mlflow_server.log_path).parent
    stored = list((server_dir / "artifacts").rglob("summary.json"))
    assert len(stored) == 2
    assert not (runs_dir / "mlartifacts").exists()
    assert not (runs_dir / "mlflow.db").exists()


def test_server_that_stops_is_detected_by_the_next_preflight(tmp_path: Path) -> None:
    server = start_server(tmp_path / "server")
    try:
        cfg = tracking_cfg(tmp_path / "runs", uri=server.url)
        make_tracker(cfg, tmp_path / "first").preflight()
    finally:
        server.stop()
    with pytest.raises(ConfigError, match=r"^tracking\.uri: cannot reach"):
        make_tracker(cfg, tmp_path / "second").preflight()


def test_server_runs_without_the_job_runner(mlflow_server: ServerProcess) -> None:
    environ = Path(f"/proc/{mlflow_server.process.pid}/environ").read_bytes().split(b"\0")
    assert b"MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false" in environ
    group = [
        p for p in os.listdir("/proc") if p.isdigit() and _pgid(int(p)) == mlflow_server.process.pid
    ]
    assert len(group) <= 4, group  # server, one uvicorn worker and helpers; no job runner pool


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None
