"""Distinct trials across workers and resumes, and a rerun after a fix.

In-process loops (the real `LoopRunner` with a scoring function for a launcher) check the derived
seeds and duplicate handling cheaply; real worker processes of `tests/loop_fake_app.py` check the
same promises across processes, a SIGKILL and a rerun.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import optuna
import pytest
from omegaconf import open_dict

from evolver.loop.outcomes import JobOutcome
from evolver.loop.runner import LoopRunner
from evolver.loop.sampling import draw_params
from evolver.loop.state import trial_configuration
from evolver.loop.study import LoopSettings, make_sampler, trial_seed

pytestmark = pytest.mark.serial

APP = Path(__file__).parent / "loop_fake_app.py"
COMMAND = [sys.executable, str(APP), "-m", "hydra/sweeper=evolver"]

# 3 x 2 x 3 x 3 = 54 configurations: sampled trials of concurrent workers collide often unless
# the loop keeps them apart.
DISCRETE_SPACE = [
    "search.params.finetune.lr_backbone.type=categorical",
    "+search.params.finetune.lr_backbone.choices=[0.0001,0.0003,0.001]",
    "search.params.finetune.lr_head.type=categorical",
    "+search.params.finetune.lr_head.choices=[0.001,0.01]",
    "search.params.finetune.phase2_epochs.low=4",
    "search.params.finetune.phase2_epochs.high=6",
    "loop.adapt_space=false",
]


def compose_fake(runs_dir: Path, *overrides: str) -> Any:
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(APP.parent / "loop_conf"), version_base="1.3"):
        return compose("fake", overrides=[f"runs_dir={runs_dir}", "loop.pruner=none", *overrides])


def score_jobs(job_overrides: list[list[str]], first_index: int) -> list[JobOutcome]:
    """A launcher that scores each job from its backbone learning rate, in-process."""
    outcomes = []
    for overrides in job_overrides:
        values = dict(line.split("=", 1) for line in overrides if "=" in line)
        lr = float(values.get("finetune.lr_backbone", 1e-3))
        outcomes.append(JobOutcome(value=0.1 + abs(math.log10(lr / 1.5e-4))))
    return outcomes


def run_in_process(runs_dir: Path, *overrides: str) -> tuple[optuna.Study, list[str]]:
    cfg = compose_fake(runs_dir, *overrides)
    lines: list[str] = []
    runner = LoopRunner(cfg, score_jobs, printer=lines.append)
    runner.run()
    return runner.study, lines


def sampled_params(study: optuna.Study) -> list[dict[str, Any]]:
    return [t.params for t in study.trials if not t.user_attrs.get("proposed_by")]


def configurations(trials: list[optuna.trial.FrozenTrial]) -> list[tuple]:
    return [key for key in map(trial_configuration, trials) if key is not None]


def starts(run_dir: Path) -> int:
    """How many times a trial folder's job started."""
    return len((run_dir / "starts.log").read_text().splitlines())


# -- seeds and duplicates, in-process ----------------------------------------------------------


def test_trial_seeds_depend_on_the_loop_seed_and_the_trial_number_only(tmp_path: Path) -> None:
    assert trial_seed(7, 3) == trial_seed(7, 3)
    assert len({trial_seed(7, n) for n in range(50)}) == 50
    assert trial_seed(8, 3) != trial_seed(7, 3) != trial_seed(7, 3, attempt=1)
    assert trial_seed(None, 3) is None

    settings = LoopSettings.from_cfg(compose_fake(tmp_path, "loop.sampler=random"))
    study = optuna.create_study()
    frozen = study._storage.get_trial(study.ask()._trial_id)
    space = {"x": optuna.distributions.FloatDistribution(0.0, 1.0)}

    def draws(numbers: range) -> list[float]:
        samplers = [make_sampler(settings, seed=trial_seed(7, n)) for n in numbers]
        return [draw_params(sampler, study, frozen, space)["x"] for sampler in samplers]

    assert draws(range(5)) == draws(range(5))  # the same loop samples the same values
    assert len(set(draws(range(5)))) == 5  # trial numbers never replay each other's draws


