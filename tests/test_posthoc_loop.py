"""Post-hoc proposals in the loop: scored from the base trial's out-of-fold candidates, with no
training, as complete trials with 0 training seconds (objective `cv.oof_log_loss` only)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from test_loop import EVOLVER, fake_loop, load

from evolver.loop.posthoc_trials import unsupported_reason
from evolver.loop.state import LoopState, is_scored_without_training


def _scored(state: LoopState) -> list:
    return [t for t in state.trials if is_scored_without_training(t)]


def test_miscalibrated_proposal_is_scored_without_training(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    result = fake_loop(
        tmp_path,
        "loop.name=cal",
        "loop.pruner=none",
        "objective=cv.oof_log_loss",
        "fake.overconfident=true",
        "tracking.enabled=true",
    )
    state = LoopState.load(load(tmp_path, "cal"))
    scored = _scored(state)
    assert scored, result.stdout[-3000:]
    trial = scored[0]
    attrs = trial.user_attrs
    base = next(t for t in state.trials if t.number == attrs["posthoc_of"])
    assert attrs["proposed_by"] == "miscalibrated" and attrs["iteration"] == 2
    assert trial.params == {} and attrs["duration_s"] == 0.0
    assert "predict.temperature" in attrs["changes"]
    # The score is the base run's cross-fitted post-hoc OOF log loss, below its raw one.
    summary = json.loads((Path(base.user_attrs["run_dir"]) / "summary.json").read_text())
    assert trial.value == pytest.approx(summary["cv"]["oof_log_loss_calibrated"], rel=1e-6)
    assert trial.value < base.value == pytest.approx(summary["cv"]["oof_log_loss"])
    # The scored trial took no training slot: iteration 2 still trained 3 trials.
    trained = [t for t in state.view(2).trials if not is_scored_without_training(t)]
    assert len(trained) == 3 and all(t.user_attrs.get("duration_s") for t in trained)
    # New training trials build on trained trials only.
    assert not is_scored_without_training(state.best(trained=True))
    assert state.best().value <= trial.value
    assert "scored on its out-of-fold predictions, 0 training seconds" in result.stdout
    record = state.iteration_record(2)
    assert any(p.get("needs_training") is False for p in record["proposals"])

    status = subprocess.run(
        [str(EVOLVER), "status", "loop.name=cal", f"runs_dir={tmp_path}"],
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "250"},
        check=True,
    )
    assert "scored on out-of-fold predictions without training" in status.stdout
    assert "train s" in status.stdout and "posthoc_choice" in status.stdout

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("cal")
    runs = client.search_runs([experiment.experiment_id], "tags.needs_training = 'false'")
    assert len(runs) == len(scored) and all(run.info.status == "FINISHED" for run in runs)
    run = next(run for run in runs if run.data.tags["trial"] == str(trial.number))
    assert run.data.metrics["train_seconds"] == 0.0
    assert run.data.metrics["objective"] == pytest.approx(trial.value)
    assert run.data.tags["mlflow.parentRunId"]
    assert "predict.temperature" in run.data.params

    # A resume does not score the same choice again.
    fake_loop(
        tmp_path,
        "loop.name=cal",
        "loop.pruner=none",
        "objective=cv.oof_log_loss",
        "fake.overconfident=true",
        "loop.iterations=3",
    )
    again = LoopState.load(load(tmp_path, "cal"))
    assert [t.number for t in _scored(again) if t.user_attrs["posthoc_of"] == base.number] == [
        trial.number
    ]


def test_other_objectives_leave_post_hoc_proposals_out(tmp_path: Path) -> None:
    fake_loop(tmp_path, "loop.name=raw", "loop.pruner=none", "fake.overconfident=true")
    state = LoopState.load(load(tmp_path, "raw"))
    assert not _scored(state)
    base = state.best()
    report = json.loads((Path(base.user_attrs["run_dir"]) / "report.json").read_text())
    assert "miscalibrated" in {finding["id"] for finding in report["findings"]}
    assert len(state.view(2).trials) == 3


def test_unsupported_reasons_name_the_objective() -> None:
    assert unsupported_reason("cv.oof_log_loss") is None
    assert "already scores" in str(unsupported_reason("cv.oof_log_loss_calibrated"))
    assert "cv.loss_best" in str(unsupported_reason("cv.loss_best"))
