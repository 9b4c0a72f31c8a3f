"""The evolver loop through the real sweeper plugin, with a task that writes synthetic records.

`tests/loop_fake_app.py` stands in for training (records in a fraction of a second, the real
diagnosis on them); `tests/test_loop_training.py` runs the same loop on the tiny model.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest

from evolver.diagnosis import Finding, Proposal
from evolver.errors import ConfigError
from evolver.loop import adaptation
from evolver.loop import status as status_mod
from evolver.loop.outcomes import constraints
from evolver.loop.proposals import baseline_plan, interleaved, plan_iteration, proposal_plan
from evolver.loop.space import ParamSpec, SearchSpace
from evolver.loop.state import LoopState
from evolver.loop.study import claim, claim_age, make_storage, release

APP = Path(__file__).parent / "loop_fake_app.py"
EVOLVER = Path(sys.executable).parent / "evolver"

SPACE = {
    "finetune.lr_backbone": {"type": "float", "low": 1e-5, "high": 3e-3, "log": True},
    "schedule": {"type": "categorical", "choices": ["plateau", "cosine"]},
    "finetune.phase2_epochs": {"type": "int", "low": 2, "high": 8},
    "early_stop.patience": {
        "type": "categorical",
        "choices": ["off", 3, 5],
        "choice_overrides": {"off": ["early_stop.enabled=false"]},
    },
}


def fake_loop(runs_dir: Path, *overrides: str, timeout: float = 240) -> subprocess.CompletedProcess:
    command = [sys.executable, str(APP), "-m", "hydra/sweeper=evolver", f"runs_dir={runs_dir}"]
    result = subprocess.run(
        [*command, *overrides], capture_output=True, text=True, timeout=timeout, cwd=runs_dir
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def load(runs_dir: Path, name: str, storage: str | None = None) -> optuna.Study:
    url = storage or f"sqlite:///{runs_dir / 'optuna.db'}"
    return optuna.load_study(study_name=name, storage=url)


def by_state(study: optuna.Study, state: str) -> list[optuna.trial.FrozenTrial]:
    return [t for t in study.trials if t.state.name == state]


# -- pure parts --------------------------------------------------------------------------------


def test_space_overrides_put_groups_first_and_map_choices() -> None:
    space = SearchSpace.from_dict(SPACE)
    lines = space.overrides(
        {"finetune.lr_backbone": 1e-4, "schedule": "cosine", "early_stop.patience": "off"}
    )
    assert lines == ["schedule=cosine", "early_stop.enabled=false", "finetune.lr_backbone=0.0001"]
    assert space.overrides({"early_stop.patience": 5}) == ["early_stop.patience=5"]


def test_space_rejects_bad_specs_naming_the_field() -> None:
    with pytest.raises(ConfigError, match=r"search\.params\.x"):
        SearchSpace.from_dict({"x": {"type": "float", "low": 1.0, "high": 0.5}})
    with pytest.raises(ConfigError, match=r"search\.params\.y\.type"):
        SearchSpace.from_dict({"y": {"type": "normal"}})


def test_lr_too_high_moves_the_lr_ceiling_below_the_degraded_lrs() -> None:
    space = SearchSpace.from_dict(SPACE)
    flagged = {"lr_too_high": [{"finetune.lr_backbone": 1e-3}, {"finetune.lr_backbone": 4e-4}]}
    adapted, made = adaptation.adapt(space, 2, flagged, {"finetune.lr_backbone": 1e-3})
    assert adapted["finetune.lr_backbone"].high == pytest.approx(4e-4)
    assert adapted["finetune.lr_backbone"].low == pytest.approx(1e-5)
    assert [a.param for a in made] == ["finetune.lr_backbone"]
    assert "0.0004" in made[0].reason and made[0].finding == "lr_too_high"
    # A finding without a rule changes nothing.
    same, none = adaptation.adapt(space, 2, {"final_weights_not_best": [{}]}, {})
    assert none == [] and same.to_dict() == space.to_dict()


def test_backbone_lr_too_high_moves_only_the_backbone_ceiling() -> None:
    head = {"type": "float", "low": 1e-4, "high": 3e-2, "log": True}
    space = SearchSpace.from_dict({**SPACE, "finetune.lr_head": head})
    values = {"finetune.lr_backbone": 4e-4, "finetune.lr_head": 2e-3}
    flagged = {"backbone_lr_too_high": [values]}
    adapted, made = adaptation.adapt(space, 2, flagged, values)
    assert [a.param for a in made] == ["finetune.lr_backbone"]
    assert adapted["finetune.lr_backbone"].high == pytest.approx(4e-4)
    assert adapted["finetune.lr_head"].to_dict() == space["finetune.lr_head"].to_dict()
    # The same trial flagged lr_too_high (the head implicated too) moves both ceilings.
    _, both = adaptation.adapt(space, 2, {"lr_too_high": [values]}, values)
    assert sorted(a.param for a in both) == ["finetune.lr_backbone", "finetune.lr_head"]


def test_trials_that_diverged_never_push_a_ceiling_below_a_healthy_incumbent() -> None:
    space = SearchSpace.from_dict(SPACE)
    incumbent = {"finetune.lr_backbone": 1e-4}
    # Two sampled trials diverged; one drew a lower backbone rate than the incumbent's.
    flagged = {"diverged": [{"finetune.lr_backbone": 2e-3}, {"finetune.lr_backbone": 3e-5}]}
    adapted, made = adaptation.adapt(space, 2, flagged, incumbent)
    assert adapted["finetune.lr_backbone"].high == pytest.approx(1e-4)
    assert "the incumbent did not at 0.0001" in made[0].reason
    # The incumbent showed it too: the ceiling goes to the lowest flagged rate.
    flagged["diverged"].append(incumbent)
    adapted, _ = adaptation.adapt(space, 2, flagged, incumbent)
    assert adapted["finetune.lr_backbone"].high == pytest.approx(3e-5)


def test_underfitting_moves_the_lr_floor_up_to_the_lowest_underfit_lr() -> None:
    space = SearchSpace.from_dict(SPACE)
    flagged = {"underfitting": [{"finetune.lr_backbone": 1e-4}, {"finetune.lr_backbone": 3e-4}]}
    adapted, made = adaptation.adapt(space, 2, flagged, {"finetune.lr_backbone": 3e-4})
    assert adapted["finetune.lr_backbone"].low == pytest.approx(1e-4)
    assert adapted["finetune.lr_backbone"].high == pytest.approx(3e-3)
    assert [a.param for a in made] == ["finetune.lr_backbone"]
    assert "at or above" in made[0].reason
    # An underfit LR already at the floor leaves the range as it was.
    same, none = adaptation.adapt(space, 2, {"underfitting": [{"finetune.lr_backbone": 1e-5}]}, {})
    assert none == [] and same.to_dict() == space.to_dict()


def test_proposals_interleave_findings_one_remedy_each_first() -> None:
    def finding(name: str, *proposals: str) -> Finding:
        return Finding(name, "medium", {}, "e", [Proposal(p, name, {}, "r") for p in proposals])

    findings = [finding("a", "a1", "a2"), finding("b", "b1"), finding("c", "c1", "c2", "c3")]
    names = [proposal.name for proposal in interleaved(findings)]
    assert names == ["a1", "b1", "c1", "a2", "c2", "c3"]


def _finished(
    number: int, value: float, params: dict, run_dir: Path, findings: list[dict]
) -> optuna.trial.FrozenTrial:
    space = SearchSpace.from_dict(SPACE)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "report.json").write_text(json.dumps({"findings": findings}))
    trial = optuna.trial.create_trial(
        params=params,
        distributions={name: space[name].distribution() for name in params},
        value=value,
        user_attrs={"iteration": 1, "run_dir": str(run_dir), "findings": []},
    )
    trial.number = number
    return trial


def _proposal(name: str, finding: str, changes: dict) -> dict:
    return {"name": name, "finding": finding, "changes": changes, "reason": "r"}


LONGER = _proposal("train_longer", "training_too_short", {"finetune.phase2_epochs": 6})


def _plan_settings(proposal_bases: int, remedy_failures: int | None = 2) -> SimpleNamespace:
    """The loop settings plan_iteration reads: 3 trials, 2 proposal slots, no adaptation."""
    return SimpleNamespace(
        remedy_failures=remedy_failures,
        trials_per_iteration=3,
        adapt_space=False,
        proposals=True,
        proposal_bases=proposal_bases,
        proposal_slots=lambda size: 2,
        objective="cv.loss_best",
        continue_proposals=True,
    )


def test_runner_up_proposals_fill_slots_the_incumbents_tried_proposals_leave(
    tmp_path: Path,
) -> None:
    space = SearchSpace.from_dict(SPACE)
    longer = LONGER
    cosine = _proposal("cosine_with_warmup", "unstable_validation", {"schedule": "cosine"})
    short = {
        "id": "training_too_short",
        "severity": "medium",
        "explanation": "e",
        "proposals": [longer],
    }
    noisy = {
        "id": "unstable_validation",
        "severity": "medium",
        "explanation": "e",
        "proposals": [cosine],
    }
    plateau = {"schedule": "plateau"}
    incumbent = _finished(0, 0.2, {"finetune.phase2_epochs": 4, **plateau}, tmp_path / "a", [short])
    runner_up = _finished(1, 0.3, {"finetune.phase2_epochs": 3, **plateau}, tmp_path / "b", [noisy])
    # The incumbent's only proposal (4 -> 6 epochs) already ran as trial 2.
    tried = _finished(2, 0.35, {"finetune.phase2_epochs": 6, **plateau}, tmp_path / "c", [])
    attrs = {"evolver.iteration.1": {"size": 3, "space": space.to_dict()}, "evolver.closed.1": {}}
    state = LoopState([incumbent, runner_up, tried], attrs)
    settings = _plan_settings(proposal_bases=2)
    plan = plan_iteration(2, state, settings, space, baseline_plan(space, {}, {}))
    proposed = [trial for trial in plan.trials if trial.user_attrs]
    # The runner-up's proposal, applied to the runner-up's own values; the third slot is sampled.
    assert len(proposed) == 1 and len(plan.trials) == 3
    assert proposed[0].params == {"finetune.phase2_epochs": 3, "schedule": "cosine"}
    assert proposed[0].user_attrs["base_rank"] == 2
    assert proposed[0].user_attrs["proposed_by"] == "unstable_validation"
    assert proposed[0].user_attrs["incumbent"] == {"number": 1, "value": 0.3}
    assert plan.record()["proposals"][0]["base_rank"] == 2
    # With the incumbent as the only base, the free slots go to the sampler.
    settings.proposal_bases = 1
    alone = plan_iteration(2, state, settings, space, baseline_plan(space, {}, {}))
    assert [trial.user_attrs for trial in alone.trials] == [{}, {}, {}]


def _continuable_base(run_dir: Path, findings: list[dict]) -> optuna.trial.FrozenTrial:
    """A finished trial 0 whose run kept both folds' end states, with `findings` in its report."""
    from omegaconf import OmegaConf

    params = {"finetune.phase2_epochs": 4, "schedule": "plateau", "finetune.lr_backbone": 1e-4}
    base = _finished(0, 0.2, params, run_dir, findings)
    config = {
        "cv": {"folds": 2},
        "schedule": {"name": "plateau"},
        "finetune": {"phase2_epochs": 4, "lr_backbone": 1e-4},
    }
    OmegaConf.save(OmegaConf.create(config), run_dir / "config.yaml")
    (run_dir / "checkpoints").mkdir()
    for fold in (1, 2):
        (run_dir / "checkpoints" / f"fold{fold}-end.ckpt").write_bytes(b"")
    return base


