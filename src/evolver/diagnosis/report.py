"""Writing a diagnosis: `report.md` for people, `report.json` for the loop, PNG plots."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evolver.continuable import CONTINUE_FROM_KEY
from evolver.diagnosis import proposals as make
from evolver.diagnosis.analysis import Diagnosis, diagnose, diagnosis_options
from evolver.diagnosis.findings import Finding, findings_of
from evolver.diagnosis.posthoc import PosthocStudy, study_run
from evolver.diagnosis.records import RunRecords, load_run
from evolver.diagnosis.thresholds import ScoreReference, Thresholds
from evolver.errors import DataError
from evolver.records import REPORT_JSON, REPORT_MD

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DiagnosedRun:
    """A run's records, their diagnosis and whether plots are wanted (from config or caller)."""

    records: RunRecords
    diagnosis: Diagnosis
    plots: bool


def diagnose_run(
    run_dir: str | Path,
    cfg: Any = None,
    *,
    baseline: float | None = None,
    target: float | None = None,
    plots: bool | None = None,
) -> DiagnosedRun:
    """Load and diagnose a run with the thresholds of `cfg`, else config.yaml, else defaults."""
    records = load_run(run_dir)
    options = diagnosis_options_of(cfg) if cfg is not None else diagnosis_options(records.config)
    diagnosis = diagnose(
        records,
        Thresholds.from_mapping(options),
        ScoreReference.from_mapping(options).merged(baseline, target),
        posthoc=posthoc_study_of(records),
    )
    want_plots = bool(options.get("plots", True)) if plots is None else plots
    return DiagnosedRun(records, diagnosis, want_plots)


def write_report(
    run_dir: str | Path,
    cfg: Any = None,
    *,
    baseline: float | None = None,
    target: float | None = None,
    plots: bool | None = None,
) -> dict[str, Any]:
    """Diagnose the run in `run_dir` and write report.md, report.json and plots into it.

    `cfg` is the run's config (DictConfig or mapping); when None, thresholds and reference scores
    come from the run's `config.yaml`, else the defaults. `baseline`/`target` override the
    config's scores; `plots` overrides `diagnosis.plots`. Returns `report.json`'s content.
    """
    run = diagnose_run(run_dir, cfg, baseline=baseline, target=target, plots=plots)
    return write_diagnosis(run, Path(run_dir))


def posthoc_study_of(records: RunRecords) -> PosthocStudy | None:
    """The post-hoc study of the run's out-of-fold predictions (None without any)."""
    if records.run_dir is None:
        return None
    settings = records.summary.get("settings") or {}
    views = settings.get("tta") or (records.config.get("tta") or {}).get("views")
    try:
        return study_run(records.run_dir, records.settings.checkpoint, views)
    except (OSError, ValueError, KeyError, DataError) as error:
        log.warning("post-hoc study skipped for %s: %s", records.run_dir, error)
        return None


def write_diagnosis(run: DiagnosedRun, run_dir: Path) -> dict[str, Any]:
    plot_files = write_plot_files(run.records, run.diagnosis, run_dir) if run.plots else []
    report = run.diagnosis.to_dict()
    report["plots"] = [path.name for path in plot_files]
    write_json(run_dir / REPORT_JSON, report)
    markdown = render_markdown(run.diagnosis, [path.name for path in plot_files])
    (run_dir / REPORT_MD).write_text(markdown)
    return report


def diagnosis_options_of(cfg: Any) -> Mapping[str, Any]:
    """The `diagnosis` group of a run config (DictConfig or mapping), resolved, as a mapping."""
    if type(cfg).__module__.startswith("omegaconf"):
        from omegaconf import OmegaConf

        node = cfg.get("diagnosis")
        if node is None:
            return {}
        return OmegaConf.to_container(node, resolve=True)  # type: ignore[return-value]
    if isinstance(cfg, Mapping):
        return diagnosis_options(cfg)
    raise TypeError(f"expected a config mapping, got {type(cfg).__name__}")


def read_findings(run_dir: str | Path) -> list[Finding]:
    """The findings (with their proposals) of a run's `report.json`; [] when it has none."""
    path = Path(run_dir) / REPORT_JSON
    if not path.is_file():
        return []
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise DataError(f"{path}: cannot read JSON ({error.__class__.__name__})") from error
    return findings_of(data)


def validate_options(options: Mapping[str, Any] | None) -> None:
    """Raise ConfigError (naming the `diagnosis.*` field) for a bad `diagnosis` config group."""
    Thresholds.from_mapping(options)
    ScoreReference.from_mapping(options)


