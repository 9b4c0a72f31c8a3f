"""The workers benchmark's smoke mode: real loop workers on PostgreSQL give a complete table."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from conftest import POSTGRES_ADMIN_DSN, REPO_ROOT

BENCHMARK = REPO_ROOT / "benchmarks" / "workers.py"


def bench_databases() -> set[str]:
    """The benchmark's databases on the server (skips the test when there is no server)."""
    import psycopg2

    try:
        connection = psycopg2.connect(POSTGRES_ADMIN_DSN, connect_timeout=2)
    except psycopg2.OperationalError:
        pytest.skip("PostgreSQL is not running on 127.0.0.1:5432")
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT datname FROM pg_database WHERE datname LIKE 'evolver_bench_%'")
            return {name for (name,) in cursor.fetchall()}
    finally:
        connection.close()


def main_table(output: str) -> list[dict[str, str]]:
    """The rows of the first markdown table in `output`, as {column: cell}."""
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| N | trials |"))
    header = [cell.strip() for cell in lines[start].strip("|").split("|")]
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        rows.append(dict(zip(header, cells, strict=True)))
    return rows


@pytest.mark.slow
@pytest.mark.postgres
def test_quick_run_has_complete_rows_without_duplicates_or_lost_trials(tmp_path: Path) -> None:
    before = bench_databases()
    results_file = tmp_path / "results.json"
    command = [sys.executable, str(BENCHMARK), "--quick", "--admin-dsn", POSTGRES_ADMIN_DSN]
    # Compiled bytecode kept where the benchmark keeps its workers' (this script's imports too).
    env = {
        **os.environ,
        "PYTHONPYCACHEPREFIX": str(Path(tempfile.gettempdir()) / "evolver-bench-pycache"),
    }
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    result = subprocess.run(
        [*command, "--json", str(results_file)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env=env,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    rows = main_table(result.stdout)
    assert [row["N"] for row in rows] == ["1", "2"]
    assert [row["trials"] for row in rows] == ["2", "4"]
    for row in rows:
        assert all(cell not in {"", "-", "nan"} for cell in row.values()), row
        assert (row["duplicates"], row["re-runs"], row["lost"]) == ("0", "0", "0"), row
        # The phases were measured inside the workers, not left at zero.
        for column in ("storage s/trial", "diagnosis s/trial", "MLflow s/trial"):
            assert float(row[column]) > 0, (column, row)
    assert rows[0]["scaling"] == "1.00"

    # Every complete trial has its timed job and a FINISHED MLflow run.
    for row in json.loads(results_file.read_text()):
        assert row["jobs_timed"] == row["complete"] == row["mlflow_finished"], row
        assert row["failures"] == [] and row["untimed"] == [], row
    # The benchmark's databases are gone.
    assert bench_databases() == before