def test_train_longer_proposal_continues_its_base_and_a_new_rate_does_not(
    tmp_path: Path,
) -> None:
    from evolver.loop.continued_trials import CONTINUES_ATTR

    space = SearchSpace.from_dict(SPACE)
    longer = LONGER
    lower = _proposal("lower_learning_rates", "lr_too_high", {"finetune.lr_backbone": 1e-5})
    findings = [
        {"id": "lr_too_high", "severity": "high", "explanation": "e", "proposals": [lower]},
        {"id": "training_too_short", "severity": "medium", "explanation": "e",
         "proposals": [longer]},
    ]  # fmt: skip
    run_dir = tmp_path / "base"
    base = _continuable_base(run_dir, findings)
    attrs = {"evolver.iteration.1": {"size": 3, "space": space.to_dict()}, "evolver.closed.1": {}}
    settings = _plan_settings(proposal_bases=1)
    plan = plan_iteration(
        2, LoopState([base], attrs), settings, space, baseline_plan(space, {}, {})
    )
    by_name = {t.user_attrs["proposal"]: t for t in plan.trials if t.user_attrs}
    assert by_name["train_longer"].user_attrs[CONTINUES_ATTR] == {
        "trial": 0,
        "run_dir": str(run_dir),
    }
    assert CONTINUES_ATTR not in by_name["lower_learning_rates"].user_attrs
    assert plan.record()["proposals"][1][CONTINUES_ATTR]["trial"] == 0
    settings.continue_proposals = False
    plan = plan_iteration(
        2, LoopState([base], attrs), settings, space, baseline_plan(space, {}, {})
    )
    assert not any(CONTINUES_ATTR in t.user_attrs for t in plan.trials)


