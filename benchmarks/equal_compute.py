"""Equal compute: evolver's loop against Optuna's strongest samplers and pruners, at the same
training seconds, from the same first trial, over several seeds and tasks.

Every loop starts from the seed notebook's configuration (backbone LR 1e-4, head LR 1e-3, plateau
schedule, early-stopping patience 3) as its first trial and searches the same space
(`conf/search/default.yaml`). The baselines are Optuna's samplers, each without a pruner and with
each pruner named (Hyperband, successive halving), with evolver's own features off (no proposals,
no space adaptation, no racing, no continuation); evolver runs with everything on, its free
slots filled by TPE (`evolver`) or by the GP sampler (`evolver_gp`), or with remedy demotion off
(`evolver_keep_order`, an ablation).

The cost is wall-clock seconds: for each trial, the seconds from the loop's first trial's start
to this trial's end (training, the sampler's own time, the loop's diagnosis and planning), one
loop at a time, with fixed torch threads. `--clock training` starts each loop's clock after its
first trial's warm-up (the process's imports and first job build, the same for every method),
so that short budgets compare the search rather than the start-up. Loops stop once their trials
have trained for the budget (`loop.budget_seconds`); curves are read at equal seconds.

    python benchmarks/equal_compute.py [--tasks digits,textures,pretrained] [--seeds 5]
        [--budget 600] [--methods evolver,evolver_gp,tpe_multivariate,gp,cmaes,random]
        [--pruners none,hyperband,successive_halving] [--folds 5] [--runs-dir runs/bench-equal]
        [--clock loop|training] [--report-only]

Prints per task: best-so-far CV loss at equal seconds (median [quartiles] over seeds), the
seconds each method needs to reach the strongest baseline's final best, the share of evolver's
compute that racing, continuation and skipped repeats saved, the remedies evolver tried (how
many beat their base, at what cost), and whether the targets hold; writes
`<runs-dir>/<task>.png`. Loops are kept (one study per task, method and seed): a rerun resumes
them and only prints when they are done.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
from pathlib import Path

import loop_runs
import optuna

from evolver.loop.remedy_records import beat_its_base, remedy_records
from evolver.loop.state import BASELINE, LoopState

# The seed's starting point, on CPU-sized trials.
START = [
    *loop_runs.SEED_START,
    "trainer.num_threads=2",
    "loop.iterations=200",
    "loop.trials_per_iteration=3",
]
TASKS = {
    # Digits at 32 px from scratch (the tiny model underfits at the seed's rates).
    "digits": [
        "model=tiny",
        "data.limit=300",
        "finetune.phase1_epochs=1",
        "finetune.phase2_epochs=6",
    ],
    # Generated colour textures, another domain (the backbone learned shapes), no rule tuned to
    # it: fine-tuned like the seed's task, but the pretrained features transfer only partly.
    "textures": [
        "model=tiny_pretrained",
        "data=textures",
        "finetune.phase1_epochs=3",
        "finetune.phase2_epochs=8",
    ],
    # Generated colour shapes from scratch: the tiny model stays near chance at this budget
    # (every method ends near ln 6), so it is no longer a default task.
    "shapes": [
        "model=tiny",
        "data=shapes",
        "data.shapes.per_class=50",
        "finetune.phase1_epochs=1",
        "finetune.phase2_epochs=6",
    ],
    # The seed's regime: a backbone pretrained on other shapes, fine-tuned on a smaller target;
    # it peaks early, degrades after its best and is stopped early at the seed's settings.
    "pretrained": [
        "model=tiny_pretrained",
        "data=shapes_target",
        "finetune.phase1_epochs=3",
        "finetune.phase2_epochs=8",
    ],
}
# `loop.remedy_failures`'s default: the remedies table counts what came after that many failures.
REMEDY_FAILURES = 2
# Evolver's features off: the same sweeper as a plain Optuna loop.
PLAIN = [
    "loop.proposals=false",
    "loop.adapt_space=false",
    "loop.race_sigmas=null",
    "loop.continue_proposals=false",
]


# Evolver with everything on, by the sampler that fills the slots its proposals leave, and
# ablations of one feature each (`evolver_keep_order`: remedy demotion off).
EVOLVER_SAMPLERS = {
    "evolver": ["loop.sampler=tpe"],
    "evolver_gp": ["loop.sampler=gp"],
    "evolver_keep_order": ["loop.sampler=tpe", "loop.remedy_failures=null"],
}


def method_overrides(method: str) -> list[str]:
    if method in EVOLVER_SAMPLERS:
        return [*EVOLVER_SAMPLERS[method], "loop.pruner=none"]
    sampler, _, pruner = method.partition("+")
    return [*PLAIN, f"loop.sampler={sampler}", f"loop.pruner={pruner or 'none'}"]


def methods_of(samplers: list[str], pruners: list[str]) -> list[str]:
    methods = []
    for sampler in samplers:
        if sampler in EVOLVER_SAMPLERS:
            methods.append(sampler)
            continue
        methods += [sampler if p == "none" else f"{sampler}+{p}" for p in pruners]
    return methods


def loop_name(task: str, method: str, seed: int, folds: int) -> str:
    return f"eq-{task}-f{folds}-{method.replace('+', '-')}-s{seed}"


def run_loop(args: argparse.Namespace, task: str, method: str, seed: int) -> None:
    name = loop_name(task, method, seed, args.folds)
    if finished(args.runs_dir, name):
        return
    overrides = [
        f"seed={seed}",
        f"cv.folds={args.folds}",
        f"loop.budget_seconds={args.budget}",
        *START,
        *TASKS[task],
        *method_overrides(method),
    ]
    loop_runs.run_loop(args.runs_dir, name, overrides)


def load(runs_dir: Path, name: str) -> optuna.Study | None:
    try:
        return optuna.load_study(study_name=name, storage=f"sqlite:///{runs_dir / 'optuna.db'}")
    except KeyError:
        return None


def finished(runs_dir: Path, name: str) -> bool:
    study = load(runs_dir, name)
    return study is not None and "evolver.stop" in study.user_attrs


def warmup_seconds(trial: optuna.trial.FrozenTrial) -> float:
    """A trial's wall seconds that were not training (`duration_s`): for a loop's first trial,
    the process's imports and first job build, which every method pays once."""
    if trial.datetime_start is None or trial.datetime_complete is None:
        return 0.0
    wall = (trial.datetime_complete - trial.datetime_start).total_seconds()
    return max(0.0, wall - float(trial.user_attrs.get("duration_s") or wall))


