"""Which settings a run may change and still continue another run's folds: the rule, pure
Python on flattened configs, shared by training (`evolver.continuation`), the loop (which
proposals continue their base) and the diagnosis (which remedies only exist as continuations).

A continuation equals training from scratch with the new settings when the two runs differ only
in what happens after the base ended: more phase-2 epochs, more early-stopping patience or early
stopping off, which checkpoint scores the folds, where records go. The schedule must not depend
on the number of epochs. `checkpoint.continue_lr_scale` (continuing at scaled rates) is the one
change that makes a continuation something no run from scratch trains.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# The config key naming the run to continue.
CONTINUE_FROM_KEY = "checkpoint.continue_from"
# The config key that continues at scaled learning rates, and its value that changes nothing.
LR_SCALE_KEY = "checkpoint.continue_lr_scale"
UNCHANGED_LR = 1.0
CONTINUABLE_SCHEDULES = ("plateau", "constant")
# Keys that say nothing about how a fold trains (where records go, how a run is tracked, what
# predict applies), so they may differ between a base run and its continuation.
FREE_PREFIXES = (
    "loop.",
    "search.",
    "tracking.",
    "diagnosis.",
    "predict.",
    "hydra.",
    "runs_dir",
    "objective",
    "checkpoint.",
    "trainer.enable_progress_bar",
    "trainer.progress",
    "data.num_workers",
    "data.root",
    "data.csv",
)


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """A nested mapping as {dotted.key: leaf value}."""
    flat: dict[str, Any] = {}
    if isinstance(node, Mapping):
        for key, value in node.items():
            flat.update(flatten(value, f"{prefix}{key}."))
        return flat
    if isinstance(node, list | tuple):
        return {prefix.rstrip("."): list(node)}
    return {prefix.rstrip("."): node}


def blockers(base: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Why a run configured `new` cannot continue a run configured `base` (flattened configs);
    empty when it can."""
    reasons = []
    schedule = base.get("schedule.name")
    if schedule not in CONTINUABLE_SCHEDULES:
        reasons.append(
            f"schedule {schedule} depends on the number of epochs (continuable: "
            f"{', '.join(CONTINUABLE_SCHEDULES)})"
        )
    for key in differing_keys(base, new):
        before, after = base.get(key), new.get(key)
        if key == "finetune.phase2_epochs" and _int(after) >= _int(before):
            continue
        if key == "early_stop.patience" and _int(after) >= _int(before):
            continue
        if key == "early_stop.enabled" and before is True and after is False:
            continue
        if key.startswith("early_stop.") and new.get("early_stop.enabled") is False:
            continue  # early stopping is off: its other settings do not matter
        reasons.append(f"{key} differs ({before!r} -> {after!r})")
    return reasons


def differing_keys(base: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """The keys (flattened configs) whose values differ and that say how a fold trains."""
    return [
        key
        for key in sorted(set(base) | set(new))
        if not key.startswith(FREE_PREFIXES) and base.get(key) != new.get(key)
    ]


def _int(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return -1
