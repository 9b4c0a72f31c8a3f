"""A remedy that paid, taken again: the pattern move of direct search (Hooke and Jeeves).

When the incumbent is a proposal that beat the trial it was built on, the loop's next most
informed step is the same step once more: a head rate raised 2.5x that helped is raised 2.5x
again, whether or not the finding that proposed it still fires. The step is read from the two
trials' settings (a ratio on a log-scale parameter, a difference on a linear one) and applied to
the incumbent, stopping at the declared search space's bounds; a range the loop narrowed for its
sampler does not bind it, as it does not bind the proposal itself. Only a step made entirely of
numeric searched parameters is repeated: a group selection (`schedule=cosine`), a categorical
(batch size) or a key the space does not hold has no "again", and a step that repeats only
partly would be another change. A key already at its bound stays there while the others move.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from evolver.diagnosis.proposals import Proposal, significant
from evolver.loop.repeated_failures import trial_settings
from evolver.loop.space import SearchSpace

AGAIN_SUFFIX = "_again"


def step_again(
    incumbent: Any,
    trials: Mapping[int, Any],
    space: SearchSpace,
    configured: Mapping[str, Any] | None = None,
) -> Proposal | None:
    """The incumbent's own proposal repeated from the incumbent; None when the incumbent is not
    a trained proposal that beat its base, or its step cannot be repeated whole.

    `space` is the declared search space (its types and bounds; a range the loop narrowed for
    its sampler does not bind a proposal); `configured` holds the loop's flat settings, for
    values neither trial's parameters nor fixed overrides name."""
    attrs = incumbent.user_attrs
    name, finding = attrs.get("proposal"), attrs.get("proposed_by")
    base_number = (attrs.get("incumbent") or {}).get("number")
    if not name or not finding or attrs.get("needs_training") is False:
        return None
    base = trials.get(base_number)
    if base is None or base.value is None or incumbent.value is None:
        return None
    if not incumbent.value < base.value:
        return None
    configured = configured or {}
    before_all = trial_settings(
        base.params, base.user_attrs.get("fixed_overrides"), space, configured
    )
    after_all = trial_settings(incumbent.params, attrs.get("fixed_overrides"), space, configured)
    changes: dict[str, Any] = {}
    moved = []
    for key in attrs.get("changes") or {}:
        if key not in space or space[key].type == "categorical":
            return None
        spec = space[key]
        before, after = before_all.get(key), after_all.get(key)
        if not _numbers(before, after) or before == after:
            return None
        value = min(max(_repeat(spec.type, spec.log, before, after), spec.low), spec.high)
        if (value - after) * (after - before) <= 0:
            continue  # at (or beyond) the space's bound: this key has no further to go
        changes[key] = value
        moved.append(f"{key.rsplit('.', 1)[-1]} {after:g} -> {value:g}")
    if not changes:
        return None
    again = name if name.endswith(AGAIN_SUFFIX) else name + AGAIN_SUFFIX
    return Proposal(
        again,
        finding,
        changes,
        f"trial {incumbent.number}'s {name} lowered trial {base.number}'s score "
        f"{base.value:.4g} -> {incumbent.value:.4g}; the same step again ({', '.join(moved)}).",
        dict(attrs.get("expected_effect") or {}),
    )


def _numbers(*values: Any) -> bool:
    return all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)


def _repeat(kind: str, log: bool, before: float, after: float) -> float:
    """The step once more: the same ratio on a log-scale parameter, the same difference on a
    linear one (whole for an int)."""
    value = after * after / before if log and before > 0 else after + (after - before)
    return round(value) if kind == "int" else significant(value)
