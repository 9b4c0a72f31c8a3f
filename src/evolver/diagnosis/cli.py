"""`evolver report <run_dir> [<run_dir_b>]`: diagnose a run, or compare two runs."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from evolver.diagnosis.compare import compare_runs, write_comparison
from evolver.diagnosis.report import (
    REPORT_JSON,
    REPORT_MD,
    DiagnosedRun,
    diagnose_run,
    pct,
    write_diagnosis,
)
from evolver.errors import DataError
from evolver.writable import os_error_text, unwritable_reason

T = TypeVar("T")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="evolver report",
        description="Diagnose a run directory (history.csv, summary.json, config.yaml): write "
        "report.md, report.json and plots into it. With two run directories, also compare "
        "the second against the first and write comparison.md/json into the second.",
    )
    parser.add_argument("run_dir", type=Path, help="run directory to diagnose")
    parser.add_argument("run_dir_b", type=Path, nargs="?", help="second run, compared to the first")
    parser.add_argument("--baseline", type=float, help="baseline score to beat (lower is better)")
    parser.add_argument("--target", type=float, help="target score to reach (lower is better)")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument(
        "--output-dir",
        type=Path,
        help="write the report files here instead of into the (last) run directory",
    )
    return parser


def main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(list(argv))
    plots = False if args.no_plots else None
    if args.run_dir_b is None:
        run = diagnose_run(args.run_dir, baseline=args.baseline, target=args.target, plots=plots)
        out_dir = args.output_dir or args.run_dir
        check_output_dir(out_dir, args.run_dir, run)
        report = _writing_into(out_dir, lambda: write_diagnosis(run, out_dir))
        print(summary_text(args.run_dir, report, out_dir))
        return 0
    run_a = diagnose_run(args.run_dir, baseline=args.baseline, target=args.target)
    run_b = diagnose_run(args.run_dir_b, baseline=args.baseline, target=args.target, plots=plots)
    out_dir = args.output_dir or args.run_dir_b
    check_output_dir(out_dir, args.run_dir_b, run_b)
    report_b = _writing_into(out_dir, lambda: write_diagnosis(run_b, out_dir))
    comparison = compare_runs(run_a.diagnosis, run_b.diagnosis)
    markdown, data = _writing_into(out_dir, lambda: write_comparison(comparison, out_dir))
    print(summary_text(args.run_dir_b, report_b, out_dir))
    score = comparison.cv["score"]
    degradation = comparison.cv["mean_degradation"]
    print(
        f"  vs {args.run_dir}: score {_signed(score['delta'])} ({pct(score['relative'])}), "
        f"mean degradation {_signed(degradation['delta'])}; "
        f"resolved {', '.join(comparison.findings_resolved) or '-'}; "
        f"new {', '.join(comparison.findings_new) or '-'}"
    )
    print(f"  comparison: {markdown} and {data.name}")
    return 0


def check_output_dir(out_dir: Path, run_dir: Path, run: DiagnosedRun) -> None:
    """Report files can be created in `out_dir`; otherwise print the diagnosis (it needs no
    files) and raise a one-line error."""
    reason = unwritable_reason(out_dir)
    if reason is None:
        return
    print(summary_text(run_dir, {**run.diagnosis.to_dict(), "plots": []}, None))
    raise DataError(
        f"{out_dir}: cannot write the report: {reason} (--output-dir writes it elsewhere)"
    )


def _writing_into(out_dir: Path, write: Callable[[], T]) -> T:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        return write()
    except OSError as error:
        where = error.filename or out_dir
        raise DataError(f"{where}: cannot write the report: {os_error_text(error)}") from None


def summary_text(run_dir: Path, report: dict[str, Any], out_dir: Path | None = None) -> str:
    """A few lines: the headline numbers, the findings and where the report went (no such
    line when `out_dir` is None: nothing was written)."""
    m = report["metrics"]
    n = m["n_folds"]
    parts = [f"{n} folds"]
    if m["score"] is not None:
        parts.append(f"score {m['score']:.4g} ({m['score_source']})")
    if m["mean_best_val_loss"] is not None:
        spread = f" ± {m['std_best_val_loss']:.2g}" if m["std_best_val_loss"] is not None else ""
        parts.append(f"best {m['mean_best_val_loss']:.4g}{spread}")
    parts.append(f"{m['folds_degraded']}/{n} folds degraded")
    if m["folds_early_stopped"] is not None:
        parts.append(f"{m['folds_early_stopped']}/{n} early stopped")
    lines = [f"{run_dir}: " + ", ".join(parts)]
    reference = []
    if m["baseline_score"] is not None:
        better = pct(m["relative_improvement"])
        reference.append(f"baseline {m['baseline_score']:.4g}: {better} better")
    if m["target_score"] is not None:
        needed = pct(m["improvement_needed"])
        reference.append(f"target {m['target_score']:.4g}: {needed} still needed")
    if reference:
        lines.append("  " + "; ".join(reference))
    findings = [f"{f['id']} ({f['severity']})" for f in report["findings"]]
    lines.append("  findings: " + (", ".join(findings) if findings else "none (healthy)"))
    if out_dir is not None:
        plots = f", {len(report['plots'])} plots" if report["plots"] else ""
        lines.append(f"  report: {out_dir / REPORT_MD}, {REPORT_JSON}{plots}")
    return "\n".join(lines)


def _signed(value: float | None) -> str:
    return "-" if value is None else f"{value:+.4g}"
