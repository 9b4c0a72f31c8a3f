"""`evolver status`: a loop's iterations, trials, best score, findings and proposal scoreboard.

    evolver status [loop.name=NAME] [runs_dir=DIR] [--storage URL]

Reads the Optuna study only (nothing else is needed); imports neither torch nor Lightning.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from evolver.database_url import redact
from evolver.errors import ConfigError
from evolver.loop.continued_trials import CONTINUES_ATTR, seconds_saved
from evolver.loop.racing import RACE_ATTR
from evolver.loop.state import (
    BASELINE,
    STOP_KEY,
    LoopState,
    is_scored_without_training,
    training_seconds,
    trial_origin,
)
from evolver.records import CONTINUED_KEY
from evolver.storage_url import default_storage_path, default_storage_url

if TYPE_CHECKING:
    from rich.console import OverflowMethod
    from rich.table import Table

# Proposal metrics where "down" is the better direction unless the proposal says otherwise.
OBJECTIVE = "objective"


@dataclass(frozen=True)
class ScoreboardRow:
    """One proposal measured against the trial it was built from: the incumbent at the time
    (`base_rank` 1) or, once the incumbent's proposals were all tried, a runner-up."""

    trial: int
    iteration: int
    finding: str
    proposal: str
    metric: str
    direction: str
    state: str
    value: float | None
    incumbent_trial: int | None
    incumbent_value: float | None
    metric_before: float | None
    metric_after: float | None
    base_rank: int = 1
    train_seconds: float | None = None

    @property
    def change(self) -> float | None:
        """Relative change of the objective against the incumbent (negative = better)."""
        if self.value is None or not self.incumbent_value:
            return None
        return (self.value - self.incumbent_value) / abs(self.incumbent_value)

    @property
    def no_effect(self) -> bool:
        """The proposal scored exactly what the trial it was built from scored: its change did
        not alter training (e.g. more patience where early stopping never fired)."""
        return (
            self.value is not None
            and self.incumbent_value is not None
            and math.isclose(self.value, self.incumbent_value, rel_tol=1e-12, abs_tol=1e-15)
        )

    @property
    def metric_change(self) -> float | None:
        if self.metric_before is None or self.metric_after is None:
            return None
        return self.metric_after - self.metric_before

    @property
    def as_expected(self) -> bool | None:
        delta = self.metric_change
        if delta is None:
            return None
        return delta < 0 if self.direction == "down" else delta > 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "trial": self.trial,
            "iteration": self.iteration,
            "finding": self.finding,
            "proposal": self.proposal,
            "metric": self.metric,
            "direction": self.direction,
            "state": self.state,
            "value": self.value,
            "incumbent_trial": self.incumbent_trial,
            "incumbent_value": self.incumbent_value,
            "base_rank": self.base_rank,
            "train_seconds": self.train_seconds,
            "change": self.change,
            "no_effect": self.no_effect,
            "metric_before": self.metric_before,
            "metric_after": self.metric_after,
            "as_expected": self.as_expected,
        }


def scoreboard(state: LoopState) -> list[ScoreboardRow]:
    by_number = {trial.number: trial for trial in state.trials}
    rows = []
    for trial in state.trials:
        attrs = trial.user_attrs
        by = attrs.get("proposed_by")
        if not by or by == BASELINE:
            continue
        incumbent = attrs.get("incumbent") or {}
        effect = attrs.get("expected_effect") or {}
        metric = str(effect.get("metric") or OBJECTIVE)
        before_trial = by_number.get(incumbent.get("number"))
        rows.append(
            ScoreboardRow(
                trial=trial.number,
                iteration=int(attrs.get("iteration") or 0),
                finding=str(by),
                proposal=str(attrs.get("proposal") or "-"),
                metric=metric,
                direction=str(effect.get("direction") or "down"),
                state=trial.state.name.lower(),
                value=trial.value if trial.state.name == "COMPLETE" else None,
                incumbent_trial=incumbent.get("number"),
                incumbent_value=incumbent.get("value"),
                metric_before=_metric(before_trial, metric),
                metric_after=_metric(trial, metric),
                base_rank=int(attrs.get("base_rank") or 1),
                train_seconds=training_seconds(trial),
            )
        )
    return sorted(rows, key=lambda row: row.trial)


