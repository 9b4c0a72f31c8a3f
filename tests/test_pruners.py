"""A proposal is judged against its base trial's curve at the same fold and epoch."""

from __future__ import annotations

import optuna
import pytest

from evolver.fold_steps import FOLD_STEP_STRIDE
from evolver.loop.pruners import BaseCurvePruner, base_number, first_prune_step


def step(fold: int, epoch: int) -> int:
    return (fold - 1) * FOLD_STEP_STRIDE + epoch


@pytest.fixture
def study() -> optuna.Study:
    study = optuna.create_study()
    base_curve = {step(1, e): v for e, v in enumerate([1.0, 0.6, 0.5, 0.45], start=1)}
    study.add_trial(
        optuna.trial.create_trial(
            value=0.45,
            intermediate_values=base_curve,
            distributions={},
            params={},
        )
    )
    return study


def judged(study: optuna.Study, reports: list[tuple[int, float]], tolerance: float = 0.25):
    pruner = BaseCurvePruner(0, tolerance, warmup_epochs=1)
    trial = study.ask()
    for at, value in reports:
        trial.report(value, at)
    frozen = study.get_trials(deepcopy=False)[-1]
    return pruner.prune(study, frozen), pruner


def test_proposal_far_worse_than_its_base_at_the_same_epoch_is_pruned(study) -> None:
    pruned, pruner = judged(study, [(step(1, 1), 1.1), (step(1, 2), 0.9)])
    assert pruned
    assert pruner.verdict(step(1, 2), 0.9) == (
        "val loss 0.9 vs base trial 0's 0.6 at epoch 2 (tolerance 25%)"
    )


def test_proposal_that_tracks_its_base_is_not_pruned(study) -> None:
    # A train-longer proposal looks exactly like its base until the base's end: kept.
    assert not judged(study, [(step(1, 2), 0.6), (step(1, 3), 0.5)])[0]
    # Within the tolerance.
    assert not judged(study, [(step(1, 3), 0.6)])[0]


def test_epochs_the_base_never_reached_and_warmup_are_not_judged(study) -> None:
    assert not judged(study, [(step(1, 6), 5.0)])[0]  # past the base's end
    assert not judged(study, [(step(2, 2), 5.0)])[0]  # a fold the base has no curve for
    assert not judged(study, [(step(1, 1), 5.0)])[0]  # warmup epoch


def test_base_number_is_the_trial_a_proposal_was_built_from() -> None:
    made = {"proposed_by": "training_too_short", "incumbent": {"number": 4, "value": 0.3}}
    assert base_number(made) == 4
    assert base_number({"proposed_by": "baseline"}) is None
    assert base_number({}) is None


def test_jobs_judge_proposals_by_their_base_and_sampled_trials_by_the_loop(tmp_path) -> None:
    from training_support import compose_cfg

    from evolver.loop.job import may_prune

    study = optuna.create_study()
    made = {"proposed_by": "training_too_short", "incumbent": {"number": 4, "value": 0.3}}
    proposal = study.ask()
    for key, value in made.items():
        proposal.set_user_attr(key, value)
    cfg = compose_cfg([f"runs_dir={tmp_path}"])
    assert may_prune(cfg, proposal)
    assert isinstance(proposal.study.pruner, BaseCurvePruner)
    assert proposal.study.pruner.base_number == 4
    # Phase 1 (3 epochs by default) and the warmup epochs of phase 2 (2) are never judged.
    assert proposal.study.pruner.warmup_epochs == 3 + 2

    study = optuna.create_study()
    proposal = study.ask()
    proposal.set_user_attr("proposed_by", "training_too_short")
    proposal.set_user_attr("incumbent", {"number": 4})
    off = compose_cfg([f"runs_dir={tmp_path}", "loop.proposal_prune_tolerance=null"])
    assert not may_prune(off, proposal)
    sampled = optuna.create_study().ask()
    assert may_prune(cfg, sampled)
    baseline = optuna.create_study().ask()
    baseline.set_user_attr("proposed_by", "baseline")
    assert not may_prune(cfg, baseline)


class FakeStrategy:
    """Stands in for a DDP strategy: `broadcast` hands every rank rank 0's object."""

    def __init__(self, from_rank_zero: object) -> None:
        self.from_rank_zero = from_rank_zero

    def broadcast(self, obj: object, src: int = 0) -> object:
        return self.from_rank_zero


