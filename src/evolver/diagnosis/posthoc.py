"""Post-hoc choices scored on out-of-fold predictions, with no training: a temperature, a clip
bound, the checkpoint (best, last or their weight average) and the TTA variant.

numpy and scipy only (importable without torch). Everything works on log-probabilities:

- a TTA variant averages the softmax probabilities of its views, as prediction does;
- a temperature T divides the log-probabilities before a softmax (for one view this is exactly
  temperature scaling of the logits);
- a clip bound c keeps every probability in [c, 1 - c] and renormalises.

Fitting on the predictions it scores would flatter the result, so each candidate's calibrated
score is cross-fitted: fold k is scored with the temperature and clip fitted on the other folds.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax, logsumexp

# The stored candidates: every fold's validation set under each checkpoint and each flip view.
CHECKPOINTS = ("best", "last", "average")
VIEWS = ("identity", "hflip", "vflip")
TTA_CHOICES: dict[str, tuple[str, ...]] = {
    "none": ("identity",),
    "hflip": ("identity", "hflip"),
    "flips": ("identity", "hflip", "vflip"),
}
# Temperatures searched (log scale) and clip bounds tried; None = no clipping.
TEMPERATURE_BOUNDS = (0.05, 20.0)
CLIP_GRID: tuple[float | None, ...] = (None, 1e-4, 5e-4, 1e-3, 2e-3, 5e-3, 0.01, 0.02, 0.05)
# Probabilities read back as 0 (a float32 softmax underflow, 6-digit text) count as this.
PROBABILITY_FLOOR = 1e-15
ECE_BINS = 15


# -- scores ----------------------------------------------------------------------------------
def log_loss(probabilities: np.ndarray, targets: np.ndarray) -> float:
    """Mean negative log-probability of the true class (scikit-learn's, without its checks)."""
    picked = probabilities[np.arange(len(targets)), targets]
    return float(-np.mean(np.log(np.clip(picked, PROBABILITY_FLOOR, 1.0))))


def accuracy(probabilities: np.ndarray, targets: np.ndarray) -> float:
    return float(np.mean(probabilities.argmax(axis=1) == targets))


@dataclass(frozen=True)
class ReliabilityBin:
    """Samples whose top-class confidence falls in [low, high)."""

    low: float
    high: float
    count: int
    confidence: float | None
    accuracy: float | None


def reliability_bins(
    probabilities: np.ndarray, targets: np.ndarray, bins: int = ECE_BINS
) -> list[ReliabilityBin]:
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == targets
    edges = np.linspace(0.0, 1.0, bins + 1)
    # The last bin is closed on the right so that confidence 1.0 is counted.
    which = np.clip(np.digitize(confidence, edges[1:-1], right=False), 0, bins - 1)
    result = []
    for index in range(bins):
        members = which == index
        count = int(members.sum())
        result.append(
            ReliabilityBin(
                low=float(edges[index]),
                high=float(edges[index + 1]),
                count=count,
                confidence=float(confidence[members].mean()) if count else None,
                accuracy=float(correct[members].mean()) if count else None,
            )
        )
    return result


def expected_calibration_error(
    probabilities: np.ndarray, targets: np.ndarray, bins: int = ECE_BINS
) -> float:
    """Top-label ECE: |accuracy - confidence| per equal-width confidence bin, weighted by size."""
    total = len(targets)
    return float(
        sum(
            b.count / total * abs(b.accuracy - b.confidence)  # type: ignore[operator]
            for b in reliability_bins(probabilities, targets, bins)
            if b.count
        )
    )


# -- calibration -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Calibration:
    """A temperature (> 0) and an optional clip bound in (0, 0.5)."""

    temperature: float = 1.0
    clip: float | None = None

    def apply(self, log_probs: np.ndarray) -> np.ndarray:
        return calibrated_probabilities(log_probs, self.temperature, self.clip)


def calibrated_probabilities(
    log_probs: np.ndarray, temperature: float = 1.0, clip: float | None = None
) -> np.ndarray:
    """softmax(log p / T), then clipped to [clip, 1 - clip] and renormalised."""
    probabilities = np.exp(log_softmax(log_probs / temperature, axis=1))
    return clip_probabilities(probabilities, clip)


def clip_probabilities(probabilities: np.ndarray, clip: float | None) -> np.ndarray:
    if clip is None:
        return probabilities
    clipped = np.clip(probabilities, clip, 1.0 - clip)
    return clipped / clipped.sum(axis=1, keepdims=True)


def log_probabilities(probabilities: np.ndarray) -> np.ndarray:
    """Log of stored probabilities, a zero read as PROBABILITY_FLOOR."""
    return np.log(np.clip(np.asarray(probabilities, dtype=np.float64), PROBABILITY_FLOOR, None))


def temperature_loss(log_probs: np.ndarray, targets: np.ndarray, temperature: float) -> float:
    scaled = log_probs / temperature
    picked = scaled[np.arange(len(targets)), targets]
    return float(np.mean(logsumexp(scaled, axis=1) - picked))


def fit_temperature(log_probs: np.ndarray, targets: np.ndarray) -> float:
    """The temperature minimising the log loss (bounded scalar search on log T)."""
    low, high = (math.log(b) for b in TEMPERATURE_BOUNDS)
    result = minimize_scalar(
        lambda log_t: temperature_loss(log_probs, targets, math.exp(log_t)),
        bounds=(low, high),
        method="bounded",
        options={"xatol": 1e-4},
    )
    return float(math.exp(result.x))


def fit_clip(probabilities: np.ndarray, targets: np.ndarray) -> float | None:
    """The clip bound of CLIP_GRID with the lowest log loss (None when clipping does not help)."""
    losses = [log_loss(clip_probabilities(probabilities, c), targets) for c in CLIP_GRID]
    return CLIP_GRID[int(np.argmin(losses))]


def fit_calibration(log_probs: np.ndarray, targets: np.ndarray) -> Calibration:
    temperature = fit_temperature(log_probs, targets)
    clip = fit_clip(calibrated_probabilities(log_probs, temperature), targets)
    return Calibration(temperature, clip)


@dataclass(frozen=True)
class CrossFit:
    """Each fold calibrated with what the other folds fitted; `probabilities` in sample order."""

    probabilities: np.ndarray
    by_fold: dict[int, Calibration]


def cross_fit(log_probs: np.ndarray, targets: np.ndarray, folds: np.ndarray) -> CrossFit:
    probabilities = np.empty_like(log_probs, dtype=np.float64)
    by_fold = {}
    for fold in np.unique(folds):
        held_out = folds == fold
        if held_out.all():  # one fold only: nothing else to fit on
            calibration = Calibration()
        else:
            calibration = fit_calibration(log_probs[~held_out], targets[~held_out])
        probabilities[held_out] = calibration.apply(log_probs[held_out])
        by_fold[int(fold)] = calibration
    return CrossFit(probabilities, by_fold)


def fold_temperatures(
    log_probs: np.ndarray, targets: np.ndarray, folds: np.ndarray
) -> dict[int, float]:
    """The temperature each fold alone would fit: how stable the fitted value is."""
    return {
        int(fold): fit_temperature(log_probs[folds == fold], targets[folds == fold])
        for fold in np.unique(folds)
    }


# -- candidates ------------------------------------------------------------------------------
def tta_name(views: Sequence[str]) -> str:
    """`none`/`hflip`/`flips` for the standard view sets, else the views joined by '-'."""
    for name, standard in TTA_CHOICES.items():
        if tuple(views) == standard:
            return name
    return "-".join(views)


def candidate_name(checkpoint: str, views: Sequence[str]) -> str:
    return f"{checkpoint}_{tta_name(views)}"


def combine_views(view_log_probs: np.ndarray, views: Sequence[int]) -> np.ndarray:
    """log of the mean softmax over the chosen views of a (views, n, classes) array."""
    chosen = np.asarray(view_log_probs[list(views)], dtype=np.float64)
    return logsumexp(chosen, axis=0) - math.log(len(views))


def mean_probabilities(view_log_probs: np.ndarray, views: Sequence[int]) -> np.ndarray:
    """The mean softmax over the chosen views, each row summing to 1 in float64."""
    probabilities = np.exp(combine_views(view_log_probs, views))
    return probabilities / probabilities.sum(axis=1, keepdims=True)


@dataclass(frozen=True)
class OofCandidates:
    """Out-of-fold log-probabilities of every sample under every checkpoint and view.

    `log_probs` has shape (checkpoints, views, samples, classes); rows sorted by sample index.
    """

    index: np.ndarray
    fold: np.ndarray
    target: np.ndarray
    log_probs: np.ndarray
    checkpoints: tuple[str, ...] = CHECKPOINTS
    views: tuple[str, ...] = VIEWS

    def choice(self, checkpoint: str, views: Sequence[str]) -> np.ndarray:
        """(samples, classes) log-probabilities of one checkpoint with one TTA view set."""
        return combine_views(
            self.log_probs[self.checkpoints.index(checkpoint)],
            [self.views.index(view) for view in views],
        )

    def save(self, path: Path) -> Path:
        np.savez(
            path,
            index=self.index,
            fold=self.fold,
            target=self.target,
            log_probs=self.log_probs.astype(np.float32),
            checkpoints=np.array(self.checkpoints),
            views=np.array(self.views),
        )
        return path

    @classmethod
    def load(cls, path: Path) -> OofCandidates:
        with np.load(path, allow_pickle=False) as data:
            return cls(
                index=data["index"],
                fold=data["fold"],
                target=data["target"],
                log_probs=data["log_probs"],
                checkpoints=tuple(str(c) for c in data["checkpoints"]),
                views=tuple(str(v) for v in data["views"]),
            )


@dataclass(frozen=True)
class Choice:
    """What prediction applies: weights, TTA views, temperature and clip bound."""

    checkpoint: str
    views: tuple[str, ...]
    temperature: float = 1.0
    clip: float | None = None

    @property
    def tta(self) -> str:
        return tta_name(self.views)

    @property
    def name(self) -> str:
        return candidate_name(self.checkpoint, self.views)

    def to_dict(self) -> dict[str, Any]:
        return {
            "checkpoint": self.checkpoint,
            "tta": self.tta,
            "views": list(self.views),
            "temperature": self.temperature,
            "clip": self.clip,
        }


@dataclass(frozen=True)
class CandidateScore:
    """One checkpoint/TTA candidate: raw OOF scores, and cross-fitted after calibration."""

    checkpoint: str
    views: tuple[str, ...]
    log_loss: float
    accuracy: float
    log_loss_calibrated: float
    accuracy_calibrated: float
    temperature: float
    clip: float | None

    @property
    def name(self) -> str:
        return candidate_name(self.checkpoint, self.views)

    @property
    def calibrates(self) -> bool:
        """Whether calibrating beats leaving the probabilities as they are (cross-fitted)."""
        return self.log_loss_calibrated < self.log_loss

    @property
    def posthoc_log_loss(self) -> float:
        """The candidate's OOF log loss with its post-hoc choice: calibrated only if it helps."""
        return min(self.log_loss, self.log_loss_calibrated)

    @property
    def choice(self) -> Choice:
        if not self.calibrates:
            return Choice(self.checkpoint, self.views)
        return Choice(self.checkpoint, self.views, self.temperature, self.clip)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "tta": tta_name(self.views),
            **asdict(self),
            "calibrates": self.calibrates,
            "posthoc_log_loss": self.posthoc_log_loss,
        }