def training_seconds_line(state: LoopState) -> str:
    seconds = [training_seconds(trial) for trial in state.trials]
    known = [value for value in seconds if value is not None]
    scored = [t for t in state.trials if is_scored_without_training(t)]
    line = f"Training seconds: {sum(known):.0f} in {len(known) - len(scored)} trained trial(s)"
    if scored:
        line += f"; {len(scored)} trial(s) scored on out-of-fold predictions without training"
    continued = [t for t in state.trials if t.user_attrs.get(CONTINUED_KEY)]
    if continued:
        saved = sum(seconds_saved(t.user_attrs) for t in continued)
        line += (
            f"; {len(continued)} trial(s) continued their base's folds, {saved:.0f} s of "
            "training not repeated"
        )
    raced = [t.user_attrs[RACE_ATTR] for t in state.trials if t.user_attrs.get(RACE_ATTR)]
    if raced:
        skipped = sum(int(r["folds"]) - int(r["after_fold"]) for r in raced)
        line += f"; {len(raced)} trial(s) raced out, {skipped} fold(s) not trained"
    repeats = state.skipped_repeats()
    if repeats:
        line += (
            f"; {len(repeats)} proposal(s) not trained: an earlier trial trained the same "
            "settings (up to where the pruner stopped it, or to the same early stops)"
        )
    return line


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def _metric(trial: Any, metric: str) -> float | None:
    if trial is None:
        return None
    if metric in (OBJECTIVE, "score"):
        value = trial.value if trial.state.name == "COMPLETE" else None
    else:
        value = (trial.user_attrs.get("metrics") or {}).get(metric)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


# -- rendering ---------------------------------------------------------------------------------


def fmt(value: Any, digits: int = 5) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if math.isfinite(value) else "-"
    return str(value)


def pct(value: float | None) -> str:
    return "-" if value is None else f"{value:+.1%}"


def render(study: Any, console: Any, state: LoopState | None = None, settings: Any = None) -> None:
    state = state or LoopState.load(study)
    iterations = iteration_numbers(state)
    for line in header_lines(study.study_name, state, iterations):
        console.print(line)
    console.print(iterations_table(state, iterations))
    console.print(trials_table(state))
    findings = findings_table(state)
    if findings.row_count:
        console.print(findings)
    adaptations = adaptations_table(state)
    if adaptations.row_count:
        console.print(adaptations)
    rows = scoreboard(state)
    if rows:
        console.print(scoreboard_table(rows))
    else:
        console.print("No proposals yet (they start with iteration 2).")


def iteration_numbers(state: LoopState) -> list[int]:
    """The iterations built or holding a trial."""
    return sorted(
        set(state.built_iterations)
        | {t.user_attrs.get("iteration") or 0 for t in state.trials} - {0}
    )


def header_lines(name: str, state: LoopState, iterations: Sequence[int]) -> list[str]:
    """The loop's size, best trial, why it stopped and its training time (rich markup)."""
    lines = [
        f"[bold]Loop {name}[/bold]: {len(state.trials)} trial(s) in {len(iterations)} iteration(s)"
    ]
    best = state.best()
    if best is not None:
        lines.append(
            f"Best so far: [bold]{best.value:.5g}[/bold] (trial {best.number}, iteration "
            f"{best.user_attrs.get('iteration')}, {trial_origin(best.user_attrs)})"
        )
    else:
        lines.append("Best so far: none (no completed trial)")
    if state.attrs.get(STOP_KEY):
        lines.append(f"Stopped: {state.attrs[STOP_KEY]}")
    lines.append(training_seconds_line(state))
    demoted = demoted_line(state)
    if demoted:
        lines.append(demoted)
    return lines


def demoted_line(state: LoopState) -> str | None:
    """The remedies the last built iteration planned after the others, with their records."""
    if not state.built_iterations:
        return None
    record = state.iteration_record(state.built_iterations[-1]) or {}
    demoted = record.get("demoted") or {}
    if not demoted:
        return None
    listed = ", ".join(
        f"{name} (0 of {counts.get('failed', 0)} beat their base)"
        for name, counts in sorted(demoted.items())
    )
    return f"Proposals tried last, never better than their base: {listed}"


def iterations_table(state: LoopState, iterations: Sequence[int]) -> Table:
    table = _table(
        "Iterations",
        (
            "iteration",
            "trials",
            "complete",
            "pruned",
            "failed",
            "running/waiting",
            "best so far",
            "findings (trials)",
        ),
        overflow="ellipsis",
    )
    for iteration in iterations:
        view = state.view(iteration)
        closed = state.closed_record(iteration) or {}
        counts = {
            name: len([t for t in view.trials if t.state.name == name])
            for name in ("COMPLETE", "PRUNED", "FAIL")
        }
        pending = len(view.running) + len(view.waiting)
        best_then = state.best_before(iteration + 1)
        findings = closed.get("findings") or _count_findings(view.trials)
        table.add_row(
            str(iteration),
            str(len(view.trials)),
            str(counts["COMPLETE"]),
            str(counts["PRUNED"]),
            str(counts["FAIL"]),
            str(pending),
            f"{best_then.value:.5g} (#{best_then.number})" if best_then else "-",
            ", ".join(f"{k} ({v})" for k, v in sorted(findings.items())) or "-",
        )
    return table


