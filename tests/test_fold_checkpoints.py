"""Each fold keeps two checkpoints: its best epoch's weights and its last epoch's weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from training_support import TINY, compose_cfg

from evolver.app import train_task
from evolver.diagnosis import posthoc as ph
from evolver.training import same_weights

pytestmark = pytest.mark.slow


# Written on the training thread (auto on a CPU), kept in memory and written when the fit ends,
# and by Lightning's AsyncCheckpointIO: every file is complete, and holds the same weights, when
# the fit returns.
@pytest.mark.parametrize("writes", ["auto", "fit_end", "background"])
def test_last_checkpoint_is_the_last_epoch_even_when_the_best_came_first(
    tmp_path: Path, writes: str
) -> None:
    run_dir = tmp_path / "run"
    # A learning rate far too high: the best epoch is an early one, later epochs degrade.
    overrides = [
        *TINY,
        f"trainer.checkpoint_writes={writes}",
        "finetune.phase2_epochs=4",
        "finetune.lr_backbone=3e-2",
        "finetune.lr_head=3e-2",
        "early_stop.enabled=false",
        "data.limit=200",
    ]
    train_task(compose_cfg(overrides), run_dir=run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    for fold in summary["folds"]:
        number = fold["fold"]
        last = torch.load(
            run_dir / "checkpoints" / f"fold{number}-last.ckpt",
            map_location="cpu",
            weights_only=True,
        )
        best = torch.load(
            run_dir / "checkpoints" / f"fold{number}-best.ckpt",
            map_location="cpu",
            weights_only=True,
        )
        end = torch.load(
            run_dir / "checkpoints" / f"fold{number}-end.ckpt",
            map_location="cpu",
            weights_only=True,
        )
        # Written once when training ended: the end state's weights, its step and epoch count.
        assert (last["global_step"], last["epoch"]) == (end["global_step"], end["epoch"])
        assert last["epoch"] == fold["epochs_trained"]
        assert "optimizer_states" not in last
        for name, tensor in end["state_dict"].items():
            assert torch.equal(last["state_dict"][name], tensor), name
        assert best["epoch"] == fold["best_epoch"] - 1
        if fold["best_epoch"] < fold["epochs_trained"]:
            # The best epoch's own weights, not the live ones it was saved from.
            assert not same_weights(best["state_dict"], last["state_dict"])
    early = [f for f in summary["folds"] if f["best_epoch"] < f["epochs_trained"]]
    assert early, summary["folds"]
    candidates = ph.OofCandidates.load(run_dir / "oof_candidates.npz")
    assert not np.allclose(candidates.log_probs[0], candidates.log_probs[1])
