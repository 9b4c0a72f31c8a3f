"""`evolver ui`: serves the loop's runs table (and optuna-dashboard), stops cleanly on Ctrl-C."""

from __future__ import annotations

import re
import socket
import subprocess
from pathlib import Path

import pytest
from process_support import answers
from tracking_support import simulate_loop, tracking_cfg
from ui_support import EVOLVER, start_ui


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


@pytest.mark.slow
def test_ui_prints_the_loop_runs_table_and_ctrl_c_stops_both_servers(tmp_path: Path) -> None:
    runs_dir = tmp_path / "runs"
    simulate_loop(tracking_cfg(runs_dir), tmp_path, iterations=1, trials=1)
    ui_port, dashboard_port = free_ports(2)
    ui = start_ui(
        [
            "--runs-dir",
            str(runs_dir),
            "loop.name=demo",
            "--port",
            str(ui_port),
            "--dashboard",
            "--dashboard-port",
            str(dashboard_port),
        ],
        cwd=tmp_path,
    )
    try:
        line = ui.wait_for_line("MLflow runs table: ")
        url = line.split(": ", 1)[1]
        assert re.fullmatch(
            rf"http://127\.0\.0\.1:{ui_port}/#/experiments/\d+/runs\?workflowType=machine_learning",
            url,
        ), url
        assert ui.wait_for_line("optuna-dashboard: ").endswith(
            f"127.0.0.1:{dashboard_port}/dashboard/"
        )
        assert answers(f"http://127.0.0.1:{ui_port}/health")
        assert answers(f"http://127.0.0.1:{dashboard_port}/api/meta")
    finally:
        exit_code = ui.interrupt()
    assert exit_code == 0
    assert not answers(f"http://127.0.0.1:{ui_port}/health")
    assert not answers(f"http://127.0.0.1:{dashboard_port}/api/meta")
    assert (runs_dir / "logs" / "mlflow-ui.log").is_file()


def run_ui(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [EVOLVER, "ui", *args], cwd=cwd, capture_output=True, text=True, timeout=120
    )


def test_ui_refuses_a_port_in_use_with_one_line(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_ui(["--runs-dir", str(tmp_path), "--port", str(port)], tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == f"evolver ui: error: --port: 127.0.0.1:{port} is already in use"


def test_ui_reports_an_unreachable_tracking_server(tmp_path: Path, free_port: int) -> None:
    result = run_ui([f"tracking.uri=http://127.0.0.1:{free_port}"], tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().startswith("evolver ui: error: tracking.uri: cannot reach")
    assert len(result.stderr.strip().splitlines()) == 1


def test_ui_rejects_stray_arguments(tmp_path: Path) -> None:
    result = run_ui(["--runs-dir", str(tmp_path), "oops"], tmp_path)
    assert result.returncode == 2
    assert "unrecognized arguments: oops" in result.stderr