def test_one_worker_samples_the_same_loop_every_time_even_across_a_resume(tmp_path: Path) -> None:
    loop = ["loop.iterations=2", "loop.trials_per_iteration=3", "seed=7"]
    first, _ = run_in_process(tmp_path / "a", *loop)
    again, _ = run_in_process(tmp_path / "b", *loop)
    assert sampled_params(first) == sampled_params(again)
    # Stopped after one iteration and resumed: the resume samples new trials (no replay of the
    # first run's draws), and exactly those an uninterrupted loop samples.
    run_in_process(tmp_path / "d", "loop.iterations=1", *loop[1:])
    resumed, lines = run_in_process(tmp_path / "d", *loop)
    assert any("resuming" in line for line in lines)
    assert sampled_params(resumed) == sampled_params(first)
    assert len(set(configurations(first.trials))) == len(first.trials) == 6


def test_sampled_trials_never_repeat_and_an_exhausted_space_skips_with_a_reason(
    tmp_path: Path,
) -> None:
    cfg = compose_fake(tmp_path, "loop.iterations=1", "loop.trials_per_iteration=6")
    with open_dict(cfg):  # 2 x 2 = 4 configurations for the baseline and 5 sampled trials
        cfg.search.params = {
            "finetune": {
                "lr_backbone": {"type": "categorical", "choices": [1e-4, 1e-3]},
                "lr_head": {"type": "categorical", "choices": [1e-3, 1e-2]},
            }
        }
    lines: list[str] = []
    runner = LoopRunner(cfg, score_jobs, printer=lines.append)
    runner.run()
    trials = runner.study.trials
    assert len(trials) == 6
    skipped = [t for t in trials if t.user_attrs.get("skip_reason")]
    ran = [t for t in trials if t not in skipped]
    # Pigeonholes: 6 trials, 4 configurations. Each is run at most once, the rest are skipped.
    assert len(ran) == len(set(configurations(ran))) == 4
    assert all(t.state.name == "COMPLETE" for t in ran)
    assert all(t.state.name == "FAIL" and not t.params for t in skipped)
    assert all(
        "repeated configurations already tried" in t.user_attrs["skip_reason"] for t in skipped
    )
    assert sum("skipped" in line for line in lines) == len(skipped)
    # Skipped trials never ran: no failure rate stops the loop.
    assert "loop.iterations" in runner.study.user_attrs["evolver.stop"]


# -- worker processes --------------------------------------------------------------------------