def test_status_scoreboard_names_the_runner_up_a_proposal_was_built_on() -> None:
    from rich.console import Console

    base = {"iteration": 1}
    made = {
        "iteration": 2,
        "proposed_by": "unstable_validation",
        "proposal": "cosine_with_warmup",
        "expected_effect": {"metric": "mean_volatility", "direction": "down"},
        "incumbent": {"number": 1, "value": 0.3},
        "base_rank": 2,
    }
    trials = [
        optuna.trial.create_trial(value=value, user_attrs=attrs)
        for value, attrs in ((0.2, base), (0.3, base), (0.27, made))
    ]
    for number, trial in enumerate(trials):
        trial.number = number
    state = LoopState(trials, {})
    [row] = status_mod.scoreboard(state)
    assert (row.incumbent_trial, row.base_rank) == (1, 2)
    assert row.change == pytest.approx(-0.1)
    console = Console(width=250, record=True)
    status_mod.render(SimpleNamespace(study_name="s"), console, state)
    assert "0.3 (#1, rank 2)" in console.export_text()
    assert not row.no_effect


def test_status_scoreboard_flags_a_proposal_that_changed_nothing() -> None:
    from rich.console import Console

    made = {
        "iteration": 2,
        "proposed_by": "early_stopping_too_eager",
        "proposal": "raise_patience",
        "incumbent": {"number": 0, "value": 0.25},
    }
    trials = [
        optuna.trial.create_trial(value=0.25, user_attrs={"iteration": 1}),
        optuna.trial.create_trial(value=0.25, user_attrs=made),
        optuna.trial.create_trial(value=0.2500001, user_attrs={**made, "proposal": "other"}),
    ]
    for number, trial in enumerate(trials):
        trial.number = number
    state = LoopState(trials, {})
    same, close = status_mod.scoreboard(state)
    assert same.no_effect and same.to_dict()["no_effect"] is True
    assert not close.no_effect
    console = Console(width=250, record=True)
    status_mod.render(SimpleNamespace(study_name="s"), console, state)
    assert "no effect" in console.export_text()


def test_lower_rate_continuation_runs_only_as_a_continuation_of_its_base(
    tmp_path: Path,
) -> None:
    from evolver.loop.continued_trials import CONTINUES_ATTR

    space = SearchSpace.from_dict(SPACE)
    scaled = {"checkpoint.continue_lr_scale": 0.2, "finetune.phase2_epochs": 6}
    continued = _proposal("continue_at_lower_lr", "lr_too_high", scaled)
    lower = _proposal("lower_learning_rates", "lr_too_high", {"finetune.lr_backbone": 1e-5})
    findings = [
        {"id": "lr_too_high", "severity": "high", "explanation": "e",
         "proposals": [continued, lower]},
    ]  # fmt: skip
    run_dir = tmp_path / "base"
    base = _continuable_base(run_dir, findings)
    attrs = {"evolver.iteration.1": {"size": 3, "space": space.to_dict()}, "evolver.closed.1": {}}
    settings = _plan_settings(proposal_bases=1)

    def planned() -> dict:
        plan = plan_iteration(
            2, LoopState([base], attrs), settings, space, baseline_plan(space, {}, {})
        )
        return {t.user_attrs["proposal"]: t for t in plan.trials if t.user_attrs}

    trial = planned()["continue_at_lower_lr"]
    assert trial.user_attrs[CONTINUES_ATTR] == {"trial": 0, "run_dir": str(run_dir)}
    assert "checkpoint.continue_lr_scale=0.2" in trial.user_attrs["fixed_overrides"]
    # Without continuations it is no remedy at all: it is left out, the other one stays.
    settings.continue_proposals = False
    assert set(planned()) == {"lower_learning_rates"}
    # A proposal built on the continued trial continues that trial, at its rates, or trains from
    # scratch: it does not inherit how its base was continued.
    on_continued = optuna.trial.create_trial(
        params=trial.params,
        distributions={name: space[name].distribution() for name in trial.params},
        value=0.1,
        user_attrs=trial.user_attrs,
    )
    plan = proposal_plan(space, on_continued, Proposal.from_dict(lower), 3)
    assert plan.params["finetune.phase2_epochs"] == 6
    assert not any(
        line.startswith("checkpoint.continue_")
        for line in plan.user_attrs.get("fixed_overrides", [])
    )