def score_candidate(
    checkpoint: str, views: Sequence[str], log_probs: np.ndarray, targets: np.ndarray, folds
) -> tuple[CandidateScore, CrossFit]:
    raw = np.exp(log_probs)
    crossed = cross_fit(log_probs, targets, folds)
    calibration = fit_calibration(log_probs, targets)
    score = CandidateScore(
        checkpoint=checkpoint,
        views=tuple(views),
        log_loss=log_loss(raw, targets),
        accuracy=accuracy(raw, targets),
        log_loss_calibrated=log_loss(crossed.probabilities, targets),
        accuracy_calibrated=accuracy(crossed.probabilities, targets),
        temperature=calibration.temperature,
        clip=calibration.clip,
    )
    return score, crossed


# -- the study -------------------------------------------------------------------------------
@dataclass(frozen=True)
class PosthocStudy:
    """Every candidate's scores, the configured one and the chosen (lowest post-hoc loss)."""

    candidates: list[CandidateScore]
    configured: str
    chosen: Choice
    chosen_score: CandidateScore
    fold_temperatures: dict[int, float]
    crossfit_temperatures: dict[int, float]
    ece_before: float
    ece_after: float
    reliability_before: list[ReliabilityBin] = field(repr=False)
    reliability_after: list[ReliabilityBin] = field(repr=False)
    samples: int = 0

    @property
    def configured_score(self) -> CandidateScore:
        return next(c for c in self.candidates if c.name == self.configured)

    @property
    def log_loss(self) -> float:
        """The chosen post-hoc choice's OOF log loss (cross-fitted when it calibrates)."""
        return self.chosen_score.posthoc_log_loss

    @property
    def gain(self) -> float:
        """How much the chosen post-hoc choice lowers the configured raw OOF log loss."""
        return self.configured_score.log_loss - self.log_loss

    @property
    def relative_gain(self) -> float | None:
        base = self.configured_score.log_loss
        return self.gain / base if base > 0 else None

    def summary(self) -> dict[str, Any]:
        """What summary.json keeps: the choice, its cross-fitted score and the table."""
        return {
            "chosen": self.chosen.to_dict(),
            "configured": self.configured,
            "log_loss": self.log_loss,
            "ece_before": self.ece_before,
            "ece_after": self.ece_after,
            "candidates": {
                c.name: {
                    "log_loss": c.log_loss,
                    "accuracy": c.accuracy,
                    "log_loss_calibrated": c.log_loss_calibrated,
                    "accuracy_calibrated": c.accuracy_calibrated,
                }
                for c in self.candidates
            },
        }

    def to_dict(self) -> dict[str, Any]:
        """What report.json holds under `posthoc`."""
        return {
            **self.summary(),
            "samples": self.samples,
            "gain": self.gain,
            "relative_gain": self.relative_gain,
            "candidates": [c.to_dict() for c in self.candidates],
            "fold_temperatures": self.fold_temperatures,
            "crossfit_temperatures": self.crossfit_temperatures,
            "reliability_before": [asdict(b) for b in self.reliability_before],
            "reliability_after": [asdict(b) for b in self.reliability_after],
        }


