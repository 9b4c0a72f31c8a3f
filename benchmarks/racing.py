"""Fold racing's and base-curve pruning's false-stop rates and savings, replayed on loops that
ran every fold of every trial to its end.

Runs evolver loops with racing off (`loop.race_sigmas=null`) and no epoch pruning of any trial,
so every trial trains all K folds, then replays the racing rule (`evolver.loop.racing.replay`)
over each loop's trials in order, each against the best trial before it, at several margins. A
stop is false when the stopped trial's full CV score beat that incumbent: racing would have lost
a better trial.

The same loops replay `BaseCurvePruner` (`evolver.loop.pruners.first_prune_step`) on every
proposal against its base trial's curve, at several tolerances (`loop.proposal_prune_tolerance`),
with the loop's warmup (phase 1 plus `loop.pruner_warmup_epochs`). A prune is false when the
pruned proposal's full CV score beat its base's: the loop would have lost an improvement.

    python benchmarks/racing.py [--tasks digits,shapes] [--seeds 2] [--trials 12] [--folds 5]
        [--sigmas 1,1.5,2,3] [--tolerances 0.25,0.5,1] [--runs-dir runs/bench-racing]

Prints, per task and margin: trials raced out, false stops, the epochs racing would not have
trained (share of all epochs) and the loop's final best with and without racing; then per
tolerance: proposals judged, pruned, false prunes and the epochs pruning would not have trained.
Loops are kept in one study per (task, seed): rerunning resumes them.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import loop_runs
import optuna

from evolver.loop.pruners import base_number, first_prune_step
from evolver.loop.racing import replay
from evolver.records import fold_scores

PHASE1_EPOCHS = 1
PRUNER_WARMUP_EPOCHS = 2  # loop.pruner_warmup_epochs's default
# The seed notebook's settings, on tiny CPU trials; every trial runs every fold.
START = [
    *loop_runs.SEED_START,
    "model=tiny",
    f"finetune.phase1_epochs={PHASE1_EPOCHS}",
    "finetune.phase2_epochs=6",
    "loop.pruner=none",
    "loop.proposal_prune_tolerance=null",
    "loop.race_sigmas=null",
]
TASKS = {
    "digits": ["data.limit=300"],
    "shapes": ["data=shapes", "data.shapes.per_class=50"],
}


def run_loop(runs_dir: Path, task: str, seed: int, trials: int, folds: int) -> str:
    name = f"race-{task}-f{folds}-s{seed}"
    per = 3
    overrides = [
        f"seed={seed}",
        f"loop.iterations={max(1, trials // per)}",
        f"loop.trials_per_iteration={per}",
        f"cv.folds={folds}",
        *START,
        *TASKS[task],
    ]
    loop_runs.run_loop(runs_dir, name, overrides)
    return name


def loop_trials(runs_dir: Path, name: str) -> list[tuple[int, float, dict[int, float], list[int]]]:
    """(number, CV value, fold scores, epochs per fold) of each complete trial, in order."""
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{runs_dir / 'optuna.db'}")
    rows = []
    for trial in sorted(study.trials, key=lambda t: t.number):
        if trial.state.name != "COMPLETE" or trial.value is None:
            continue
        summary_path = Path(trial.user_attrs.get("run_dir", "")) / "summary.json"
        if not summary_path.is_file():
            continue
        summary = json.loads(summary_path.read_text())
        folds = sorted(summary["folds"], key=lambda fold: fold["fold"])
        scores = fold_scores(folds, summary.get("objective_name", "cv.loss_best"))
        epochs = [int(fold["epochs_trained"]) for fold in folds]
        rows.append((trial.number, float(trial.value), scores, epochs))
    return rows


def replay_table(task: str, loops: list[list[tuple]], sigmas: list[float]) -> list[dict]:
    print(f"\nTask {task}: racing replayed on {len(loops)} loop(s) that trained every fold")
    header = (
        f"{'sigmas':>6}  {'trials':>6}  {'raced':>5}  {'false':>5}  {'epochs saved':>12}  "
        f"{'best without':>12}  {'best with':>9}"
    )
    print(header)
    results = []
    for sigmas_value in sigmas:
        raced = false = trials = 0
        saved = total = 0
        best_without, best_with = [], []
        for rows in loops:
            if not rows:
                continue
            verdicts = replay([(n, v, s) for n, v, s, _ in rows], sigmas_value)
            kept = []
            for (_, value, _scores, epochs), (_, verdict, false_stop) in zip(
                rows, verdicts, strict=True
            ):
                trials += 1
                total += sum(epochs)
                if verdict is None:
                    kept.append(value)
                    continue
                raced += 1
                false += false_stop
                saved += sum(epochs[verdict.after_fold :])
            best_without.append(min(value for _, value, _, _ in rows))
            best_with.append(min(kept) if kept else float("nan"))
        share = saved / total if total else 0.0
        mean_without = sum(best_without) / max(1, len(best_without))
        mean_with = sum(best_with) / max(1, len(best_with))
        print(
            f"{sigmas_value:>6g}  {trials:>6}  {raced:>5}  {false:>5}  "
            f"{saved:>5} ({share:>4.0%})  {mean_without:>12.4f}  {mean_with:>9.4f}"
        )
        results.append(
            {
                "task": task,
                "sigmas": sigmas_value,
                "trials": trials,
                "raced": raced,
                "false_stops": false,
                "epochs_saved": saved,
                "epochs_total": total,
                "mean_best_without": mean_without,
                "mean_best_with": mean_with,
            }
        )
    return results


def proposal_curves(runs_dir: Path, name: str) -> list[tuple[dict, dict, float, float]]:
    """(curve, base's curve, value, base's value) of each complete proposal whose base is
    complete, from one loop's study."""
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{runs_dir / 'optuna.db'}")
    complete = {
        t.number: t for t in study.trials if t.state.name == "COMPLETE" and t.value is not None
    }
    pairs = []
    for trial in complete.values():
        base = complete.get(base_number(trial.user_attrs) if trial.user_attrs else None)
        if base is None:
            continue
        pairs.append(
            (
                dict(trial.intermediate_values),
                dict(base.intermediate_values),
                float(trial.value),
                float(base.value),
            )
        )
    return pairs