def trials_table(state: LoopState) -> Table:
    table = _table(
        "Trials", ("#", "iter", "state", "objective", "train s", "origin", "settings", "note")
    )
    for trial in state.trials:
        attrs = trial.user_attrs
        note = (
            attrs.get("fail_reason")
            or attrs.get("prune_reason")
            or ", ".join(attrs.get("findings") or [])
        )
        if attrs.get(CONTINUES_ATTR):
            note = f"continues #{attrs[CONTINUES_ATTR]['trial']}; {note}".rstrip("; ")
        table.add_row(
            str(trial.number),
            str(attrs.get("iteration", "-")),
            trial.state.name.lower(),
            fmt(trial.value) if trial.state.name == "COMPLETE" else "-",
            _seconds(training_seconds(trial)),
            trial_origin(attrs),
            " ".join(
                short_override(line)
                for line in attrs.get("overrides") or attrs.get("fixed_overrides") or []
            )
            or "-",
            note or "",
        )
    return table


def findings_table(state: LoopState) -> Table:
    """The findings on the incumbent each built iteration answered."""
    table = _table(
        "Findings on the incumbent, per iteration built",
        ("iteration", "incumbent", "finding", "severity", "explanation"),
    )
    for iteration in state.built_iterations:
        record = state.iteration_record(iteration) or {}
        incumbent = record.get("incumbent") or {}
        for finding in record.get("findings") or []:
            table.add_row(
                str(iteration),
                f"#{incumbent.get('number')}" if incumbent else "-",
                str(finding.get("id")),
                str(finding.get("severity")),
                str(finding.get("explanation")),
            )
    return table


def adaptations_table(state: LoopState) -> Table:
    table = _table(
        "Search-space adaptations",
        ("iteration", "param", "finding", "before", "after", "reason"),
    )
    for iteration in state.built_iterations:
        for item in (state.iteration_record(iteration) or {}).get("adaptations") or []:
            table.add_row(
                str(item["iteration"]),
                item["param"],
                item["finding"],
                _range(item["before"]),
                _range(item["after"]),
                item["reason"],
            )
    return table


def scoreboard_table(rows: Sequence[ScoreboardRow]) -> Table:
    table = _table(
        "Proposal scoreboard (measured against the trial it was built from: the "
        "incumbent, or a runner-up once the incumbent's proposals were all tried)",
        (
            "trial",
            "finding",
            "proposal",
            "expected",
            "measured",
            "objective",
            "train s",
            "built from",
            "change",
        ),
    )
    for row in rows:
        expected = f"{row.metric} {row.direction}"
        if row.metric_change is None:
            measured = "-"
        else:
            verdict = {True: "as expected", False: "opposite", None: ""}[row.as_expected]
            change = f"{fmt(row.metric_before, 3)} -> {fmt(row.metric_after, 3)}"
            measured = f"{row.metric} {change} ({verdict})"
        table.add_row(
            f"#{row.trial}",
            row.finding,
            row.proposal,
            expected,
            measured,
            fmt(row.value) if row.value is not None else row.state,
            _seconds(row.train_seconds),
            f"{fmt(row.incumbent_value)} (#{row.incumbent_trial}"
            + (f", rank {row.base_rank})" if row.base_rank > 1 else ")"),
            "no effect" if row.no_effect else pct(row.change),
        )
    return table


def _table(title: str, columns: Sequence[str], overflow: OverflowMethod = "fold") -> Table:
    from rich.table import Table

    table = Table(title=title)
    for column in columns:
        table.add_column(column, overflow=overflow)
    return table


def short_override(line: str) -> str:
    """`key=0.00012345678` as `key=0.0001235`: four significant digits are enough to read."""
    key, sep, value = line.partition("=")
    try:
        number = float(value)
    except ValueError:
        return line
    if "." not in value and "e" not in value.lower():
        return line
    return f"{key}{sep}{number:.4g}"


