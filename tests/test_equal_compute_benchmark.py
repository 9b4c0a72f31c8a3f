"""The equal-compute benchmark's reading of loops: best so far at equal seconds, seconds to a
target, and the seconds racing and continuation saved."""

from __future__ import annotations

import datetime
import importlib.util
import sys
from pathlib import Path

import optuna
import pytest

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "equal_compute.py"


@pytest.fixture(scope="module")
def bench():
    # The script imports its sibling `loop_runs`, as it does when run from benchmarks/.
    if str(SCRIPT.parent) not in sys.path:
        sys.path.insert(0, str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("equal_compute", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_loop(runs_dir: Path, name: str, trials: list[tuple[float, float, dict]]) -> None:
    """A finished loop whose trials end `seconds` after the first one started."""
    storage = f"sqlite:///{runs_dir / 'optuna.db'}"
    study = optuna.create_study(study_name=name, storage=storage)
    start = datetime.datetime(2026, 1, 1)
    for seconds, value, attrs in trials:
        trial = optuna.trial.create_trial(value=value, user_attrs=attrs)
        trial.datetime_start = start
        trial.datetime_complete = start + datetime.timedelta(seconds=seconds)
        study.add_trial(trial)
    study.set_user_attr("evolver.stop", "done")


def test_curves_read_best_so_far_at_equal_seconds(bench, tmp_path: Path) -> None:
    make_loop(tmp_path, "a", [(10, 0.9, {}), (25, 0.5, {}), (40, 0.7, {})])
    points = bench.curve(tmp_path, "a")
    assert [(at, best) for at, best, _ in points] == [(10, 0.9), (25, 0.5), (40, 0.5)]
    assert bench.best_at(points, 5) == float("inf")
    assert bench.best_at(points, 30) == 0.5
    assert bench.seconds_to(points, 0.6) == 25
    assert bench.seconds_to(points, 0.1) is None
    assert bench.finished(tmp_path, "a") and not bench.finished(tmp_path, "missing")


def test_the_training_clock_leaves_out_the_first_trials_warm_up(bench, tmp_path: Path) -> None:
    # The first trial trained 10 s of its 30: 20 s of imports and building come off every point.
    make_loop(tmp_path, "w", [(30, 0.9, {"duration_s": 10.0}), (45, 0.4, {"duration_s": 14.0})])
    study = bench.load(tmp_path, "w")
    assert bench.warmup_seconds(study.trials[0]) == 20.0
    assert [at for at, _, _ in bench.curve(tmp_path, "w")] == [30, 45]
    assert [at for at, _, _ in bench.curve(tmp_path, "w", clock="training")] == [10, 25]
    assert bench.seconds_to(bench.curve(tmp_path, "w", clock="training"), 0.5) == 25


def test_savings_count_raced_folds_and_continued_seconds(bench, tmp_path: Path) -> None:
    raced = {"duration_s": 20.0, "raced_out": {"after_fold": 2, "folds": 5}}
    continued = {"duration_s": 30.0, "seconds_saved": 45.0}
    make_loop(tmp_path, "b", [(20, 0.9, raced), (50, 0.5, continued)])
    saved = bench.savings(bench.curve(tmp_path, "b"))
    assert saved == {"spent": 50.0, "racing": 30.0, "continuation": 45.0}


def test_methods_pair_each_sampler_with_each_pruner(bench) -> None:
    methods = bench.methods_of(["evolver", "evolver_gp", "gp"], ["none", "hyperband"])
    assert methods == ["evolver", "evolver_gp", "gp", "gp+hyperband"]
    assert bench.method_overrides("evolver_gp") == ["loop.sampler=gp", "loop.pruner=none"]
    assert bench.method_overrides("gp+hyperband")[-2:] == [
        "loop.sampler=gp",
        "loop.pruner=hyperband",
    ]
    assert "loop.race_sigmas=null" in bench.method_overrides("random")
    assert "loop.race_sigmas=null" not in bench.method_overrides("evolver")
    ablation = bench.method_overrides("evolver_keep_order")
    assert "loop.remedy_failures=null" in ablation
    assert "loop.remedy_failures=null" not in bench.method_overrides("evolver")


def test_a_seed_without_a_score_yet_counts_as_the_worst(bench) -> None:
    inf = float("inf")
    assert bench.quartiles([0.1, 0.2, 0.3, 0.4, 0.5]) == pytest.approx((0.2, 0.3, 0.4))
    # Left out, the other two seeds' median (0.15) would beat a loop that has scored all three.
    assert bench.quartiles([0.1, 0.2, inf])[1] == 0.2
    assert bench.quartiles([0.1, inf, inf])[1] == inf
    assert bench.quartiles([inf, inf]) == (inf, inf, inf)
    assert bench.quartiles([0.3]) == (0.3, 0.3, 0.3)


def test_remedies_and_skipped_repeats_are_counted_once(bench, tmp_path: Path) -> None:
    origin = {"proposed_by": "a_finding"}
    better = {"proposal": "train_longer", "incumbent": {"value": 0.6}, "duration_s": 10.0}
    worse = {"proposal": "larger_batch", "incumbent": {"value": 0.4}, "duration_s": 30.0}
    make_loop(tmp_path, "c", [(10, 0.6, {"proposal": "baseline"}), (20, 0.5, better | origin),
                              (50, 0.7, worse | origin), (60, 0.7, worse | origin),
                              (70, 0.7, worse | origin)])  # fmt: skip
    study = optuna.load_study(study_name="c", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    repeat = {"proposal": "larger_batch", "incumbent": 1, "repeats": 2, "duration_s": 30.0}
    # The same repeat found again in a later iteration is still one trial not trained.
    study.set_user_attr("evolver.iteration.3", {"repeats": [repeat]})
    study.set_user_attr("evolver.iteration.4", {"repeats": [repeat]})
    assert bench.repeat_savings(tmp_path, "c") == 30.0
    rows = bench.remedy_table({0: bench.curve(tmp_path, "c")}, [0])
    # The third larger_batch came after two that did not pay: one trial, 30 s.
    assert rows == [
        ("larger_batch", 3, 0, 0, 90.0, 1, 30.0),
        ("train_longer", 1, 0, 1, 10.0, 0, 0.0),
    ]
