"""Finding rules: each reads the fold statistics and run metrics and names one problem.

Every rule is a small class with a stable `id`; `DEFAULT_RULES` is the set `diagnose` runs, and a
caller can pass its own sequence (add, drop or subclass rules). A rule returns None when its
problem is absent or when the records cannot tell (curve rules need history rows).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from evolver.diagnosis import finding_ids
from evolver.diagnosis import proposals as make
from evolver.diagnosis.metrics import FoldStats, RunMetrics
from evolver.diagnosis.posthoc import PosthocStudy
from evolver.diagnosis.proposals import Proposal
from evolver.diagnosis.records import RunSettings
from evolver.diagnosis.thresholds import Thresholds

SEVERITIES = ("low", "medium", "high", "critical")


@dataclass(frozen=True)
class Finding:
    """A problem with the run: `id`, `severity` (one of SEVERITIES), `evidence` (the numbers and
    folds that triggered it), a one-sentence `explanation` and the `proposals` that answer it."""

    id: str
    severity: str
    evidence: dict[str, Any]
    explanation: str
    proposals: list[Proposal] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "severity": self.severity,
            "evidence": self.evidence,
            "explanation": self.explanation,
            "proposals": [proposal.to_dict() for proposal in self.proposals],
        }

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Finding:
        return cls(
            id=values["id"],
            severity=values["severity"],
            evidence=dict(values.get("evidence") or {}),
            explanation=values["explanation"],
            proposals=[Proposal.from_dict(entry) for entry in values.get("proposals") or []],
        )


def findings_of(report: Mapping[str, Any]) -> list[Finding]:
    """The findings of a report (`report.json`'s content)."""
    return [Finding.from_dict(entry) for entry in report.get("findings") or []]


@dataclass(frozen=True)
class RuleContext:
    """What a rule sees: per-fold statistics, run metrics, settings and thresholds."""

    folds: list[FoldStats]
    metrics: RunMetrics
    settings: RunSettings
    thresholds: Thresholds
    posthoc: PosthocStudy | None = None

    @property
    def curves(self) -> list[FoldStats]:
        """Folds with history rows (curve-shape rules need them)."""
        return [fold for fold in self.folds if fold.has_history]

    @property
    def observed_phase2_epochs(self) -> int:
        return max((fold.phase2_epochs or 0 for fold in self.folds), default=0)


class FindingRule(ABC):
    """One kind of finding. Subclasses set `id` and implement `check`."""

    id: ClassVar[str]

    @abstractmethod
    def check(self, context: RuleContext) -> Finding | None: ...

    def finding(
        self,
        severity: str,
        evidence: dict[str, Any],
        explanation: str,
        proposals: list[Proposal | None],
    ) -> Finding:
        return Finding(self.id, severity, _rounded(evidence), explanation, make.compact(proposals))


def _enough(flagged: int, total: int, fraction: float) -> bool:
    return total > 0 and flagged > 0 and flagged / total >= fraction


class DivergedRule(FindingRule):
    id = finding_ids.DIVERGED

    def check(self, context: RuleContext) -> Finding | None:
        limit = context.thresholds.explode_factor
        nonfinite = [f.fold for f in context.folds if f.nonfinite]
        exploded = {
            f.fold: f.explosion for f in context.curves if f.explosion and f.explosion > limit
        }
        if not nonfinite and not exploded:
            return None
        settings = context.settings
        reason = "losses diverged"
        return self.finding(
            "critical",
            {"nonfinite_folds": nonfinite, "loss_growth_by_fold": exploded, "limit": limit},
            "A loss became non-finite or grew far beyond its first-epoch value, so the "
            "optimizer is stepping too far.",
            [
                make.scale_learning_rates(
                    self.id,
                    settings,
                    0.1,
                    "lower_learning_rates",
                    f"{reason}; scale both learning rates down 10x",
                    make.effect("mean_best_val_loss", "down"),
                ),
                make.cosine_with_warmup(self.id, settings, reason),
            ],
        )


class OverfittingAfterBestRule(FindingRule):
    id = finding_ids.OVERFITTING_AFTER_BEST

    def check(self, context: RuleContext) -> Finding | None:
        rise = context.thresholds.overfit_min_rise
        known = [f for f in context.folds if f.relative_degradation is not None]
        rising = {f.fold: f.relative_degradation for f in known if f.relative_degradation > rise}
        if not _enough(len(rising), len(known), context.thresholds.overfit_min_fold_fraction):
            return None
        mean_rise = sum(rising.values()) / len(rising)
        # The classic signature: training loss keeps falling while validation loss climbs.
        train_falling = [
            f.fold for f in context.curves if f.fold in rising and f.train_falling_after_best
        ]
        settings = context.settings
        reason = f"val loss rose {mean_rise:.1%} above its best in {len(rising)}/{len(known)} folds"
        raise_smoothing = not smoothing_caps(context, make.RAISED_SMOOTHING)
        return self.finding(
            "high" if mean_rise > 3 * rise else "medium",
            {
                "relative_rise_by_fold": rising,
                "folds": len(known),
                "mean_degradation": context.metrics.mean_degradation,
                "max_degradation": context.metrics.max_degradation,
                "max_degradation_fold": context.metrics.max_degradation_fold,
                "folds_train_loss_still_falling": train_falling,
            },
            f"Validation loss climbs after its best epoch in {len(rising)}/{len(known)} folds, "
            "so the model fits the training folds at the cost of held-out data.",
            [
                make.more_regularization(
                    self.id, settings, reason, raise_smoothing=raise_smoothing
                ),
                make.select_best_checkpoint(self.id, settings, reason),
            ],
        )


def smoothing_capped_folds(
    context: RuleContext, label_smoothing: float
) -> tuple[dict[int, float], int]:
    """The folds where smoothing by `label_smoothing` would leave a floor of at least
    `smoothing_floor_share` of the best val loss (fold -> share), and how many folds were
    measured (none when the records do not say how many classes there are)."""
    classes = context.settings.num_classes
    if not classes or classes < 2 or label_smoothing <= 0:
        return {}, 0
    floor = make.smoothing_floor(label_smoothing, classes)
    shares = {
        f.fold: floor / f.best_val_loss
        for f in context.folds
        if f.best_val_loss is not None and f.best_val_loss > 0
    }
    limit = context.thresholds.smoothing_floor_share
    return {fold: share for fold, share in shares.items() if share >= limit}, len(shares)


def smoothing_caps(context: RuleContext, label_smoothing: float) -> bool:
    """Whether smoothing by `label_smoothing` caps the best val loss in enough folds."""
    capped, measured = smoothing_capped_folds(context, label_smoothing)
    return _enough(len(capped), measured, context.thresholds.smoothing_min_fold_fraction)


class SmoothingCapsConfidenceRule(FindingRule):
    """Label smoothing holds the validation loss up: the model classifies nearly every held-out
    image right, and most of what is left of its cross-entropy is the floor the smoothed targets
    set (validation loss is plain cross-entropy, trained targets are not)."""

    id = finding_ids.SMOOTHING_CAPS_CONFIDENCE

    def check(self, context: RuleContext) -> Finding | None:
        settings, t = context.settings, context.thresholds
        smoothing = settings.label_smoothing or 0.0
        capped, measured = smoothing_capped_folds(context, smoothing)
        if not _enough(len(capped), measured, t.smoothing_min_fold_fraction):
            return None
        classes = settings.num_classes or 0  # known: folds were measured
        floor = make.smoothing_floor(smoothing, classes)
        reason = (
            f"label smoothing {smoothing:g} sets a val-loss floor of {floor:.3g}, "
            f"{min(capped.values()):.0%} or more of the best val loss in "
            f"{len(capped)}/{measured} folds"
        )
        mean_share = sum(capped.values()) / len(capped)
        return self.finding(
            "high" if mean_share >= 0.75 else "medium",
            {
                "label_smoothing": smoothing,
                "num_classes": classes,
                "floor": floor,
                "floor_share_by_fold": capped,
                "folds": measured,
                "best_val_acc_by_fold": {
                    f.fold: f.best_val_acc for f in context.folds if f.best_val_acc is not None
                },
                "min_share": t.smoothing_floor_share,
            },
            "The folds classify almost every held-out image right, and most of their "
            "validation cross-entropy is the floor that training towards smoothed targets "
            "sets: the predictions cannot grow confident enough.",
            [make.lower_label_smoothing(self.id, settings, t, reason)],
        )


def too_high_lr_signs(context: RuleContext) -> dict[int, list[str]]:
    """Per fold, the signs of steps too large: best early in phase 2 and degrading after it, a
    spike, a jump at the phase switch."""
    t = context.thresholds
    signs: dict[int, list[str]] = {}
    for fold in context.curves:
        fold_signs = []
        early_best = (
            fold.best_phase == 2
            and fold.best_phase_epoch is not None
            and fold.best_phase_epoch <= t.lr_best_within_phase2_epochs
            and (fold.relative_degradation or 0) > t.overfit_min_rise
        )
        if early_best:
            fold_signs.append(
                f"best at phase-2 epoch {fold.best_phase_epoch}, "
                f"then +{fold.relative_degradation:.1%}"
            )
        if fold.max_spike is not None and fold.max_spike > t.spike_rise:
            fold_signs.append(f"spike +{fold.max_spike:.1%}")
        if fold.phase_switch_jump is not None and fold.phase_switch_jump > t.phase_switch_jump:
            fold_signs.append(f"jump +{fold.phase_switch_jump:.1%} at the phase switch")
        if fold_signs:
            signs[fold.fold] = fold_signs
    return signs


def head_rate_implicated(context: RuleContext, folds: Iterable[int]) -> bool:
    """Whether the head's rate shares the blame in these folds: a fold that trained no head-only
    phase cannot tell the two rates apart, and one that spiked within it shows the head's rate
    too high on its own."""
    spike = context.thresholds.spike_rise
    named = set(folds)
    return any(
        not fold.phase1_epochs or (fold.phase1_max_spike or 0.0) > spike
        for fold in context.curves
        if fold.fold in named
    )


class LearningRateTooHighRule(FindingRule):
    """Signs of too-large steps in enough folds, the head's rate implicated too (no head-only
    phase, or a spike within it): both rates are lowered."""

    id = finding_ids.LR_TOO_HIGH
    blames_head: ClassVar[bool] = True
    explanation: ClassVar[str] = (
        "Validation loss is best early in phase 2 and then degrades or spikes, the "
        "signature of steps too large once the backbone unfreezes."
    )

    def check(self, context: RuleContext) -> Finding | None:
        signs = too_high_lr_signs(context)
        if not _enough(len(signs), len(context.curves), context.thresholds.lr_min_fold_fraction):
            return None
        if head_rate_implicated(context, signs) != self.blames_head:
            return None
        settings = context.settings
        reason = f"{len(signs)}/{len(context.curves)} folds show signs of a too-high learning rate"
        return self.finding(
            "high",
            {
                "signs_by_fold": signs,
                "folds": len(context.curves),
                "lr_backbone": settings.lr_backbone,
                "lr_head": settings.lr_head,
            },
            self.explanation,
            self.proposals(context, reason),
        )

    def proposals(self, context: RuleContext, reason: str) -> list[Proposal | None]:
        settings, t = context.settings, context.thresholds
        lower = make.lower_learning_rates if self.blames_head else make.lower_backbone_lr
        return [
            lower(self.id, settings, t, reason),
            make.continue_at_lower_lr(self.id, settings, t, reason),
            make.cosine_with_warmup(self.id, settings, reason),
        ]


class BackboneLearningRateTooHighRule(LearningRateTooHighRule):
    """The same signs, but every flagged fold trained its head alone first without a spike: the
    head's rate was fine on its own, so only the backbone's is lowered (the head's is left to
    the findings about the head, e.g. `head_still_learning`)."""

    id = finding_ids.BACKBONE_LR_TOO_HIGH
    blames_head = False
    explanation = (
        "Validation loss is best early in phase 2 and then degrades or spikes, after a head "
        "phase that trained without spikes: the backbone's steps are too large once it "
        "unfreezes."
    )


class EarlyStoppingTooEagerRule(FindingRule):
    id = finding_ids.EARLY_STOPPING_TOO_EAGER

    def check(self, context: RuleContext) -> Finding | None:
        settings = context.settings
        min_delta = settings.min_delta or 0.0
        factor = context.thresholds.eager_noise_factor
        stopped = [f for f in context.curves if f.early_stopped]
        eager: dict[int, str] = {}
        for fold in stopped:
            if fold.improving_at_end:
                eager[fold.fold] = "still improving when stopped"
            elif (
                fold.noise is not None
                and fold.degradation is not None
                and fold.noise > min_delta
                and fold.degradation <= factor * fold.noise
                and _new_best_within_patience(fold, settings.patience)
            ):
                eager[fold.fold] = (
                    f"rise {fold.degradation:.4g} within {factor:g}x noise {fold.noise:.4g} "
                    f"(min_delta {min_delta:g})"
                )
        if not _enough(len(eager), len(stopped), 0.5):
            return None
        reason = f"early stopping cut {len(eager)}/{len(stopped)} stopped folds too soon"
        observed = context.observed_phase2_epochs
        return self.finding(
            "medium",
            {
                "folds_by_reason": eager,
                "folds_early_stopped": context.metrics.folds_early_stopped,
                "n_folds": context.metrics.n_folds,
                "patience": settings.patience,
                "min_delta": settings.min_delta,
                "mean_epochs_trained_early_stopped": (
                    context.metrics.mean_epochs_trained_early_stopped
                ),
                "max_epochs": settings.max_epochs,
            },
            "Early stopping fired while validation loss was still improving or only "
            "fluctuating within its noise, so folds stopped before they had converged.",
            [
                make.raise_patience(self.id, settings, context.thresholds, reason),
                make.disable_early_stopping(
                    self.id, settings, context.thresholds, reason, observed
                ),
            ],
        )


def _folds_where(
    context: RuleContext, stat: str, flagged: Callable[[float], bool]
) -> tuple[dict[int, float], int]:
    """The folds whose curve statistic `stat` is flagged (fold -> value), and how many folds have
    that statistic at all."""
    values = {f.fold: getattr(f, stat) for f in context.curves if getattr(f, stat) is not None}
    return {fold: value for fold, value in values.items() if flagged(value)}, len(values)


def _new_best_within_patience(fold: FoldStats, patience: int | None) -> bool:
    """Whether the fold's lowest val loss came inside the last `patience` epochs before the stop:
    improvements smaller than `min_delta` that early stopping ignored. A fold whose best came
    `patience` or more epochs before the stop peaked and did not improve again; stopping it was
    right, however small its rise (the pretrained regime: best early, slow degradation)."""
    if patience is None or fold.best_epoch is None or fold.epochs_trained is None:
        return True
    return fold.epochs_trained - fold.best_epoch < patience


class BestPositionRule(FindingRule):
    """Shared logic of the two Playbook rules on where in training the best epoch falls."""

    def candidates(self, context: RuleContext) -> list[FoldStats]:
        # Early-stopped folds end a patience window after their best; their position says little.
        return [f for f in context.folds if f.best_position is not None and not f.early_stopped]


class TrainingTooShortRule(BestPositionRule):
    id = finding_ids.TRAINING_TOO_SHORT

    def check(self, context: RuleContext) -> Finding | None:
        t = context.thresholds
        candidates = self.candidates(context)
        late = {
            f.fold: f.best_position
            for f in candidates
            if f.best_position > t.short_best_position or f.improving_at_end
        }
        if not _enough(len(late), len(candidates), t.position_min_fold_fraction):
            return None
        reason = f"the best epoch is in the last quarter in {len(late)}/{len(candidates)} folds"
        return self.finding(
            "medium",
            {
                "best_position_by_fold": late,
                "folds": len(candidates),
                "max_epochs": context.settings.max_epochs,
                "still_improving": [f.fold for f in candidates if f.improving_at_end],
            },
            "The best epoch falls in the last quarter of training or the loss was still "
            "falling at the end, so more epochs would likely help.",
            [
                make.train_longer(
                    self.id, context.settings, t, reason, context.observed_phase2_epochs
                )
            ],
        )


class TrainingTooLongRule(BestPositionRule):
    id = finding_ids.TRAINING_TOO_LONG

    def check(self, context: RuleContext) -> Finding | None:
        t = context.thresholds
        candidates = self.candidates(context)
        early = {
            f.fold: f.best_position for f in candidates if f.best_position <= t.long_best_position
        }
        if not _enough(len(early), len(candidates), t.position_min_fold_fraction):
            return None
        best_epochs = [
            context_fold.best_phase_epoch
            for context_fold in candidates
            if context_fold.fold in early and context_fold.best_phase == 2
        ]
        best_phase2 = sum(best_epochs) / len(best_epochs) if best_epochs else 1.0
        reason = f"the best epoch is in the first tenth in {len(early)}/{len(candidates)} folds"
        return self.finding(
            "low",
            {"best_position_by_fold": early, "folds": len(candidates)},
            "The best epoch falls in the first tenth of training, so most epochs are spent "
            "after the model stopped improving.",
            [
                make.train_shorter(
                    self.id,
                    context.settings,
                    reason,
                    best_phase2,
                    context.observed_phase2_epochs,
                )
            ],
        )


class UnstableValidationRule(FindingRule):
    id = finding_ids.UNSTABLE_VALIDATION

    def check(self, context: RuleContext) -> Finding | None:
        t = context.thresholds
        volatility = context.metrics.mean_volatility
        spread = context.metrics.fold_spread
        noisy = volatility is not None and volatility > t.volatility_max
        spread_out = spread is not None and spread > t.fold_spread_max
        if not (noisy or spread_out):
            return None
        settings = context.settings
        reason = (
            f"val loss noise is {volatility:.1%} of its level"
            if noisy
            else f"fold scores spread {spread:.1%}"
        )
        return self.finding(
            "medium",
            {
                "mean_volatility": volatility,
                "volatility_by_fold": {
                    f.fold: f.volatility for f in context.curves if f.volatility is not None
                },
                "fold_spread": spread,
                "volatility_max": t.volatility_max,
                "fold_spread_max": t.fold_spread_max,
            },
            "Validation loss jumps from epoch to epoch or differs widely between folds, so "
            "single epochs and single folds are unreliable.",
            [
                make.larger_batch(self.id, settings, t, reason),
                make.cosine_with_warmup(self.id, settings, reason),
            ],
        )


class FinalWeightsNotBestRule(FindingRule):
    id = finding_ids.FINAL_WEIGHTS_NOT_BEST

    def check(self, context: RuleContext) -> Finding | None:
        settings = context.settings
        uses_last = settings.checkpoint == "last" or settings.objective_name == "cv.loss_final"
        final, best = context.metrics.mean_final_val_loss, context.metrics.mean_best_val_loss
        if not uses_last or final is None or not best:
            return None
        gap = (final - best) / best
        if gap <= context.thresholds.final_vs_best_gap:
            return None
        reason = f"last weights score {final:.4g} while best checkpoints score {best:.4g}"
        return self.finding(
            "high",
            {
                "mean_final_val_loss": final,
                "mean_best_val_loss": best,
                "relative_gap": gap,
                "checkpoint": settings.checkpoint,
                "objective_name": settings.objective_name,
            },
            "The CV score uses each fold's last weights although its best checkpoint scores "
            f"{gap:.1%} better.",
            [make.select_best_checkpoint(self.id, settings, reason)],
        )


class HeadPhaseIneffectiveRule(FindingRule):
    id = finding_ids.HEAD_PHASE_INEFFECTIVE

    def check(self, context: RuleContext) -> Finding | None:
        t = context.thresholds
        flat, measured = _folds_where(
            context, "phase1_improvement", lambda gain: gain < t.head_min_improvement
        )
        if not _enough(len(flat), measured, 0.5):
            return None
        settings = context.settings
        reason = f"phase 1 improved val loss by less than {t.head_min_improvement:.0%}"
        return self.finding(
            "low",
            {"phase1_improvement_by_fold": flat, "folds": measured},
            "Training only the head in phase 1 barely lowers validation loss, so those epochs "
            "are spent without progress.",
            [
                make.raise_head_lr(self.id, settings, t, reason),
                make.more_head_epochs(self.id, settings, reason),
            ],
        )


class HeadStillLearningRule(FindingRule):
    """The head phase ended while validation loss still fell steeply: fine-tuning then starts
    from a half-trained head, the case linear-probing-then-fine-tuning (LP-FT) guards against."""

    id = finding_ids.HEAD_STILL_LEARNING

    def check(self, context: RuleContext) -> Finding | None:
        t = context.thresholds
        learning, measured = _folds_where(
            context, "phase1_end_gain", lambda gain: gain > t.head_still_learning_gain
        )
        if not _enough(len(learning), measured, 0.5):
            return None
        settings = context.settings
        mean_gain = sum(learning.values()) / len(learning)
        reason = (
            f"the last head epoch still lowered val loss {mean_gain:.0%} in "
            f"{len(learning)}/{measured} folds"
        )
        return self.finding(
            "medium",
            {
                "phase1_end_gain_by_fold": learning,
                "folds": measured,
                "min_gain": t.head_still_learning_gain,
                "lr_head": settings.lr_head,
                "phase1_epochs": settings.max_phase1_epochs,
            },
            "Validation loss was still falling steeply when phase 1 ended, so the backbone "
            "unfroze under a half-trained head whose large gradients disturb the pretrained "
            "features.",
            [
                make.raise_head_lr(self.id, settings, t, reason),
                make.more_head_epochs(self.id, settings, reason),
            ],
        )


class UnderfittingRule(FindingRule):
    id = finding_ids.UNDERFITTING

    def check(self, context: RuleContext) -> Finding | None:
        t = context.thresholds
        measured = [f for f in context.curves if f.train_drop is not None]
        stuck = {f.fold: f.train_drop for f in measured if f.train_drop < t.underfit_min_train_drop}
        if not _enough(len(stuck), len(measured), 0.5):
            return None
        settings = context.settings
        reason = f"training loss fell less than {t.underfit_min_train_drop:.0%}"
        # A curve still falling at its end is `training_too_short`'s case; a flat one says the
        # steps are too small or held back, so a larger step is tried first.
        return self.finding(
            "medium",
            {
                "train_loss_drop_by_fold": stuck,
                "folds": len(measured),
                "lr_backbone": settings.lr_backbone,
                "lr_head": settings.lr_head,
            },
            "Training loss stays close to its first-epoch value, so the model is not fitting "
            "even the training data.",
            [
                make.raise_learning_rates(self.id, settings, t, reason),
                make.less_regularization(self.id, settings, reason),
                make.train_longer(self.id, settings, t, reason, context.observed_phase2_epochs),
            ],
        )


class MiscalibratedRule(FindingRule):
    id = finding_ids.MISCALIBRATED

    def check(self, context: RuleContext) -> Finding | None:
        study = context.posthoc
        limit = context.thresholds.calibration_min_gain
        if study is None or study.relative_gain is None or study.relative_gain <= limit:
            return None
        configured, chosen = study.configured_score, study.chosen
        reason = (
            f"the post-hoc choice lowers the OOF log loss {configured.log_loss:.4g} -> "
            f"{study.log_loss:.4g} (cross-fitted)"
        )
        return self.finding(
            "medium" if study.relative_gain > 5 * limit else "low",
            {
                "ece_before": study.ece_before,
                "ece_after": study.ece_after,
                "oof_log_loss": configured.log_loss,
                "oof_log_loss_posthoc": study.log_loss,
                "gain": study.gain,
                "relative_gain": study.relative_gain,
                "configured": study.configured,
                "chosen": study.chosen.name,
                "temperature": chosen.temperature,
                "fold_temperatures": study.fold_temperatures,
                "clip": chosen.clip,
                "min_gain": limit,
            },
            "The out-of-fold probabilities are over- or under-confident, or another checkpoint "
            "or TTA variant scores better, so the submission can improve without training.",
            [make.posthoc_choice(self.id, chosen, configured.checkpoint, configured.views, reason)],
        )


# Findings are sorted by severity, rule order breaking ties (and so ordering an iteration's
# proposals). The head phase comes first in training and shapes the phase-2 curves the later
# rules read, so its remedy is tried before theirs; a smoothing floor that makes up most of the
# loss bounds what any curve-shape remedy can gain, so its remedy comes next.
DEFAULT_RULES: tuple[FindingRule, ...] = (
    DivergedRule(),
    HeadStillLearningRule(),
    SmoothingCapsConfidenceRule(),
    OverfittingAfterBestRule(),
    LearningRateTooHighRule(),
    BackboneLearningRateTooHighRule(),
    EarlyStoppingTooEagerRule(),
    TrainingTooShortRule(),
    TrainingTooLongRule(),
    UnstableValidationRule(),
    FinalWeightsNotBestRule(),
    HeadPhaseIneffectiveRule(),
    UnderfittingRule(),
    MiscalibratedRule(),
)


def _rounded(value: Any) -> Any:
    """Evidence numbers to 6 significant digits, so reports stay readable and JSON-safe."""
    if isinstance(value, float):
        return float(f"{value:.6g}") if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _rounded(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_rounded(item) for item in value]
    return value