def _lower_lr_remedy(tmp_path: Path) -> tuple[SearchSpace, dict, dict, optuna.trial.FrozenTrial]:
    """The space, an `lr_too_high` finding proposing a lower backbone rate, plateau settings and
    a base trial 0 with 4 phase-2 epochs."""
    space = SearchSpace.from_dict(SPACE)
    lower = _proposal("lower_learning_rates", "lr_too_high", {"finetune.lr_backbone": 1e-5})
    lr_too_high = {"id": "lr_too_high", "severity": "high", "explanation": "e"}
    lr_too_high["proposals"] = [lower]
    plateau = {"schedule": "plateau", "finetune.lr_backbone": 1e-4}
    base = _finished(0, 0.3, {**plateau, "finetune.phase2_epochs": 4}, tmp_path / "a", [])
    return space, lr_too_high, plateau, base


def test_a_remedy_the_pruner_stopped_is_not_retrained_on_a_longer_base(tmp_path: Path) -> None:
    from evolver.loop.racing import RACE_ATTR

    space, lr_too_high, plateau, base = _lower_lr_remedy(tmp_path)
    # The remedy on trial 0, stopped by the base-curve pruner at fold 1, epoch 2.
    stopped = optuna.trial.create_trial(
        params={**plateau, "finetune.lr_backbone": 1e-5, "finetune.phase2_epochs": 4},
        distributions={name: space[name].distribution() for name in plateau}
        | {"finetune.phase2_epochs": space["finetune.phase2_epochs"].distribution()},
        state=optuna.trial.TrialState.PRUNED,
        intermediate_values={1: 0.5, 2: 0.6},
        user_attrs={"proposal": "lower_learning_rates", "prune_reason": "worse than base"},
    )
    stopped.number = 1
    # Trial 0 trained longer is the incumbent now, and its diagnosis proposes the same remedy.
    longer = _finished(
        2, 0.2, {**plateau, "finetune.phase2_epochs": 7}, tmp_path / "b", [lr_too_high]
    )
    attrs = {"evolver.iteration.1": {"size": 3, "space": space.to_dict()}, "evolver.closed.1": {}}
    settings = _plan_settings(proposal_bases=1)

    def planned(*trials: optuna.trial.FrozenTrial):
        state = LoopState([base, *trials, longer], attrs)
        plan = plan_iteration(2, state, settings, space, baseline_plan(space, {}, {}))
        return [t.user_attrs.get("proposal") for t in plan.trials], plan

    proposals, plan = planned(stopped)
    assert "lower_learning_rates" not in proposals
    [repeat] = plan.record()["repeats"]
    assert (repeat["proposal"], repeat["incumbent"], repeat["repeats"]) == (
        "lower_learning_rates", 2, 1,
    )  # fmt: skip
    assert repeat["prune_reason"] == "worse than base"
    recorded = LoopState([base, stopped, longer], {**attrs, "evolver.iteration.2": plan.record()})
    assert "1 proposal(s) not trained" in status_mod.training_seconds_line(recorded)
    # Trained for its whole folds and raced out, it might have scored better with more epochs.
    stopped.user_attrs[RACE_ATTR] = {"after_fold": 1, "folds": 5}
    assert "lower_learning_rates" in planned(stopped)[0]
    del stopped.user_attrs[RACE_ATTR]
    # A schedule that depends on the number of epochs trains differently from the first epoch.
    for trial in (stopped, longer):
        trial.params["schedule"] = "cosine"
    assert "lower_learning_rates" in planned(stopped)[0]
    for trial in (stopped, longer):
        trial.params["schedule"] = "plateau"
    # Fewer epochs than the stopped trial: the settings do not extend it.
    longer.params["finetune.phase2_epochs"] = 3
    assert "lower_learning_rates" in planned(stopped)[0]
    longer.params["finetune.phase2_epochs"] = 7
    assert "lower_learning_rates" not in planned(stopped)[0]


def test_a_remedy_that_ended_on_early_stops_is_not_retrained_on_a_longer_base(
    tmp_path: Path,
) -> None:
    space, lr_too_high, plateau, base = _lower_lr_remedy(tmp_path)
    # The remedy on trial 0 completed; early stopping ended both its folds, at phase-2 epochs 2
    # and 3 of 4.
    remedy = _finished(
        1, 0.25, {**plateau, "finetune.lr_backbone": 1e-5, "finetune.phase2_epochs": 4},
        tmp_path / "r", [],
    )  # fmt: skip
    remedy.user_attrs["proposal"] = "lower_learning_rates"
    folds = [
        {"fold": 1, "phase2_epochs": 2, "early_stopped": True},
        {"fold": 2, "phase2_epochs": 3, "early_stopped": True},
    ]
    summary = tmp_path / "r" / "summary.json"

    def write_summary(**extra: object) -> None:
        summary.write_text(json.dumps({"status": "complete", "folds": folds, **extra}))

    write_summary()
    # Trial 0 trained longer is the incumbent, and its diagnosis proposes the same remedy: from
    # scratch with 7 phase-2 epochs it would stop where trial 1 stopped, with trial 1's score.
    longer = _finished(
        2, 0.2, {**plateau, "finetune.phase2_epochs": 7}, tmp_path / "b", [lr_too_high]
    )
    attrs = {"evolver.iteration.1": {"size": 3, "space": space.to_dict()}, "evolver.closed.1": {}}
    settings = _plan_settings(proposal_bases=1)

    def planned() -> tuple[list, object]:
        state = LoopState([base, remedy, longer], attrs)
        plan = plan_iteration(2, state, settings, space, baseline_plan(space, {}, {}))
        return [t.user_attrs.get("proposal") for t in plan.trials], plan

    proposals, plan = planned()
    assert "lower_learning_rates" not in proposals
    [repeat] = plan.record()["repeats"]
    assert (repeat["proposal"], repeat["incumbent"], repeat["repeats"]) == (
        "lower_learning_rates", 2, 1,
    )  # fmt: skip
    assert repeat["value"] == 0.25 and repeat["prune_reason"] is None
    # A fold that ran to its cap might have gone on improving with more epochs.
    folds[1]["early_stopped"] = False
    write_summary()
    assert "lower_learning_rates" in planned()[0]
    folds[1]["early_stopped"] = True
    write_summary()
    # A cap below the epochs a fold trained cuts that fold short: not the same training.
    longer.params["finetune.phase2_epochs"] = 2
    assert "lower_learning_rates" in planned()[0]
    longer.params["finetune.phase2_epochs"] = 3
    assert "lower_learning_rates" not in planned()[0]
    # A continued run did not train from scratch; a cosine schedule depends on the cap.
    write_summary(continued_from={"run_dir": "elsewhere"})
    assert "lower_learning_rates" in planned()[0]
    write_summary()
    for trial in (base, remedy, longer):
        trial.params["schedule"] = "cosine"
    assert "lower_learning_rates" in planned()[0]


