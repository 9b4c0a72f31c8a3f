"""Fold racing's false-stop rate and savings, replayed on loops that ran every fold.

Runs evolver loops with racing off (`loop.race_sigmas=null`) and no epoch pruning of any trial,
so every trial trains all K folds, then replays the racing rule (`evolver.loop.racing.replay`)
over each loop's trials in order, each against the best trial before it, at several margins. A
stop is false when the stopped trial's full CV score beat that incumbent: racing would have lost
a better trial.

    python benchmarks/racing.py [--tasks digits,shapes] [--seeds 2] [--trials 12] [--folds 5]
        [--sigmas 1,1.5,2,3] [--runs-dir runs/bench-racing]

Prints, per task and margin: trials raced out, false stops, the epochs racing would not have
trained (share of all epochs) and the loop's final best with and without racing. Loops are kept
in one study per (task, seed): rerunning resumes them.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import loop_runs
import optuna

from evolver.loop.racing import replay
from evolver.records import fold_scores

# The seed notebook's settings, on tiny CPU trials; every trial runs every fold.
START = [
    *loop_runs.SEED_START,
    "model=tiny",
    "finetune.phase1_epochs=1",
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="digits,shapes")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--sigmas", default="1,1.5,2,3")
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
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