def first_trial(trials: list[optuna.trial.FrozenTrial]) -> optuna.trial.FrozenTrial:
    """The trial the loop started first: the one that paid the process's warm-up."""
    return min(trials, key=lambda t: t.datetime_start)


def curve(
    runs_dir: Path, name: str, clock: str = "loop"
) -> list[tuple[float, float, optuna.trial.FrozenTrial]]:
    """(seconds since the loop's first trial started, best so far, trial) at each trial's end.
    `clock="training"` starts the clock after the first trial's warm-up instead."""
    study = load(runs_dir, name)
    if study is None:
        return []
    done = [t for t in study.trials if t.state.is_finished() and t.datetime_complete]
    if not done:
        return []
    first = first_trial([t for t in done if t.datetime_start])
    start = first.datetime_start
    if clock == "training":
        start += datetime.timedelta(seconds=warmup_seconds(first))
    points, best = [], float("inf")
    for trial in sorted(done, key=lambda t: t.datetime_complete):
        if trial.state.name == "COMPLETE" and trial.value is not None:
            best = min(best, trial.value)
        seconds = (trial.datetime_complete - start).total_seconds()
        points.append((seconds, best, trial))
    return points


def best_at(points: list[tuple[float, float, object]], seconds: float) -> float:
    values = [best for at, best, _ in points if at <= seconds]
    return values[-1] if values else float("inf")


def seconds_to(points: list[tuple[float, float, object]], target: float) -> float | None:
    for at, best, _ in points:
        if best <= target:
            return at
    return None


def quartiles(values: list[float]) -> tuple[float, float, float]:
    """Quartiles (inclusive interpolation) with a seed that has no score yet counted as the
    worst, not left out: a median over fewer seeds would not be a median over seeds."""
    ordered = sorted(values)
    if not ordered:
        return (float("inf"),) * 3

    def at(fraction: float) -> float:
        position = fraction * (len(ordered) - 1)
        low, high = int(position), min(int(position) + 1, len(ordered) - 1)
        weight = position - low
        if weight == 0 or ordered[low] == ordered[high]:
            return ordered[low]
        if ordered[high] == float("inf"):
            return float("inf")
        return ordered[low] + weight * (ordered[high] - ordered[low])

    return at(0.25), at(0.5), at(0.75)


def savings(points: list[tuple[float, float, optuna.trial.FrozenTrial]]) -> dict[str, float]:
    """Seconds evolver's features saved: racing (folds not trained, at the raced trial's own
    seconds per fold) and continuation (the base's seconds not repeated)."""
    raced = continued = spent = 0.0
    for _, _, trial in points:
        attrs = trial.user_attrs
        duration = float(attrs.get("duration_s") or 0.0)
        spent += duration
        race = attrs.get("raced_out")
        if race:
            per_fold = duration / max(1, int(race["after_fold"]))
            raced += per_fold * (int(race["folds"]) - int(race["after_fold"]))
        continued += float(attrs.get("seconds_saved") or 0.0)
    return {"spent": spent, "racing": raced, "continuation": continued}


