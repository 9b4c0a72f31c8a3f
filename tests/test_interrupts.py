"""Ctrl-C and SIGTERM stop the current trial cleanly: records written, the MLflow run KILLED, the
Optuna trial failed as interrupted and re-run first on resume, one line, exit 130 or 143.

Real processes get the signal mid-training. A child started from a shell that ignores SIGINT (a
background job) would inherit that: each one starts with SIGINT back at its default.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import pytest
from mlflow.tracking import MlflowClient
from training_support import tiny

from evolver import interrupts
from evolver.loop.outcomes import INTERRUPTED, JobOutcome, as_interrupted
from evolver.loop.runner import LoopRunner

EVOLVER = str(Path(sys.executable).parent / "evolver")
APP = Path(__file__).parent / "loop_fake_app.py"


def start(command: list[str], cwd: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        command,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def wait_for(condition: Callable[[], bool], process: subprocess.Popen[str], timeout: float) -> None:
    deadline = time.time() + timeout
    while not condition():
        if process.poll() is not None:
            pytest.fail(f"ended before the signal: {process.communicate()[1][-3000:]}")
        if time.time() > deadline:
            process.kill()
            pytest.fail("the run never reached the point to interrupt")
        time.sleep(0.1)


def interrupted_lines(stdout: str, stderr: str) -> list[str]:
    return [line for line in (stdout + stderr).splitlines() if "interrupted" in line]


# -- pure parts --------------------------------------------------------------------------------


def test_interrupted_names_its_signal_and_exit_code() -> None:
    stopped = interrupts.Interrupted(signal.SIGTERM, "trial 4", "rerun the same command to resume")
    assert (str(stopped), stopped.exit_code) == ("SIGTERM", 143)
    assert interrupts.Interrupted(signal.SIGINT).exit_code == 130
    assert stopped.line("evolver loop") == (
        "evolver loop: interrupted (SIGTERM) during trial 4; rerun the same command to resume"
    )
    # Not a KeyboardInterrupt: Lightning's fit would turn that into sys.exit(1).
    assert not isinstance(stopped, KeyboardInterrupt | Exception)


def test_a_job_that_failed_after_the_signal_counts_as_interrupted() -> None:
    failed = as_interrupted(JobOutcome(error=RuntimeError("worker died")), signal.SIGINT)
    assert (failed.interrupted_by, failed.failure_reason()) == ("SIGINT", INTERRUPTED)
    finished = as_interrupted(JobOutcome(value=0.5), signal.SIGINT)
    assert finished.interrupted_by is None and finished.objective() == 0.5


def test_a_signal_is_held_while_deferred_and_restored_after(tmp_path: Path) -> None:
    before = signal.getsignal(signal.SIGTERM)
    with interrupts.handled():
        with interrupts.deferred():
            signal.raise_signal(signal.SIGTERM)
            held = interrupts.received()
        with pytest.raises(interrupts.Interrupted) as raised:
            interrupts.raise_if_received()
    assert held == signal.SIGTERM and raised.value.signal_name == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) == before and interrupts.received() is None


def compose_fake(runs_dir: Path, *overrides: str) -> Any:
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(APP.parent / "loop_conf"), version_base="1.3"):
        return compose("fake", overrides=[f"runs_dir={runs_dir}", "loop.pruner=none", *overrides])


def interrupt_jobs(job_overrides: list[list[str]], first_index: int) -> list[JobOutcome]:
    """A launcher whose job is stopped by Ctrl-C."""
    signal.raise_signal(signal.SIGINT)
    raise AssertionError("the signal raises in the main thread")


def score_jobs(job_overrides: list[list[str]], first_index: int) -> list[JobOutcome]:
    return [JobOutcome(value=0.25) for _ in job_overrides]


def test_interrupted_trials_rerun_up_to_max_retry_and_never_count_as_failures(
    tmp_path: Path,
) -> None:
    cfg = compose_fake(
        tmp_path, "loop.iterations=1", "loop.trials_per_iteration=2", "loop.max_retry=1",
        "loop.max_failure_rate=0.0",
    )  # fmt: skip
    for expected in ("trial 0", "trial 2"):
        with interrupts.handled(), pytest.raises(interrupts.Interrupted) as raised:
            LoopRunner(cfg, interrupt_jobs, printer=lambda line: None).run()
        assert raised.value.where == expected and raised.value.signal_name == "SIGINT"
    lines: list[str] = []
    runner = LoopRunner(cfg, score_jobs, printer=lines.append)
    runner.run()
    trials = runner.study.trials
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE", "FAIL"]
    # Trial 0 ran again first, as trial 2, with its parameters; a retry of trial 2 would exceed
    # loop.max_retry, and neither counts toward loop.max_failure_rate (0 here).
    assert trials[2].system_attrs["failed_trial"] == 0 and trials[2].params == trials[0].params
    assert all(trials[n].user_attrs["fail_reason"] == "interrupted" for n in (0, 2))
    assert "stopped: ran the 1 iteration(s) asked for (loop.iterations)" in lines[-1]


# -- evolver train -----------------------------------------------------------------------------


@pytest.mark.slow
def test_ctrl_c_stops_evolver_train_with_its_records(tmp_path: Path) -> None:
    runs_dir = tmp_path / "runs"
    # Checkpoints written when saved (auto on a CPU; not `fit_end`): the first epoch is always a
    # new best, so its checkpoint says training is under way.
    overrides = tiny(
        "finetune.phase2_epochs=30", "tracking.enabled=true", "early_stop.enabled=false",
        "trainer.checkpoint_writes=immediate",
    )  # fmt: skip
    process = start([EVOLVER, "train", *overrides, f"runs_dir={runs_dir}"], tmp_path)
    wait_for(lambda: any(runs_dir.rglob("fold1-best.ckpt")), process, timeout=180)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)

    assert process.returncode == 130, stderr[-3000:]
    lines = interrupted_lines(stdout, stderr)
    assert len(lines) == 1 and lines[0].startswith(
        "evolver train: interrupted (SIGINT) during fold 1"
    )
    (summary_path,) = (runs_dir / "train").glob("*/summary.json")
    summary = json.loads(summary_path.read_text())
    assert (summary["status"], summary["error"]) == ("interrupted", "SIGINT")
    assert summary["folds"][0]["stop_reason"] == "interrupted"
    history = (summary_path.parent / "history.csv").read_text().splitlines()
    assert len(history) >= 2  # the header and the epochs finished before the signal
    client = MlflowClient(tracking_uri=f"sqlite:///{runs_dir / 'mlflow.db'}")
    (run,) = client.search_runs(client.search_experiments()[0].experiment_id)
    assert run.info.status == "KILLED" and run.data.tags["state"] == "interrupted"


# -- evolver loop ------------------------------------------------------------------------------


@pytest.mark.slow
def test_sigterm_fails_the_trial_as_interrupted_and_resume_reruns_it_first(
    tmp_path: Path,
) -> None:
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    command = [
        sys.executable,
        str(APP),
        "-m",
        "hydra/sweeper=evolver",
        f"runs_dir={tmp_path}",
        "loop.name=stop",
        "loop.iterations=1",
        "loop.trials_per_iteration=2",
        "loop.pruner=none",
        # Long enough (7 epochs, 3.5 s) that a poll on a busy machine still sees trial 0 running.
        "fake.epoch_seconds=0.5",
    ]

    def trials() -> list[optuna.trial.FrozenTrial]:
        try:
            return optuna.load_study(study_name="stop", storage=storage).trials
        except Exception:  # not created yet
            return []

    process = start(command, tmp_path)
    wait_for(
        lambda: any(t.state.name == "RUNNING" and t.intermediate_values for t in trials()),
        process,
        timeout=120,
    )
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=60)

    assert process.returncode == 143, stderr[-3000:]
    assert interrupted_lines(stdout, stderr) == [
        "evolver loop: interrupted (SIGTERM) during trial 0; rerun the same command to resume"
    ]
    (stopped,) = [t for t in trials() if t.state.name == "FAIL"]
    assert stopped.number == 0
    assert stopped.user_attrs["fail_reason"] == "interrupted"
    assert stopped.user_attrs["interrupted_by"] == "SIGTERM"
    summary = json.loads((tmp_path / "loops" / "stop" / "trial_0" / "summary.json").read_text())
    assert (summary["status"], summary["error"]) == ("interrupted", "SIGTERM")

    rerun = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    started = [line for line in rerun.stdout.splitlines() if ") started:" in line]
    assert "trial 2 (baseline) started" in started[0]
    study = optuna.load_study(study_name="stop", storage=storage)
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert (
        len(complete) == 2 and len(study.trials) == 3
    )  # the loop's 2 trials, plus the stopped one
    (retry,) = [t for t in complete if t.system_attrs.get("failed_trial") == 0]
    assert retry.number == 2 and retry.params == stopped.params
    assert retry.system_attrs["retry_history"] == [0]
