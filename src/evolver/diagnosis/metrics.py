"""Per-fold statistics and run-level metrics, computed from the records (never transcribed).

Loss statistics come from the history when it has the fold; a fold known only from summary.json
uses the summary's numbers. Stop decisions (early stopped, reason) come from the summary, or are
derived from the settings when they tell; otherwise they stay unknown (None).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

from evolver.diagnosis.records import RunRecords, SavedFold
from evolver.diagnosis.thresholds import ScoreReference, Thresholds

# Epochs of the end of training whose linear trend decides "still improving".
TREND_WINDOW = 3


@dataclass(frozen=True)
class FoldStats:
    """One fold's training dynamics. Curve fields are None for a fold without history rows."""

    fold: int
    best_val_loss: float | None
    final_val_loss: float | None
    degradation: float | None
    relative_degradation: float | None
    degraded: bool | None
    epochs_trained: int | None
    phase1_epochs: int | None
    phase2_epochs: int | None
    early_stopped: bool | None
    stop_reason: str | None
    nonfinite: bool
    has_history: bool
    best_epoch: int | None = None
    best_phase: int | None = None
    best_phase_epoch: int | None = None
    best_position: float | None = None
    noise: float | None = None
    volatility: float | None = None
    max_spike: float | None = None
    phase1_max_spike: float | None = None
    phase_switch_jump: float | None = None
    phase1_improvement: float | None = None
    phase1_end_gain: float | None = None
    train_drop: float | None = None
    train_val_gap: float | None = None
    improving_at_end: bool | None = None
    train_falling_after_best: bool | None = None
    explosion: float | None = None
    best_val_acc: float | None = None

    def to_dict(self) -> dict[str, object]:
        return {key: _plain(value) for key, value in asdict(self).items()}


@dataclass(frozen=True)
class RunMetrics:
    """The run's key numbers; what `report.json` holds under `metrics`."""

    n_folds: int
    mean_final_val_loss: float | None
    std_final_val_loss: float | None
    mean_best_val_loss: float | None
    std_best_val_loss: float | None
    mean_degradation: float | None
    max_degradation: float | None
    max_degradation_fold: int | None
    folds_degraded: int
    folds_early_stopped: int | None
    mean_epochs_trained: float | None
    mean_epochs_trained_early_stopped: float | None
    mean_phase2_epochs_early_stopped: float | None
    folds_best_in_phase2: int | None
    mean_best_position: float | None
    mean_train_val_gap: float | None
    mean_volatility: float | None
    fold_spread: float | None
    score: float | None
    score_source: str | None
    baseline_score: float | None
    target_score: float | None
    relative_improvement: float | None
    gap_to_target: float | None
    improvement_needed: float | None

    def to_dict(self) -> dict[str, object]:
        return {key: _plain(value) for key, value in asdict(self).items()}


def fold_stats(records: RunRecords, thresholds: Thresholds) -> list[FoldStats]:
    """Statistics of every fold in the records, sorted by fold number."""
    by_fold = {int(k): group for k, group in records.history.groupby("fold", sort=True)}
    stats = []
    for fold in records.folds:
        saved = records.saved_folds.get(fold)
        if fold in by_fold:
            stats.append(_from_history(fold, by_fold[fold], saved, records, thresholds))
        else:
            stats.append(_from_summary(fold, saved or SavedFold(fold=fold), records, thresholds))
    return stats


def run_metrics(
    records: RunRecords, folds: list[FoldStats], reference: ScoreReference
) -> RunMetrics:
    finals = _series(stat.final_val_loss for stat in folds)
    bests = _series(stat.best_val_loss for stat in folds)
    degradations = {s.fold: s.degradation for s in folds if s.degradation is not None}
    max_fold = max(degradations, key=lambda k: degradations[k]) if degradations else None
    stop_known = [s for s in folds if s.early_stopped is not None]
    stopped = [s for s in folds if s.early_stopped]
    with_history = [s for s in folds if s.has_history]
    score, score_source = _score(records, finals, bests)
    relative_improvement = gap = needed = None
    if score is not None and reference.baseline:
        relative_improvement = (reference.baseline - score) / reference.baseline
    if score is not None and reference.target is not None and score:
        gap = score - reference.target
        needed = gap / score
    return RunMetrics(
        n_folds=len(folds),
        mean_final_val_loss=_mean(finals),
        std_final_val_loss=_std(finals),
        mean_best_val_loss=_mean(bests),
        std_best_val_loss=_std(bests),
        mean_degradation=_mean(_series(degradations.values())),
        max_degradation=degradations[max_fold] if max_fold is not None else None,
        max_degradation_fold=max_fold,
        folds_degraded=sum(1 for s in folds if s.degraded),
        folds_early_stopped=len(stopped) if stop_known else None,
        mean_epochs_trained=_mean(_series(s.epochs_trained for s in folds)),
        mean_epochs_trained_early_stopped=_mean(_series(s.epochs_trained for s in stopped)),
        mean_phase2_epochs_early_stopped=_mean(_series(s.phase2_epochs for s in stopped)),
        folds_best_in_phase2=(
            sum(1 for s in with_history if s.best_phase == 2) if with_history else None
        ),
        mean_best_position=_mean(_series(s.best_position for s in folds)),
        mean_train_val_gap=_mean(_series(s.train_val_gap for s in folds)),
        mean_volatility=_mean(_series(s.volatility for s in folds)),
        fold_spread=_spread(bests),
        score=score,
        score_source=score_source,
        baseline_score=reference.baseline,
        target_score=reference.target,
        relative_improvement=relative_improvement,
        gap_to_target=gap,
        improvement_needed=needed,
    )