def fitting(rank: int, world_size: int, val_loss: float, strategy: object = None):
    from types import SimpleNamespace

    import torch

    trainer = SimpleNamespace(
        sanity_checking=False,
        callback_metrics={"val_loss": torch.tensor(val_loss)},
        is_global_zero=rank == 0,
        world_size=world_size,
        strategy=strategy,
    )
    return trainer, SimpleNamespace(current_epoch=1)


def test_pruning_callback_reports_at_the_fold_step_and_stops_with_the_pruners_reason(
    study,
) -> None:
    from evolver.callbacks.pruning import FoldPruningCallback

    study.pruner = BaseCurvePruner(0, 0.25, warmup_epochs=1)
    trial = study.ask()
    callback = FoldPruningCallback(trial, "val_loss", fold=1)
    with pytest.raises(optuna.TrialPruned, match=r"vs base trial 0's 0\.6 at epoch 2"):
        callback.on_validation_end(*fitting(rank=0, world_size=1, val_loss=0.9))
    assert study.get_trials()[-1].intermediate_values == {step(1, 2): pytest.approx(0.9)}
    # Reporting only: the value is stored, the fit goes on.
    quiet = FoldPruningCallback(study.ask(), "val_loss", fold=1, prune=False)
    quiet.on_validation_end(*fitting(rank=0, world_size=1, val_loss=0.9))
    assert study.get_trials()[-1].intermediate_values == {step(1, 2): pytest.approx(0.9)}


def test_under_ddp_rank_zero_decides_and_every_rank_stops(study) -> None:
    from evolver.callbacks.pruning import FoldPruningCallback

    study.pruner = BaseCurvePruner(0, 0.25, warmup_epochs=1)
    trial = study.ask()
    # Another rank neither reports nor asks the pruner; it stops on rank 0's verdict.
    other = FoldPruningCallback(trial, "val_loss", fold=1)
    with pytest.raises(optuna.TrialPruned, match="rank 0's reason"):
        other.on_validation_end(*fitting(1, 2, 0.9, FakeStrategy("rank 0's reason")))
    other.on_validation_end(*fitting(1, 2, 0.9, FakeStrategy(None)))
    assert study.get_trials()[-1].intermediate_values == {}


BASE_CURVE = {step(1, e): v for e, v in enumerate([1.0, 0.6, 0.5, 0.45], start=1)}
# Ignored in warmup (epoch 1), within 25% at epoch 2, too far from epoch 3 on.
DRIFTING = {step(1, 1): 5.0, step(1, 2): 0.7, step(1, 3): 0.8, step(1, 4): 0.9}


def test_replayed_pruning_stops_where_the_pruner_would(study) -> None:
    assert first_prune_step(DRIFTING, BASE_CURVE, 0.25, warmup_epochs=1) == step(1, 3)
    assert first_prune_step(DRIFTING, BASE_CURVE, 1.0, warmup_epochs=1) is None
    # The live pruner agrees, step by step.
    reports = sorted(DRIFTING.items())
    assert not judged(study, reports[:2])[0]
    assert judged(study, reports[:3])[0]


def test_pruning_benchmark_counts_false_prunes_and_saved_epochs() -> None:
    import importlib.util
    import sys
    from pathlib import Path

    script = Path(__file__).parents[1] / "benchmarks" / "racing.py"
    if str(script.parent) not in sys.path:
        sys.path.insert(0, str(script.parent))
    spec = importlib.util.spec_from_file_location("racing_bench", script)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.PHASE1_EPOCHS, bench.PRUNER_WARMUP_EPOCHS = 0, 1
    tracking = {step(1, e): v for e, v in enumerate([1.0, 0.62, 0.5, 0.44], start=1)}
    pairs = [
        (DRIFTING, BASE_CURVE, 0.40, 0.45),  # pruned at epoch 3, yet it ended better: false
        (tracking, BASE_CURVE, 0.44, 0.45),  # kept
    ]
    [tight, loose] = bench.pruning_table("t", pairs, [0.25, 1.0])
    assert (tight["pruned"], tight["false_prunes"], tight["epochs_saved"]) == (1, 1, 1)
    assert tight["better_than_base"] == 2 and tight["epochs_total"] == 8
    assert (loose["pruned"], loose["false_prunes"]) == (0, 0)
