"""A run's records: per-fold statistics from epoch rows, CV scores, and the names of the files,
columns and keys of a run directory.

Pure Python (csv/json/math): the statistics are unit-tested without torch, and every number in
`summary.json` is computed from the same rows that `history.csv` holds.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# history.csv: one row per fold and epoch, keyed by the integer columns.
HISTORY_KEY_COLUMNS = ("fold", "epoch", "phase")
HISTORY_VALUE_COLUMNS = ("train_loss", "val_loss", "val_acc", "lr_backbone", "lr_head")
HISTORY_COLUMNS = HISTORY_KEY_COLUMNS + HISTORY_VALUE_COLUMNS

# The files of a run directory.
HISTORY_FILE = "history.csv"
SUMMARY_FILE = "summary.json"
OOF_FILE = "oof.csv"
# Every fold's validation set under each checkpoint (best, last, average) and flip view: the
# post-hoc study's input (evolver.diagnosis.posthoc.OofCandidates).
OOF_CANDIDATES_FILE = "oof_candidates.npz"
CONFIG_FILE = "config.yaml"
# The diagnosis: report.md for people, report.json for the loop, and its plots.
REPORT_MD = "report.md"
REPORT_JSON = "report.json"
PLOT_SUFFIX = ".png"
VAL_LOSS_PNG = "val_loss.png"
TRAIN_VS_VAL_PNG = "train_vs_val.png"
LR_SCHEDULE_PNG = "lr_schedule.png"
RELIABILITY_PNG = "reliability.png"
# `evolver predict`'s default output.
SUBMISSION_FILE = "submission.csv"
# Fold checkpoints: checkpoints/fold<k>-best.ckpt and fold<k>-last.ckpt.
CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_SUFFIX = ".ckpt"

# A loop's folder keeps one iteration_<i>/iteration.json per closed iteration: what it planned
# (findings, proposals) and how it ended (trial states, best, training seconds).
ITERATION_DIR_PREFIX = "iteration_"
ITERATION_FILE = "iteration.json"

CV_KEYS = ("loss_best", "loss_final", "oof_log_loss", "accuracy", "oof_log_loss_calibrated")
# summary.json's key for the post-hoc study (chosen temperature, clip, checkpoint and TTA).
POSTHOC_KEY = "posthoc"
# summary.json's key of a continued run (checkpoint.continue_from): the base run directory, the
# epoch each fold continued after, the training seconds the base had spent on them, and the
# factor on the learning rates from there (`lr_scale`, 1.0 unless checkpoint.continue_lr_scale).
CONTINUED_KEY = "continued_from"
# summary.json `status` values. An interrupted run (Ctrl-C, SIGTERM) has the signal's name as its
# `error` and keeps the epochs it finished.
STATUS_COMPLETE = "complete"
STATUS_PRUNED = "pruned"
STATUS_FAILED = "failed"
STATUS_INTERRUPTED = "interrupted"
RUN_STATUSES = (STATUS_COMPLETE, STATUS_PRUNED, STATUS_FAILED, STATUS_INTERRUPTED)


@dataclass(frozen=True)
class StopInfo:
    """How a fold's fit ended, as the trainer saw it."""

    early_stopped: bool = False
    stop_reason: str | None = None  # e.g. patience_exhausted, max_epochs, pruned, failed
    stop_message: str | None = None
    nonfinite: bool = False


@dataclass
class FoldSummary:
    fold: int
    best_val_loss: float | None
    best_epoch: int | None
    final_val_loss: float | None
    degradation: float | None
    epochs_trained: int
    phase1_epochs: int
    phase2_epochs: int
    early_stopped: bool
    stop_reason: str | None
    nonfinite: bool
    stop_message: str | None = None
    # The log loss of the fold's out-of-fold predictions (the configured checkpoint and TTA);
    # None for a fold cut short.
    oof_log_loss: float | None = None
    # Wall-clock seconds of the fold's fit in this run.
    seconds: float | None = None
    # A fold continued from another run's end state (checkpoint.continue_from): the epoch it
    # continued after, and the seconds the base run had spent to get there.
    continued_after_epoch: int | None = None
    seconds_saved: float | None = None


# The per-fold value behind each objective, for comparing trials fold by fold (fold racing). The
# calibrated objective is compared on the folds' uncalibrated log loss, its closest per-fold
# figure; accuracy has none (a higher-is-better score is not an objective).
FOLD_SCORE_KEYS = {
    "cv.loss_best": "best_val_loss",
    "cv.loss_final": "final_val_loss",
    "cv.oof_log_loss": "oof_log_loss",
    "cv.oof_log_loss_calibrated": "oof_log_loss",
}


def fold_scores(folds: Iterable[Mapping[str, Any]], objective: str) -> dict[int, float]:
    """Each complete fold's value of `objective` ({} when the objective has no per-fold value)."""
    key = FOLD_SCORE_KEYS.get(objective)
    if key is None:
        return {}
    return {int(fold["fold"]): float(fold[key]) for fold in folds if _finite(fold.get(key))}


