"""The evolver loop: iterations of trials that Optuna and the diagnoses propose.

- `study`: settings (`cfg.loop`), RDB storage with heartbeats, sampler, pruner, atomic claims.
- `space`: the search space (`conf/search/`); `adaptation`: its adaptation by findings.
- `proposals`: an iteration's enqueued trials, from the incumbent's diagnosis.
- `state`: loop state kept in the study; `outcomes`: a finished job's records as trial attrs.
- `runner`: the loop itself, a worker's top-level algorithm; the Hydra sweeper
  (`hydra/sweeper=evolver`) drives it. Its parts share a `context.LoopContext`:
  `building` (an iteration's plan enqueued), `trial_queue` (waiting trials popped and prepared),
  `telling` (a trial's outcome told to Optuna), `closing` (a finished iteration's record).
- `job`: the job side (pruning callback); `status`: `evolver status`.

The names below load their submodule on first use, so that importing this package stays cheap
(no Optuna, no torch).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from evolver.loop.adaptation import Adaptation, adapt
    from evolver.loop.outcomes import JobOutcome
    from evolver.loop.runner import LoopRunner
    from evolver.loop.space import ParamSpec, SearchSpace
    from evolver.loop.state import LoopState, trial_origin
    from evolver.loop.status import print_summary, render, scoreboard
    from evolver.loop.study import LoopSettings
    from evolver.loop.trial_queue import override_key, quote

_SUBMODULES = {
    "Adaptation": "adaptation",
    "JobOutcome": "outcomes",
    "LoopRunner": "runner",
    "LoopSettings": "study",
    "LoopState": "state",
    "ParamSpec": "space",
    "SearchSpace": "space",
    "adapt": "adaptation",
    "override_key": "trial_queue",
    "print_summary": "status",
    "quote": "trial_queue",
    "render": "status",
    "scoreboard": "status",
    "trial_origin": "state",
}

__all__ = [
    "Adaptation",
    "JobOutcome",
    "LoopRunner",
    "LoopSettings",
    "LoopState",
    "ParamSpec",
    "SearchSpace",
    "adapt",
    "override_key",
    "print_summary",
    "quote",
    "render",
    "scoreboard",
    "trial_origin",
]


def __getattr__(name: str) -> Any:
    submodule = _SUBMODULES.get(name)
    if submodule is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{submodule}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
