"""Fold racing: stop a trial after a fold when its partial CV score cannot plausibly beat the
incumbent's, so a clearly worse configuration does not pay for all K folds.

The rule compares like with like: the trial's fold scores against the incumbent's on the same
folds (same splits: the fold assignment does not depend on the trial's parameters). After fold k
of K (k < K), with paired gaps d_i = trial_i - incumbent_i, the trial is raced out when

    mean(d_1..d_k) > sigmas * spread / sqrt(k)

where `spread` is the standard deviation of the incumbent's K fold scores. The spread says how
much one fold's score moves by chance of the split; averaging k folds shrinks that by sqrt(k).
A trial that is worse by more than that margin on the folds seen so far would need its remaining
folds to be better than the incumbent's by an implausible amount to win.

Pure Python: the rule is unit-tested and replayed on finished studies without torch
(`benchmarks/racing.py` measures its false-stop rate that way).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

# Trial user attribute holding each fold's objective value ({fold: score}).
FOLD_SCORES_ATTR = "fold_scores"
# Trial user attribute describing where a raced-out trial stopped.
RACE_ATTR = "raced_out"
DEFAULT_SIGMAS = 2.0


@dataclass(frozen=True)
class RaceVerdict:
    """Why a trial stopped after `after_fold` of `folds`."""

    after_fold: int
    folds: int
    incumbent: int
    mean_gap: float
    margin: float

    @property
    def reason(self) -> str:
        return (
            f"raced out after fold {self.after_fold} of {self.folds}: "
            f"{self.mean_gap:+.4g} worse than trial {self.incumbent} on the same folds "
            f"(margin {self.margin:.3g})"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "after_fold": self.after_fold,
            "folds": self.folds,
            "incumbent": self.incumbent,
            "mean_gap": round(self.mean_gap, 6),
            "margin": round(self.margin, 6),
        }


@dataclass(frozen=True)
class FoldRace:
    """The incumbent a trial races against: its number and its score on each of the K folds."""

    incumbent: int
    incumbent_scores: Mapping[int, float]
    sigmas: float = DEFAULT_SIGMAS

    @property
    def folds(self) -> int:
        return len(self.incumbent_scores)

    @property
    def spread(self) -> float:
        return statistics.stdev(self.incumbent_scores.values()) if self.folds > 1 else 0.0

    def verdict(self, scores: Mapping[int, float]) -> RaceVerdict | None:
        """The verdict on a trial's fold scores so far; None while it may still win (and always
        once every fold is in: a complete trial is judged by its CV score)."""
        shared = [fold for fold in scores if fold in self.incumbent_scores]
        k = len(shared)
        if k == 0 or len(scores) >= self.folds or self.spread <= 0:
            return None
        gaps = [scores[fold] - self.incumbent_scores[fold] for fold in shared]
        if not all(math.isfinite(gap) for gap in gaps):
            return None
        mean_gap = sum(gaps) / k
        margin = self.sigmas * self.spread / math.sqrt(k)
        if mean_gap <= margin:
            return None
        return RaceVerdict(max(shared), self.folds, self.incumbent, mean_gap, margin)


def incumbent_race(
    trials: Iterable[Any], folds: int, sigmas: float = DEFAULT_SIGMAS, exclude: int | None = None
) -> FoldRace | None:
    """The race against the best complete trial that has a score for each of the `folds` folds
    (Optuna FrozenTrials; None when there is none)."""
    from optuna.trial import TrialState

    best = None
    for trial in trials:
        if trial.state != TrialState.COMPLETE or trial.number == exclude or trial.value is None:
            continue
        scores = stored_fold_scores(trial.user_attrs)
        if len(scores) != folds or not math.isfinite(trial.value):
            continue
        if best is None or trial.value < best[0]:
            best = (trial.value, trial.number, scores)
    if best is None:
        return None
    return FoldRace(best[1], best[2], sigmas)


def stored_fold_scores(user_attrs: Mapping[str, Any]) -> dict[int, float]:
    """A trial's fold scores as stored (JSON turns the fold numbers into strings)."""
    raw = user_attrs.get(FOLD_SCORES_ATTR) or {}
    return {int(fold): float(score) for fold, score in raw.items()}


def replay(
    trials: Iterable[tuple[int, float, Mapping[int, float]]], sigmas: float = DEFAULT_SIGMAS
) -> list[tuple[int, RaceVerdict | None, bool]]:
    """Replay racing over finished trials, in order, each against the best before it: for each
    (number, CV value, fold scores) gives its verdict and whether that stop was false (the
    trial's full CV beat the incumbent's)."""
    results: list[tuple[int, RaceVerdict | None, bool]] = []
    best: tuple[float, int, Mapping[int, float]] | None = None
    for number, value, scores in trials:
        verdict = None
        if best is not None:
            race = FoldRace(best[1], best[2], sigmas)
            for k in range(1, len(scores)):
                partial = {fold: scores[fold] for fold in sorted(scores)[:k]}
                verdict = race.verdict(partial)
                if verdict is not None:
                    break
        false_stop = verdict is not None and best is not None and value < best[0]
        results.append((number, verdict, false_stop))
        if best is None or value < best[0]:
            best = (value, number, scores)
    return results
