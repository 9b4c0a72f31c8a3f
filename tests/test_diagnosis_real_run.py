"""A real `evolver train` run with pathological settings: the expected findings fire, and the
proposals' overrides, applied as they are, make the next run degrade less."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from training_support import tiny

from evolver.cli import main as evolver_main
from evolver.diagnosis import Finding, read_findings

# The tiny training with more phase-2 epochs, so the curves have a shape to read.
TINY_TRAIN_OVERRIDES = tiny("finetune.phase2_epochs=8")
# The seed's settings made worse: learning rates 20x the defaults, patience 1, last weights scored.
PATHOLOGICAL = [
    "finetune.lr_backbone=0.002",
    "finetune.lr_head=0.02",
    "early_stop.enabled=true",
    "early_stop.patience=1",
    "checkpoint.select=last",
]

# Which of the two fires depends on whether the head phase spiked at this head rate.
LR_FINDINGS = {"lr_too_high", "backbone_lr_too_high"}


def train(run_dir: Path, overrides: list[str]) -> dict:
    command = [
        sys.executable,
        "-m",
        "evolver.cli",
        "train",
        *overrides,
        f"runs_dir={run_dir.parent}",
        f"hydra.run.dir={run_dir}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (run_dir / "report.md").is_file(), "evolver train did not write the report"
    return json.loads((run_dir / "report.json").read_text())


def merged_overrides(base: list[str], findings: list[Finding]) -> list[str]:
    """`base` with the first proposal of every finding applied (most severe finding wins)."""
    chosen: dict[str, str] = {}
    for finding in findings:
        if not finding.proposals:
            continue
        for override in finding.proposals[0].overrides:
            key = override.split("=", 1)[0]
            chosen.setdefault(key, override)
    kept = [o for o in base if o.split("=", 1)[0] not in chosen]
    groups = [o for o in chosen.values() if "." not in o.split("=", 1)[0]]
    keys = [o for o in chosen.values() if "." in o.split("=", 1)[0]]
    return kept + groups + keys


@pytest.mark.slow
def test_pathological_run_is_diagnosed_and_the_proposals_reduce_degradation(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    bad_overrides = TINY_TRAIN_OVERRIDES + PATHOLOGICAL
    bad = train(tmp_path / "bad", bad_overrides)
    ids = {finding["id"] for finding in bad["findings"]}
    assert ids & LR_FINDINGS, ids
    assert ids & {"early_stopping_too_eager", "overfitting_after_best"}, ids
    assert bad["metrics"]["folds_degraded"] >= 1
    assert {"val_loss.png", "train_vs_val.png", "lr_schedule.png"} <= set(bad["plots"])

    fixed_overrides = merged_overrides(bad_overrides, read_findings(tmp_path / "bad"))
    assert "finetune.lr_backbone=0.0004" in fixed_overrides
    assert "finetune.lr_backbone=0.002" not in fixed_overrides
    fixed = train(tmp_path / "fixed", fixed_overrides)
    assert fixed["metrics"]["mean_degradation"] < bad["metrics"]["mean_degradation"]
    assert not LR_FINDINGS & {finding["id"] for finding in fixed["findings"]}

    assert evolver_main(["report", str(tmp_path / "bad"), str(tmp_path / "fixed")]) == 0
    assert "comparison:" in capsys.readouterr().out
    comparison = json.loads((tmp_path / "fixed" / "comparison.json").read_text())
    assert comparison["cv"]["mean_degradation"]["delta"] < 0
    assert LR_FINDINGS & set(comparison["findings_resolved"])