def _value_at(rows: pd.DataFrame, column: str, index: int | None) -> float | None:
    """The column's finite value in the row at position `index` (None if absent)."""
    if index is None or column not in rows.columns:
        return None
    value = float(rows[column].iloc[index])
    return value if math.isfinite(value) else None


def estimate_noise(values: np.ndarray) -> float | None:
    """Epoch-to-epoch noise of a curve: RMS of its second differences over sqrt(6).

    Second differences cancel a smooth trend, so a steadily falling curve has little noise while
    a zig-zagging one has a lot; for white noise of std s the estimate is s.
    """
    if len(values) < 3:
        return None
    second = np.diff(values, n=2)
    return float(math.sqrt(float(np.mean(second**2)) / 6.0))


def _from_history(
    fold: int,
    rows: pd.DataFrame,
    saved: SavedFold | None,
    records: RunRecords,
    thresholds: Thresholds,
) -> FoldStats:
    val = rows["val_loss"].to_numpy(dtype=float)
    train = rows["train_loss"].to_numpy(dtype=float)
    epochs = rows["epoch"].to_numpy(dtype=int)
    phases = rows["phase"].to_numpy(dtype=int)
    finite_val = np.isfinite(val)
    nonfinite = bool((~finite_val).any() or np.isinf(train).any())
    if saved is not None and saved.nonfinite:
        nonfinite = True
    best = final = best_epoch = best_phase = best_phase_epoch = position = best_index = None
    train_falling = None
    if finite_val.any():
        best_index = int(np.nanargmin(np.where(finite_val, val, np.nan)))
        best, best_epoch, best_phase = float(val[best_index]), int(epochs[best_index]), None
        best_phase = int(phases[best_index])
        best_phase_epoch = int(np.sum(phases[: best_index + 1] == best_phase))
        position = best_epoch / int(epochs[-1])
        final = float(val[finite_val][-1])
        if best_index < len(train) - 1 and np.isfinite(train[[best_index, -1]]).all():
            train_falling = bool(train[-1] < train[best_index])
    degradation, relative, degraded = _degradation(best, final, thresholds)
    phase1, phase2 = int(np.sum(phases == 1)), int(np.sum(phases == 2))
    curve = val[(phases == 2) & finite_val] if phase2 >= 3 else val[finite_val]
    noise = estimate_noise(curve)
    level = float(np.median(curve)) if len(curve) else None
    volatility = noise / level if noise is not None and level else None
    finite_train = train[np.isfinite(train)]
    train_drop = None
    if len(finite_train) >= 3 and finite_train[0] > 0:
        train_drop = float((finite_train[0] - finite_train.min()) / finite_train[0])
    gap = None
    if finite_val[-1] and math.isfinite(train[-1]):
        gap = float(val[-1] - train[-1])
    epochs_trained = int(epochs[-1])
    return FoldStats(
        fold=fold,
        best_val_loss=best,
        final_val_loss=final,
        degradation=degradation,
        relative_degradation=relative,
        degraded=degraded,
        epochs_trained=epochs_trained,
        phase1_epochs=phase1,
        phase2_epochs=phase2,
        early_stopped=_early_stopped(saved, epochs_trained, records),
        stop_reason=saved.stop_reason if saved else None,
        nonfinite=nonfinite,
        has_history=True,
        best_epoch=best_epoch,
        best_phase=best_phase,
        best_phase_epoch=best_phase_epoch,
        best_position=position,
        noise=noise,
        volatility=volatility,
        max_spike=_max_spike(val[finite_val]),
        phase1_max_spike=_max_spike(val[(phases == 1) & finite_val]),
        phase_switch_jump=_phase_switch_jump(val, phases),
        phase1_improvement=_phase1_improvement(val[(phases == 1) & finite_val]),
        phase1_end_gain=_phase1_end_gain(val[(phases == 1) & finite_val]),
        train_drop=train_drop,
        train_val_gap=gap,
        improving_at_end=_improving_at_end(
            val[finite_val], best_epoch == epochs_trained, thresholds.degradation_tolerance
        ),
        train_falling_after_best=train_falling,
        explosion=_explosion(val, train),
        best_val_acc=_value_at(rows, "val_acc", best_index),
    )


