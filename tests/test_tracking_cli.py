"""`evolver train` with tracking on: the run in the configured experiment, or a one-line error."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from tracking_support import TINY_LOOP_OVERRIDES

EVOLVER = str(Path(sys.executable).parent / "evolver")
TRAIN_OVERRIDES = [o for o in TINY_LOOP_OVERRIDES if not o.startswith("loop.")]


def train(runs_dir: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    command = [EVOLVER, "train", *TRAIN_OVERRIDES, f"runs_dir={runs_dir}", *extra]
    return subprocess.run(command, cwd=runs_dir.parent, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_unreachable_tracking_server_stops_train_before_training(
    tmp_path: Path, free_port: int
) -> None:
    result = train(tmp_path / "runs", f"tracking.uri=http://127.0.0.1:{free_port}")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"evolver train: error: tracking.uri: cannot reach MLflow tracking server at "
        f"http://127.0.0.1:{free_port} ([Errno 111] Connection refused)"
    )
    assert not list((tmp_path / "runs").rglob("history.csv"))


@pytest.mark.slow
def test_single_train_run_goes_to_the_configured_experiment(tmp_path: Path) -> None:
    runs_dir = tmp_path / "runs"
    result = train(runs_dir, "tracking.experiment=single-runs", "+tracking.tags.owner=me")
    assert result.returncode == 0, result.stderr[-3000:]
    [run_dir] = [p.parent for p in (runs_dir / "train").rglob("summary.json")]
    client = MlflowClient(tracking_uri=f"sqlite:///{runs_dir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("single-runs")
    [run] = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == run_dir.name
    assert run.info.status == "FINISHED"
    assert run.data.tags["run_type"] == "train" and run.data.tags["owner"] == "me"
    assert "mlflow.parentRunId" not in run.data.tags
    assert run.info.artifact_uri.startswith((runs_dir / "mlartifacts").as_uri())
    with (run_dir / "history.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    for fold in (1, 2):
        expected = [
            (int(r["epoch"]), pytest.approx(float(r["val_loss"]), rel=1e-6))
            for r in rows
            if int(r["fold"]) == fold
        ]
        history = client.get_metric_history(run.info.run_id, f"fold{fold}/val_loss")
        assert sorted((m.step, m.value) for m in history) == expected