def test_proposal_is_the_incumbent_plus_its_changes() -> None:
    space = SearchSpace.from_dict(SPACE)
    incumbent = optuna.trial.create_trial(
        params={"finetune.lr_backbone": 1e-3, "schedule": "plateau", "early_stop.patience": 3},
        distributions={
            name: space[name].distribution()
            for name in ("finetune.lr_backbone", "schedule", "early_stop.patience")
        },
        value=0.1,
    )
    proposal = {
        "name": "disable_early_stopping",
        "finding": "early_stopping_too_eager",
        "changes": {"early_stop.enabled": False, "finetune.phase2_epochs": 12, "optim.name": "sgd"},
        "reason": "r",
        "expected_effect": {"metric": "mean_best_val_loss", "direction": "down"},
    }
    plan = proposal_plan(space, incumbent, Proposal.from_dict(proposal), 2)
    # Through the choice's overrides, `early_stop.enabled=false` is the "off" choice.
    assert plan.params == {
        "finetune.lr_backbone": 1e-3,
        "schedule": "plateau",
        "early_stop.patience": "off",
    }
    # 12 epochs lie outside [2, 8] and optim.name is not searched: both become fixed overrides.
    assert plan.user_attrs["fixed_overrides"] == ["finetune.phase2_epochs=12", "optim.name=sgd"]
    assert plan.user_attrs["excluded_params"] == ["finetune.phase2_epochs"]
    assert plan.user_attrs["proposed_by"] == "early_stopping_too_eager"
    assert plan.user_attrs["incumbent"] == {"number": incumbent.number, "value": 0.1}


def test_baseline_takes_configured_values() -> None:
    space = SearchSpace.from_dict(SPACE)
    cfg = {
        "finetune": {"lr_backbone": 1e-4, "phase2_epochs": 20},
        "early_stop": {"enabled": False, "patience": 3},
    }
    plan = baseline_plan(space, cfg, {"schedule": "plateau"})
    assert plan.params == {
        "finetune.lr_backbone": 1e-4,
        "schedule": "plateau",
        "early_stop.patience": "off",
    }
    assert plan.user_attrs["excluded_params"] == ["finetune.phase2_epochs"]


def test_constraints_mark_degraded_and_unstable_runs() -> None:
    folds = [
        {"best_val_loss": 0.10, "final_val_loss": 0.12},
        {"best_val_loss": 0.10, "final_val_loss": 0.1001},
    ]
    assert constraints(folds, [], 0.01) == [0.0, -1.0]  # half the folds: still feasible
    assert constraints(folds[:1], ["unstable_validation"], 0.01) == [0.5, 1.0]


def _trial(number: int, iteration: int, value: float) -> optuna.trial.FrozenTrial:
    trial = optuna.trial.create_trial(value=value, user_attrs={"iteration": iteration})
    trial.number = number
    return trial


def test_iterations_without_improvement_counts_back_from_the_last() -> None:
    trials = [_trial(0, 1, 0.5), _trial(1, 2, 0.4), _trial(2, 3, 0.45), _trial(3, 4, 0.41)]
    closed = {f"evolver.closed.{i}": {} for i in (1, 2, 3, 4)}
    state = LoopState(trials, closed)
    assert state.iterations_without_improvement(0.0) == 2
    assert state.best().number == 1
    # Iteration 2 improved 0.5 -> 0.4 by 20%: not enough when 25% is asked for.
    assert state.iterations_without_improvement(0.25) == 3


def test_claim_is_granted_once(tmp_path: Path) -> None:
    storage = make_storage(f"sqlite:///{tmp_path / 'c.db'}")
    study_id = storage.create_new_study([optuna.study.StudyDirection.MINIMIZE], "claims")
    assert claim(storage, study_id, "evolver.build.2", "a")
    assert not claim(storage, study_id, "evolver.build.2", "b")
    assert storage.get_study_system_attrs(study_id)["evolver.build.2"]["owner"] == "a"
    assert 0 <= claim_age(storage, study_id, "evolver.build.2") < 60
    release(storage, study_id, "evolver.build.2")
    assert claim(storage, study_id, "evolver.build.2", "b")


def test_findings_pulling_one_range_both_ways_leave_it_valid() -> None:
    space = SearchSpace.from_dict(
        {"regularization.mixup": {"type": "float", "low": 0.0, "high": 0.4}}
    )
    incumbent = {"regularization.mixup": 0.2389335775731437}
    flagged = {"underfitting": [incumbent], "overfitting_after_best": [incumbent]}
    adapted, made = adaptation.adapt(space, 2, flagged, incumbent)
    spec = adapted["regularization.mixup"]
    assert spec.low < spec.high
    assert [a.finding for a in made] == ["underfitting"]


