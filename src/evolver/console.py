"""The fold table printed at the end of a run, like the seed analysis's table, with rich."""

from __future__ import annotations

import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from evolver.records import RunSummary


def output_console(log_width: int = 160) -> Console:
    """A console for tables: the terminal's width, or a wide fixed one for logs and pipes
    (rich would otherwise squeeze every table to 80 columns there)."""
    return Console(width=None if sys.stdout.isatty() else log_width)


def _num(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def fold_table(summary: RunSummary) -> Table:
    table = Table(title=f"Folds ({summary.status})", title_justify="left")
    for name in (
        "fold",
        "final",
        "best",
        "best epoch",
        "degradation",
        "epochs",
        "phase 2",
        "early stop",
        "reason",
    ):
        table.add_column(name, justify="left" if name == "reason" else "right")
    for f in summary.folds:
        table.add_row(
            str(f.fold),
            _num(f.final_val_loss),
            _num(f.best_val_loss),
            "-" if f.best_epoch is None else str(f.best_epoch),
            "-" if f.degradation is None else f"{f.degradation:+.4f}",
            str(f.epochs_trained),
            str(f.phase2_epochs),
            "yes" if f.early_stopped else "no",
            (f.stop_reason or "-") + (" (non-finite)" if f.nonfinite else ""),
        )
    return table


def print_run_end(summary: RunSummary, run_dir: Path, console: Console | None = None) -> None:
    console = console or output_console()
    console.print(fold_table(summary))
    cv = summary.cv
    console.print(
        f"CV loss (best checkpoints) {_num(cv.loss_best)}   CV loss (final weights) "
        f"{_num(cv.loss_final)}   OOF log loss {_num(cv.oof_log_loss)}   "
        f"accuracy {_num(cv.accuracy)}   ({summary.duration_s:.1f} s)"
    )
    if summary.error:
        console.print(f"[red]{summary.status}[/red]: {summary.error}", markup=True)
    console.print(f"run directory: {run_dir}", highlight=False, soft_wrap=True)