def write_plot_files(records: RunRecords, diagnosis: Diagnosis, run_dir: Path) -> list[Path]:
    from evolver.diagnosis.plots import write_plots, write_reliability_plot

    try:
        written = write_plots(records.history, diagnosis.folds, run_dir)
        if diagnosis.posthoc is not None:
            written.append(write_reliability_plot(diagnosis.posthoc, run_dir))
        return written
    except (OSError, ValueError, RuntimeError) as error:
        # Plots are a convenience: a figure that fails must not cost the report.
        log.warning("diagnosis plots not written for %s: %s", run_dir, error)
        return []


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(_json_safe(data), indent=2) + "\n")


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(key): _json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(item) for item in value]
    return value


def fmt(value: Any, digits: int = 4) -> str:
    """A number for a table: 4 significant digits, '-' when unknown."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return "-" if not math.isfinite(value) else f"{value:.{digits}g}"
    return str(value)


def pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def render_markdown(diagnosis: Diagnosis, plot_names: list[str]) -> str:
    m = diagnosis.metrics
    s = diagnosis.settings
    title = diagnosis.run_dir.name if diagnosis.run_dir else "run"
    lines = [f"# Diagnosis of {title}", ""]
    facts = [f"{m.n_folds} folds"]
    if diagnosis.status:
        facts.insert(0, f"status {diagnosis.status}")
    for key in ("model", "lr_backbone", "lr_head", "batch_size", "schedule", "patience"):
        if s.get(key) is not None:
            facts.append(f"{key} {fmt(s[key])}")
    lines += [", ".join(facts) + ".", ""]
    lines += _score_section(diagnosis)
    lines += _fold_table(diagnosis)
    lines += [
        "## Key metrics",
        "",
        f"- Mean final val loss: {fmt(m.mean_final_val_loss)} ± {fmt(m.std_final_val_loss)}",
        f"- Mean best val loss: {fmt(m.mean_best_val_loss)} ± {fmt(m.std_best_val_loss)}",
        f"- Mean degradation from best to final: {fmt(m.mean_degradation)}",
        f"- Max degradation: {fmt(m.max_degradation)} (fold {fmt(m.max_degradation_fold)})",
        f"- Folds degraded: {m.folds_degraded}/{m.n_folds} "
        f"(beyond {diagnosis.thresholds.degradation_tolerance:.0%} of the best)",
        f"- Folds early stopped: {fmt(m.folds_early_stopped)}/{m.n_folds}",
        f"- Mean epochs trained: {fmt(m.mean_epochs_trained, 3)} "
        f"(early-stopped folds: {fmt(m.mean_epochs_trained_early_stopped, 3)}, of which phase 2: "
        f"{fmt(m.mean_phase2_epochs_early_stopped, 3)})",
        f"- Folds with their best in phase 2: {fmt(m.folds_best_in_phase2)}; mean best position "
        f"in training: {pct(m.mean_best_position)}",
        f"- Mean train/val gap at the end: {fmt(m.mean_train_val_gap)}; val-loss volatility: "
        f"{pct(m.mean_volatility)}; fold spread: {pct(m.fold_spread)}",
        "",
    ]
    lines += _posthoc_section(diagnosis.posthoc)
    lines += _findings_section(diagnosis)
    if diagnosis.notes:
        lines += ["## Notes on the records", ""]
        lines += [f"- {note}" for note in diagnosis.notes] + [""]
    if plot_names:
        lines += ["## Plots", ""]
        lines += [f"![{name}]({name})" for name in plot_names] + [""]
    return "\n".join(lines)


def _score_section(diagnosis: Diagnosis) -> list[str]:
    m = diagnosis.metrics
    if m.score is None:
        return []
    lines = ["## Score", "", f"- Score ({m.score_source}): {fmt(m.score)}"]
    if m.baseline_score is not None:
        lines.append(
            f"- Baseline {fmt(m.baseline_score)}: improvement "
            f"{fmt(m.baseline_score - m.score)} ({pct(m.relative_improvement)})"
        )
    if m.target_score is not None:
        lines.append(
            f"- Target {fmt(m.target_score)}: gap {fmt(m.gap_to_target)}, improvement still "
            f"needed {pct(m.improvement_needed)}"
        )
    return [*lines, ""]


def _fold_table(diagnosis: Diagnosis) -> list[str]:
    lines = [
        "## Folds",
        "",
        "| fold | best | best epoch | final | degradation | epochs (p1+p2) | early stopped "
        "| stop reason |",
        "|---:|---:|---:|---:|---:|---:|:---:|:---|",
    ]
    for f in diagnosis.folds:
        where = fmt(f.best_epoch)
        if f.best_phase is not None:
            where += f" (p{f.best_phase} e{f.best_phase_epoch})"
        epochs = fmt(f.epochs_trained)
        if f.phase1_epochs is not None and f.phase2_epochs is not None:
            epochs += f" ({f.phase1_epochs}+{f.phase2_epochs})"
        degradation = fmt(f.degradation)
        if f.degraded:
            degradation = f"**{degradation}**"
        lines.append(
            f"| {f.fold} | {fmt(f.best_val_loss)} | {where} | {fmt(f.final_val_loss)} | "
            f"{degradation} | {epochs} | {fmt(f.early_stopped)} | {f.stop_reason or '-'} |"
        )
    return [*lines, ""]


def _posthoc_section(study: PosthocStudy | None) -> list[str]:
    if study is None:
        return []
    lines = [
        "## Post-hoc choices (out-of-fold, no training)",
        "",
        f"{study.samples} out-of-fold predictions. *calibrated* is cross-fitted: each fold is "
        "scored with the temperature and clip fitted on the other folds.",
        "",
        "| candidate | log loss | accuracy | calibrated log loss | calibrated accuracy "
        "| temperature (all folds) | clip |",
        "|:---|---:|---:|---:|---:|---:|---:|",
    ]
    for c in study.candidates:
        marks = [m for m, on in (("configured", c.name == study.configured),
                                 ("chosen", c.name == study.chosen.name)) if on]  # fmt: skip
        name = c.name + (f" ({', '.join(marks)})" if marks else "")
        lines.append(
            f"| {name} | {fmt(c.log_loss)} | {pct(c.accuracy)} | {fmt(c.log_loss_calibrated)} "
            f"| {pct(c.accuracy_calibrated)} | {fmt(c.temperature, 3)} | {fmt(c.clip)} |"
        )
    chosen = study.chosen
    folds = ", ".join(f"{k}: {v:.3g}" for k, v in study.fold_temperatures.items())
    crossed = ", ".join(f"{k}: {v:.3g}" for k, v in study.crossfit_temperatures.items())
    lines += [
        "",
        f"- Chosen: {chosen.checkpoint} weights, TTA {chosen.tta}, temperature "
        f"{chosen.temperature:.3g}, clip {fmt(chosen.clip)}: OOF log loss "
        f"{fmt(study.configured_score.log_loss)} -> {fmt(study.log_loss)} "
        f"({pct(study.relative_gain)} lower)",
        f"- Temperature fitted on each fold alone: {folds}; used for each fold when "
        f"cross-fitting: {crossed}",
        f"- Expected calibration error: {fmt(study.ece_before)} before, "
        f"{fmt(study.ece_after)} after",
        "",
    ]
    return lines


def _findings_section(diagnosis: Diagnosis) -> list[str]:
    if not diagnosis.findings:
        return ["## Findings", "", "No findings: the curves look healthy.", ""]
    lines = ["## Findings", ""]
    for index, finding in enumerate(diagnosis.findings, start=1):
        lines += [f"### {index}. `{finding.id}` ({finding.severity})", "", finding.explanation, ""]
        lines.append("Evidence:")
        lines += [f"- {key}: {_evidence(value)}" for key, value in finding.evidence.items()]
        lines.append("")
        if finding.proposals:
            lines.append("Proposals:")
            for proposal in finding.proposals:
                expected = proposal.expected_effect
                lines.append(
                    f"- **{proposal.name}**: {proposal.reason} Expected: "
                    f"{expected.get('metric')} {expected.get('direction')}."
                )
                overrides = proposal.overrides
                if make.continues_base(proposal):
                    run = diagnosis.run_dir or "RUN_DIR"
                    overrides = [*overrides, f"{CONTINUE_FROM_KEY}={run}"]
                lines.append(f"  `{' '.join(overrides)}`")
            lines.append("")
    return lines


def _evidence(value: Any) -> str:
    if isinstance(value, Mapping):
        return ", ".join(f"{key}: {_evidence(item)}" for key, item in value.items()) or "-"
    if isinstance(value, list):
        return ", ".join(_evidence(item) for item in value) or "-"
    return fmt(value)
