"""Continuing a run's folds from another run's fold end states: the rule, the loop's choice, the
lineage records, and a real continued fold (right epoch, schedule and optimizer state)."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from training_support import compose_cfg, tiny

from evolver.continuable import blockers
from evolver.errors import ConfigError
from evolver.loop.continued_trials import continuation_of
from evolver.records import CONTINUED_KEY
from evolver.tracking.records import stop_reasons, summary_metrics

BASE = {
    "schedule.name": "plateau",
    "finetune.phase2_epochs": 8,
    "finetune.lr_backbone": 1e-4,
    "early_stop.enabled": True,
    "early_stop.patience": 3,
    "checkpoint.select": "last",
    "loop.name": "a",
    "data.num_workers": 4,
}


def changed(**changes: object) -> dict:
    return {**BASE, **{key.replace("__", "."): value for key, value in changes.items()}}


def test_what_happens_after_the_base_ended_may_differ() -> None:
    assert blockers(BASE, changed(finetune__phase2_epochs=12)) == []
    assert blockers(BASE, changed(early_stop__patience=6)) == []
    assert blockers(BASE, changed(early_stop__enabled=False, early_stop__patience=1)) == []
    # Where records go and which weights score the folds do not change training.
    assert blockers(BASE, changed(checkpoint__select="best", loop__name="b")) == []
    assert blockers(BASE, changed(data__num_workers=0)) == []


def test_anything_that_changes_the_training_so_far_blocks_it() -> None:
    [reason] = blockers(BASE, changed(finetune__lr_backbone=2e-5))
    assert reason == "finetune.lr_backbone differs (0.0001 -> 2e-05)"
    assert blockers(BASE, changed(finetune__phase2_epochs=4))  # fewer epochs: not a continuation
    assert blockers(BASE, changed(early_stop__patience=2))
    assert blockers({**BASE, "early_stop.enabled": False}, changed(early_stop__enabled=True))
    # A schedule stretched over more epochs would have taken other steps from the start.
    cosine = {**BASE, "schedule.name": "cosine"}
    assert blockers(cosine, {**cosine, "finetune.phase2_epochs": 12})[0].startswith(
        "schedule cosine depends on the number of epochs"
    )


def base_trial(run_dir: Path, folds: int = 2, end_states: int = 2, state: str = "COMPLETE"):
    from omegaconf import OmegaConf

    config = {
        "cv": {"folds": folds},
        "schedule": {"name": "plateau"},
        "finetune": {"phase2_epochs": 4, "lr_backbone": 1e-4},
        "early_stop": {"enabled": True, "patience": 2},
    }
    (run_dir / "checkpoints").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(config), run_dir / "config.yaml")
    for fold in range(1, end_states + 1):
        (run_dir / "checkpoints" / f"fold{fold}-end.ckpt").write_bytes(b"")
    return SimpleNamespace(
        number=3, state=SimpleNamespace(name=state), user_attrs={"run_dir": str(run_dir)}
    )


def test_loop_continues_a_proposal_only_when_its_base_can_be_continued(tmp_path: Path) -> None:
    base = base_trial(tmp_path / "base")
    longer = {"finetune.phase2_epochs": 8, "early_stop.enabled": False}
    assert continuation_of(base, longer) == {"trial": 3, "run_dir": str(tmp_path / "base")}
    assert continuation_of(base, {"finetune.lr_backbone": 2e-5}) is None
    assert continuation_of(base, {"schedule": "cosine"}) is None
    assert continuation_of(base_trial(tmp_path / "one", end_states=1), longer) is None
    assert continuation_of(base_trial(tmp_path / "pruned", state="PRUNED"), longer) is None


def test_lineage_reaches_mlflow_tags_and_metrics() -> None:
    summary = {
        "folds": [{"fold": 1, "stop_reason": "max_epochs", "seconds": 2.5}],
        CONTINUED_KEY: {"run_dir": "/runs/base", "epochs": {"1": 5}, "seconds_saved": 7.25},
    }
    tags = stop_reasons(summary)
    assert tags["continued_from.run_dir"] == "/runs/base"
    assert tags["continued_from.epochs"] == "1:5"
    metrics = summary_metrics(summary)
    assert metrics["seconds_saved"] == 7.25
    assert metrics["fold1/seconds"] == 2.5


# Base: phase 2 of 3 epochs with patience 1 at a rate that overfits at once, so early stopping
# ends both folds; the continuation turns it off and trains to 5 phase-2 epochs.
BASE_RUN = tiny(
    "finetune.phase2_epochs=3",
    "data.limit=160",
    "early_stop.patience=1",
    "finetune.lr_backbone=3e-2",
    "finetune.lr_head=3e-2",
    "diagnosis.enabled=false",
)


def history(run_dir: Path) -> list[dict]:
    with (run_dir / "history.csv").open() as handle:
        return list(csv.DictReader(handle))


def adam_steps(checkpoint: Path) -> float:
    import torch

    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    return max(float(s["step"]) for s in state["optimizer_states"][0]["state"].values())


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A trained BASE_RUN whose two folds both stopped early."""
    from evolver.app import train_task

    run_dir = tmp_path_factory.mktemp("continuation") / "base"
    train_task(compose_cfg(BASE_RUN), run_dir=run_dir)
    return run_dir


