"""Per-epoch wall time of `evolver train` (Lightning, callbacks, recording, checkpoints) against
a plain PyTorch loop: same model, data, batch size, optimizer and epochs, side by side.

    .venv/bin/python benchmarks/overhead.py [--models test_resnet resnet18] [--epochs 4]
        [--rounds 5] [--profile] [--phases] [--compare-writes MODE ...]
        [--compare-lightning]

The sides run in rounds, one fold each, the side that goes first rotating from round to round.
Each fold's time is the median of its epochs, the first (a warm-up) left out; each round gives
one ratio, evolver's fold against the plain fold of the same round, and the table shows the
median of those ratios and their range. Pairing within a round cancels what drifts slowly (other
tenants, the CPU's clock); the range shows what remains. Target: ratio <= 1.05. Run it alone on
the machine.

`--clock cpu` times each epoch in CPU seconds of the whole process (`time.process_time`: every
thread, the checkpoint writer's included) instead of wall seconds, so that time other tenants of
a shared machine take stops counting. On the 2-core machine it did not make runs agree more
closely (README); the background side also pays its writer thread's CPU there.

`--compare-writes immediate background` adds a side per mode to the same rounds: evolver with
its checkpoints written on the training thread (`trainer.checkpoint_writes=immediate`) or from a
background thread (`background`), against the evolver side's `auto` (`fit_end` on a CPU: kept in
memory, written once when the fold's fit ends).

`--compare-lightning` adds the floor any Lightning-based trainer starts from: the plain loop's
model, loss, optimizer and validation as the smallest LightningModule under a bare Trainer (no
callbacks but the clock, no checkpoints, no logger), in the same rounds. Its ratio to the plain
loop is Lightning's own share of the overhead; evolver's ratio to it is evolver's share.

`--phases` trains one more evolver fold and one plain fold per model and prints, per epoch, where
evolver's time goes between its boundaries (training steps, validation, the epoch-end callbacks
and writes) next to the plain loop's training and validation.

`--profile` trains one more fold per model (and per `--compare-writes` mode) under Lightning's
SimpleProfiler (`trainer.profiler=simple`) and prints where evolver's epoch goes: the training
step itself, data loading, validation, and what the plain loop does not have (each callback,
checkpoint writes, the module's epoch hooks), in seconds per epoch.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_module
from lightning.pytorch.callbacks import Callback
from rich.console import Console
from rich.table import Table

from evolver.data.loaders import FoldLoaders, TransformSettings, fold_splits, make_fold_loaders
from evolver.data.sources import load_image_set
from evolver.model import create_backbone
from evolver.tracking import make_tracker
from evolver.training import CrossValidation

# Wall seconds by default; `--clock cpu` swaps in the process's CPU seconds.
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
clock_now = CLOCKS["wall"]


class EpochClock(Callback):
    """Time (`clock_now`: wall or CPU seconds) between consecutive epoch starts (train +
    validation + callbacks + saving), and the profiler's records when the trainer has a
    SimpleProfiler."""

    def __init__(self) -> None:
        self.starts: list[float] = []
        self.end = 0.0
        self.profile: dict[str, list[float]] = {}

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.starts.append(clock_now())

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.end = clock_now()
        self.profile = dict(getattr(trainer.profiler, "recorded_durations", {}))

    def durations(self) -> list[float]:
        marks = [*self.starts, self.end]
        return [b - a for a, b in itertools.pairwise(marks)]


def compose_cfg(
    model: str,
    epochs: int,
    batch_size: int,
    limit: int | None,
    profiler: str | None = None,
    extra: tuple[str, ...] = (),
) -> object:
    overrides = [
        f"model.name={model}",
        "model.pretrained=false",
        "cv.folds=5",
        "finetune.phase1_epochs=0",
        f"finetune.phase2_epochs={epochs}",
        "schedule=constant",
        "early_stop=off",
        "tta=none",
        f"data.batch_size={batch_size}",
        "data.num_workers=0",
        f"data.limit={'null' if limit is None else limit}",
        "trainer.enable_progress_bar=false",
        "trainer.accelerator=cpu",
        "tracking.enabled=true",
        "diagnosis.enabled=false",
        f"trainer.profiler={profiler or 'null'}",
        *extra,
    ]
    with initialize_config_module(config_module="evolver.conf", version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def evolver_epochs(
    cfg: object,
    run_dir: Path,
    clock: EpochClock | None = None,
    extra: tuple[Callback, ...] = (),
) -> list[float]:
    """One fold through evolver's own path, MLflow tracking (embedded store) included."""
    cfg = cfg.copy()
    cfg.runs_dir = str(run_dir)
    images = load_image_set(cfg.data)
    clock = clock or EpochClock()
    tracker = make_tracker(cfg, run_dir)
    tracker.preflight()
    cv = CrossValidation(
        cfg, run_dir, images, extra_callbacks=lambda fold: [clock, *tracker.callbacks(fold), *extra]
    )
    _, train_idx, val_idx = first_fold(cfg, images.targets)
    cv.fit_fold(1, train_idx, val_idx)
    tracker.finish(run_dir, "complete")
    return clock.durations()


