"""Per-epoch wall time of `evolver train` (Lightning, callbacks, recording, checkpoints) against
a plain PyTorch loop: same model, data, batch size, optimizer and epochs, side by side.

    .venv/bin/python benchmarks/overhead.py [--models test_resnet resnet18] [--epochs 4]

The first epoch of each side is a warm-up and is left out; each side's time is the median of
the rest, best of `--repeats` alternating runs. Target: ratio <= 1.05.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import tempfile
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_module
from lightning.pytorch.callbacks import Callback
from rich.console import Console
from rich.table import Table

from evolver.data.loaders import FoldLoaders, fold_splits
from evolver.data.sources import load_image_set
from evolver.model import create_backbone
from evolver.tracking import make_tracker
from evolver.training import CrossValidation


class EpochClock(Callback):
    """Wall time between consecutive epoch starts (train + validation + callbacks + saving)."""

    def __init__(self) -> None:
        self.starts: list[float] = []
        self.end = 0.0

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.starts.append(time.perf_counter())

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.end = time.perf_counter()

    def durations(self) -> list[float]:
        marks = [*self.starts, self.end]
        return [b - a for a, b in itertools.pairwise(marks)]


def compose_cfg(model: str, epochs: int, batch_size: int, limit: int | None) -> object:
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
    ]
    with initialize_config_module(config_module="evolver.conf", version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def evolver_epochs(cfg: object, run_dir: Path) -> tuple[list[float], FoldLoaders]:
    """One fold through evolver's own path, MLflow tracking (embedded store) included."""
    cfg = cfg.copy()
    cfg.runs_dir = str(run_dir)
    images = load_image_set(cfg.data)
    clock = EpochClock()
    tracker = make_tracker(cfg, run_dir)
    tracker.preflight()
    cv = CrossValidation(
        cfg, run_dir, images, extra_callbacks=lambda fold: [clock, *tracker.callbacks(fold)]
    )
    _, train_idx, val_idx = next(fold_splits(images.targets, 5, True, int(cfg.seed)))
    cv.fit_fold(1, train_idx, val_idx)
    tracker.finish(run_dir, "complete")
    from evolver.data.loaders import make_fold_loaders

    loaders = make_fold_loaders(
        images, train_idx, val_idx, cv.transforms, int(cfg.data.batch_size), 0, int(cfg.seed) + 1
    )
    return clock.durations(), loaders


def plain_epochs(cfg: object, loaders: FoldLoaders, epochs: int, num_classes: int) -> list[float]:
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
        start = time.perf_counter()
        model.train()
        train_sum = torch.zeros(())
        for images, targets in loaders.train:
            loss = F.cross_entropy(model(images), targets, label_smoothing=smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            train_sum += loss.detach() * images.shape[0]
        model.eval()
        val_sum, correct = torch.zeros(()), torch.zeros(())
        with torch.inference_mode():
            for images, targets in loaders.val:
                logits = model(images)
                val_sum += F.cross_entropy(logits, targets, reduction="sum")
                correct += (logits.argmax(1) == targets).sum()
        _ = (train_sum.item(), val_sum.item(), correct.item())
        durations.append(time.perf_counter() - start)
    return durations


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["test_resnet", "resnet18"])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--limit", type=int, default=None, help="first N digits (default: all)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--repeats",
        type=int,
        default=2,
        help="alternate the two sides this many times; keep each side's best",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    table = Table(title=f"Per-epoch wall time, digits 32 px, {args.epochs} epochs (first left out)")
    for column in (
        "model",
        "params",
        "evolver train (s/epoch)",
        "plain PyTorch (s/epoch)",
        "ratio",
    ):
        table.add_column(column, justify="right")
    for model in args.models:
        cfg = compose_cfg(model, args.epochs, args.batch_size, args.limit)
        evolver_runs, plain_runs = [], []
        # Alternating the sides and keeping each one's best run damps load from other processes.
        for _ in range(args.repeats):
            with tempfile.TemporaryDirectory() as tmp:
                evolver, loaders = evolver_epochs(cfg, Path(tmp))
            evolver_runs.append(statistics.median(evolver[1:]))
            plain_runs.append(statistics.median(plain_epochs(cfg, loaders, args.epochs, 10)[1:]))
        evolver_s, plain_s = min(evolver_runs), min(plain_runs)
        params = sum(p.numel() for p in create_backbone(model, 10).parameters()) / 1e6
        table.add_row(
            model,
            f"{params:.2f} M",
            f"{evolver_s:.3f}",
            f"{plain_s:.3f}",
            f"{evolver_s / plain_s:.3f}",
        )
    Console(width=120).print(table)
    print(f"torch threads: {torch.get_num_threads()}")


if __name__ == "__main__":
    main()
