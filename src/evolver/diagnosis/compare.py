"""Comparing two diagnosed runs (e.g. a baseline and its successor): per-fold and CV deltas."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evolver.diagnosis.analysis import Diagnosis

COMPARISON_MD = "comparison.md"
COMPARISON_JSON = "comparison.json"
# Run metrics compared; all are "lower is better" except none here, so a negative delta improves.
COMPARED_METRICS = (
    "score",
    "mean_final_val_loss",
    "mean_best_val_loss",
    "mean_degradation",
    "max_degradation",
    "folds_degraded",
    "folds_early_stopped",
    "mean_epochs_trained",
    "mean_volatility",
    "fold_spread",
)
FOLD_FIELDS = ("best_val_loss", "final_val_loss", "degradation", "epochs_trained")


@dataclass(frozen=True)
class Comparison:
    """Run b against run a. Deltas are b - a, so negative means b's loss is lower.

    `folds`: one row per fold present in both runs ({"fold", "<field>_a", "<field>_b",
    "<field>_delta"}); `cv`: {metric: {"a", "b", "delta", "relative"}}; `findings_resolved`,
    `findings_new`, `findings_kept`: finding ids.
    """

    run_a: str | None
    run_b: str | None
    folds: list[dict[str, Any]]
    cv: dict[str, dict[str, float | None]]
    findings_resolved: list[str]
    findings_new: list[str]
    findings_kept: list[str]

    def to_dict(self) -> dict[str, Any]:
        return {
            "run_a": self.run_a,
            "run_b": self.run_b,
            "folds": self.folds,
            "cv": self.cv,
            "findings_resolved": self.findings_resolved,
            "findings_new": self.findings_new,
            "findings_kept": self.findings_kept,
        }


def compare_runs(a: Diagnosis, b: Diagnosis) -> Comparison:
    a_folds = {fold.fold: fold for fold in a.folds}
    rows = []
    for fold in b.folds:
        if fold.fold not in a_folds:
            continue
        row: dict[str, Any] = {"fold": fold.fold}
        for name in FOLD_FIELDS:
            value_a, value_b = getattr(a_folds[fold.fold], name), getattr(fold, name)
            row[f"{name}_a"], row[f"{name}_b"] = value_a, value_b
            row[f"{name}_delta"] = _delta(value_a, value_b)
        rows.append(row)
    metrics_a, metrics_b = a.metrics.to_dict(), b.metrics.to_dict()
    cv = {}
    for name in COMPARED_METRICS:
        value_a, value_b = metrics_a.get(name), metrics_b.get(name)
        delta = _delta(value_a, value_b)
        relative = delta / abs(value_a) if delta is not None and value_a else None
        cv[name] = {"a": value_a, "b": value_b, "delta": delta, "relative": relative}
    ids_a, ids_b = set(a.finding_ids), set(b.finding_ids)
    return Comparison(
        run_a=str(a.run_dir) if a.run_dir else None,
        run_b=str(b.run_dir) if b.run_dir else None,
        folds=rows,
        cv=cv,
        findings_resolved=[i for i in a.finding_ids if i not in ids_b],
        findings_new=[i for i in b.finding_ids if i not in ids_a],
        findings_kept=[i for i in b.finding_ids if i in ids_a],
    )


def render_comparison(comparison: Comparison) -> str:
    from evolver.diagnosis.report import fmt, pct

    name_a = Path(comparison.run_a).name if comparison.run_a else "a"
    name_b = Path(comparison.run_b).name if comparison.run_b else "b"
    lines = [
        f"# Comparison: {name_b} vs {name_a}",
        "",
        f"Deltas are {name_b} - {name_a}; negative means lower loss in {name_b}.",
        "",
        "## CV",
        "",
        f"| metric | {name_a} | {name_b} | delta | relative |",
        "|:---|---:|---:|---:|---:|",
    ]
    for name, row in comparison.cv.items():
        lines.append(
            f"| {name} | {fmt(row['a'])} | {fmt(row['b'])} | {fmt(row['delta'])} | "
            f"{pct(row['relative'])} |"
        )
    lines += [
        "",
        "## Folds",
        "",
        "| fold | best a | best b | Δ best | final a | final b | Δ final | Δ degradation "
        "| Δ epochs |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in comparison.folds:
        lines.append(
            f"| {row['fold']} | {fmt(row['best_val_loss_a'])} | {fmt(row['best_val_loss_b'])} | "
            f"{fmt(row['best_val_loss_delta'])} | {fmt(row['final_val_loss_a'])} | "
            f"{fmt(row['final_val_loss_b'])} | {fmt(row['final_val_loss_delta'])} | "
            f"{fmt(row['degradation_delta'])} | {fmt(row['epochs_trained_delta'])} |"
        )
    lines += [
        "",
        "## Findings",
        "",
        f"- Resolved: {', '.join(comparison.findings_resolved) or '-'}",
        f"- New: {', '.join(comparison.findings_new) or '-'}",
        f"- Still present: {', '.join(comparison.findings_kept) or '-'}",
        "",
    ]
    return "\n".join(lines)


def write_comparison(comparison: Comparison, out_dir: Path) -> tuple[Path, Path]:
    from evolver.diagnosis.report import write_json

    markdown, data = out_dir / COMPARISON_MD, out_dir / COMPARISON_JSON
    markdown.write_text(render_comparison(comparison))
    write_json(data, comparison.to_dict())
    return markdown, data


def _delta(a: Any, b: Any) -> float | None:
    if a is None or b is None or isinstance(a, bool) or isinstance(b, bool):
        return None
    return b - a
