"""Building an iteration: the incumbent's diagnosis turned into enqueued trials, the space adapted.

Iteration 1 runs the configured baseline first. Each later iteration reads the diagnosis of the
best trial so far (its `report.json`) and the findings of the previous iteration's trials; every
proposal becomes a trial equal to the incumbent plus the proposal's changes. When the incumbent is
a proposal that beat its base, the same step taken again from the incumbent comes first
(`evolver.loop.repeated_steps`). Proposals already tried are skipped; slots the incumbent's
proposals leave free go to the runner-ups' proposals (each built on its own runner-up), then to the
sampler. Changes of keys that are not in the search space (or values outside it) become fixed
overrides of that trial. A proposal that needs no training (a post-hoc choice) takes no slot: it is
scored from its base trial's out-of-fold predictions (`evolver.loop.posthoc_trials`). A proposal
that only exists as a continuation of its base (`continue_at_lower_lr`) is skipped when the base
cannot be continued, and a from-scratch proposal is skipped as a repeat when the pruner already
stopped it on settings that train the same up to that point, or when an earlier complete trial
trained the same settings to the same early stops (`evolver.loop.repeated_failures`; the iteration
record lists it under `repeats`). A remedy that failed against its base `loop.remedy_failures`
times and never paid is planned after all the others (`evolver.loop.remedy_records`; the
iteration record lists it under `demoted`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evolver.diagnosis.findings import Finding
from evolver.diagnosis.proposals import Proposal, continues_base
from evolver.loop.adaptation import Adaptation, adapt
from evolver.loop.continued_trials import CONTINUATION_PREFIX, CONTINUES_ATTR, continuation_of
from evolver.loop.outcomes import read_json, report_findings
from evolver.loop.posthoc_trials import unsupported_reason
from evolver.loop.remedy_records import remedy_records
from evolver.loop.repeated_failures import configured_settings, earlier_repeat
from evolver.loop.repeated_steps import step_again
from evolver.loop.space import SearchSpace, format_value
from evolver.loop.state import BASELINE, LoopState, trial_values
from evolver.loop.study import LoopSettings
from evolver.records import HISTORY_FILE, REPORT_JSON

log = logging.getLogger("evolver.loop")


@dataclass
class TrialPlan:
    """One trial to enqueue: fixed parameter values and the user attributes that describe it."""

    params: dict[str, Any]
    user_attrs: dict[str, Any]

    def identity(self) -> tuple:
        fixed = tuple(sorted(self.user_attrs.get("fixed_overrides") or []))
        params = tuple(sorted((k, format_value(v)) for k, v in self.params.items()))
        return (params, fixed, self.user_attrs.get("posthoc_of"))


@dataclass
class IterationPlan:
    iteration: int
    size: int
    space: SearchSpace
    trials: list[TrialPlan]
    incumbent: dict[str, Any] | None = None
    # Proposals scored without training, added as complete trials (no slot, no job).
    scored: list[TrialPlan] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    # Proposals left out because the pruner stopped the same remedy on equivalent settings.
    repeats: list[dict[str, Any]] = field(default_factory=list)
    # Remedies planned after the others: name -> {"paid": 0, "failed": n}.
    demoted: dict[str, dict[str, int]] = field(default_factory=dict)
    iteration_findings: dict[str, int] = field(default_factory=dict)
    adaptations: list[Adaptation] = field(default_factory=list)

    def record(self) -> dict[str, Any]:
        """The study user attribute `evolver.iteration.<i>`."""
        return {
            "iteration": self.iteration,
            "size": self.size,
            "incumbent": self.incumbent,
            "findings": [
                {
                    "id": finding.id,
                    "severity": finding.severity,
                    "explanation": finding.explanation,
                    "evidence": finding.evidence,
                }
                for finding in self.findings
            ],
            "iteration_findings": self.iteration_findings,
            "proposals": [
                {key: plan.user_attrs[key] for key in PROPOSAL_ATTRS if key in plan.user_attrs}
                for plan in self.trials + self.scored
                if plan.user_attrs.get("proposed_by")
            ],
            "repeats": self.repeats,
            "demoted": self.demoted,
            "adaptations": [adaptation.to_dict() for adaptation in self.adaptations],
            "space": self.space.to_dict(),
        }


PROPOSAL_ATTRS = (
    "proposed_by",
    "proposal",
    "reason",
    "expected_effect",
    "changes",
    "incumbent",
    "base_rank",
    "needs_training",
    "posthoc_of",
    CONTINUES_ATTR,
)


def baseline_plan(space: SearchSpace, cfg: Any, group_choices: Mapping[str, Any]) -> TrialPlan:
    """The configured starting point: each searched parameter at its configured value."""
    params: dict[str, Any] = {}
    excluded: list[str] = []
    for spec in space:
        value = spec.value_in_config(cfg, group_choices)
        if value is not None and spec.contains(value):
            params[spec.name] = value
        else:  # outside the space: the run keeps the configured value, the sampler skips it
            excluded.append(spec.name)
    attrs = {"proposed_by": BASELINE, "proposal": BASELINE, "reason": "the configured baseline"}
    if excluded:
        attrs["excluded_params"] = excluded
    return TrialPlan(params, attrs)


def proposal_plan(
    space: SearchSpace, incumbent: Any, proposal: Proposal, iteration: int
) -> TrialPlan:
    """The incumbent's values with one proposal's changes applied."""
    changes = proposal.changes
    params = dict(incumbent.params)
    # How the incumbent was continued (checkpoint.continue_*) is its lineage, not a setting to
    # carry on: a proposal continues its own base, or trains from scratch.
    fixed = {
        key: line
        for line in incumbent.user_attrs.get("fixed_overrides") or []
        if not (key := line.split("=", 1)[0]).startswith(CONTINUATION_PREFIX)
    }
    excluded = set(incumbent.user_attrs.get("excluded_params") or [])
    consumed: set[str] = set()
    for spec in space:
        found, value, keys = spec.value_for_changes(changes)
        if not found:
            continue
        consumed |= keys
        fixed.pop(spec.name, None)
        if spec.contains(value):
            params[spec.name] = value
            excluded.discard(spec.name)
        else:
            params.pop(spec.name, None)
            excluded.add(spec.name)
            fixed[spec.name] = f"{spec.name}={format_value(value)}"
    for key, value in changes.items():
        if key not in consumed:
            fixed[key] = f"{key}={format_value(value)}"
    attrs = _origin(proposal, incumbent)
    # Group selections first: Hydra must select a group before keys inside it are set.
    lines = sorted(fixed.values(), key=lambda line: "." in line.split("=", 1)[0])
    if lines:
        attrs["fixed_overrides"] = lines
    if excluded:
        attrs["excluded_params"] = sorted(excluded)
    return TrialPlan(params, attrs)


def scored_plan(base: Any, proposal: Proposal) -> TrialPlan:
    """A post-hoc proposal on `base`: no parameters, the changes as the predict overrides."""
    attrs = _origin(proposal, base)
    attrs |= {
        "needs_training": False,
        "posthoc_of": base.number,
        "base_run_dir": base.user_attrs.get("run_dir"),
        "fixed_overrides": sorted(f"{k}={format_value(v)}" for k, v in attrs["changes"].items()),
    }
    return TrialPlan({}, attrs)


def _origin(proposal: Proposal, base: Any) -> dict[str, Any]:
    """The user attributes that say which proposal, on which trial, a planned trial tests."""
    return {
        "proposed_by": proposal.finding,
        "proposal": proposal.name,
        "reason": proposal.reason,
        "expected_effect": dict(proposal.expected_effect),
        "changes": {key: _jsonable(value) for key, value in proposal.changes.items()},
        "incumbent": {"number": base.number, "value": base.value},
    }


def trial_findings(run_dir: str | None) -> list[Finding]:
    """The findings of a trial's `report.json`, written now from its records when the run did not
    write one; none when there is no report to read."""
    if not run_dir:
        return []
    path = Path(run_dir) / REPORT_JSON
    if not path.is_file() and (Path(run_dir) / HISTORY_FILE).is_file():
        try:
            from evolver.diagnosis import write_report

            write_report(run_dir)
        except Exception as error:  # a run's records may be incomplete (pruned, failed)
            log.warning("could not diagnose %s: %s", run_dir, error)
            return []
    return report_findings(read_json(path) or {}, path)


def iteration_findings(trials: list[Any]) -> dict[str, list[Any]]:
    """Finding id -> the finished trials (complete or pruned) that showed it."""
    found: dict[str, list[Any]] = {}
    for trial in trials:
        if trial.state.name not in ("COMPLETE", "PRUNED"):
            continue
        for finding in trial.user_attrs.get("findings") or []:
            found.setdefault(finding, []).append(trial)
    return found


_MISSING = object()


def applicable(changes: Mapping[str, Any], cfg: Any, group_choices: Mapping[str, Any]) -> list[str]:
    """The keys of `changes` that the loop's config does not have (empty when all exist)."""
    missing = []
    for key in changes:
        if "." not in key:
            if key not in group_choices:
                missing.append(key)
            continue
        node = cfg
        for part in key.split("."):
            node = node.get(part, _MISSING) if hasattr(node, "get") else _MISSING
            if node is _MISSING:
                missing.append(key)
                break
    return missing


