"""A remedy that keeps losing to its base yields its slot to the others."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
from test_loop import SPACE, _plan_settings

from evolver.loop.proposals import baseline_plan, plan_iteration
from evolver.loop.remedy_records import RemedyRecord, remedy_records
from evolver.loop.space import SearchSpace
from evolver.loop.state import LoopState
from evolver.loop.status import demoted_line

State = optuna.trial.TrialState


def _trial(number: int, value: float | None, params: dict, state=State.COMPLETE, **attrs):
    space = SearchSpace.from_dict(SPACE)
    trial = optuna.trial.create_trial(
        params=params,
        distributions={name: space[name].distribution() for name in params},
        value=value if state == State.COMPLETE else None,
        intermediate_values={0: 0.5} if state == State.PRUNED else None,
        state=state,
        user_attrs={"iteration": 1, **attrs},
    )
    trial.number = number
    return trial


def _remedy(number: int, name: str, value: float | None, base_value: float, **kwargs):
    state = kwargs.pop("state", State.COMPLETE)
    return _trial(
        number,
        value,
        {"finetune.lr_backbone": 1e-4},
        state,
        proposal=name,
        proposed_by="a_finding",
        incumbent={"number": 0, "value": base_value},
        **kwargs,
    )


def test_a_remedy_pays_only_when_it_ends_better_than_its_base() -> None:
    trials = [
        _trial(0, 0.3, {"finetune.lr_backbone": 1e-4}, proposal="baseline", proposed_by="baseline"),
        _trial(1, 0.10, {"finetune.lr_backbone": 2e-4}),  # sampled: no remedy
        _remedy(2, "lower_lr", 0.31, 0.30),  # worse
        _remedy(3, "lower_lr", 0.30, 0.30),  # no effect
        _remedy(4, "lower_lr", None, 0.30, state=State.PRUNED),  # pruned or raced out
        _remedy(5, "raise_head_lr", 0.25, 0.30),
        _remedy(6, "raise_head_lr", None, 0.25, state=State.PRUNED),
        _remedy(7, "train_longer", None, 0.25, state=State.RUNNING),  # unfinished
        _remedy(8, "train_longer", None, 0.25, state=State.FAIL),  # failed: no verdict
        _remedy(9, "temperature", 0.2, 0.25, needs_training=False),  # post-hoc: no slot
    ]
    records = remedy_records(trials)
    assert records == {
        "lower_lr": RemedyRecord(paid=0, failed=3),
        "raise_head_lr": RemedyRecord(paid=1, failed=1),
    }
    assert records["lower_lr"].demoted(2) and records["lower_lr"].demoted(3)
    assert not records["lower_lr"].demoted(4)
    assert not records["lower_lr"].demoted(None)
    assert not records["raise_head_lr"].demoted(1)  # it paid once


def _finding(finding: str, name: str, changes: dict) -> dict:
    proposal = {"name": name, "finding": finding, "changes": changes, "reason": "r"}
    return {"id": finding, "severity": "medium", "explanation": "e", "proposals": [proposal]}


FINDINGS = [
    _finding("lr_too_high", "lower_learning_rates", {"finetune.lr_backbone": 5e-5}),
    _finding("unstable_validation", "cosine_with_warmup", {"schedule": "cosine"}),
    _finding("training_too_short", "train_longer", {"finetune.phase2_epochs": 6}),
]


def _plan(
    tmp_path: Path, failures_so_far: int, remedy_failures: int | None, findings: list = FINDINGS
):
    """Iteration 2 on an incumbent whose findings propose lower rates first, with lower rates
    already stopped `failures_so_far` times on other bases."""
    space = SearchSpace.from_dict(SPACE)
    (tmp_path / "report.json").write_text(json.dumps({"findings": findings}))
    params = {"finetune.lr_backbone": 1e-4, "schedule": "plateau", "finetune.phase2_epochs": 4}
    incumbent = _trial(0, 0.2, params, run_dir=str(tmp_path))
    failed = [
        _remedy(1 + i, "lower_learning_rates", None, 0.4, state=State.PRUNED)
        for i in range(failures_so_far)
    ]
    attrs = {"evolver.iteration.1": {"size": 3, "space": space.to_dict()}, "evolver.closed.1": {}}
    state = LoopState([incumbent, *failed], attrs)
    settings = _plan_settings(1, remedy_failures=remedy_failures)
    return plan_iteration(2, state, settings, space, baseline_plan(space, {}, {}))


def _planned(plan) -> list[str | None]:
    return [trial.user_attrs.get("proposal") for trial in plan.trials]


@pytest.mark.parametrize(
    ("failures_so_far", "remedy_failures", "planned"),
    [
        # Failed twice, never paid: the other findings' remedies take the two slots first.
        (2, 2, ["cosine_with_warmup", "train_longer", None]),
        # Failed once: it keeps its place.
        (1, 2, ["lower_learning_rates", "cosine_with_warmup", None]),
        # Off: the findings' order.
        (3, None, ["lower_learning_rates", "cosine_with_warmup", None]),
    ],
)
def test_a_remedy_that_never_paid_is_planned_after_the_others(
    tmp_path: Path, failures_so_far: int, remedy_failures: int | None, planned: list
) -> None:
    plan = _plan(tmp_path, failures_so_far, remedy_failures)
    assert _planned(plan) == planned
    demoted = planned[0] != "lower_learning_rates"
    expected = {"lower_learning_rates": {"paid": 0, "failed": 2}} if demoted else {}
    assert plan.record()["demoted"] == expected


def test_a_demoted_remedy_still_takes_a_slot_no_other_remedy_wants(tmp_path: Path) -> None:
    # Only lower rates to propose: tried again, rather than the slot given to the sampler.
    plan = _plan(tmp_path, 2, 2, findings=FINDINGS[:1])
    assert _planned(plan) == ["lower_learning_rates", None, None]
    assert plan.record()["demoted"] == {"lower_learning_rates": {"paid": 0, "failed": 2}}


def test_status_names_the_remedies_the_last_iteration_tried_last(tmp_path: Path) -> None:
    plan = _plan(tmp_path, 3, 2)
    state = LoopState([], {"evolver.iteration.2": plan.record()})
    assert demoted_line(state) == (
        "Proposals tried last, never better than their base: "
        "lower_learning_rates (0 of 3 beat their base)"
    )
    assert demoted_line(LoopState([], {"evolver.iteration.2": {"demoted": {}}})) is None
