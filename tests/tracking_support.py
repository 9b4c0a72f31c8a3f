"""Helpers of the tracking tests: run directories written to the records schema, configs."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

REPO_ROOT = Path(__file__).resolve().parents[1]
HISTORY_COLUMNS = ["fold", "epoch", "phase", "train_loss", "val_loss", "val_acc",
                   "lr_backbone", "lr_head"]  # fmt: skip


def history_rows(folds: int, epochs: int, phase1_epochs: int = 1) -> list[dict[str, Any]]:
    rows = []
    for fold in range(1, folds + 1):
        for epoch in range(1, epochs + 1):
            frozen = epoch <= phase1_epochs
            rows.append(
                {
                    "fold": fold,
                    "epoch": epoch,
                    "phase": 1 if frozen else 2,
                    "train_loss": round(1.0 / (epoch + fold), 6),
                    "val_loss": round(1.2 / epoch + 0.01 * fold, 6),
                    "val_acc": round(0.5 + 0.05 * epoch, 6),
                    "lr_backbone": 0.0 if frozen else 1e-4,
                    "lr_head": 1e-3,
                }
            )
    return rows


def fold_summary(fold: int, epochs: int, early_stopped: bool) -> dict[str, Any]:
    best = 1.2 / epochs + 0.01 * fold
    return {
        "fold": fold,
        "best_val_loss": best,
        "best_epoch": epochs,
        "final_val_loss": best + 0.002 * fold,
        "degradation": 0.002 * fold,
        "epochs_trained": epochs,
        "phase1_epochs": 1,
        "phase2_epochs": epochs - 1,
        "early_stopped": early_stopped,
        "stop_reason": "val_loss did not improve in 2 epochs" if early_stopped else None,
        "nonfinite": False,
    }


def write_run_dir(run_dir: Path, folds: int = 2, epochs: int = 3, status: str = "complete") -> Path:
    """A run directory as `evolver train` leaves it (config, history, summary, oof, report)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text("model:\n  name: tiny\n")
    rows = history_rows(folds, epochs)
    with (run_dir / "history.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=HISTORY_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    fold_records = [fold_summary(k, epochs, early_stopped=k == 1) for k in range(1, folds + 1)]
    loss_best = sum(f["best_val_loss"] for f in fold_records) / folds
    summary = {
        "status": status,
        "error": None,
        "folds": fold_records,
        "cv": {
            "loss_best": loss_best,
            "loss_final": loss_best + 0.003,
            "oof_log_loss": loss_best + 0.001,
            "accuracy": 0.9,
        },
        "settings": {"n_folds": folds, "model": "tiny"},
        "objective_name": "cv.loss_best",
        "objective": loss_best,
        "duration_s": 12.5,
    }
    (run_dir / "summary.json").write_text(json.dumps(summary))
    (run_dir / "oof.csv").write_text("index,fold,target,p_0,p_1\n0,1,0,0.9,0.1\n")
    (run_dir / "report.md").write_text("# Report\n")
    (run_dir / "report.json").write_text('{"findings": []}')
    (run_dir / "curves.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    return run_dir


def tracking_group() -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.load(REPO_ROOT / "conf/tracking/default.yaml"))


def tracking_cfg(runs_dir: Path, **tracking: Any) -> DictConfig:
    """The config keys tracking reads, with the shipped `tracking` defaults."""
    cfg = {
        "seed": 42,
        "runs_dir": str(runs_dir),
        "objective": "cv.loss_best",
        "model": {"name": "tiny", "pretrained": False},
        "finetune": {"phase1_epochs": 1, "phase2_epochs": 2, "lr_head": 1e-3},
        "tracking": {**tracking_group(), **tracking},
        "loop": {"name": "demo", "storage": None, "trial_number": None},
    }
    return OmegaConf.create(cfg)


def compose_with_overrides(tmp_path: Path, base: DictConfig, overrides: list[str]) -> DictConfig:
    """Compose `base` (as a primary config whose `tracking` is the real group) with Hydra."""
    from hydra import compose, initialize_config_dir

    conf = tmp_path / "conf"
    (conf / "tracking").mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO_ROOT / "conf/tracking/default.yaml", conf / "tracking/default.yaml")
    primary = OmegaConf.to_container(base)
    tracking = primary.pop("tracking")
    primary["defaults"] = [{"tracking": "default"}, "_self_"]
    primary["tracking"] = {k: v for k, v in tracking.items() if v != tracking_group().get(k)}
    OmegaConf.save(OmegaConf.create(primary), conf / "train.yaml")
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def simulate_loop(cfg: DictConfig, tmp_path: Path, iterations: int = 1, trials: int = 2) -> None:
    """What the sweeper does around its jobs, with run directories written by hand."""
    import optuna

    from evolver.loop.job import trial_params
    from evolver.storage_url import optuna_storage_url
    from evolver.tracking import make_tracker
    from evolver.tracking.loop_runs import LoopTracking

    Path(str(cfg.runs_dir)).mkdir(parents=True, exist_ok=True)
    study = optuna.create_study(
        study_name=str(cfg.loop.name), storage=optuna_storage_url(cfg), load_if_exists=True
    )
    loop = LoopTracking(cfg)
    loop.preflight()
    for iteration in range(1, iterations + 1):
        parent = loop.start_iteration(iteration)
        for _ in range(trials):
            trial = study.ask()
            trial.suggest_float("finetune.lr_head", 1e-4, 1e-2, log=True)
            overrides = loop.trial_overrides(parent, iteration, trial.number, "sampler")
            overrides.append(f"loop.trial_number={trial.number}")
            job_cfg = compose_with_overrides(tmp_path / f"conf{trial.number}", cfg, overrides)
            run_dir = tmp_path / "runs" / "multirun" / str(trial.number)
            job = make_tracker(job_cfg, run_dir, sampled=lambda cfg=job_cfg: trial_params(cfg))
            job.preflight()
            write_run_dir(run_dir, folds=2, epochs=3)
            job.finish(run_dir, "complete")
            summary = json.loads((run_dir / "summary.json").read_text())
            study.tell(trial, summary["objective"])
        report_dir = tmp_path / f"iteration-{iteration}"
        report_dir.mkdir(exist_ok=True)
        (report_dir / "iteration.md").write_text(f"# Iteration {iteration}\n")
        loop.end_iteration(
            parent, iteration, {"best.objective": study.best_value}, report_dir, study
        )