def start(runs_dir: Path, *overrides: str) -> subprocess.Popen:
    return subprocess.Popen(
        [*COMMAND, f"runs_dir={runs_dir}", *overrides],
        cwd=runs_dir,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def fake_loop(runs_dir: Path, *overrides: str, code: int = 0) -> str:
    result = subprocess.run(
        [*COMMAND, f"runs_dir={runs_dir}", *overrides],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=runs_dir,
    )
    assert result.returncode == code, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


@pytest.mark.slow
@pytest.mark.postgres
def test_four_workers_started_together_run_distinct_trials_once(
    tmp_path: Path, postgres_url: str
) -> None:
    overrides = [
        "loop.name=four",
        f"loop.storage={postgres_url}",
        "loop.iterations=2",
        "loop.trials_per_iteration=6",
        "loop.pruner=none",
        "loop.poll_interval=0.2",
        *DISCRETE_SPACE,
    ]
    workers = [start(tmp_path, *overrides) for _ in range(4)]
    outputs = [worker.communicate(timeout=300)[0] for worker in workers]
    assert [worker.returncode for worker in workers] == [0] * 4, outputs
    study = optuna.load_study(study_name="four", storage=postgres_url)
    trials = study.trials
    assert len(trials) == 12
    assert [t.state.name for t in trials] == ["COMPLETE"] * 12
    keys = configurations(trials)
    assert len(keys) == 12 and not [key for key, n in Counter(keys).items() if n > 1]
    # None ran twice: one folder per trial, each job started once.
    folders = sorted((tmp_path / "loops" / "four").glob("trial_*"))
    assert len(folders) == 12
    assert [starts(folder) for folder in folders] == [1] * 12
    assert sum("->" in output for output in outputs) >= 2  # the trials were shared


@pytest.mark.slow
def test_a_resume_after_sigkill_reruns_only_the_killed_trial(tmp_path: Path) -> None:
    overrides = [
        "loop.name=kill",
        "loop.pruner=none",
        "loop.proposals=false",  # every later trial is sampled...
        "loop.adapt_space=false",
        "loop.startup_trials=20",  # ... at random: a replayed random sequence would show
        "loop.heartbeat_interval=1",
        "loop.grace_period=3",
        "fake.epoch_seconds=0.05",
    ]
    process = start(tmp_path, *overrides)
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    killed = None
    try:
        deadline = time.time() + 120
        while time.time() < deadline and killed is None:
            time.sleep(0.1)
            try:
                trials = optuna.load_study(study_name="kill", storage=storage).trials
            except Exception:  # the study is not created yet
                continue
            complete = [t for t in trials if t.state.name == "COMPLETE"]
            running = [t for t in trials if t.state.name == "RUNNING" and t.intermediate_values]
            if len(complete) >= 2 and running:
                killed = running[0].number
                os.kill(process.pid, signal.SIGKILL)
    finally:
        process.kill()
        process.communicate(timeout=30)
    assert killed is not None, "the loop never reached its third trial"
    before = optuna.load_study(study_name="kill", storage=storage).trials

    fake_loop(tmp_path, *overrides)
    study = optuna.load_study(study_name="kill", storage=storage)
    after = [t for t in study.trials if t.number >= len(before)]
    killed_trial = study.trials[killed]
    assert killed_trial.state.name == "FAIL"
    earlier = {trial_configuration(t) for t in before if t.params}
    repeats = [t for t in after if trial_configuration(t) in earlier]
    assert [t.system_attrs.get("failed_trial") for t in repeats] == [killed]
    assert repeats[0].params == killed_trial.params and repeats[0].state.name == "COMPLETE"
    assert len(after) == len(study.trials) - len(before) >= 3  # new sampled trials too
    ran = [t for t in study.trials if t.number != killed]
    assert len(set(configurations(ran))) == len(ran)
    assert len([t for t in study.trials if t.state.name == "COMPLETE"]) == 6
    # Completed trials were never re-run: one folder per trial, each job started once.
    folders = sorted((tmp_path / "loops" / "kill").glob("trial_*"))
    assert len(folders) == len(study.trials)
    assert [starts(folder) for folder in folders] == [1] * len(folders)


@pytest.mark.slow
def test_a_rerun_after_a_config_fix_retries_the_failed_baseline(tmp_path: Path) -> None:
    loop = ["loop.name=fix", "loop.iterations=1", "loop.trials_per_iteration=1"]
    output = fake_loop(tmp_path, *loop, "data.batch_size=0", code=2)
    assert "data.batch_size: must be >= 1" in output

    # Fixed, but retries switched off: the loop says what failed and why it does nothing.
    output = fake_loop(tmp_path, *loop, "loop.retry_failed=false")
    assert "trial 0 (baseline, iteration 1): ConfigError: data.batch_size" in output
    assert "not retried (loop.retry_failed=false)" in output
    assert "stopped without running a trial" in output
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    assert len(optuna.load_study(study_name="fix", storage=storage).trials) == 1

    output = fake_loop(tmp_path, *loop)
    assert "config changed: runs again as trial 1" in output
    failed, retry = optuna.load_study(study_name="fix", storage=storage).trials
    assert failed.state.name == "FAIL" and retry.state.name == "COMPLETE"
    assert retry.params == failed.params and retry.user_attrs["proposed_by"] == "baseline"
    assert retry.system_attrs["failed_trial"] == 0 and retry.user_attrs["retry_of"] == 0
