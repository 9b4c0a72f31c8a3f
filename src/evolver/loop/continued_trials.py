"""Which proposals continue their base trial's folds instead of training from scratch.

A proposal whose changes only concern what happens after its base trial ended (more phase-2
epochs, more patience, early stopping off, another checkpoint choice, lower rates from there)
starts each fold from the base's fold end state (`checkpoint.continue_from`,
`evolver.continuation`). The same rule (`evolver.continuable`) decides it here, on the base's
saved config with the proposal's changes applied, and in the job, on the composed config, so the
job never has to refuse what the loop planned.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from evolver.continuable import CONTINUE_FROM_KEY, blockers, flatten
from evolver.continuation import fold_end_states
from evolver.records import CONFIG_FILE

# Trial user attribute of a continuing proposal: {"trial": base number, "run_dir": base run}.
CONTINUES_ATTR = "continues"
# The job override that makes a trial continue its base.
CONTINUE_KEY = CONTINUE_FROM_KEY
# The keys that say how a trial continued its base (continue_from, continue_lr_scale).
CONTINUATION_PREFIX = "checkpoint.continue_"


def continuation_of(base: Any, changes: Mapping[str, Any]) -> dict[str, Any] | None:
    """{"trial", "run_dir"} when a proposal with `changes` can continue `base` (a complete
    FrozenTrial whose run kept every fold's end state); None when it must train from scratch."""
    from omegaconf import OmegaConf

    run_dir = base.user_attrs.get("run_dir")
    if not run_dir or base.state.name != "COMPLETE":
        return None
    config_path = Path(run_dir) / CONFIG_FILE
    if not config_path.is_file():
        return None
    before = flatten(OmegaConf.to_container(OmegaConf.load(config_path), resolve=False))
    folds = before.get("cv.folds")
    if not isinstance(folds, int) or len(fold_end_states(Path(run_dir))) != folds:
        return None
    after = dict(before)
    for key, value in changes.items():
        # A config-group selection (schedule=cosine) changes the group's keys too: it can
        # only pass as the group the base already used.
        after[key if "." in key else f"{key}.name"] = value
    if blockers(before, after):
        return None
    return {"trial": base.number, "run_dir": str(run_dir)}


def seconds_saved(user_attrs: Mapping[str, Any]) -> float:
    """Training seconds a trial did not spend thanks to continuing its base (0 if it did not)."""
    value = user_attrs.get("seconds_saved")
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else 0.0
