"""What one loop worker's parts share once its study is open."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from evolver.loop.space import SearchSpace
from evolver.loop.state import LoopState
from evolver.loop.study import LoopSettings, claim, release
from evolver.tracking import LoopTracker

Printer = Callable[[str], None]


@dataclass
class LoopContext:
    """A worker's open study, its identity among the workers, its tracking and its output."""

    settings: LoopSettings
    study: Any
    storage: Any
    study_id: int
    base_space: SearchSpace
    worker: str
    tracking: LoopTracker
    print: Printer
    config_digest: str = ""
    parent_runs: dict[int, str | None] = field(default_factory=dict)

    def say(self, text: str) -> None:
        """Print one line of the loop's progress."""
        self.print(f"[loop {self.settings.name}] {text}")

    def claim(self, key: str) -> bool:
        """Take `key` for this worker (atomic among all workers); False when another has it."""
        return claim(self.storage, self.study_id, key, self.worker)

    def release(self, key: str) -> None:
        release(self.storage, self.study_id, key)

    def parent_run(self, iteration: int) -> str | None:
        """The tracking run of `iteration`, started (or reopened) by its first use here."""
        if iteration not in self.parent_runs:
            self.parent_runs[iteration] = self.tracking.start_iteration(iteration)
        return self.parent_runs[iteration]

    def iteration_label(self, iteration: int) -> str:
        """`iteration i/n`, as progress lines name an iteration."""
        return f"iteration {iteration}/{self.settings.iterations}"


def best_text(state: LoopState, best: Any = None) -> str:
    best = best or state.best()
    return "none yet" if best is None else f"{best.value:.5g} (trial {best.number})"
