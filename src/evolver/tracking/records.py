"""Turn a run directory's records (summary.json, history.csv) into MLflow metrics.

Folds are fold-keyed metrics on the one trial run (`fold1/val_loss` with step = epoch), not nested
fold runs: the MLflow UI then charts every fold's curve of a trial on that trial's page, compares
trials on `fold1/val_loss` directly, and the runs table stays one row per trial.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from evolver.records import (
    CONFIG_FILE,
    CONTINUED_KEY,
    CV_KEYS,
    HISTORY_FILE,
    HISTORY_VALUE_COLUMNS,
    OOF_FILE,
    PLOT_SUFFIX,
    POSTHOC_KEY,
    REPORT_JSON,
    REPORT_MD,
    SUMMARY_FILE,
    fold_checkpoints,
)

FOLD_SUMMARY_METRICS = ("best_val_loss", "best_epoch", "final_val_loss", "degradation",
                        "epochs_trained", "phase1_epochs", "phase2_epochs", "seconds")  # fmt: skip


def fold_metric_key(fold: int, name: str) -> str:
    return f"fold{fold}/{name}"


def read_summary(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / SUMMARY_FILE
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def read_history(run_dir: Path) -> list[dict[str, str]]:
    path = run_dir / HISTORY_FILE
    if not path.is_file():
        return []
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def _number(value: Any) -> float | None:
    if value is None or value == "":
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number


def history_points(
    rows: Iterable[dict[str, str]], skip: set[tuple[int, int, str]] = frozenset()
) -> Iterator[tuple[str, float, int]]:
    """(key, value, step) for each per-epoch value of each fold, but (fold, epoch, name) in skip."""
    for row in rows:
        fold, epoch = int(row["fold"]), int(row["epoch"])
        for name in HISTORY_VALUE_COLUMNS:
            value = _number(row.get(name))
            if value is not None and (fold, epoch, name) not in skip:
                yield fold_metric_key(fold, name), value, epoch


def summary_metrics(summary: dict[str, Any]) -> dict[str, float]:
    """The run-level numbers people sort and compare trials by."""
    metrics: dict[str, float] = {}
    for name in CV_KEYS:
        value = _number((summary.get("cv") or {}).get(name))
        if value is not None:
            metrics[f"cv.{name}"] = value
    folds = summary.get("folds") or []
    degradations = [d for d in (_number(f.get("degradation")) for f in folds) if d is not None]
    finite = [d for d in degradations if math.isfinite(d)]
    if finite:
        metrics["degradation.mean"] = sum(finite) / len(finite)
        metrics["degradation.max"] = max(finite)
    metrics["folds.completed"] = float(len(folds))
    metrics["folds.early_stopped"] = float(sum(bool(f.get("early_stopped")) for f in folds))
    epochs = [e for e in (_number(f.get("epochs_trained")) for f in folds) if e is not None]
    if epochs:
        metrics["epochs.mean"] = sum(epochs) / len(epochs)
    continued = summary.get(CONTINUED_KEY) or {}
    if continued:
        metrics["seconds_saved"] = float(_number(continued.get("seconds_saved")) or 0.0)
    for name in ("objective", "duration_s"):
        value = _number(summary.get(name))
        if value is not None:
            metrics[name] = value
    for fold in folds:
        for name in FOLD_SUMMARY_METRICS:
            value = _number(fold.get(name))
            if value is not None:
                metrics[fold_metric_key(int(fold["fold"]), name)] = value
    metrics.update(posthoc_metrics(summary.get(POSTHOC_KEY) or {}))
    return metrics


def posthoc_metrics(posthoc: dict[str, Any]) -> dict[str, float]:
    """The post-hoc table: `posthoc.<checkpoint>_<tta>.log_loss` (and accuracy, calibrated), and
    the chosen temperature, clip, log loss and calibration errors."""
    metrics: dict[str, float] = {}
    for name, scores in (posthoc.get("candidates") or {}).items():
        for key, value in scores.items():
            if _number(value) is not None:
                metrics[f"posthoc.{name}.{key}"] = float(value)
    chosen = posthoc.get("chosen") or {}
    for key, value in (
        ("temperature", chosen.get("temperature")),
        ("clip", chosen.get("clip")),
        ("log_loss", posthoc.get("log_loss")),
        ("ece_before", posthoc.get("ece_before")),
        ("ece_after", posthoc.get("ece_after")),
    ):
        if _number(value) is not None:
            metrics[f"posthoc.{key}"] = float(value)
    return metrics


def stop_reasons(summary: dict[str, Any]) -> dict[str, str]:
    """Tags `fold<k>.stop_reason`: why each fold stopped (early stopping, max epochs, ...)."""
    tags: dict[str, str] = {}
    for fold in summary.get("folds") or []:
        reason = fold.get("stop_reason")
        if reason:
            tags[f"fold{fold['fold']}.stop_reason"] = str(reason)
    continued = summary.get(CONTINUED_KEY) or {}
    if continued:
        # Lineage: the run whose fold end states this one continued, and after which epochs.
        tags["continued_from.run_dir"] = str(continued.get("run_dir"))
        epochs = continued.get("epochs") or {}
        tags["continued_from.epochs"] = ",".join(f"{k}:{v}" for k, v in epochs.items()) or "-"
        if continued.get("lr_scale") not in (None, 1.0):
            tags["continued_from.lr_scale"] = f"{continued['lr_scale']:g}"
    return tags


def artifact_files(run_dir: Path) -> dict[str, list[Path]]:
    """Files to upload, by artifact folder ('' = the run's root)."""
    root = [run_dir / name for name in (CONFIG_FILE, HISTORY_FILE, SUMMARY_FILE, OOF_FILE)]
    report = [run_dir / name for name in (REPORT_MD, REPORT_JSON)]
    plots = sorted(run_dir.glob(f"*{PLOT_SUFFIX}"))
    return {
        "": [p for p in root if p.is_file()],
        "report": [p for p in report if p.is_file()],
        "report/plots": plots,
    }


def best_checkpoints(run_dir: Path) -> list[Path]:
    return fold_checkpoints(run_dir, "best")
