"""`diagnose`: records -> metrics, fold statistics and findings (the report's content)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evolver.diagnosis.findings import DEFAULT_RULES, SEVERITIES, Finding, FindingRule, RuleContext
from evolver.diagnosis.metrics import FoldStats, RunMetrics, fold_stats, run_metrics
from evolver.diagnosis.posthoc import PosthocStudy
from evolver.diagnosis.proposals import Proposal
from evolver.diagnosis.records import RunRecords
from evolver.diagnosis.thresholds import ScoreReference, Thresholds


@dataclass(frozen=True)
class Diagnosis:
    """The outcome of diagnosing one run.

    `findings` are sorted by severity (most severe first); `notes` list inconsistencies found in
    the records themselves (for instance a summary whose best loss exceeds its final loss).
    """

    metrics: RunMetrics
    folds: list[FoldStats]
    findings: list[Finding]
    settings: dict[str, Any]
    thresholds: Thresholds
    notes: list[str] = field(default_factory=list)
    run_dir: Path | None = None
    status: str | None = None
    posthoc: PosthocStudy | None = None

    @property
    def finding_ids(self) -> list[str]:
        return [finding.id for finding in self.findings]

    @property
    def proposals(self) -> list[Proposal]:
        """Every proposal in finding order (most severe finding first)."""
        return [proposal for finding in self.findings for proposal in finding.proposals]

    def to_dict(self) -> dict[str, Any]:
        """The `report.json` content."""
        return {
            "run_dir": str(self.run_dir) if self.run_dir else None,
            "status": self.status,
            "metrics": self.metrics.to_dict(),
            "folds": [fold.to_dict() for fold in self.folds],
            "findings": [finding.to_dict() for finding in self.findings],
            "settings": self.settings,
            "thresholds": self.thresholds.to_dict(),
            "notes": list(self.notes),
            "posthoc": self.posthoc.to_dict() if self.posthoc else None,
        }


def diagnose(
    records: RunRecords,
    thresholds: Thresholds | None = None,
    reference: ScoreReference | None = None,
    rules: Sequence[FindingRule] = DEFAULT_RULES,
    posthoc: PosthocStudy | None = None,
) -> Diagnosis:
    """Compute fold statistics and metrics, then run every rule over them (`posthoc`: the
    run's post-hoc study of its out-of-fold predictions, when it has one)."""
    thresholds = thresholds or Thresholds()
    folds = fold_stats(records, thresholds)
    metrics = run_metrics(records, folds, reference or ScoreReference())
    context = RuleContext(folds, metrics, records.settings, thresholds, posthoc)
    findings = [finding for rule in rules if (finding := rule.check(context)) is not None]
    findings.sort(key=lambda finding: -SEVERITIES.index(finding.severity))
    return Diagnosis(
        metrics=metrics,
        folds=folds,
        findings=findings,
        settings=records.settings.to_dict(),
        thresholds=thresholds,
        notes=record_notes(records),
        run_dir=records.run_dir,
        status=records.status,
        posthoc=posthoc,
    )


def record_notes(records: RunRecords) -> list[str]:
    """Inconsistencies between or within the records, stated so nobody trusts them blindly."""
    notes = []
    for saved in records.saved_folds.values():
        best, final = saved.best_val_loss, saved.final_val_loss
        if best is not None and final is not None and best > final:
            notes.append(
                f"fold {saved.fold}: summary best_val_loss {best:.4g} is above its final "
                f"val loss {final:.4g}; a best can never exceed the final"
            )
    history_folds = set(records.history["fold"].astype(int)) if len(records.history) else set()
    missing = sorted(set(records.saved_folds) - history_folds)
    if history_folds and missing:
        notes.append(f"folds {missing} have no history rows; their curves are not diagnosed")
    if records.status in ("pruned", "failed"):
        error = records.summary.get("error")
        notes.append(f"run {records.status}" + (f": {error}" if error else ""))
    return notes


def diagnosis_options(config: Mapping[str, Any] | None) -> Mapping[str, Any]:
    """The `diagnosis` node of a resolved config mapping (empty when absent)."""
    node = (config or {}).get("diagnosis")
    return node if isinstance(node, Mapping) else {}