def study(
    choices: Mapping[tuple[str, tuple[str, ...]], np.ndarray],
    targets: np.ndarray,
    folds: np.ndarray,
    configured: tuple[str, tuple[str, ...]],
) -> PosthocStudy:
    """Score every (checkpoint, views) -> log-probabilities candidate and choose the lowest
    post-hoc log loss: raw, or cross-fitted calibrated where that is lower (the configured
    candidate wins ties)."""
    targets = np.asarray(targets, dtype=np.int64)
    folds = np.asarray(folds)
    ordered = [configured, *[key for key in choices if key != configured]]
    scored = {key: score_candidate(*key, choices[key], targets, folds) for key in ordered}
    best_key = min(ordered, key=lambda key: scored[key][0].posthoc_log_loss)
    best, crossed = scored[best_key]
    before = np.exp(choices[configured])
    after = crossed.probabilities if best.calibrates else np.exp(choices[best_key])
    return PosthocStudy(
        candidates=[scored[key][0] for key in ordered],
        configured=candidate_name(*configured),
        chosen=best.choice,
        chosen_score=best,
        fold_temperatures=fold_temperatures(choices[best_key], targets, folds),
        crossfit_temperatures={k: c.temperature for k, c in crossed.by_fold.items()},
        ece_before=expected_calibration_error(before, targets),
        ece_after=expected_calibration_error(after, targets),
        reliability_before=reliability_bins(before, targets),
        reliability_after=reliability_bins(after, targets),
        samples=len(targets),
    )


