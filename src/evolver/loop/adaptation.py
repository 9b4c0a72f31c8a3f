"""How findings adapt the search space between iterations.

Each rule reads a finding that fired (on the incumbent or on most of an iteration's trials) and
narrows or shifts ranges of the sampler's space. Rules follow the Deep Learning Tuning Playbook
and the seed's analysis; they never look at the task itself.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from evolver.diagnosis import finding_ids
from evolver.loop.space import ParamSpec, SearchSpace

SMOOTHING = "regularization.label_smoothing"


@dataclass(frozen=True)
class Adaptation:
    """One change of a parameter's range, with the finding and numbers that caused it."""

    iteration: int
    param: str
    finding: str
    before: dict[str, Any]
    after: dict[str, Any]
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "iteration": self.iteration,
            "param": self.param,
            "finding": self.finding,
            "before": self.before,
            "after": self.after,
            "reason": self.reason,
        }


@dataclass(frozen=True)
class AdaptationContext:
    iteration: int
    finding: str
    incumbent: Mapping[str, Any]  # the incumbent's parameter values
    flagged: list[Mapping[str, Any]]  # parameter values of trials showing the finding
    fired: frozenset[str] = frozenset()  # every finding adapting the space this iteration


def is_learning_rate(spec: ParamSpec) -> bool:
    leaf = spec.name.rsplit(".", 1)[-1]
    return spec.type == "float" and (leaf == "lr" or leaf.startswith("lr_"))


def _lowest_flagged_lrs(
    space: SearchSpace, ctx: AdaptationContext, leaf: str | None = None
) -> Iterable[tuple[ParamSpec, float, int]]:
    """(spec, lowest value among the flagged trials, how many had one) per learning rate (only
    those named `leaf`, e.g. `lr_backbone`, when given)."""
    for spec in space:
        if not is_learning_rate(spec) or (leaf and spec.name.rsplit(".", 1)[-1] != leaf):
            continue
        seen = [
            float(v[spec.name]) for v in ctx.flagged if isinstance(v.get(spec.name), int | float)
        ]
        if seen:
            yield spec, min(seen), len(seen)


def lower_lr_ceiling(
    space: SearchSpace, ctx: AdaptationContext, leaf: str | None = None
) -> list[Adaptation | None]:
    """LRs that degraded or diverged: the ceiling moves to the lowest such LR, but never below
    the incumbent's own rate when the incumbent did not show the finding (sampled trials that
    diverged for another reason, a backbone rate too high say, must not rule out the head rate
    that works best so far)."""
    changes = []
    incumbent_flagged = any(dict(values) == dict(ctx.incumbent) for values in ctx.flagged)
    for spec, lowest, count in _lowest_flagged_lrs(space, ctx, leaf):
        ceiling = lowest
        reason = (
            f"{count} trial(s) showed {ctx.finding}; the lowest LR among them was "
            f"{lowest:.3g}, so the sampler searches below it"
        )
        current = ctx.incumbent.get(spec.name)
        if not incumbent_flagged and isinstance(current, int | float) and current > lowest:
            ceiling = float(current)
            reason = (
                f"{count} trial(s) showed {ctx.finding}, the lowest LR among them "
                f"{lowest:.3g}; the incumbent did not at {ceiling:.3g}, so the sampler searches "
                "up to it"
            )
        if ceiling >= float(spec.high):
            continue
        floor = min(float(spec.low), ceiling / 10)
        changes.append(_adapt(spec, ctx, low=floor, high=ceiling, reason=reason))
    return changes


def lower_backbone_lr_ceiling(
    space: SearchSpace, ctx: AdaptationContext
) -> list[Adaptation | None]:
    """The backbone's rate alone: the head's own phase trained without a sign against it."""
    return lower_lr_ceiling(space, ctx, leaf="lr_backbone")


def raise_lr_floor(space: SearchSpace, ctx: AdaptationContext) -> list[Adaptation | None]:
    """LRs that underfit: the floor moves up to the lowest such LR, since smaller steps from
    the same settings fit the training data even less."""
    changes = []
    for spec, floor, count in _lowest_flagged_lrs(space, ctx):
        if floor <= float(spec.low):
            continue
        reason = (
            f"{count} trial(s) showed {ctx.finding}; the lowest LR among them was "
            f"{floor:.3g}, so the sampler searches at or above it"
        )
        changes.append(_adapt(spec, ctx, low=floor, high=spec.high, reason=reason))
    return changes


def raise_epoch_floor(space: SearchSpace, ctx: AdaptationContext) -> list[Adaptation | None]:
    spec = space.params.get("finetune.phase2_epochs")
    current = ctx.incumbent.get("finetune.phase2_epochs") if spec else None
    if spec is None or spec.type != "int" or not isinstance(current, int):
        return []
    low = min(max(int(spec.low), current), int(spec.high))
    high = max(int(spec.high), math.ceil(current * 1.5))
    if (low, high) == (spec.low, spec.high):
        return []
    reason = f"the incumbent ({current} phase-2 epochs) peaked in its last quarter; search longer"
    return [_adapt(spec, ctx, low=low, high=max(high, low + 1), reason=reason)]