def first_fold(cfg: object, targets: object) -> tuple:
    return next(fold_splits(targets, 5, True, int(cfg.seed)))


def plain_loaders(cfg: object) -> FoldLoaders:
    """The loaders of the fold `evolver_epochs` trains, with evolver's own transforms."""
    images = load_image_set(cfg.data)
    _, train_idx, val_idx = first_fold(cfg, images.targets)
    return make_fold_loaders(
        images,
        train_idx,
        val_idx,
        TransformSettings.from_cfg(cfg),
        int(cfg.data.batch_size),
        0,
        int(cfg.seed) + 1,
    )


def paired_ratios(sides: dict[str, list[float]], reference: str) -> dict[str, list[float]]:
    """Each side's fold time over the reference side's in the same round, round by round."""
    return {
        side: [mine / theirs for mine, theirs in zip(times, sides[reference], strict=True)]
        for side, times in sides.items()
        if side != reference
    }


def plain_epochs(
    cfg: object,
    loaders: FoldLoaders,
    epochs: int,
    num_classes: int,
    parts: list[tuple[float, float]] | None = None,
) -> list[float]:
    """Each epoch's seconds; `parts`, when given, receives each epoch's (training, validation)."""
    pl.seed_everything(int(cfg.seed) + 1, verbose=False)
    model = create_backbone(str(cfg.model.name), num_classes)
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=float(cfg.finetune.lr_head),
        weight_decay=float(cfg.optim.weight_decay),
    )
    smoothing = float(cfg.regularization.label_smoothing)
    durations = []
    for _ in range(epochs):
        start = clock_now()
        model.train()
        train_sum = torch.zeros(())
        for images, targets in loaders.train:
            loss = F.cross_entropy(model(images), targets, label_smoothing=smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            train_sum += loss.detach() * images.shape[0]
        trained = clock_now()
        model.eval()
        val_sum, correct = torch.zeros(()), torch.zeros(())
        with torch.inference_mode():
            for images, targets in loaders.val:
                logits = model(images)
                val_sum += F.cross_entropy(logits, targets, reduction="sum")
                correct += (logits.argmax(1) == targets).sum()
        _ = (train_sum.item(), val_sum.item(), correct.item())
        durations.append(clock_now() - start)
        if parts is not None:
            parts.append((trained - start, durations[-1] - (trained - start)))
    return durations


class BareClassifier(pl.LightningModule):
    """The plain loop's model, loss, optimizer and validation as the smallest LightningModule."""

    def __init__(self, model: str, num_classes: int, lr: float, decay: float, smoothing: float):
        super().__init__()
        self.model = create_backbone(model, num_classes)
        self.lr, self.decay, self.smoothing = lr, decay, smoothing

    def on_validation_epoch_start(self) -> None:
        self.val_sum, self.correct = torch.zeros(()), torch.zeros(())

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> object:
        images, targets = batch
        return F.cross_entropy(self.model(images), targets, label_smoothing=self.smoothing)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        images, targets = batch
        logits = self.model(images)
        self.val_sum += F.cross_entropy(logits, targets, reduction="sum")
        self.correct += (logits.argmax(1) == targets).sum()

    def on_validation_epoch_end(self) -> None:
        _ = (self.val_sum.item(), self.correct.item())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.decay)