def continue_base(base_dir: Path, run_dir: Path, *overrides: str) -> tuple[dict, dict]:
    """Train BASE_RUN with `overrides`, continuing `base_dir`; both runs' summary.json."""
    from evolver.app import train_task

    cfg = compose_cfg([*BASE_RUN, *overrides, f"checkpoint.continue_from={base_dir}"])
    train_task(cfg, run_dir=run_dir)
    return tuple(json.loads((d / "summary.json").read_text()) for d in (base_dir, run_dir))


@pytest.mark.slow
def test_continued_fold_resumes_at_its_epoch_schedule_and_optimizer_state(
    base_dir: Path, tmp_path: Path
) -> None:
    continued_dir = tmp_path / "continued"
    base, continued = continue_base(
        base_dir, continued_dir, "early_stop.enabled=false", "finetune.phase2_epochs=5"
    )
    assert all(fold["early_stopped"] for fold in base["folds"])
    base_rows, rows = history(base_dir), history(continued_dir)
    for fold, base_fold in zip(continued["folds"], base["folds"], strict=True):
        ended = base_fold["epochs_trained"]
        assert fold["continued_after_epoch"] == ended
        assert fold["epochs_trained"] == 6  # 1 + 5: the base's epochs, then the new ones
        assert fold["seconds_saved"] == pytest.approx(base_fold["seconds"])
        own = [r for r in rows if r["fold"] == str(fold["fold"])]
        before = [r for r in base_rows if r["fold"] == str(fold["fold"])]
        # The base's rows carry over unchanged; the count goes on from the base's last epoch.
        assert own[:ended] == before
        assert [int(r["epoch"]) for r in own[ended:]] == list(range(ended + 1, 7))
        # The plateau schedule goes on from its state: no reset to the configured rate.
        assert float(own[ended]["lr_backbone"]) <= float(before[-1]["lr_backbone"])
        # The optimizer's step count goes on from the base's (AdamW keeps it per parameter).
        steps_per_epoch = adam_steps(base_dir / f"checkpoints/fold{fold['fold']}-end.ckpt") / (
            ended - 1
        )
        expected = steps_per_epoch * (6 - 1)
        assert adam_steps(continued_dir / f"checkpoints/fold{fold['fold']}-end.ckpt") == (
            pytest.approx(expected)
        )
    record = continued[CONTINUED_KEY]
    assert record["run_dir"] == str(base_dir)
    assert record["epochs"] == {str(f["fold"]): f["epochs_trained"] for f in base["folds"]}
    # The best checkpoint stays the best over all epochs, the base's included.
    best = min(float(r["val_loss"]) for r in rows if r["fold"] == "1")
    assert continued["folds"][0]["best_val_loss"] == pytest.approx(best)
    assert not list((continued_dir / "checkpoints").glob("*-resume.ckpt"))


def end_state_rates(checkpoint: Path) -> list[float]:
    import torch

    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    return [group["lr"] for group in state["optimizer_states"][0]["param_groups"]]