def plan_iteration(
    iteration: int,
    state: LoopState,
    settings: LoopSettings,
    base_space: SearchSpace,
    baseline: TrialPlan,
    cfg: Any = None,
    group_choices: Mapping[str, Any] | None = None,
) -> IterationPlan:
    size = settings.trials_per_iteration
    previous = state.iteration_record(iteration - 1) if iteration > 1 else None
    space = SearchSpace.from_dict(previous["space"]) if previous else base_space
    if iteration == 1:
        return IterationPlan(iteration, size, space, [baseline, *_blanks(size - 1)])

    incumbent = state.best(trained=True)
    earlier = state.view(iteration - 1).trials
    by_finding = iteration_findings(earlier)
    counts = {finding: len(trials) for finding, trials in sorted(by_finding.items())}
    plan = IterationPlan(iteration, size, space, [], iteration_findings=counts)
    if incumbent is None:  # nothing completed yet: nothing to build on but the sampler
        plan.trials = _blanks(size)
        return plan

    plan.incumbent = {"number": incumbent.number, "value": incumbent.value}
    plan.findings = trial_findings(incumbent.user_attrs.get("run_dir"))

    if settings.adapt_space:
        finished = [t for t in earlier if t.state.name in ("COMPLETE", "PRUNED")]
        flagged: dict[str, list[Mapping[str, Any]]] = {}
        for finding in plan.findings:
            flagged.setdefault(finding.id, []).append(trial_values(incumbent))
        for finding, trials in by_finding.items():
            if finished and len(trials) * 2 >= len(finished):
                flagged.setdefault(finding, []).extend(trial_values(t) for t in trials)
        plan.space, plan.adaptations = adapt(space, iteration, flagged, trial_values(incumbent))

    proposals: list[TrialPlan] = []
    slots = settings.proposal_slots(size) if settings.proposals else 0
    seen = {_trial_identity(trial) for trial in state.trials}
    no_training_skipped = unsupported_reason(settings.objective)
    configured = configured_settings(cfg)
    records = remedy_records(state.trials)
    candidates = _candidates(state, plan, settings, base_space, configured)
    demoted = {
        proposal.name: records[proposal.name]
        for _, _, proposal in candidates
        if proposal.name in records and records[proposal.name].demoted(settings.remedy_failures)
    }
    # Remedies that never paid go after the others, each list keeping its order (a stable sort).
    candidates.sort(key=lambda candidate: candidate[2].name in demoted)
    plan.demoted = {name: record.to_dict() for name, record in demoted.items()}
    if demoted:
        log.info("proposals tried last (never beat their base): %s", ", ".join(sorted(demoted)))
    for rank, base, proposal in candidates:
        scored = not proposal.needs_training
        if scored and no_training_skipped:
            log.info("proposal %s skipped: %s", proposal.name, no_training_skipped)
            continue
        if not scored and len(proposals) >= slots:
            continue
        if cfg is not None and applicable(proposal.changes, cfg, group_choices or {}):
            log.info("proposal %s skipped: keys missing from the config", proposal.name)
            continue
        if scored:
            trial_plan = scored_plan(base, proposal)
        else:
            trial_plan = proposal_plan(plan.space, base, proposal, iteration)
        if trial_plan.identity() in seen:
            continue
        if not scored and settings.continue_proposals:
            continues = continuation_of(base, proposal.changes)
            if continues:
                trial_plan.user_attrs[CONTINUES_ATTR] = continues
        if continues_base(proposal) and CONTINUES_ATTR not in trial_plan.user_attrs:
            log.info(
                "proposal %s skipped: trial %d cannot be continued", proposal.name, base.number
            )
            continue
        if not scored:
            repeat = earlier_repeat(
                proposal.name, trial_plan.params, trial_plan.user_attrs, state.trials,
                plan.space, configured,
            )  # fmt: skip
            if repeat is not None:
                plan.repeats.append(_repeat_record(proposal, base, repeat))
                log.info(
                    "proposal %s on trial %d skipped: trial %d trained the same settings %s",
                    proposal.name, base.number, repeat.number, _repeated_how(repeat),
                )  # fmt: skip
                continue
        seen.add(trial_plan.identity())
        if rank > 1:
            trial_plan.user_attrs["base_rank"] = rank
        (plan.scored if scored else proposals).append(trial_plan)
    plan.trials = proposals + _blanks(size - len(proposals))
    return plan


