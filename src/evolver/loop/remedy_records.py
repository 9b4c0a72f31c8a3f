"""What each remedy has paid so far in a loop: one that keeps losing to its base yields its slot.

A proposal's name is its remedy (`lower_learning_rates`, `raise_head_lr_again`). Each trained
trial of it either paid, ending better than the trial it was built from, or did not: it ended no
better, or the pruner or fold racing stopped it. The incumbent's diagnosis tends to name the same
problems from one incumbent to the next, so without a memory the loop proposes a remedy that
never paid again and again from each new incumbent. A remedy that failed `failures` times without
paying once is planned after every remedy that has not (`loop.remedy_failures`): it is still
tried when slots are left, never dropped, since a new incumbent can change what it does.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from evolver.loop.state import BASELINE, is_scored_without_training


@dataclass(frozen=True)
class RemedyRecord:
    """A remedy's trained trials so far: how many beat their base, how many did not."""

    paid: int = 0
    failed: int = 0

    def demoted(self, failures: int | None) -> bool:
        """Failed `failures` times and never paid (never, with `failures` None)."""
        return failures is not None and self.paid == 0 and self.failed >= failures

    def to_dict(self) -> dict[str, int]:
        return {"paid": self.paid, "failed": self.failed}


def remedy_records(trials: Iterable[Any]) -> dict[str, RemedyRecord]:
    """Proposal name -> its record over the finished trained proposals among `trials`; the
    baseline, sampled trials, post-hoc choices and unfinished or failed trials do not count."""
    records: dict[str, RemedyRecord] = {}
    for trial in trials:
        attrs = trial.user_attrs
        name = attrs.get("proposal")
        if not attrs.get("proposed_by") or name in (None, BASELINE):
            continue
        if is_scored_without_training(trial) or trial.state.name not in ("COMPLETE", "PRUNED"):
            continue
        record = records.get(name, RemedyRecord())
        if beat_its_base(trial):
            records[name] = RemedyRecord(record.paid + 1, record.failed)
        else:
            records[name] = RemedyRecord(record.paid, record.failed + 1)
    return records


def beat_its_base(trial: Any) -> bool:
    """A complete proposal scored lower than the trial it was built from scored then."""
    base_value = (trial.user_attrs.get("incumbent") or {}).get("value")
    return (
        trial.state.name == "COMPLETE"
        and trial.value is not None
        and isinstance(base_value, int | float)
        and trial.value < base_value
    )