def lower_epoch_ceiling(space: SearchSpace, ctx: AdaptationContext) -> list[Adaptation | None]:
    spec = space.params.get("finetune.phase2_epochs")
    current = ctx.incumbent.get("finetune.phase2_epochs") if spec else None
    if spec is None or spec.type != "int" or not isinstance(current, int):
        return []
    high = max(int(spec.low) + 1, min(int(spec.high), math.ceil(current / 2)))
    if high >= int(spec.high):
        return []
    reason = f"the incumbent ({current} phase-2 epochs) peaked in its first tenth; search shorter"
    return [_adapt(spec, ctx, low=spec.low, high=high, reason=reason)]


def _regularization_strengths(
    space: SearchSpace, ctx: AdaptationContext
) -> Iterable[tuple[ParamSpec, float]]:
    """The searched regularization strengths whose incumbent value lies inside their range."""
    for spec in space:
        current = ctx.incumbent.get(spec.name)
        if not spec.name.startswith("regularization.") or spec.type != "float":
            continue
        if isinstance(current, int | float) and spec.low < current < spec.high:
            yield spec, float(current)


def raise_regularization_floor(
    space: SearchSpace, ctx: AdaptationContext
) -> list[Adaptation | None]:
    """Regularize at least as much as the incumbent; label smoothing excepted when its floor
    caps the validation loss (`lower_smoothing_ceiling` moves it the other way)."""
    changes = []
    for spec, current in _regularization_strengths(space, ctx):
        if spec.name == SMOOTHING and finding_ids.SMOOTHING_CAPS_CONFIDENCE in ctx.fired:
            continue
        reason = (
            "the incumbent overfits after its best epoch; regularize at least as much as it "
            f"({current:.3g})"
        )
        changes.append(_adapt(spec, ctx, low=current, high=spec.high, reason=reason))
    return changes


def lower_regularization_ceiling(
    space: SearchSpace, ctx: AdaptationContext
) -> list[Adaptation | None]:
    changes = []
    for spec, current in _regularization_strengths(space, ctx):
        reason = f"the incumbent underfits; regularize at most as much as it ({current:.3g})"
        changes.append(_adapt(spec, ctx, low=spec.low, high=current, reason=reason))
    return changes


def lower_smoothing_ceiling(space: SearchSpace, ctx: AdaptationContext) -> list[Adaptation | None]:
    """Label smoothing whose floor capped the validation loss: the sampler searches below the
    lowest smoothing among the trials that showed it."""
    spec = space.params.get(SMOOTHING)
    seen = [float(v[SMOOTHING]) for v in ctx.flagged if isinstance(v.get(SMOOTHING), int | float)]
    if spec is None or spec.type != "float" or not seen:
        return []
    ceiling = min(seen)
    if ceiling >= float(spec.high):
        return []
    reason = (
        f"{len(seen)} trial(s) showed {ctx.finding}; the lowest smoothing among them was "
        f"{ceiling:.3g}, so the sampler searches below it"
    )
    return [_adapt(spec, ctx, low=min(float(spec.low), 0.0), high=ceiling, reason=reason)]


def fit_more(space: SearchSpace, ctx: AdaptationContext) -> list[Adaptation | None]:
    return raise_lr_floor(space, ctx) + lower_regularization_ceiling(space, ctx)


ADAPTATION_RULES = {
    finding_ids.LR_TOO_HIGH: lower_lr_ceiling,
    finding_ids.BACKBONE_LR_TOO_HIGH: lower_backbone_lr_ceiling,
    finding_ids.DIVERGED: lower_lr_ceiling,
    finding_ids.TRAINING_TOO_SHORT: raise_epoch_floor,
    finding_ids.TRAINING_TOO_LONG: lower_epoch_ceiling,
    finding_ids.OVERFITTING_AFTER_BEST: raise_regularization_floor,
    finding_ids.UNDERFITTING: fit_more,
    finding_ids.SMOOTHING_CAPS_CONFIDENCE: lower_smoothing_ceiling,
}


def _adapt(
    spec: ParamSpec, ctx: AdaptationContext, *, low: Any, high: Any, reason: str
) -> Adaptation | None:
    """The range change, or None when it would leave no range (findings that pull one
    parameter both ways, e.g. overfitting and underfitting, cancel out)."""
    if spec.type == "float":
        low, high = float(f"{float(low):.4g}"), float(f"{float(high):.4g}")
    if not low < high or (spec.log and low <= 0):
        return None
    after = replace(spec, low=low, high=high)
    return Adaptation(
        ctx.iteration, spec.name, ctx.finding, spec.to_dict(), after.to_dict(), reason
    )


def apply_adaptations(space: SearchSpace, adaptations: Iterable[Adaptation]) -> SearchSpace:
    for adaptation in adaptations:
        if adaptation.param in space:
            space = space.with_param(ParamSpec.from_dict(adaptation.param, adaptation.after))
    return space


def adapt(
    space: SearchSpace,
    iteration: int,
    findings: Mapping[str, list[Mapping[str, Any]]],
    incumbent: Mapping[str, Any],
) -> tuple[SearchSpace, list[Adaptation]]:
    """Apply every rule whose finding fired. `findings` maps a finding id to the parameter
    values of the trials that showed it."""
    made: list[Adaptation] = []
    fired = frozenset(findings)
    for finding, flagged in findings.items():
        rule = ADAPTATION_RULES.get(finding)
        if rule is None:
            continue
        context = AdaptationContext(iteration, finding, incumbent, list(flagged), fired)
        proposed = rule(space, context)
        changes = [change for change in proposed if change is not None]
        space = apply_adaptations(space, changes)
        made += changes
    return space, made
