"""LoopTracking: experiment per loop, run per iteration, nested run per trial, resume."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from tracking_support import (
    assert_loop_structure,
    compose_with_overrides,
    simulate_loop,
    tracking_cfg,
    write_run_dir,
)

from evolver.loop.state import SAMPLER
from evolver.tracking import make_tracker
from evolver.tracking.loop_runs import LoopTracking


def client_of(loop: LoopTracking) -> MlflowClient:
    return MlflowClient(tracking_uri=loop.settings.uri)


def make_study(runs_dir: Path, name: str = "demo", trials: int = 3) -> optuna.Study:
    study = optuna.create_study(study_name=name, storage=f"sqlite:///{runs_dir / 'optuna.db'}")
    for number in range(trials):
        trial = study.ask()
        lr = trial.suggest_float("finetune.lr_head", 1e-4, 1e-2, log=True)
        batch = trial.suggest_categorical("data.batch_size", [32, 64])
        study.tell(trial, lr * 10 + batch / 1000 + number * 0.01)
    return study


def test_start_iteration_creates_one_parent_run_and_reuses_it(tmp_path: Path) -> None:
    loop = LoopTracking(tracking_cfg(tmp_path))
    loop.preflight()
    first = loop.start_iteration(1)
    assert loop.start_iteration(1) == first
    second = loop.start_iteration(2)
    assert second != first
    # A new LoopTracking (a resumed loop process) finds the same run.
    assert LoopTracking(tracking_cfg(tmp_path)).start_iteration(1) == first
    client = client_of(loop)
    experiment = client.get_experiment_by_name("demo")
    assert experiment.tags["loop"] == "demo" and experiment.tags["optuna.study"] == "demo"
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.run_name"])
    assert [r.info.run_name for r in runs] == ["iteration-1", "iteration-2"]
    assert runs[0].data.tags["run_type"] == "iteration"
    assert runs[0].data.tags["iteration"] == "1"


def test_trial_overrides_nest_the_job_run_under_its_iteration(tmp_path: Path) -> None:
    base = tracking_cfg(tmp_path / "runs")
    loop = LoopTracking(base)
    loop.preflight()
    parent = loop.start_iteration(2)
    proposed_by = "lr_too_high: lower lr_head, keep ${seed} as is"
    overrides = loop.trial_overrides(parent, 2, 7, proposed_by)
    job_cfg = compose_with_overrides(tmp_path, base, [*overrides, "loop.trial_number=7"])
    assert job_cfg.tracking.parent_run_id == parent
    assert job_cfg.tracking.tags.proposed_by == proposed_by

    run_dir = write_run_dir(tmp_path / "runs" / "multirun" / "0")
    job = make_tracker(job_cfg, run_dir)
    job.preflight()
    job.finish(run_dir, "complete")
    run = client_of(loop).get_run(job.run_id)
    assert run.info.run_name == "trial-7"
    assert run.info.experiment_id == loop.experiment_id()
    tags = run.data.tags
    assert tags["mlflow.parentRunId"] == parent
    assert {k: tags[k] for k in ("loop", "iteration", "trial", "optuna.study", "proposed_by")} == {
        "loop": "demo",
        "iteration": "2",
        "trial": "7",
        "optuna.study": "demo",
        "proposed_by": proposed_by,
    }
    assert tags["run_type"] == "trial" and tags["state"] == "complete"
    assert not any(key.startswith("tracking.tags") for key in run.data.params)


def test_trial_of_the_sampler_is_tagged_as_such(tmp_path: Path) -> None:
    loop = LoopTracking(tracking_cfg(tmp_path))
    overrides = loop.trial_overrides(None, 1, 0, SAMPLER)
    assert "++tracking.tags.proposed_by='sampler'" in overrides
    assert not any(o.startswith("tracking.parent_run_id") for o in overrides)


def test_end_iteration_logs_report_metrics_and_optuna_plots(tmp_path: Path) -> None:
    cfg = tracking_cfg(tmp_path)
    study = make_study(tmp_path)
    loop = LoopTracking(cfg)
    loop.preflight()
    parent = loop.start_iteration(1)
    report_dir = tmp_path / "iteration-1"
    report_dir.mkdir()
    (report_dir / "iteration.md").write_text("| trial | cv.loss_best |\n")
    (report_dir / "iteration.json").write_text("{}")
    metrics = {"best.cv.loss_best": 0.071, "trials.pruned": 1.0}
    loop.end_iteration(parent, 1, metrics, report_dir, study)

    client = client_of(loop)
    run = client.get_run(parent)
    assert run.info.status == "FINISHED"
    assert run.data.metrics == {"best.cv.loss_best": 0.071, "trials.pruned": 1.0}
    assert client.get_metric_history(parent, "best.cv.loss_best")[0].step == 1
    assert run.data.tags["state"] == "complete"
    root = {a.path for a in client.list_artifacts(parent)}
    assert root == {"iteration.md", "iteration.json", "optuna"}
    plots = {a.path: a.file_size for a in client.list_artifacts(parent, "optuna")}
    assert set(plots) == {"optuna/optimization_history.png", "optuna/param_importances.png"}
    assert all(size > 1000 for size in plots.values())


def test_close_stale_runs_kills_only_runs_no_live_worker_owns_and_resume_reopens(
    tmp_path: Path,
) -> None:
    cfg = tracking_cfg(tmp_path)
    loop = LoopTracking(cfg)
    loop.preflight()
    parent = loop.start_iteration(1)
    job_cfg = compose_with_overrides(tmp_path, cfg, loop.trial_overrides(parent, 1, 0, SAMPLER))
    crashed = make_tracker(job_cfg, tmp_path / "job0")
    crashed.preflight()  # the job is killed here: its run stays RUNNING
    live_cfg = compose_with_overrides(
        tmp_path / "live", cfg, loop.trial_overrides(parent, 1, 1, SAMPLER)
    )
    live = make_tracker(live_cfg, tmp_path / "job1")
    live.preflight()  # trial 1 still trains in another worker

    resumed = LoopTracking(cfg)
    client = client_of(loop)
    # Trial 0 failed (its heartbeat went stale); iteration 1 is still open: only trial 0's run.
    assert resumed.close_stale_runs({0}, set()) == 1
    assert client.get_run(parent).info.status == "RUNNING"
    assert client.get_run(live.run_id).info.status == "RUNNING"
    # Once iteration 1 is closed and settled, its run too.
    assert resumed.close_stale_runs(set(), {1}) == 1
    for run_id in (parent, crashed.run_id):
        run = client.get_run(run_id)
        assert run.info.status == "KILLED"
        assert run.data.tags["state"] == "killed"
        assert run.data.tags["state_reason"] == "left running by an interrupted loop"
    assert client.get_run(live.run_id).info.status == "RUNNING"
    assert resumed.close_stale_runs({0}, {1}) == 0
    assert resumed.start_iteration(1) == parent
    reopened = client.get_run(parent)
    assert reopened.info.status == "RUNNING"
    assert reopened.data.tags["state"] == "running" and "state_reason" not in reopened.data.tags


def test_everything_is_a_no_op_when_tracking_is_off(tmp_path: Path) -> None:
    loop = LoopTracking(tracking_cfg(tmp_path, enabled=False))
    loop.preflight()
    assert loop.start_iteration(1) is None
    assert loop.trial_overrides(None, 1, 0, "x") == []
    loop.end_iteration(None, 1, {"a": 1.0}, tmp_path)
    assert loop.close_stale_runs({0}, {1}) == 0
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.postgres
def test_loop_structure_in_postgres(tmp_path: Path, postgres_url: str) -> None:
    loop = LoopTracking(tracking_cfg(tmp_path, uri=postgres_url))
    loop.preflight()
    parent = loop.start_iteration(1)
    assert LoopTracking(tracking_cfg(tmp_path, uri=postgres_url)).start_iteration(1) == parent
    assert loop.close_stale_runs(set(), {1}) == 1


def test_a_whole_loop_reads_back_as_iterations_with_nested_trials(tmp_path: Path) -> None:
    cfg = tracking_cfg(tmp_path / "runs")
    simulate_loop(cfg, tmp_path, iterations=2, trials=2)
    assert_loop_structure(LoopTracking(cfg).settings.uri, "demo", {1: 2, 2: 2})
