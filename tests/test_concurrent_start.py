"""Workers started at the same instant against fresh stores all start and finish.

A compose file or a SLURM array starts its workers together: each one creates the Optuna storage
and opens the MLflow store first, and on a fresh store the first opening creates its tables.
Four `evolver loop` workers of `tests/loop_tracked_app.py` (the fake app with the real tracker)
start at once on one loop, against fresh SQLite files, then against fresh PostgreSQL databases.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from conftest import postgres_database
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.slow

TRACKED_APP = Path(__file__).parent / "loop_tracked_app.py"
WORKERS = 4
TRIALS = 4


def start_workers_together(runs_dir: Path, *overrides: str) -> list[subprocess.CompletedProcess]:
    command = [
        sys.executable, str(TRACKED_APP), "-m", "hydra/sweeper=evolver", f"runs_dir={runs_dir}",
        "loop.name=together", "loop.iterations=1", f"loop.trials_per_iteration={TRIALS}",
        "loop.poll_interval=0.5", "finetune.phase2_epochs=3", "tracking.enabled=true",
        *overrides,
    ]  # fmt: skip
    workers = [
        subprocess.Popen(
            command, cwd=runs_dir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for _ in range(WORKERS)
    ]
    results = []
    for worker in workers:
        output, _ = worker.communicate(timeout=600)
        results.append(subprocess.CompletedProcess(command, worker.returncode, output))
    return results


def assert_all_finished(
    results: list[subprocess.CompletedProcess], optuna_url: str, mlflow_url: str
) -> None:
    for index, result in enumerate(results):
        assert result.returncode == 0, f"worker {index}:\n{result.stdout[-3000:]}"
    study = optuna.load_study(study_name="together", storage=optuna_url)
    states = [t.state.name for t in study.trials]
    assert len(states) == TRIALS and set(states) <= {"COMPLETE", "PRUNED"}, states
    client = MlflowClient(tracking_uri=mlflow_url)
    experiment = client.get_experiment_by_name("together")
    runs = client.search_runs([experiment.experiment_id])
    kinds = sorted(run.data.tags["run_type"] for run in runs)
    assert kinds == ["iteration"] + ["trial"] * TRIALS
    assert {run.info.status for run in runs} <= {"FINISHED", "KILLED"}  # KILLED: pruned


def test_workers_started_together_on_fresh_sqlite_stores(tmp_path: Path) -> None:
    runs_dir = tmp_path / "runs"
    runs_dir.mkdir()
    results = start_workers_together(runs_dir)
    assert_all_finished(
        results, f"sqlite:///{runs_dir / 'optuna.db'}", f"sqlite:///{runs_dir / 'mlflow.db'}"
    )


@pytest.mark.postgres
def test_workers_started_together_on_fresh_postgres_databases(
    tmp_path: Path, postgres_url: str
) -> None:
    runs_dir = tmp_path / "runs"
    runs_dir.mkdir()
    # Two databases: Optuna and MLflow both keep an `alembic_version` table.
    with postgres_database("evolver_mlflow") as mlflow_url:
        results = start_workers_together(
            runs_dir, f"loop.storage={postgres_url}", f"tracking.uri={mlflow_url}"
        )
        assert_all_finished(results, postgres_url, mlflow_url)