def assert_loop_structure(uri: str, loop_name: str, trials_per_iteration: dict[int, int]) -> None:
    """The store holds experiment `loop_name` -> `iteration-<i>` runs -> `trial-<n>` runs whose
    params, metrics, curves, tags and artifacts match each trial's run directory exactly."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(loop_name)
    assert experiment is not None, f"no experiment {loop_name!r}"
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    iterations = {r.info.run_name: r for r in runs if r.data.tags.get("run_type") == "iteration"}
    trials = [r for r in runs if r.data.tags.get("run_type") == "trial"]
    assert sorted(iterations) == sorted(f"iteration-{i}" for i in trials_per_iteration)
    assert len(runs) == len(iterations) + len(trials)
    for number, expected_trials in trials_per_iteration.items():
        parent = iterations[f"iteration-{number}"]
        assert parent.info.status == "FINISHED"
        assert parent.data.tags["iteration"] == str(number)
        parent_files = {a.path for a in client.list_artifacts(parent.info.run_id, "optuna")}
        assert "optuna/optimization_history.png" in parent_files
        children = [r for r in trials if r.data.tags["mlflow.parentRunId"] == parent.info.run_id]
        assert len(children) == expected_trials
        for run in children:
            assert_trial_run(client, run, loop_name, number)


def assert_trial_run(client: Any, run: Any, loop_name: str, iteration: int) -> None:
    tags = run.data.tags
    assert run.info.run_name == f"trial-{tags['trial']}"
    assert tags["loop"] == loop_name and tags["optuna.study"] == loop_name
    assert tags["iteration"] == str(iteration)
    assert tags["proposed_by"]
    run_dir = Path(tags["run_dir"])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert tags["state"] == summary["status"]
    expected_status = {"complete": "FINISHED", "pruned": "KILLED", "failed": "FAILED"}
    assert run.info.status == expected_status[summary["status"]]
    params = run.data.params
    assert any(key.startswith("sampled.") for key in params), params
    assert params["model.name"] == str(OmegaConf.load(run_dir / "config.yaml").model.name)
    metrics = run.data.metrics
    for key, value in summary["cv"].items():
        if value is not None:
            assert metrics[f"cv.{key}"] == pytest_approx(value), key
    degradations = [f["degradation"] for f in summary["folds"]]
    assert metrics["degradation.max"] == pytest_approx(max(degradations))
    assert metrics["folds.early_stopped"] == sum(f["early_stopped"] for f in summary["folds"])
    with (run_dir / "history.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    for fold in {int(r["fold"]) for r in rows}:
        for name in ("train_loss", "val_loss", "lr_head"):
            expected = [
                (int(r["epoch"]), pytest_approx(float(r[name])))
                for r in rows
                if int(r["fold"]) == fold and r[name] != ""
            ]
            history = client.get_metric_history(run.info.run_id, f"fold{fold}/{name}")
            assert sorted((m.step, m.value) for m in history) == expected, (fold, name)
    files = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "history.csv", "summary.json", "report"} <= files


def pytest_approx(value: float) -> Any:
    import pytest

    return pytest.approx(value, rel=1e-6, abs=1e-9)


# `evolver loop` small enough for a test: tiny model, 2 folds of a digits slice, 2 epochs a fold.
TINY_LOOP_OVERRIDES = [
    "model=tiny",
    "cv.folds=2",
    "finetune.phase1_epochs=1",
    "finetune.phase2_epochs=1",
    "data.limit=240",
    "data.num_workers=0",
    "trainer.enable_progress_bar=false",
    "loop.name=demo",
    "loop.iterations=1",
    "loop.trials_per_iteration=2",
    "loop.baseline_first=false",  # both trials run: one iteration with two trial runs
]


def run_tiny_loop(runs_dir: Path, *extra: str, timeout_s: float = 480) -> None:
    """`evolver loop` (tracking on) into runs_dir; fails with its output if it does not finish."""
    import subprocess
    import sys

    command = [str(Path(sys.executable).parent / "evolver"), "loop", *TINY_LOOP_OVERRIDES,
               f"runs_dir={runs_dir}", "tracking.enabled=true", *extra]  # fmt: skip
    result = subprocess.run(
        command, cwd=runs_dir.parent, capture_output=True, text=True, timeout=timeout_s
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
