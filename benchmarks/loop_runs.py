"""Running one evolver loop for a benchmark: `evolver loop` in a subprocess, its output
appended to `<runs_dir>/<name>.log`, one progress line when it ends."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

EVOLVER = Path(sys.executable).parent / "evolver"


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