def repeat_savings(runs_dir: Path, name: str) -> float:
    """Seconds the loop did not spend on remedies an earlier trial had already trained the same
    way, up to where the pruner stopped it or to the same early stops (each counted once, at the
    earlier trial's own seconds)."""
    study = load(runs_dir, name)
    if study is None:
        return 0.0
    repeats = LoopState.load(study).skipped_repeats().values()
    return sum(float(repeat.get("duration_s") or 0.0) for repeat in repeats)


def remedy_table(
    curves: dict[int, list], seeds: list[int], failures: int = REMEDY_FAILURES
) -> list[tuple]:
    """Per proposal, over seeds: trials complete, pruned (or raced out), better than the trial
    they were built on, the seconds they spent, and the trials and seconds that came after the
    remedy had failed `failures` times in its loop without paying (what `loop.remedy_failures`
    plans after the other remedies)."""
    rows: dict[str, list[float]] = {}
    for seed in seeds:
        earlier: list[optuna.trial.FrozenTrial] = []
        for _, _, trial in sorted(curves[seed], key=lambda point: point[2].number):
            attrs = trial.user_attrs
            name = attrs.get("proposal")
            if not name or name == BASELINE:
                earlier.append(trial)
                continue
            row = rows.setdefault(name, [0, 0, 0, 0.0, 0, 0.0])
            row[0 if trial.state.name == "COMPLETE" and trial.value is not None else 1] += 1
            row[2] += beat_its_base(trial)
            seconds = float(attrs.get("duration_s") or 0.0)
            row[3] += seconds
            record = remedy_records(earlier).get(name)
            if record is not None and record.demoted(failures):
                row[4] += 1
                row[5] += seconds
            earlier.append(trial)
    return sorted(((name, *row) for name, row in rows.items()), key=lambda r: -r[4])


def baseline_dynamics(runs_dir: Path, names: list[str]) -> str | None:
    """The first trial's report metrics (the same configuration in every loop)."""
    for name in names:
        study = load(runs_dir, name)
        if study is None or not study.trials:
            continue
        first = min(study.trials, key=lambda t: t.number)
        report = Path(first.user_attrs.get("run_dir", "")) / "report.json"
        if report.is_file():
            metrics = json.loads(report.read_text()).get("metrics") or {}
            keys = (
                "n_folds",
                "folds_early_stopped",
                "folds_degraded",
                "mean_degradation",
                "mean_best_position",
                "mean_best_val_loss",
                "mean_final_val_loss",
            )
            return ", ".join(f"{k} {metrics.get(k)}" for k in keys)
    return None