def lightning_epochs(
    cfg: object, loaders: FoldLoaders, epochs: int, num_classes: int
) -> list[float]:
    """The plain loop's fold under a bare Trainer: Lightning's own loop and nothing of evolver."""
    pl.seed_everything(int(cfg.seed) + 1, verbose=False)
    module = BareClassifier(
        str(cfg.model.name),
        num_classes,
        float(cfg.finetune.lr_head),
        float(cfg.optim.weight_decay),
        float(cfg.regularization.label_smoothing),
    )
    clock = EpochClock()
    bare_trainer(epochs, clock).fit(module, loaders.train, loaders.val)
    return clock.durations()


def bare_trainer(epochs: int, clock: Callback, **options: object) -> pl.Trainer:
    """A Trainer with nothing but `clock`: no checkpoints, logger, progress bar or summary."""
    return pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[clock],
        **options,
    )


# Profiler actions that are the work itself (the plain loop does the same).
WORK = {
    "run_training_batch": "training step (forward, backward, optimizer)",
    "[_TrainingEpochLoop].train_dataloader_next": "data loading (train)",
    "[_EvaluationLoop].val_next": "data loading (validation)",
    "[Strategy]SingleDeviceStrategy.validation_step": "validation step",
}
# Actions nested in `run_training_batch`, left out so nothing counts twice.
NESTED = ("optimizer_step", "training_step", "backward", "zero_grad", "batch_to_device")
# Checkpoint writes happen inside the callbacks that make them (ModelCheckpoint, FitEndState,
# LastEpochWeights): each callback's row includes its writes.
NESTED_WRITES = ("save_checkpoint",)


def profile_rows(durations: dict[str, list[float]], epochs: int) -> list[tuple[str, float]]:
    """Seconds per epoch by what spent them: the work, then each extra (callbacks by class, with
    the checkpoints they write; LightningModule hooks), largest first; nothing under 0.5 ms. A
    callback that writes once per fit (FitEndState, LastEpochWeights) is spread over the
    profiled epochs, so a longer fit spends less per epoch on it."""
    rows: dict[str, float] = {}
    for action, values in durations.items():
        total = sum(values)
        if action in WORK:
            label = WORK[action]
        elif (
            action in NESTED_WRITES
            or any(part in action for part in NESTED)
            or action.startswith("run_training_epoch")
        ):
            continue
        elif action.startswith("[Callback]"):
            label = "callback " + action.removeprefix("[Callback]").split("{")[0].split(".")[0]
        elif action.startswith("[LightningModule]"):
            label = "module hooks (epoch start/end, setup)"
        else:
            label = "other Lightning hooks"
        rows[label] = rows.get(label, 0.0) + total / epochs
    ordered = sorted(rows.items(), key=lambda item: -item[1])
    return [(label, seconds) for label, seconds in ordered if seconds >= 5e-4]


class EpochPhases(Callback):
    """Wall-clock marks at an epoch's boundaries, in the order Lightning reaches them."""

    def __init__(self) -> None:
        self.marks: list[tuple[str, float]] = []
        self._last_batch = self._last_val_batch = 0.0

    def _mark(self, name: str, at: float | None = None) -> None:
        self.marks.append((name, time.perf_counter() if at is None else at))

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._mark("epoch start")

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if batch_idx == 0:
            self._mark("first step")

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        self._last_batch = time.perf_counter()

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._mark("last step end", self._last_batch)
        self._mark("validation start")

    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._last_val_batch = time.perf_counter()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._mark("validation end", self._last_val_batch)

    def segments(self) -> dict[str, float]:
        """Median seconds of each segment between consecutive marks, the first epoch left out
        (the next epoch's start closes each epoch)."""
        spans: dict[str, list[float]] = {}
        for (start, at), (end, until) in itertools.pairwise(self.marks):
            spans.setdefault(f"{start} -> {end}", []).append(until - at)
        return {name: statistics.median(v[1:] or v) for name, v in spans.items()}