def test_a_smoothing_floor_moves_the_smoothing_ceiling_down_and_keeps_overfitting_off_it() -> None:
    reg = {"type": "float", "low": 0.0, "high": 0.4}
    space = SearchSpace.from_dict(
        {"regularization.label_smoothing": reg, "regularization.mixup": reg}
    )
    incumbent = {"regularization.label_smoothing": 0.1, "regularization.mixup": 0.2}
    lower = {"regularization.label_smoothing": 0.05, "regularization.mixup": 0.3}
    flagged = {
        "overfitting_after_best": [incumbent],
        "smoothing_caps_confidence": [incumbent, lower],
    }
    adapted, made = adaptation.adapt(space, 2, flagged, incumbent)
    smoothing = adapted["regularization.label_smoothing"]
    assert (smoothing.low, smoothing.high) == (0.0, 0.05)
    # Overfitting still raises mixup's floor, but not smoothing's.
    assert adapted["regularization.mixup"].low == pytest.approx(0.2)
    assert [(a.finding, a.param) for a in made] == [
        ("overfitting_after_best", "regularization.mixup"),
        ("smoothing_caps_confidence", "regularization.label_smoothing"),
    ]
    assert "lowest smoothing among them was 0.05" in made[1].reason
    # Overfitting alone raises both floors, as before.
    adapted, _ = adaptation.adapt(space, 2, {"overfitting_after_best": [incumbent]}, incumbent)
    assert adapted["regularization.label_smoothing"].low == pytest.approx(0.1)


def test_param_spec_contains() -> None:
    spec = ParamSpec.from_dict("a", {"type": "int", "low": 1, "high": 3})
    assert spec.contains(2) and not spec.contains(2.5) and not spec.contains(True)


# -- the loop through Hydra --------------------------------------------------------------------


def test_two_iterations_start_with_proposals_tagged_by_finding(tmp_path: Path) -> None:
    result = fake_loop(tmp_path, "loop.name=two", "loop.pruner=none", "loop.baseline_first=true")
    study = load(tmp_path, "two")
    state = LoopState.load(study)
    assert [len(state.view(i).trials) for i in (1, 2)] == [3, 3]
    first = state.view(1).trials
    assert first[0].user_attrs["proposed_by"] == "baseline"
    assert first[0].params["finetune.lr_backbone"] == pytest.approx(1e-3)
    # One worker: iteration 1's sampler slots, still waiting when the baseline completed, are
    # skipped (not failures) and the baseline's proposals run next.
    assert [t.state.name for t in first] == ["COMPLETE", "FAIL", "FAIL"]
    assert all("baseline completed first" in t.user_attrs["skip_reason"] for t in first[1:])
    assert state.failure_rate() == 0
    assert [t.state.name for t in state.view(2).trials] == ["COMPLETE"] * 3
    assert result.stdout.count("skipped: the baseline completed first") == 2

    record = state.iteration_record(2)
    incumbent = state.best_before(2)
    assert record["incumbent"]["number"] == incumbent.number
    finding_ids = {finding["id"] for finding in record["findings"]}
    proposals = record["proposals"]
    assert proposals and {p["proposed_by"] for p in proposals} <= finding_ids
    # Iteration 2 runs its proposals first, each tagged with the finding behind it.
    second = sorted(state.view(2).trials, key=lambda t: t.number)
    tagged = [t.user_attrs.get("proposed_by") for t in second[: len(proposals)]]
    assert tagged == [p["proposed_by"] for p in proposals]
    assert all(t.user_attrs.get("run_dir") for t in study.trials if t.state.name == "COMPLETE")
    assert (tmp_path / "loops" / "two" / f"trial_{second[0].number}" / "summary.json").is_file()
    assert "iteration 2/2" in result.stdout and "best" in result.stdout

    status = subprocess.run(
        [str(EVOLVER), "status", "loop.name=two", f"runs_dir={tmp_path}"],
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "250"},
        check=True,
    )
    assert "Proposal scoreboard" in status.stdout
    for proposal in proposals:
        assert proposal["proposed_by"] in status.stdout
        assert proposal["proposal"] in status.stdout


@pytest.mark.parametrize(
    "settings",
    [["loop.baseline_first=false"], ["loop.baseline_first=true", "loop.proposals=false"]],
)
def test_the_first_iterations_sampler_slots_run_without_baseline_first(
    tmp_path: Path, settings: list[str]
) -> None:
    fake_loop(tmp_path, "loop.name=all", "loop.iterations=1", "loop.pruner=none", *settings)
    study = load(tmp_path, "all")
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 3
    assert study.trials[0].user_attrs["proposed_by"] == "baseline"


@pytest.mark.parametrize("sampler", ["random", "cmaes", "gp"])
def test_other_samplers_run_the_loop(tmp_path: Path, sampler: str) -> None:
    fake_loop(
        tmp_path,
        "loop.name=s",
        f"loop.sampler={sampler}",
        "loop.startup_trials=1",
        "loop.trials_per_iteration=2",
        "loop.pruner=none",
    )
    study = load(tmp_path, "s")
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 4


def test_resume_with_more_iterations_keeps_finished_trials(tmp_path: Path) -> None:
    fake_loop(tmp_path, "loop.name=grow", "loop.iterations=1", "loop.pruner=none")
    before = {t.number: t.value for t in load(tmp_path, "grow").trials}
    assert len(before) == 3
    fake_loop(tmp_path, "loop.name=grow", "loop.iterations=2", "loop.pruner=none")
    study = load(tmp_path, "grow")
    assert len(study.trials) == 6
    assert {t.number: t.value for t in study.trials if t.number in before} == before
    # Nothing left to do: a third run with the same budget starts no trial.
    fake_loop(tmp_path, "loop.name=grow", "loop.iterations=2", "loop.pruner=none")
    assert len(load(tmp_path, "grow").trials) == 6