def report(args: argparse.Namespace, task: str, methods: list[str]) -> dict:
    seeds = list(range(args.seeds))
    curves = {
        m: {s: curve(args.runs_dir, loop_name(task, m, s, args.folds), args.clock) for s in seeds}
        for m in methods
    }
    print(
        f"\n== Task {task} ({args.folds} folds, budget {args.budget:g} s, {len(seeds)} seeds, "
        f"{args.clock} clock)"
    )
    warmups = [
        warmup_seconds(first_trial([trial for _, _, trial in points]))
        for by_seed in curves.values()
        for points in by_seed.values()
        if points
    ]
    if warmups:
        print(
            f"first trials' warm-up before training (imports, first job): median "
            f"{statistics.median(warmups):.1f} s over {len(warmups)} loops"
            + (" (left out)" if args.clock == "training" else " (counted)")
        )
    dynamics = baseline_dynamics(
        args.runs_dir, [loop_name(task, m, s, args.folds) for m in methods for s in seeds]
    )
    if dynamics:
        print(f"first trial (seed settings): {dynamics}")
    grid = [args.budget * f for f in (0.1, 0.2, 0.3, 0.5, 0.75, 1.0)]
    print("\nbest-so-far CV loss at equal seconds: median [q1, q3] over seeds")
    print(f"{'method':<28}" + "".join(f"{g:>22.0f}" for g in grid))
    table: dict[str, list[tuple[float, float, float]]] = {}
    for method in methods:
        row = [quartiles([best_at(curves[method][s], g) for s in seeds]) for g in grid]
        table[method] = row
        cells = "".join(f"{q2:>9.4f} [{q1:.3f},{q3:.3f}]" for q1, q2, q3 in row)
        print(f"{method:<28}{cells}")

    evolvers = [m for m in methods if m in EVOLVER_SAMPLERS]
    baselines = [m for m in methods if m not in EVOLVER_SAMPLERS]
    finals = {m: table[m][-1][1] for m in baselines}
    strongest = min(finals, key=finals.get) if finals else None
    result: dict = {"task": task, "table": {m: table[m] for m in methods}, "grid": grid}
    if strongest is not None:
        target = finals[strongest]
        print(f"\nstrongest baseline: {strongest} (median final best {target:.4f})")
        print(f"{'method':<28}{'median s to reach it':>22}{'reached':>10}")
        reach: dict[str, float | None] = {}
        for method in methods:
            times = [seconds_to(curves[method][s], target) for s in seeds]
            hit = [t for t in times if t is not None]
            # A loop that never got there counts as the budget plus one second.
            filled = [t if t is not None else args.budget + 1 for t in times]
            reach[method] = statistics.median(filled) if filled else None
            print(f"{method:<28}{reach[method]:>22.0f}{len(hit):>7}/{len(seeds)}")
        result.update(strongest=strongest, target=target, seconds_to_target=reach)
        for method in evolvers:
            ratio = (reach[method] or 0) / max(1e-9, reach[strongest] or 1e-9)
            at_budget = table[method][-1][1]
            lower_everywhere = all(at_budget < finals[m] for m in baselines)
            print(
                f"targets, {method}: needs {ratio:.2f}x the strongest baseline's seconds "
                f"(target <= 0.33): {'met' if ratio <= 1 / 3 else 'MISSED'}; median best at the "
                f"budget below every baseline's: {'met' if lower_everywhere else 'MISSED'}"
            )
            result.setdefault("targets", {})[method] = {
                "ratio": ratio,
                "lower_than_every_baseline": lower_everywhere,
            }
    for method in evolvers:
        totals = [
            savings(curves[method][s])
            | {"repeats": repeat_savings(args.runs_dir, loop_name(task, method, s, args.folds))}
            for s in seeds
            if curves[method][s]
        ]
        if totals:
            spent = sum(t["spent"] for t in totals)
            for feature in ("racing", "continuation", "repeats"):
                saved = sum(t[feature] for t in totals)
                share = saved / (spent + saved) if spent + saved else 0.0
                print(f"{method} {feature}: {saved:.0f} s saved ({share:.0%} of the compute)")
                result.setdefault("saved", {}).setdefault(method, {})[feature] = saved
        print(f"\n{method}: remedies (over seeds; better = lower CV loss than their base)")
        print(
            f"{'proposal':<26}{'complete':>9}{'pruned':>8}{'better':>8}{'seconds':>9}"
            f"{f'after {REMEDY_FAILURES} unpaid: trials':>24}{'seconds':>9}"
        )
        for name, complete, pruned, better, seconds, late, late_s in remedy_table(
            curves[method], seeds
        ):
            print(
                f"{name:<26}{complete:>9}{pruned:>8}{better:>8}{seconds:>9.0f}"
                f"{late:>24}{late_s:>9.0f}"
            )
    plot(args.runs_dir / f"{task}.png", task, curves, seeds)
    return result


def plot(path: Path, task: str, curves: dict, seeds: list[int]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 5))
    for method, by_seed in curves.items():
        ends = [p[-1][0] for p in by_seed.values() if p]
        if not ends:
            continue
        grid = [max(ends) * i / 60 for i in range(1, 61)]
        rows = [quartiles([best_at(by_seed[s], g) for s in seeds]) for g in grid]
        median = [r[1] for r in rows]
        style = {"linewidth": 2.5} if method in EVOLVER_SAMPLERS else {"linewidth": 1.2}
        (line,) = axis.plot(grid, median, label=method, **style)
        axis.fill_between(
            grid, [r[0] for r in rows], [r[2] for r in rows], alpha=0.12, color=line.get_color()
        )
    axis.set_xlabel("training seconds (wall-clock)")
    axis.set_ylabel("best CV loss so far (median, quartiles)")
    axis.set_title(f"{task}: best so far at equal compute")
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    print(f"plot: {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="digits,textures,pretrained")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--budget", type=float, default=600.0)
    parser.add_argument("--methods", default="evolver,evolver_gp,tpe_multivariate,gp,cmaes,random")
    parser.add_argument("--pruners", default="none,hyperband,successive_halving")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--runs-dir", type=Path, default=Path("runs/bench-equal"))
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--report-only", action="store_true", help="do not run loops")
    parser.add_argument(
        "--clock",
        choices=("loop", "training"),
        default="loop",
        help="loop: seconds from the first trial's start; training: from the end of its warm-up",
    )
    args = parser.parse_args()
    args.runs_dir = args.runs_dir.resolve()
    args.runs_dir.mkdir(parents=True, exist_ok=True)
    os.environ["OMP_NUM_THREADS"] = "2"
    methods = methods_of(args.methods.split(","), args.pruners.split(","))
    results = []
    for task in args.tasks.split(","):
        if not args.report_only:
            for seed in range(args.seeds):
                for method in methods:
                    run_loop(args, task, method, seed)
        results.append(report(args, task, methods))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
