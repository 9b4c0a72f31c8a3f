"""Diagnosis of training dynamics: pure Python and pandas, importable without torch.

Public API (used by training and the loop):

- `load_run(run_dir) -> RunRecords`: read `history.csv` (enough on its own), `summary.json` and
  `config.yaml` of a run directory.
- `diagnose(records, thresholds=None, reference=None, rules=DEFAULT_RULES) -> Diagnosis`:
  fold statistics, `RunMetrics` and `Finding`s, each with `id`, `severity`, `evidence`,
  `explanation` and `proposals` (`Proposal` with `changes`, `overrides`, `reason`,
  `expected_effect`).
- `diagnose_run(run_dir, cfg=None, baseline=, target=) -> DiagnosedRun`: load and diagnose with
  the thresholds of `cfg` (else the run's config.yaml, else the defaults), writing nothing.
- `write_report(run_dir, cfg=None) -> dict`: diagnose a run and write `report.md`,
  `report.json` and PNG plots into it; returns the report dict (`report.json`'s content).
- `read_findings(run_dir) -> list[Finding]`: the findings of a written `report.json`.
- `validate_options(cfg.diagnosis)`: ConfigError for a bad `diagnosis` group, before training.
- `compare_runs(a, b) -> Comparison`: per-fold and CV deltas between two diagnosed runs.
"""

from evolver.diagnosis.analysis import Diagnosis, diagnose
from evolver.diagnosis.compare import Comparison, compare_runs
from evolver.diagnosis.findings import DEFAULT_RULES, SEVERITIES, Finding, FindingRule
from evolver.diagnosis.metrics import FoldStats, RunMetrics
from evolver.diagnosis.proposals import Proposal
from evolver.diagnosis.records import RunRecords, RunSettings, load_run
from evolver.diagnosis.report import (
    REPORT_JSON,
    REPORT_MD,
    DiagnosedRun,
    diagnose_run,
    read_findings,
    validate_options,
    write_report,
)
from evolver.diagnosis.thresholds import ScoreReference, Thresholds

__all__ = [
    "DEFAULT_RULES",
    "REPORT_JSON",
    "REPORT_MD",
    "SEVERITIES",
    "Comparison",
    "DiagnosedRun",
    "Diagnosis",
    "Finding",
    "FindingRule",
    "FoldStats",
    "Proposal",
    "RunMetrics",
    "RunRecords",
    "RunSettings",
    "ScoreReference",
    "Thresholds",
    "compare_runs",
    "diagnose",
    "diagnose_run",
    "load_run",
    "read_findings",
    "validate_options",
    "write_report",
]