def _from_summary(
    fold: int, saved: SavedFold, records: RunRecords, thresholds: Thresholds
) -> FoldStats:
    degradation, relative, degraded = _degradation(
        saved.best_val_loss, saved.final_val_loss, thresholds
    )
    epochs = saved.epochs_trained
    position = None
    if saved.best_epoch is not None and epochs:
        position = saved.best_epoch / epochs
    return FoldStats(
        fold=fold,
        best_val_loss=saved.best_val_loss,
        final_val_loss=saved.final_val_loss,
        degradation=degradation,
        relative_degradation=relative,
        degraded=degraded,
        epochs_trained=epochs,
        phase1_epochs=saved.phase1_epochs,
        phase2_epochs=saved.phase2_epochs,
        early_stopped=_early_stopped(saved, epochs, records),
        stop_reason=saved.stop_reason,
        nonfinite=bool(saved.nonfinite),
        has_history=False,
        best_epoch=saved.best_epoch,
        best_position=position,
    )


def _degradation(
    best: float | None, final: float | None, thresholds: Thresholds
) -> tuple[float | None, float | None, bool | None]:
    if best is None or final is None or not (math.isfinite(best) and math.isfinite(final)):
        return None, None, None
    degradation = final - best
    relative = degradation / abs(best) if best else None
    if relative is None:
        return degradation, None, degradation > 0
    return degradation, relative, relative > thresholds.degradation_tolerance


def _early_stopped(saved: SavedFold | None, epochs: int | None, records: RunRecords) -> bool | None:
    if saved is not None and saved.early_stopped is not None:
        return bool(saved.early_stopped)
    settings = records.settings
    if settings.early_stop_enabled is False:
        return False
    if epochs is None or settings.max_epochs is None:
        return None
    if epochs >= settings.max_epochs:
        return False
    # Fewer epochs than configured: early stopping, unless the run ended for another reason.
    if settings.early_stop_enabled and records.status in (None, "complete"):
        return True
    return None


def _max_spike(val: np.ndarray) -> float | None:
    if len(val) < 2:
        return None
    previous = val[:-1]
    rises = np.where(previous > 0, (val[1:] - previous) / np.where(previous > 0, previous, 1), 0)
    return float(max(rises.max(), 0.0))


def _phase_switch_jump(val: np.ndarray, phases: np.ndarray) -> float | None:
    if not ((phases == 1).any() and (phases == 2).any()):
        return None
    last_phase1 = val[np.flatnonzero(phases == 1)[-1]]
    first_phase2 = val[np.flatnonzero(phases == 2)[0]]
    if not (math.isfinite(last_phase1) and math.isfinite(first_phase2)) or last_phase1 <= 0:
        return None
    return float((first_phase2 - last_phase1) / last_phase1)


def _phase1_improvement(val: np.ndarray) -> float | None:
    if len(val) < 2 or val[0] <= 0:
        return None
    return float((val[0] - val[1:].min()) / val[0])


def _phase1_end_gain(val: np.ndarray) -> float | None:
    """How far the head phase's last epoch fell below the phase's earlier best (a fraction of
    it; negative when it did not): large while the head is still learning at the unfreeze."""
    if len(val) < 2:
        return None
    earlier = float(val[:-1].min())
    if earlier <= 0:
        return None
    return float((earlier - val[-1]) / earlier)


def _improving_at_end(val: np.ndarray, best_is_last: bool, tolerance: float) -> bool | None:
    """Still improving: the last epoch is the best, or the closing trend falls and the final loss
    is within the degradation tolerance of the best (a falling zig-zag far above it is noise)."""
    if len(val) < 2:
        return None
    if best_is_last:
        return True
    window = val[-TREND_WINDOW:]
    slope = np.polyfit(np.arange(len(window)), window, 1)[0]
    best = float(val.min())
    return bool(slope < 0 and val[-1] - best <= tolerance * abs(best))


def _explosion(val: np.ndarray, train: np.ndarray) -> float | None:
    ratios = []
    for curve in (val, train):
        finite = curve[np.isfinite(curve)]
        if len(finite) >= 2 and finite[0] > 0:
            ratios.append(float(finite.max() / finite[0]))
    return max(ratios) if ratios else None


def _score(
    records: RunRecords, finals: pd.Series, bests: pd.Series
) -> tuple[float | None, str | None]:
    """The run's CV score: the summary's objective, else the mean val loss the settings select."""
    if records.objective is not None:
        return records.objective, records.settings.objective_name or "objective"
    if records.settings.checkpoint == "best" and len(bests):
        return float(bests.mean()), "mean_best_val_loss"
    if len(finals):
        return float(finals.mean()), "mean_final_val_loss"
    return None, None


def _series(values) -> pd.Series:
    return pd.Series([v for v in values if v is not None and math.isfinite(v)], dtype=float)


def _mean(values: pd.Series) -> float | None:
    return float(values.mean()) if len(values) else None


def _std(values: pd.Series) -> float | None:
    # Sample std (ddof=1) as pandas computes it, the figure a notebook prints.
    return float(values.std()) if len(values) >= 2 else None


def _spread(bests: pd.Series) -> float | None:
    if len(bests) < 2 or not bests.mean():
        return None
    return float(bests.std() / bests.mean())


def _plain(value: object) -> object:
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
