"""The evolver loop on real training: `evolver loop` with the tiny model on a slice of digits."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from training_support import tiny

from evolver.loop.state import LoopState

EVOLVER = Path(sys.executable).parent / "evolver"

# The tiny training, a little smaller still: six trainings per loop.
TINY = tiny(
    "finetune.phase2_epochs=2",
    "data.limit=240",
    "search=demo",
    "search.params.finetune.phase2_epochs.high=3",
)

pytestmark = pytest.mark.slow


def evolver(runs_dir: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [str(EVOLVER), *args, f"runs_dir={runs_dir}"],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=runs_dir,
        env={**os.environ, "COLUMNS": "250"},
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result


def study_of(runs_dir: Path, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{runs_dir / 'optuna.db'}")


def test_tiny_loop_runs_proposals_in_iteration_two(tmp_path: Path) -> None:
    output = evolver(tmp_path, "loop", "loop.name=tiny", "loop.pruner=none", *TINY).stdout
    study = study_of(tmp_path, "tiny")
    state = LoopState.load(study)
    assert [len(state.view(i).trials) for i in (1, 2)] == [3, 3]
    assert all(t.state.name in ("COMPLETE", "PRUNED", "FAIL") for t in study.trials)
    # One worker: the baseline's proposals come straight after it (loop.baseline_first), and
    # iteration 1's sampler slots are skipped.
    first = sorted(state.view(1).trials, key=lambda t: t.number)
    assert [bool(t.user_attrs.get("skip_reason")) for t in first] == [False, True, True]
    ran = [t for t in study.trials if not t.user_attrs.get("skip_reason")]
    assert sum(t.state.name == "COMPLETE" for t in ran) >= 2
    record = state.iteration_record(2)
    proposals = record["proposals"]
    assert proposals, record["findings"]
    second = sorted(state.view(2).trials, key=lambda t: t.number)
    assert [t.user_attrs.get("proposed_by") for t in second[: len(proposals)]] == [
        p["proposed_by"] for p in proposals
    ]
    for trial in ran:
        run_dir = Path(trial.user_attrs["run_dir"])
        assert (run_dir / "summary.json").is_file() and (run_dir / "history.csv").is_file()
    assert "iteration 2/2" in output and "Proposal scoreboard" in output

    status = evolver(tmp_path, "status", "loop.name=tiny").stdout
    for proposal in proposals:
        assert proposal["proposed_by"] in status and proposal["proposal"] in status


def test_tiny_loop_prunes_hopeless_learning_rates(tmp_path: Path) -> None:
    evolver(
        tmp_path,
        "loop",
        "loop.name=hopeless",
        "loop.iterations=1",
        "loop.trials_per_iteration=3",
        "loop.pruner_startup_trials=1",
        "loop.pruner_warmup_epochs=0",
        "loop.baseline_first=false",  # the sampled trials of iteration 1 are the subject
        "finetune.lr_head=0.003",
        *TINY,
        "search.params.finetune.lr_backbone.low=1e-9",
        "search.params.finetune.lr_backbone.high=1e-8",
        "search.params.finetune.lr_head.low=1e-9",
        "search.params.finetune.lr_head.high=1e-8",
    )
    study = study_of(tmp_path, "hopeless")
    pruned = [t for t in study.trials if t.state.name == "PRUNED"]
    assert pruned, [(t.number, t.state.name, t.value) for t in study.trials]
    for trial in pruned:
        assert trial.params["finetune.lr_head"] <= 1e-8
        assert trial.intermediate_values  # reported per epoch by the job itself
        summary = (Path(trial.user_attrs["run_dir"]) / "summary.json").read_text()
        assert '"pruned"' in summary


def test_invalid_baseline_stops_the_loop_with_one_line(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            str(EVOLVER),
            "loop",
            "loop.name=invalid",
            f"runs_dir={tmp_path}",
            *[line for line in TINY if not line.startswith("finetune.phase")],
            "finetune.phase1_epochs=0",
            "finetune.phase2_epochs=0",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "evolver loop: error: finetune.phase2_epochs: phase1_epochs + phase2_epochs must be >= 1"
    ]
    study = study_of(tmp_path, "invalid")
    assert [t.state.name for t in study.trials if t.state.is_finished()] == ["FAIL"]
