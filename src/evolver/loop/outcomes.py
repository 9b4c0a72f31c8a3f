"""What a finished job left behind, turned into the trial's user attributes and constraints."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evolver.diagnosis import finding_ids
from evolver.diagnosis.findings import Finding, findings_of
from evolver.interrupts import InterruptedJob, interrupt_signal, signal_name
from evolver.loop.racing import FOLD_SCORES_ATTR, RACE_ATTR
from evolver.records import CONTINUED_KEY, REPORT_JSON, SUMMARY_FILE, fold_scores

log = logging.getLogger("evolver.loop")

# RunMetrics fields kept on each trial (the scoreboard measures proposals' effects on them).
METRIC_ATTRS = (
    "mean_best_val_loss",
    "mean_final_val_loss",
    "mean_degradation",
    "max_degradation",
    "folds_degraded",
    "folds_early_stopped",
    "mean_epochs_trained",
    "mean_best_position",
    "mean_volatility",
    "fold_spread",
    "score",
)
# Findings that mark a trial as unstable for the sampler's constraints.
UNSTABLE_FINDINGS = frozenset({finding_ids.UNSTABLE_VALIDATION, finding_ids.DIVERGED})
# Names of the values `constraints` returns, as set on Optuna trials.
CONSTRAINT_NAMES = ("degraded_folds", "unstable")
# `fail_reason` of a trial that Ctrl-C or SIGTERM stopped: it is re-run, never counted as failed.
INTERRUPTED = "interrupted"
# Trial attributes that tell how a job ended; a retry of the trial starts without them.
OUTCOME_ATTRS = frozenset(
    {
        "run_dir",
        "overrides",
        "run_status",
        "cv",
        "duration_s",
        "run_error",
        "metrics",
        "findings",
        "constraints",
        "fail_reason",
        "prune_reason",
        "interrupted_by",
        FOLD_SCORES_ATTR,
        RACE_ATTR,
        CONTINUED_KEY,
        "seconds_saved",
    }
)


@dataclass(frozen=True)
class JobOutcome:
    """A launched job's result: its return value, or the exception it raised."""

    value: Any = None
    error: BaseException | None = None
    run_dir: Path | None = None

    @property
    def pruned(self) -> bool:
        import optuna

        return isinstance(self.error, optuna.TrialPruned)

    @property
    def interrupted_by(self) -> str | None:
        """The signal's name when SIGINT or SIGTERM stopped the job, else None."""
        signum = interrupt_signal(self.error)
        return None if signum is None else signal_name(signum)

    def objective(self) -> float | None:
        """The finite float objective, or None."""
        if self.error is not None or isinstance(self.value, bool):
            return None
        try:
            value = float(self.value)
        except (TypeError, ValueError):
            return None
        return value if math.isfinite(value) else None

    def failure_reason(self) -> str:
        if self.interrupted_by is not None:
            return INTERRUPTED
        if self.error is not None:
            text = str(self.error).strip().splitlines()
            return f"{type(self.error).__name__}: {text[0] if text else ''}".rstrip(": ")
        return f"the job returned {self.value!r}, not a finite objective"


def as_interrupted(outcome: JobOutcome, signum: int) -> JobOutcome:
    """The outcome of a job that did not finish once `signum` arrived: interrupted by it."""
    if outcome.error is None or outcome.pruned or outcome.interrupted_by is not None:
        return outcome
    return JobOutcome(error=InterruptedJob(signum), run_dir=outcome.run_dir)


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def report_findings(report: Mapping[str, Any], path: Path) -> list[Finding]:
    """The findings of `report.json`'s content read from `path`; none when they do not parse."""
    try:
        return findings_of(report)
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        log.warning("%s: findings not readable (%s: %s)", path, type(error).__name__, error)
        return []


def record_attrs(run_dir: Path | None, degradation_tolerance: float) -> dict[str, Any]:
    """The run's CV scores, dynamics statistics, finding ids and constraints, from its
    `summary.json` and `report.json` (whatever exists)."""
    if run_dir is None:
        return {}
    attrs: dict[str, Any] = {"run_dir": str(run_dir)}
    summary = read_json(run_dir / SUMMARY_FILE) or {}
    report = read_json(run_dir / REPORT_JSON) or {}
    if summary:
        attrs["run_status"] = summary.get("status")
        attrs["cv"] = {k: v for k, v in (summary.get("cv") or {}).items() if _finite(v)}
        if summary.get("duration_s") is not None:
            attrs["duration_s"] = summary["duration_s"]
        if summary.get("error"):
            attrs["run_error"] = str(summary["error"])[:500]
        continued = summary.get(CONTINUED_KEY) or {}
        if continued:
            attrs[CONTINUED_KEY] = dict(continued)
            attrs["seconds_saved"] = continued.get("seconds_saved") or 0.0
    metrics = report.get("metrics") or {}
    if metrics:
        attrs["metrics"] = {k: metrics[k] for k in METRIC_ATTRS if _finite(metrics.get(k))}
    findings = report_findings(report, run_dir / REPORT_JSON)
    attrs["findings"] = [finding.id for finding in findings if finding.id]
    folds = summary.get("folds") or report.get("folds") or []
    objective = str(summary.get("objective_name") or "cv.loss_best")
    # JSON keys: the fold numbers are stored as strings (racing.stored_fold_scores reads them).
    attrs[FOLD_SCORES_ATTR] = {str(k): v for k, v in fold_scores(folds, objective).items()}
    attrs["constraints"] = constraints(folds, attrs["findings"], degradation_tolerance)
    return attrs


def constraints(
    folds: list[dict[str, Any]], findings: list[str], degradation_tolerance: float
) -> list[float]:
    """Optuna constraints (feasible when <= 0): (1) the share of folds whose final val loss
    degraded beyond the tolerance, minus one half, so most folds degrading is infeasible;
    (2) +1 when validation was unstable or diverged, else -1."""
    degraded = 0
    counted = 0
    for fold in folds:
        best, final = fold.get("best_val_loss"), fold.get("final_val_loss")
        if not (_finite(best) and _finite(final)) or not best:
            continue
        counted += 1
        if (final - best) / abs(best) > degradation_tolerance:
            degraded += 1
    share = degraded / counted if counted else 0.0
    unstable = 1.0 if UNSTABLE_FINDINGS & set(findings) else -1.0
    return [round(share - 0.5, 6), unstable]


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
