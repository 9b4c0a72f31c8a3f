"""What the post-hoc study costs a K-fold run, and what it gains on out-of-fold predictions.

    .venv/bin/python benchmarks/posthoc_cost.py [overrides ...] [--repeats 1]

Trains the same run (default `evolver train` settings plus the given Hydra overrides) twice,
alternating: once predicting the configured checkpoint and TTA only, once predicting every
checkpoint (best, last, average) x TTA view candidate for the study. Prints each side's wall time,
the study's own cost measured inside the run (extra inference, candidates file, fitting) plus the
report's share (re-study, reliability diagram), and the OOF log loss before and after the
post-hoc choices, cross-fitted. Target: the study adds < 10% to the run's wall time.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from hydra import compose, initialize_config_module
from rich.console import Console
from rich.table import Table

from evolver.data.sources import load_image_set
from evolver.diagnosis import load_run
from evolver.diagnosis.plots import write_reliability_plot
from evolver.diagnosis.report import posthoc_study_of
from evolver.training import CrossValidation

QUIET = ["trainer.enable_progress_bar=false", "tracking.enabled=false", "diagnosis.enabled=false"]


def compose_cfg(overrides: list[str]) -> object:
    with initialize_config_module(config_module="evolver.conf", version_base="1.3"):
        return compose(config_name="train", overrides=[*QUIET, *overrides])


def train(cfg: object, run_dir: Path, posthoc: bool) -> tuple[float, float]:
    """(wall seconds of the K-fold run and its records, seconds the study took inside it)."""
    started = time.perf_counter()
    images = load_image_set(cfg.data)
    cv = CrossValidation(cfg, run_dir, images, posthoc=posthoc)
    cv.run()
    cv.write_records("complete", None)
    return time.perf_counter() - started, cv.posthoc_seconds


def report_seconds(run_dir: Path) -> float:
    """The report's share: the study re-run from the stored candidates and its diagram."""
    started = time.perf_counter()
    study = posthoc_study_of(load_run(run_dir))
    assert study is not None
    write_reliability_plot(study, run_dir)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of the run")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument(
        "--no-baseline", action="store_true", help="skip the configured-choice-only side"
    )
    args = parser.parse_args()
    cfg = compose_cfg(args.overrides)
    walls: dict[bool, list[float]] = {False: [], True: []}
    inside, reported, summary = [], [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            sides = (False, True) if repeat % 2 == 0 else (True, False)
            for posthoc in sides[1:] if args.no_baseline else sides:
                run_dir = Path(tmp) / f"{repeat}-{posthoc}"
                wall, study_s = train(cfg, run_dir, posthoc)
                walls[posthoc].append(wall)
                if posthoc:
                    inside.append(study_s)
                    reported.append(report_seconds(run_dir))
                    summary = json.loads((run_dir / "summary.json").read_text())
    table = Table(title=f"post-hoc study cost ({' '.join(args.overrides) or 'defaults'})")
    for column in ("side", "run wall (s)", "study in run (s)", "study in report (s)", "share"):
        table.add_column(column, justify="left" if column == "side" else "right")
    full = min(walls[True])
    study_total = min(inside) + min(reported)
    if walls[False]:
        table.add_row("configured choice only", f"{min(walls[False]):.1f}", "-", "-", "-")
    table.add_row(
        "with every candidate",
        f"{full:.1f}",
        f"{min(inside):.2f}",
        f"{min(reported):.2f}",
        f"{study_total / full:.1%}",
    )
    console = Console()
    console.print(table)
    if walls[False]:
        base = min(walls[False])
        console.print(f"wall-time difference of the two sides: {(full - base) / base:+.1%} (noisy)")
    posthoc = summary["posthoc"]
    results = Table(title="OOF log loss: configured vs post-hoc choice (cross-fitted)")
    for column in ("configured", "OOF log loss", "accuracy", "chosen", "post-hoc log loss"):
        results.add_column(column)
    configured = posthoc["candidates"][posthoc["configured"]]
    chosen = posthoc["chosen"]
    choice = f"{chosen['checkpoint']}_{chosen['tta']}, T={chosen['temperature']:.3g}"
    choice += f", clip={chosen['clip']}" if chosen["clip"] else ""
    results.add_row(
        posthoc["configured"],
        f"{configured['log_loss']:.4f}",
        f"{configured['accuracy']:.2%}",
        choice,
        f"{posthoc['log_loss']:.4f}",
    )
    console.print(results)
    candidates = Table(title="every candidate")
    for column in ("candidate", "log loss", "accuracy", "calibrated (cross-fitted)"):
        candidates.add_column(column)
    for name, scores in posthoc["candidates"].items():
        candidates.add_row(
            name,
            f"{scores['log_loss']:.4f}",
            f"{scores['accuracy']:.2%}",
            f"{scores['log_loss_calibrated']:.4f}",
        )
    console.print(candidates)


if __name__ == "__main__":
    main()