@pytest.mark.slow
def test_continuing_at_a_lower_rate_scales_the_rates_where_the_base_ended(
    base_dir: Path, tmp_path: Path
) -> None:
    continued_dir = tmp_path / "lower"
    base, continued = continue_base(
        base_dir, continued_dir, "finetune.phase2_epochs=5", "checkpoint.continue_lr_scale=0.1"
    )
    rows = history(continued_dir)
    for fold, base_fold in zip(continued["folds"], base["folds"], strict=True):
        ended = base_fold["epochs_trained"]
        assert fold["continued_after_epoch"] == ended
        # Early stopping had fired in the base (patience 1): its wait starts again, so the fold
        # trains on at the new rates instead of stopping at once.
        assert fold["epochs_trained"] > ended
        first = next(r for r in rows if r["fold"] == str(fold["fold"]) and int(r["epoch"]) > ended)
        backbone, head = end_state_rates(base_dir / f"checkpoints/fold{fold['fold']}-end.ckpt")
        assert float(first["lr_backbone"]) == pytest.approx(backbone * 0.1)
        assert float(first["lr_head"]) == pytest.approx(head * 0.1)
    assert continued[CONTINUED_KEY]["lr_scale"] == 0.1


def test_scaling_rates_touches_optimizer_schedule_and_early_stopping_state() -> None:
    from evolver.continuation import scale_learning_rates

    state = {
        "optimizer_states": [
            {"param_groups": [{"lr": 1e-3, "initial_lr": 2e-3, "name": "lr_head"}], "state": {}}
        ],
        "lr_schedulers": [
            {"base_lrs": [2e-3], "_last_lr": [1e-3], "num_bad_epochs": 2, "best": 0.4},
        ],
        "callbacks": {
            "PhaseTwoEarlyStopping{'monitor': 'val_loss', 'mode': 'min'}": {
                "wait_count": 1,
                "best_score": 0.4,
            },
            "ModelCheckpoint{}": {"best_model_score": 0.4},
        },
    }
    scale_learning_rates(state, 0.5)
    assert state["optimizer_states"][0]["param_groups"][0] == {
        "lr": 5e-4,
        "initial_lr": 1e-3,
        "name": "lr_head",
    }
    assert state["lr_schedulers"][0] == {
        "base_lrs": [1e-3],
        "_last_lr": [5e-4],
        "num_bad_epochs": 0,
        "best": 0.4,
    }
    [early_stopping, checkpoint] = state["callbacks"].values()
    assert early_stopping == {"wait_count": 0, "best_score": 0.4}
    assert checkpoint == {"best_model_score": 0.4}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["checkpoint.continue_lr_scale=0"], "must be positive, got 0"),
        (["checkpoint.continue_lr_scale=abc"], "must be a number, got 'abc'"),
        (["checkpoint.continue_lr_scale=0.5"], "set checkpoint.continue_from"),
    ],
)
def test_a_bad_lr_scale_is_a_one_line_error(
    tmp_path: Path, overrides: list[str], message: str
) -> None:
    from evolver.training import CrossValidation

    cfg = compose_cfg([*BASE_RUN, *overrides])
    with pytest.raises(ConfigError, match=f"checkpoint.continue_lr_scale.*{message}") as error:
        CrossValidation(cfg, tmp_path / "run", images=None)
    assert "\n" not in str(error.value)


def test_a_base_that_cannot_be_continued_is_a_one_line_error(tmp_path: Path) -> None:
    from evolver.training import CrossValidation

    run = tmp_path / "base"
    base_trial(run)
    cfg = compose_cfg(
        [*BASE_RUN, f"checkpoint.continue_from={run}", "finetune.lr_backbone=1e-3", "cv.folds=2"]
    )
    with pytest.raises(ConfigError, match=r"checkpoint.continue_from.*cannot continue"):
        CrossValidation(cfg, tmp_path / "run", images=None)
    with pytest.raises(ConfigError, match="is not a run directory"):
        CrossValidation(
            compose_cfg([*BASE_RUN, f"checkpoint.continue_from={tmp_path / 'nowhere'}"]),
            tmp_path / "run",
            images=None,
        )