def print_phases(model: str, args: argparse.Namespace) -> None:
    cfg = compose_cfg(model, args.epochs, args.batch_size, args.limit)
    phases = EpochPhases()
    with tempfile.TemporaryDirectory() as tmp:
        evolver_epochs(cfg, Path(tmp), extra=(phases,))
    parts: list[tuple[float, float]] = []
    plain_epochs(cfg, plain_loaders(cfg), args.epochs, 10, parts)
    train = statistics.median(t for t, _ in parts[1:])
    validation = statistics.median(v for _, v in parts[1:])
    table = Table(title=f"{model}: an epoch's segments, median ms (first epoch left out)")
    table.add_column("evolver segment")
    table.add_column("ms", justify="right")
    for name, seconds in phases.segments().items():
        table.add_row(name, f"{seconds * 1000:.1f}")
    table.add_row("plain loop: training steps", f"{train * 1000:.1f}")
    table.add_row("plain loop: validation", f"{validation * 1000:.1f}")
    Console(width=120).print(table)


def print_profile(model: str, args: argparse.Namespace, writes: str | None = None) -> None:
    """One profiled fold; `writes` sets `trainer.checkpoint_writes` (None: auto). `fit_end`'s
    write when the fit ends falls in the strategy's teardown, outside every profiled action."""
    import logging

    # Lightning logs its own full profiler report at the end of the fit: the table below is it.
    logging.getLogger("lightning.pytorch.profilers").setLevel(logging.WARNING)
    extra = (f"trainer.checkpoint_writes={writes}",) if writes else ()
    cfg = compose_cfg(
        model, args.epochs, args.batch_size, args.limit, profiler="simple", extra=extra
    )
    clock = EpochClock()
    with tempfile.TemporaryDirectory() as tmp:
        epochs = evolver_epochs(cfg, Path(tmp), clock)
    per_epoch = sum(epochs) / len(epochs)
    table = Table(
        title=f"{model}, {writes or 'auto'} writes: where an evolver epoch goes "
        f"({per_epoch:.3f} s/epoch, profiled)"
    )
    for column in ("part", "s/epoch", "share"):
        table.add_column(column, justify="left" if column == "part" else "right")
    rows = profile_rows(clock.profile, len(epochs))
    for label, seconds in rows:
        table.add_row(label, f"{seconds:.4f}", f"{seconds / per_epoch:.1%}")
    extras = sum(seconds for label, seconds in rows if label not in WORK.values())
    table.add_row(
        "all extras (not in the plain loop)", f"{extras:.4f}", f"{extras / per_epoch:.1%}"
    )
    Console(width=120).print(table)


def side_cells(times: list[float], ratios: list[float]) -> tuple[str, str]:
    """A side's median s/epoch, and its median paired ratio with the range of the rounds."""
    return (
        f"{statistics.median(times):.3f}",
        f"{statistics.median(ratios):.3f} [{min(ratios):.3f}, {max(ratios):.3f}]",
    )