def _candidates(
    state: LoopState,
    plan: IterationPlan,
    settings: LoopSettings,
    base_space: SearchSpace,
    configured: Mapping[str, Any],
) -> list[tuple[int, Any, Proposal]]:
    """(base rank, base trial, proposal) in planning order: the incumbent's repeated step, then
    its findings' proposals, then each runner-up's."""
    if not settings.proposals:
        return []
    by_number = {trial.number: trial for trial in state.trials}
    candidates: list[tuple[int, Any, Proposal]] = []
    for rank, base in enumerate(state.ranked(trained=True)[: settings.proposal_bases], start=1):
        findings = plan.findings if rank == 1 else trial_findings(base.user_attrs.get("run_dir"))
        proposals = interleaved(findings)
        again = step_again(base, by_number, base_space, configured) if rank == 1 else None
        if again is not None:
            proposals.insert(0, again)
        candidates += [(rank, base, proposal) for proposal in proposals]
    return candidates


def _repeat_record(proposal: Proposal, base: Any, repeat: Any) -> dict[str, Any]:
    """One entry of the iteration record's `repeats`: the proposal left out and why."""
    return {
        "proposal": proposal.name,
        "proposed_by": proposal.finding,
        "incumbent": base.number,
        "repeats": repeat.number,
        "prune_reason": repeat.user_attrs.get("prune_reason"),
        "value": repeat.value if repeat.state.name == "COMPLETE" else None,
        "duration_s": repeat.user_attrs.get("duration_s"),
    }


def _repeated_how(repeat: Any) -> str:
    if repeat.state.name == "COMPLETE":
        return f"to the same early stops (scored {repeat.value:.6g})"
    return "up to where the pruner stopped it"


def interleaved(findings: Sequence[Finding]) -> list[Proposal]:
    """Every finding's first proposal (most severe finding first), then every second one...:
    an iteration with few slots tests one remedy of each problem before a second of any."""
    lists = [finding.proposals for finding in findings]
    depth = max((len(proposals) for proposals in lists), default=0)
    return [proposals[i] for i in range(depth) for proposals in lists if i < len(proposals)]


def _trial_identity(trial: Any) -> tuple:
    return TrialPlan(dict(trial.params), dict(trial.user_attrs)).identity()


def _blanks(count: int) -> list[TrialPlan]:
    return [TrialPlan({}, {}) for _ in range(max(0, count))]


def _jsonable(value: Any) -> Any:
    return value if isinstance(value, str | int | float | bool) or value is None else str(value)