def _range(spec: Mapping[str, Any]) -> str:
    if spec.get("type") == "categorical":
        return str(spec.get("choices"))
    return f"[{fmt(spec.get('low'), 3)}, {fmt(spec.get('high'), 3)}]" + (
        " log" if spec.get("log") else ""
    )


def _count_findings(trials: Sequence[Any]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for trial in trials:
        for finding in trial.user_attrs.get("findings") or []:
            counts[finding] = counts.get(finding, 0) + 1
    return counts


def outcome_line(state: LoopState, objective: str) -> str | None:
    """One line: the baseline's score and accuracy, the best trial's, and the finding and
    proposal (or the sampler) that produced it; None before the baseline completed."""
    baselines = [t for t in state.completed if t.user_attrs.get("proposed_by") == BASELINE]
    best = state.best()
    if not baselines or best is None:
        return None
    baseline = min(baselines, key=lambda t: t.number)

    def scored(trial: Any) -> str:
        accuracy = (trial.user_attrs.get("cv") or {}).get("accuracy")
        return f"{trial.value:.4g}" + (
            f" (accuracy {accuracy:.1%})" if isinstance(accuracy, int | float) else ""
        )

    line = f"Result: baseline trial {baseline.number} {objective} {scored(baseline)}"
    if best.number == baseline.number:
        return line + "; no trial beat it"
    change = pct((best.value - baseline.value) / abs(baseline.value)) if baseline.value else "-"
    origin = trial_origin(best.user_attrs)
    base = (best.user_attrs.get("incumbent") or {}).get("number")
    how = (
        f"from {origin.replace(': ', ' -> ')} on trial {base}"
        if base is not None
        else f"from the {origin}"
    )
    return f"{line} -> best trial {best.number} {scored(best)}, {change}, {how}"


def print_summary(study: Any, settings: Any, state: LoopState | None = None) -> None:
    """The end-of-loop summary: the status tables, then where to look next."""
    from evolver.console import output_console

    console = output_console()
    render(study, console, state=state, settings=settings)
    # Printed output ends up in logs: the password stays out, the user puts it back.
    storage = redact(settings.storage)
    console.print(
        f"\nTrial folders: {settings.loop_dir}\n"
        f"Status again:  evolver status loop.name={settings.name}"
        + (
            ""
            if settings.storage == default_storage_url(settings.runs_dir)
            else f" --storage '{storage}'"
        )
        + f" runs_dir={settings.runs_dir}\n"
        f"MLflow UI:     evolver ui runs_dir={settings.runs_dir} --loop {settings.name}\n"
        f"Optuna:        optuna-dashboard {storage}"
        + ("\n(*** stands for the storage password)" if storage != settings.storage else "")
    )
    line = outcome_line(state or LoopState.load(study), settings.objective)
    if line:
        console.print(f"\n{line}")


# -- command line ------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="evolver status",
        description="Print an evolver loop's iterations, trials, findings and proposal scoreboard.",
    )
    parser.add_argument("overrides", nargs="*", help="loop.name=NAME and/or runs_dir=DIR")
    parser.add_argument(
        "--storage", help="Optuna storage URL (default: sqlite:///<runs_dir>/optuna.db)"
    )
    parser.add_argument("--json", action="store_true", help="print the scoreboard as JSON")
    return parser


def main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(list(argv))
    values = {"loop.name": "default", "runs_dir": "runs"}
    for item in args.overrides:
        key, sep, value = item.partition("=")
        if not sep or key not in values | {"loop.storage": None}:
            raise ConfigError(item, "expected loop.name=NAME, runs_dir=DIR or loop.storage=URL")
        values[key] = value
    storage = args.storage or values.get("loop.storage")
    if not storage:
        path = default_storage_path(values["runs_dir"])
        if not path.is_file():
            raise ConfigError("runs_dir", f"no loop storage at {path} (run `evolver loop` first)")
        storage = default_storage_url(values["runs_dir"])
    study = load(storage, values["loop.name"])
    if args.json:
        import json

        state = LoopState.load(study)
        print(json.dumps([row.to_dict() for row in scoreboard(state)], indent=2))
        return 0
    from evolver.console import output_console

    render(study, output_console())
    return 0


def load(storage: str, name: str) -> Any:
    import optuna

    from evolver.loop.study import make_storage

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    backend = make_storage(storage)
    names = optuna.study.get_all_study_names(storage=backend)
    if name not in names:
        known = ", ".join(names) or "none"
        raise ConfigError(
            "loop.name", f"no loop named {name!r} in {redact(storage)} (loops: {known})"
        )
    return optuna.load_study(study_name=name, storage=backend)
