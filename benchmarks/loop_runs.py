"""Running one evolver loop for a benchmark: `evolver loop` in a subprocess, its output
appended to `<runs_dir>/<name>.log`, one progress line when it ends."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

EVOLVER = Path(sys.executable).parent / "evolver"
# Every search benchmark's first trial: the seed notebook's settings (backbone LR 1e-4, head LR
# 1e-3, plateau, patience 3), quiet and untracked so only training costs time.
SEED_START = [
    "finetune.lr_backbone=1e-4",
    "finetune.lr_head=1e-3",
    "schedule=plateau",
    "early_stop.patience=3",
    "data.num_workers=0",
    "trainer.enable_progress_bar=false",
    "tracking.enabled=false",
    "diagnosis.plots=false",
]


def run_loop(runs_dir: Path, name: str, overrides: list[str]) -> int:
    """Run (or resume) loop `name` under `runs_dir` with `overrides`; returns its exit code."""
    command = [str(EVOLVER), "loop", f"loop.name={name}", f"runs_dir={runs_dir}", *overrides]
    log = runs_dir / f"{name}.log"
    started = time.time()
    with log.open("a") as handle:
        result = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT)
    print(
        f"  {name}: exit {result.returncode} in {time.time() - started:.0f} s (log {log})",
        flush=True,
    )
    return result.returncode