def summarize_fold(fold: int, rows: Sequence[Mapping[str, Any]], stop: StopInfo) -> FoldSummary:
    """Best/final validation loss, degradation and epoch counts of one fold's epoch rows."""
    ordered = sorted((r for r in rows if int(r["fold"]) == fold), key=lambda r: int(r["epoch"]))
    finite = [r for r in ordered if _finite(r["val_loss"])]
    best = min(finite, key=lambda r: (float(r["val_loss"]), int(r["epoch"])), default=None)
    final = float(ordered[-1]["val_loss"]) if ordered else None
    final = final if final is not None and _finite(final) else None
    best_loss = float(best["val_loss"]) if best else None
    nonfinite = stop.nonfinite or any(
        not _finite(r["val_loss"]) or not _finite(r["train_loss"]) for r in ordered
    )
    return FoldSummary(
        fold=fold,
        best_val_loss=best_loss,
        best_epoch=int(best["epoch"]) if best else None,
        final_val_loss=final,
        degradation=None if best_loss is None or final is None else final - best_loss,
        epochs_trained=len(ordered),
        phase1_epochs=sum(1 for r in ordered if int(r["phase"]) == 1),
        phase2_epochs=sum(1 for r in ordered if int(r["phase"]) == 2),
        early_stopped=stop.early_stopped,
        stop_reason=stop.stop_reason,
        nonfinite=nonfinite,
        stop_message=stop.stop_message,
    )


@dataclass
class CvScores:
    loss_best: float | None = None
    loss_final: float | None = None
    oof_log_loss: float | None = None
    accuracy: float | None = None
    # The post-hoc choice's OOF log loss, each fold calibrated with the other folds' fit.
    oof_log_loss_calibrated: float | None = None


def cv_losses(folds: Sequence[FoldSummary]) -> tuple[float | None, float | None]:
    """Mean best-checkpoint loss and mean last-weights loss over folds (None if any is missing)."""
    return (
        _mean([f.best_val_loss for f in folds]),
        _mean([f.final_val_loss for f in folds]),
    )


@dataclass
class RunSummary:
    status: str
    error: str | None
    folds: list[FoldSummary]
    cv: CvScores
    settings: dict[str, Any]
    objective_name: str
    duration_s: float
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def objective(self) -> float | None:
        return objective_value(self.cv, self.objective_name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "error": self.error,
            "folds": [asdict(f) for f in self.folds],
            "cv": asdict(self.cv),
            "settings": self.settings,
            "objective_name": self.objective_name,
            "objective": self.objective,
            "duration_s": round(self.duration_s, 3),
            **self.extra,
        }


def objective_value(cv: CvScores, name: str) -> float | None:
    key = name.removeprefix("cv.")
    value = getattr(cv, key, None)
    return None if value is None or not _finite(value) else float(value)


def write_history(run_dir: Path, rows: Iterable[Mapping[str, Any]]) -> Path:
    path = run_dir / HISTORY_FILE
    ordered = sorted(rows, key=lambda r: (int(r["fold"]), int(r["epoch"])))
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=HISTORY_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(ordered)
    return path


def read_history(run_dir: Path) -> list[dict[str, Any]]:
    with (run_dir / HISTORY_FILE).open(newline="") as handle:
        return [
            {k: (int(v) if k in HISTORY_KEY_COLUMNS else float(v)) for k, v in row.items()}
            for row in csv.DictReader(handle)
        ]


def write_summary(run_dir: Path, summary: RunSummary) -> Path:
    path = run_dir / SUMMARY_FILE
    path.write_text(json.dumps(_json_safe(summary.to_dict()), indent=2) + "\n")
    return path


def write_oof(
    run_dir: Path,
    indices: Sequence[int],
    folds: Sequence[int],
    targets: Sequence[int],
    probabilities: Sequence[Sequence[float]],
) -> Path:
    """Out-of-fold predictions: `index, fold, target, p_0..p_{C-1}`, sorted by sample index."""
    path = run_dir / OOF_FILE
    classes = len(probabilities[0]) if len(probabilities) else 0
    rows = sorted(zip(indices, folds, targets, probabilities, strict=True), key=lambda r: r[0])
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["index", "fold", "target", *[f"p_{c}" for c in range(classes)]])
        for index, fold, target, probs in rows:
            writer.writerow(
                [int(index), int(fold), int(target), *[f"{float(p):.6g}" for p in probs]]
            )
    return path


def checkpoint_name(fold: int | str, kind: str) -> str:
    """The file name of fold `fold`'s `kind` (best, last) checkpoint, without its suffix."""
    return f"fold{fold}-{kind}"


def fold_checkpoints(run_dir: Path, kind: str) -> list[Path]:
    """Every fold's `kind` checkpoint in the run directory."""
    return sorted((run_dir / CHECKPOINT_DIR).glob(checkpoint_name("*", kind) + CHECKPOINT_SUFFIX))


def _mean(values: Sequence[float | None]) -> float | None:
    if not values or any(v is None or not _finite(v) for v in values):
        return None
    return sum(float(v) for v in values) / len(values)  # type: ignore[arg-type]


def _finite(value: Any) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def _json_safe(value: Any) -> Any:
    """NaN/inf are not JSON: write them as null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value