def pruning_table(task: str, pairs: list[tuple], tolerances: list[float]) -> list[dict]:
    warmup = PHASE1_EPOCHS + PRUNER_WARMUP_EPOCHS
    print(f"\nTask {task}: base-curve pruning replayed on {len(pairs)} proposals (warmup {warmup})")
    print(
        f"{'tolerance':>9}  {'pruned':>6}  {'false':>5}  {'better than base':>16}  "
        f"{'epochs saved':>12}"
    )
    results = []
    improved = sum(value < base_value for _, _, value, base_value in pairs)
    for tolerance in tolerances:
        pruned = false = saved = total = 0
        for curve, base_curve, value, base_value in pairs:
            total += len(curve)
            step = first_prune_step(curve, base_curve, tolerance, warmup)
            if step is None:
                continue
            pruned += 1
            false += value < base_value
            saved += sum(1 for later in curve if later > step)
        share = saved / total if total else 0.0
        print(
            f"{tolerance:>9g}  {pruned:>6}  {false:>5}  {improved:>16}  {saved:>5} ({share:>4.0%})"
        )
        results.append(
            {
                "task": task,
                "tolerance": tolerance,
                "proposals": len(pairs),
                "pruned": pruned,
                "false_prunes": false,
                "better_than_base": improved,
                "epochs_saved": saved,
                "epochs_total": total,
            }
        )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="digits,shapes")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--sigmas", default="1,1.5,2,3")
    parser.add_argument("--tolerances", default="0.25,0.5,1")
    parser.add_argument("--runs-dir", type=Path, default=Path("runs/bench-racing"))
    parser.add_argument("--json", type=Path, default=None, help="write the table rows here")
    parser.add_argument("--replay-only", action="store_true", help="do not run loops")
    args = parser.parse_args()
    args.runs_dir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    sigmas = [float(value) for value in args.sigmas.split(",")]
    results = []
    for task in args.tasks.split(","):
        names = []
        for seed in range(args.seeds):
            name = f"race-{task}-f{args.folds}-s{seed}"
            if not args.replay_only:
                run_loop(args.runs_dir, task, seed, args.trials, args.folds)
            names.append(name)
        loops = [loop_trials(args.runs_dir, name) for name in names]
        results += replay_table(task, loops, sigmas)
        pairs = [pair for name in names for pair in proposal_curves(args.runs_dir, name)]
        tolerances = [float(value) for value in args.tolerances.split(",")]
        results += pruning_table(task, pairs, tolerances)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