def study_candidates(
    candidates: OofCandidates, configured_checkpoint: str, configured_views: Sequence[str]
) -> PosthocStudy:
    """The study over every stored checkpoint x TTA variant (and the configured views)."""
    view_sets = [v for v in TTA_CHOICES.values() if set(v) <= set(candidates.views)]
    configured = (configured_checkpoint, tuple(configured_views))
    keys = [configured] + [
        (checkpoint, views)
        for checkpoint in candidates.checkpoints
        for views in view_sets
        if (checkpoint, views) != configured
    ]
    choices = {key: candidates.choice(*key) for key in keys}
    return study(choices, candidates.target, candidates.fold, configured)


def study_oof(
    probabilities: np.ndarray,
    targets: np.ndarray,
    folds: np.ndarray,
    checkpoint: str = "best",
    views: Sequence[str] = ("identity",),
) -> PosthocStudy:
    """The study of one stored choice (an `oof.csv`): temperature and clip only."""
    key = (checkpoint, tuple(views))
    return study({key: log_probabilities(probabilities)}, targets, folds, key)


# -- a run directory -------------------------------------------------------------------------
def read_oof_csv(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(probabilities, targets, folds) of an `oof.csv`."""
    import pandas as pd

    from evolver.errors import DataError

    try:
        frame = pd.read_csv(path)
    except (OSError, ValueError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: cannot read ({error.__class__.__name__})") from error
    columns = [c for c in frame.columns if str(c).startswith("p_")]
    if not columns or "target" not in frame or "fold" not in frame:
        raise DataError(f"{path}: expected columns fold, target, p_0..p_<C-1>")
    return (
        frame[columns].to_numpy(dtype=np.float64),
        frame["target"].to_numpy(dtype=np.int64),
        frame["fold"].to_numpy(dtype=np.int64),
    )


def parse_candidate_name(name: str) -> tuple[str, tuple[str, ...]]:
    """(checkpoint, views) of a `candidate_name` such as `best_hflip`."""
    checkpoint, _, tta = name.partition("_")
    views = TTA_CHOICES.get(tta) or tuple(view for view in tta.split("-") if view)
    return checkpoint, views or ("identity",)


def score_choice(
    run_dir: Path, checkpoint: str, views: Sequence[str], calibrated: bool
) -> tuple[float, float] | None:
    """(OOF log loss, accuracy) of one post-hoc choice of a finished run, from its stored
    candidates, with no training: `calibrated` adds the temperature and clip, cross-fitted so
    that no fold is scored with what was fitted on it. None when the run did not store them."""
    from evolver.records import OOF_CANDIDATES_FILE

    path = Path(run_dir) / OOF_CANDIDATES_FILE
    if not path.is_file():
        return None
    candidates = OofCandidates.load(path)
    if checkpoint not in candidates.checkpoints or not set(views) <= set(candidates.views):
        return None
    log_probs = candidates.choice(checkpoint, views)
    targets = np.asarray(candidates.target, dtype=np.int64)
    if calibrated:
        probabilities = cross_fit(log_probs, targets, np.asarray(candidates.fold)).probabilities
    else:
        probabilities = np.exp(log_probs)
    return log_loss(probabilities, targets), accuracy(probabilities, targets)


def study_run(
    run_dir: Path, checkpoint: str | None = None, views: Sequence[str] | None = None
) -> PosthocStudy | None:
    """The study of a run directory: every candidate when it stored them, else its `oof.csv`
    (temperature and clip only); None when it has neither. `checkpoint`/`views` name the
    configured choice (default: best, identity)."""
    from evolver.records import OOF_CANDIDATES_FILE, OOF_FILE

    checkpoint = checkpoint or "best"
    views = tuple(views or ("identity",))
    candidates_path, oof_path = run_dir / OOF_CANDIDATES_FILE, run_dir / OOF_FILE
    if candidates_path.is_file():
        candidates = OofCandidates.load(candidates_path)
        if checkpoint in candidates.checkpoints and set(views) <= set(candidates.views):
            return study_candidates(candidates, checkpoint, views)
    if oof_path.is_file():
        probabilities, targets, folds = read_oof_csv(oof_path)
        if len(targets):
            return study_oof(probabilities, targets, folds, checkpoint, views)
    return None