def lightning_cells(sides: dict[str, list[float]]) -> tuple[str, str, str]:
    """The bare Lightning side's s/epoch and paired ratio to the plain loop, and evolver's paired
    ratio to it."""
    over_plain = paired_ratios({"plain": sides["plain"], "lightning": sides["lightning"]}, "plain")
    over_bare = paired_ratios(
        {"lightning": sides["lightning"], "evolver": sides["evolver"]}, "lightning"
    )
    time_cell, ratio_cell = side_cells(sides["lightning"], over_plain["lightning"])
    return time_cell, ratio_cell, side_cells(sides["evolver"], over_bare["evolver"])[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["test_resnet", "resnet18"])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--limit", type=int, default=None, help="first N digits (default: all)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--rounds",
        type=int,
        default=5,
        help="train one fold per side this many times; each round gives one paired ratio",
    )
    parser.add_argument("--profile", action="store_true", help="also print a per-epoch profile")
    parser.add_argument(
        "--phases",
        action="store_true",
        help="also print an epoch's segments against the plain loop's",
    )
    parser.add_argument(
        "--compare-writes",
        nargs="+",
        default=[],
        choices=["immediate", "background", "fit_end"],
        help="also time evolver with each of these trainer.checkpoint_writes (the evolver side "
        "uses auto: immediate on a CPU, background on a GPU), in the same alternation",
    )
    parser.add_argument(
        "--compare-lightning",
        action="store_true",
        help="also time the plain loop's model under a bare Lightning Trainer, in the same "
        "alternation: Lightning's own share of the overhead",
    )
    parser.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="wall",
        help="time epochs in wall seconds or in the process's CPU seconds",
    )
    args = parser.parse_args()
    global clock_now
    clock_now = CLOCKS[args.clock]
    if args.threads:
        torch.set_num_threads(args.threads)

    unit = "wall time" if args.clock == "wall" else "CPU time (all threads)"
    title = (
        f"Per-epoch {unit}, digits 32 px, {args.epochs} epochs (first left out), "
        f"{args.rounds} rounds; ratio: median of the per-round ratios [range]"
    )
    table = Table(title=title)
    for column in (
        "model",
        "params",
        "evolver train (s/epoch)",
        "plain PyTorch (s/epoch)",
        "ratio",
        *itertools.chain.from_iterable(
            (f"evolver, {mode} writes (s/epoch)", f"ratio ({mode})") for mode in args.compare_writes
        ),
        *(
            ("bare Lightning (s/epoch)", "ratio (bare Lightning)", "evolver / bare Lightning")
            if args.compare_lightning
            else ()
        ),
    ):
        table.add_column(column, justify="right")
    for model in args.models:
        configs = {"evolver": compose_cfg(model, args.epochs, args.batch_size, args.limit)}
        for mode in args.compare_writes:
            configs[mode] = compose_cfg(
                model,
                args.epochs,
                args.batch_size,
                args.limit,
                extra=(f"trainer.checkpoint_writes={mode}",),
            )
        loaders = plain_loaders(configs["evolver"])
        order = ["plain", *(["lightning"] if args.compare_lightning else []), *configs]
        sides: dict[str, list[float]] = {side: [] for side in order}
        for round_ in range(args.rounds):
            first = round_ % len(order)
            for side in order[first:] + order[:first]:
                if side == "plain":
                    epochs = plain_epochs(configs["evolver"], loaders, args.epochs, 10)
                elif side == "lightning":
                    epochs = lightning_epochs(configs["evolver"], loaders, args.epochs, 10)
                else:
                    with tempfile.TemporaryDirectory() as tmp:
                        epochs = evolver_epochs(configs[side], Path(tmp))
                sides[side].append(statistics.median(epochs[1:]))
            print(
                f"{model} round {round_ + 1}/{args.rounds}: "
                + ", ".join(f"{side} {times[-1]:.3f} s/epoch" for side, times in sides.items()),
                flush=True,
            )
        ratios = paired_ratios(sides, "plain")
        evolver_cells = side_cells(sides["evolver"], ratios["evolver"])
        params = sum(p.numel() for p in create_backbone(model, 10).parameters()) / 1e6
        table.add_row(
            model,
            f"{params:.2f} M",
            evolver_cells[0],
            f"{statistics.median(sides['plain']):.3f}",
            evolver_cells[1],
            *itertools.chain.from_iterable(
                side_cells(sides[mode], ratios[mode]) for mode in args.compare_writes
            ),
            *(lightning_cells(sides) if args.compare_lightning else ()),
        )
    Console(width=120).print(table)
    print(f"torch threads: {torch.get_num_threads()}")
    if args.phases:
        for model in args.models:
            print_phases(model, args)
    if args.profile:
        for model in args.models:
            for writes in (None, *args.compare_writes):
                print_profile(model, args, writes)


if __name__ == "__main__":
    main()
