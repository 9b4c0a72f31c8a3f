"""How long the diagnosis of a 5-fold, 20-epoch run takes (it runs after every loop trial).

Prints one row per stage: median and best of N repeats, in milliseconds.
    python benchmarks/diagnosis_speed.py [--repeats 30]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from evolver.diagnosis import diagnose, load_run, write_report

FOLDS, PHASE1_EPOCHS, PHASE2_EPOCHS = 5, 3, 17


def synthetic_run(run_dir: Path) -> None:
    """A noisy, overfitting 5-fold run: history.csv, summary.json and config.yaml."""
    rng = np.random.default_rng(0)
    rows = []
    for fold in range(1, FOLDS + 1):
        for epoch in range(1, PHASE1_EPOCHS + PHASE2_EPOCHS + 1):
            phase = 1 if epoch <= PHASE1_EPOCHS else 2
            trend = 0.3 + 0.7 * math.exp(-epoch / 4) + 0.008 * max(0, epoch - 8)
            rows.append(
                {
                    "fold": fold,
                    "epoch": epoch,
                    "phase": phase,
                    "train_loss": 1.2 * 0.88**epoch,
                    "val_loss": trend * (1 + rng.normal(0, 0.03)),
                    "val_acc": 0.9,
                    "lr_backbone": 0.0 if phase == 1 else 1e-4,
                    "lr_head": 1e-3,
                }
            )
    pd.DataFrame(rows).to_csv(run_dir / "history.csv", index=False)
    settings = {
        "max_phase1_epochs": PHASE1_EPOCHS,
        "max_phase2_epochs": PHASE2_EPOCHS,
        "patience": None,
        "min_delta": 0.0,
        "monitor": "val_loss",
        "checkpoint": "last",
        "lr_backbone": 1e-4,
        "lr_head": 1e-3,
        "batch_size": 32,
        "schedule": "plateau",
        "warmup_epochs": 0,
        "n_folds": FOLDS,
        "model": "resnet50",
    }
    summary = {
        "status": "complete",
        "folds": [{"fold": k, "early_stopped": False} for k in range(1, FOLDS + 1)],
        "settings": settings,
        "objective_name": "cv.loss_final",
        "objective": None,
    }
    (run_dir / "summary.json").write_text(json.dumps(summary))


def measure(stage: Callable[[], object], repeats: int) -> tuple[float, float]:
    stage()  # warm caches and lazy imports
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        stage()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times), min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        run_dir = Path(folder)
        synthetic_run(run_dir)
        records = load_run(run_dir)
        rows = [
            ("load_run (csv + json)", measure(lambda: load_run(run_dir), args.repeats)),
            ("diagnose (metrics + findings)", measure(lambda: diagnose(records), args.repeats)),
            (
                "load + diagnose",
                measure(lambda: diagnose(load_run(run_dir)), args.repeats),
            ),
            (
                "write_report, no plots",
                measure(lambda: write_report(run_dir, plots=False), args.repeats),
            ),
            (
                "write_report, 3 plots",
                measure(lambda: write_report(run_dir, plots=True), max(3, args.repeats // 5)),
            ),
        ]
        findings = ", ".join(diagnose(records).finding_ids) or "none"
    print(f"Diagnosis of a {FOLDS}-fold, {PHASE1_EPOCHS + PHASE2_EPOCHS}-epoch run")
    print(f"findings: {findings}\n")
    print(f"| {'stage':<32} | {'median ms':>10} | {'best ms':>8} |")
    print(f"|{'-' * 34}|{'-' * 12}|{'-' * 10}|")
    for name, (median, best) in rows:
        print(f"| {name:<32} | {median:>10.1f} | {best:>8.1f} |")


if __name__ == "__main__":
    main()