def test_iterations_are_mlflow_runs_when_tracking_is_on(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    fake_loop(tmp_path, "loop.name=tracked", "loop.pruner=none", "tracking.enabled=true")
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("tracked")
    runs = client.search_runs([experiment.experiment_id], "tags.run_type = 'iteration'")
    assert sorted(run.info.run_name for run in runs) == ["iteration-1", "iteration-2"]
    assert all(run.info.status == "FINISHED" for run in runs)
    # The loop's incumbent is the lowest loss; Optuna's `best_value` would skip infeasible
    # trials, and constraints only steer the sampler.
    best = LoopState.load(load(tmp_path, "tracked")).best().value
    assert min(run.data.metrics["best_value"] for run in runs) == pytest.approx(best)
    # Each iteration run holds the iteration's summary.
    artifacts = [a.path for a in client.list_artifacts(runs[0].info.run_id)]
    assert "iteration.json" in artifacts


def test_raising_and_nan_trials_fail_with_reasons_and_the_loop_goes_on(tmp_path: Path) -> None:
    fake_loop(
        tmp_path,
        "loop.name=bad",
        "loop.pruner=none",
        "loop.max_failure_rate=0.9",
        "fake.raise_on=[1]",
        "fake.nan_on=[2]",
    )
    study = load(tmp_path, "bad")
    assert len(study.trials) == 6
    failed = {t.number: t.user_attrs["fail_reason"] for t in by_state(study, "FAIL")}
    assert set(failed) == {1, 2}
    assert "RuntimeError: synthetic failure in trial 1" in failed[1]
    assert "nan" in failed[2].lower()
    assert len(by_state(study, "COMPLETE")) == 4
    # The failed trial still left its records.
    assert (tmp_path / "loops" / "bad" / "trial_1" / "summary.json").is_file()


def test_reaching_the_target_stops_the_loop(tmp_path: Path) -> None:
    fake_loop(tmp_path, "loop.name=target", "loop.pruner=none", "loop.target=0.5")
    study = load(tmp_path, "target")
    assert len(study.trials) == 3
    assert "reached the target 0.5" in study.user_attrs["evolver.stop"]


def test_a_training_seconds_budget_stops_the_loop(tmp_path: Path) -> None:
    # Each fake trial records 0.1 training seconds: the third crosses the budget.
    result = fake_loop(tmp_path, "loop.name=budget", "loop.pruner=none", "loop.budget_seconds=0.25")
    study = load(tmp_path, "budget")
    assert len(study.trials) == 3
    assert "(loop.budget_seconds)" in study.user_attrs["evolver.stop"]
    assert "spent 0.3 training seconds of 0.25" in result.stdout


def test_too_many_failures_stop_the_loop(tmp_path: Path) -> None:
    result = fake_loop(
        tmp_path, "loop.name=stop", "loop.max_failure_rate=0.5", "fake.raise_on=[0,1,2,3,4,5]"
    )
    study = load(tmp_path, "stop")
    assert len(study.trials) == 3  # iteration 2 never starts
    assert "failed" in study.user_attrs["evolver.stop"]
    assert "stopped" in result.stdout


def test_pruner_stops_hopeless_learning_rates(tmp_path: Path) -> None:
    fake_loop(
        tmp_path,
        "loop.name=prune",
        "loop.iterations=1",
        "loop.trials_per_iteration=6",
        "loop.pruner_startup_trials=1",
        "loop.pruner_warmup_epochs=1",
        "finetune.lr_backbone=0.00015",
        "search.params.finetune.lr_backbone.low=0.05",
        "search.params.finetune.lr_backbone.high=1.0",
    )
    study = load(tmp_path, "prune")
    pruned = by_state(study, "PRUNED")
    assert pruned, [(t.number, t.state.name, t.value) for t in study.trials]
    assert all(t.params["finetune.lr_backbone"] >= 0.05 for t in pruned)
    assert all("pruned at fold" in t.user_attrs["prune_reason"] for t in pruned)
    # A pruned trial keeps its partial records.
    summary = Path(pruned[0].user_attrs["run_dir"]) / "summary.json"
    assert '"status": "pruned"' in summary.read_text()


def test_sweep_syntax_is_refused_with_one_line(tmp_path: Path) -> None:
    command = [sys.executable, str(APP), "-m", "hydra/sweeper=evolver", f"runs_dir={tmp_path}"]
    result = subprocess.run(
        [*command, "finetune.lr_head=0.1,0.2"], capture_output=True, text=True, cwd=tmp_path
    )
    assert result.returncode != 0
    assert "sweep syntax" in result.stderr + result.stdout


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("loop.sampler=bogus", "loop.sampler"),
        ("search.params.finetune.lr_head.low=5", "search.params.finetune.lr_head"),
        ("loop.storage=postgresql://nobody@127.0.0.1:1/none", "loop.storage"),
    ],
)
def test_bad_loop_settings_are_one_line_with_exit_code_2(
    tmp_path: Path, override: str, field: str
) -> None:
    command = [sys.executable, str(APP), "-m", "hydra/sweeper=evolver", f"runs_dir={tmp_path}"]
    result = subprocess.run([*command, override], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and field in lines[0], result.stderr
    assert not list(tmp_path.glob("loops/*/trial_*"))


@pytest.mark.slow
@pytest.mark.parametrize(
    "launcher",
    [
        ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"],
        ["hydra/launcher=submitit_local", "hydra.launcher.timeout_min=5"],
    ],
    ids=["joblib", "submitit_local"],
)
def test_joblib_and_submitit_launchers_run_the_loop_unchanged(
    tmp_path: Path, launcher: list[str]
) -> None:
    fake_loop(
        tmp_path,
        "loop.name=jl",
        "loop.pruner=none",
        "loop.parallel=2",
        *launcher,
        "fake.raise_on=[1]",
    )
    study = load(tmp_path, "jl")
    assert [t.state.name for t in study.trials].count("COMPLETE") == 5
    failed = by_state(study, "FAIL")
    assert [t.number for t in failed] == [1]
    assert "synthetic failure" in failed[0].user_attrs["fail_reason"]


@pytest.mark.slow
@pytest.mark.serial
def test_sigkill_mid_trial_then_resume(tmp_path: Path) -> None:
    overrides = [
        "loop.name=kill",
        "loop.pruner=none",
        "loop.heartbeat_interval=1",
        "loop.grace_period=3",
        "loop.poll_interval=0.5",
        "fake.epoch_seconds=0.15",
    ]
    command = [sys.executable, str(APP), "-m", "hydra/sweeper=evolver", f"runs_dir={tmp_path}"]
    process = subprocess.Popen(
        [*command, *overrides], cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    deadline = time.time() + 120
    killed_number = None
    try:
        while time.time() < deadline and killed_number is None:
            time.sleep(0.2)
            try:
                trials = optuna.load_study(study_name="kill", storage=storage).trials
            except Exception:
                continue
            complete = [t for t in trials if t.state.name == "COMPLETE"]
            running = [t for t in trials if t.state.name == "RUNNING" and t.intermediate_values]
            if len(complete) >= 2 and running:
                killed_number = running[0].number
                os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait(timeout=30)
    assert killed_number is not None, "the loop never reached its third trial"
    before = {
        t.number: t.value for t in load(tmp_path, "kill").trials if t.state.name == "COMPLETE"
    }

    fake_loop(tmp_path, *overrides)
    study = load(tmp_path, "kill")
    complete = by_state(study, "COMPLETE")
    assert len(complete) == 6
    assert {t.number: t.value for t in complete if t.number in before} == before
    killed = next(t for t in study.trials if t.number == killed_number)
    assert killed.state.name == "FAIL"
    retry = [t for t in complete if t.system_attrs.get("failed_trial") == killed_number]
    assert len(retry) == 1 and retry[0].params == killed.params
    # Completed runs were never re-run: one trial folder per trial, each written once.
    assert len(list((tmp_path / "loops" / "kill").glob("trial_*"))) == len(study.trials)


@pytest.mark.slow
@pytest.mark.postgres
def test_two_workers_on_postgres_share_one_loop(tmp_path: Path, postgres_url: str) -> None:
    overrides = [
        "loop.name=pg",
        f"loop.storage={postgres_url}",
        "loop.pruner=none",
        "loop.poll_interval=0.3",
        "fake.epoch_seconds=0.1",
    ]
    command = [sys.executable, str(APP), "-m", "hydra/sweeper=evolver", f"runs_dir={tmp_path}"]
    workers = [
        subprocess.Popen(
            [*command, *overrides],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [worker.communicate(timeout=240)[0] for worker in workers]
    assert [worker.returncode for worker in workers] == [0, 0], outputs
    study = load(tmp_path, "pg", storage=postgres_url)
    numbers = [t.number for t in study.trials]
    assert len(numbers) == len(set(numbers)) == 6
    assert len(by_state(study, "COMPLETE")) == 6
    state = LoopState.load(study)
    record = state.iteration_record(2)
    enqueued = [t for t in state.view(2).trials if t.user_attrs.get("proposed_by")]
    assert len(enqueued) == len(record["proposals"]) >= 1
    # Both workers ran trials.
    assert all("trial" in output and "->" in output for output in outputs), outputs


@pytest.mark.postgres
def test_plain_postgresql_urls_use_the_installed_driver(postgres_url: str) -> None:
    plain = "postgresql://" + postgres_url.split("://", 1)[1]
    study = optuna.create_study(study_name="plain", storage=make_storage(plain))
    study.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=1)
    assert len(load(Path("."), "plain", storage=postgres_url).trials) == 1


@pytest.mark.postgres
def test_status_errors_keep_the_storage_password_out(postgres_url: str, tmp_path: Path) -> None:
    # Trust authentication ignores the password, so the URL connects as written.
    scheme, rest = postgres_url.split("://", 1)
    user, host = rest.split("@", 1)
    with_password = f"{scheme}://{user}:s3cret@{host}"
    optuna.create_study(study_name="there", storage=make_storage(with_password))
    result = subprocess.run(
        [str(EVOLVER), "status", "loop.name=absent", "--storage", with_password],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert result.returncode == 2, result.stderr
    assert "s3cret" not in result.stderr + result.stdout
    assert f"{user}:***@" in result.stderr and "loops: there" in result.stderr


def test_outcome_line_names_baseline_best_and_the_proposal_behind_it() -> None:
    made = {
        "iteration": 2,
        "proposed_by": "lr_too_high",
        "proposal": "lower_learning_rates",
        "incumbent": {"number": 0, "value": 0.4},
        "cv": {"accuracy": 0.9},
    }
    baseline = {"iteration": 1, "proposed_by": "baseline", "cv": {"accuracy": 0.85}}
    trials = [
        optuna.trial.create_trial(value=0.4, user_attrs=baseline),
        optuna.trial.create_trial(value=0.3, user_attrs=made),
        optuna.trial.create_trial(value=0.35, user_attrs={"iteration": 2}),
    ]
    for number, trial in enumerate(trials):
        trial.number = number
    line = status_mod.outcome_line(LoopState(trials, {}), "cv.loss_best")
    assert line == (
        "Result: baseline trial 0 cv.loss_best 0.4 (accuracy 85.0%) -> best trial 1 0.3 "
        "(accuracy 90.0%), -25.0%, from lr_too_high -> lower_learning_rates on trial 0"
    )
    only = status_mod.outcome_line(LoopState(trials[:1], {}), "cv.loss_best")
    assert only.endswith("; no trial beat it")
    assert status_mod.outcome_line(LoopState(trials[2:], {}), "cv.loss_best") is None


def test_only_iterations_closed_long_ago_count_as_settled() -> None:
    from evolver.loop.closing import settled_iterations

    attrs = {f"evolver.iteration.{i}": {"size": 1} for i in (1, 2, 3, 4)}
    attrs |= {"evolver.closed.1": {"best": None}, "evolver.closed.2": {"best": None}}
    attrs["evolver.closed.3"] = None  # reopened by a retry of one of its failed trials
    state = LoopState([], attrs)
    claims = {f"evolver.close.{i}": {"owner": "w", "at": 1000.0} for i in (1, 3)}
    claims["evolver.close.2"] = {"owner": "w", "at": 1590.0}  # being closed right now
    assert settled_iterations(state, claims, now=1601.0, settle_s=600) == {1}
    assert settled_iterations(state, claims, now=2500.0, settle_s=600) == {1, 2}
