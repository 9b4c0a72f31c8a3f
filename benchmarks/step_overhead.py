"""The training step alone: a plain PyTorch loop, a bare LightningModule under a bare Trainer,
and evolver's `FineTuneClassifier` under the same bare Trainer (no callbacks, no validation, no
checkpoints), on the same loaders, alternating.

    .venv/bin/python benchmarks/step_overhead.py [--model resnet18] [--epochs 4] [--repeats 3]

Isolates what `benchmarks/overhead.py` attributes to the training step: evolver's module
against the plain loop, and Lightning's own loop against the plain loop. Each variant's time is
the median training epoch (the first left out), best of `--repeats`. Run it alone.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from overhead import BareClassifier, bare_trainer, compose_cfg
from rich.console import Console
from rich.table import Table

from evolver.data.loaders import FoldLoaders, fold_splits, make_fold_loaders
from evolver.data.sources import load_image_set
from evolver.model import FineTuneClassifier, create_backbone
from evolver.settings import TrainingSettings
from evolver.training import CrossValidation


class TrainEpochClock(Callback):
    """Seconds of each training epoch (no validation runs)."""

    def __init__(self) -> None:
        self.seconds: list[float] = []

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.seconds.append(time.perf_counter() - self._start)


def lightning_epoch(module: pl.LightningModule, loaders: FoldLoaders, epochs: int) -> float:
    clock = TrainEpochClock()
    pl.seed_everything(1, verbose=False)
    bare_trainer(epochs, clock, limit_val_batches=0).fit(module, loaders.train)
    return statistics.median(clock.seconds[1:])


def plain_epoch(model: str, loaders: FoldLoaders, epochs: int, lr: float, decay: float) -> float:
    pl.seed_everything(1, verbose=False)
    network = create_backbone(model, 10)
    optimizer = torch.optim.AdamW(network.parameters(), lr=lr, weight_decay=decay)
    seconds = []
    for _ in range(epochs):
        start = time.perf_counter()
        network.train()
        for images, targets in loaders.train:
            loss = F.cross_entropy(network(images), targets, label_smoothing=0.1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    cfg = compose_cfg(args.model, args.epochs, 32, None)
    images = load_image_set(cfg.data)
    _, train_idx, val_idx = next(fold_splits(images.targets, 5, True, int(cfg.seed)))
    with tempfile.TemporaryDirectory() as tmp:
        transforms = CrossValidation(cfg, Path(tmp), images).transforms
    loaders = make_fold_loaders(images, train_idx, val_idx, transforms, 32, 0, int(cfg.seed) + 1)
    settings = TrainingSettings.from_cfg(cfg)
    lr, decay = settings.finetune.lr_head, settings.optim.weight_decay
    classes = [str(i) for i in range(images.num_classes)]
    runs: dict[str, list[float]] = {"plain": [], "bare Lightning": [], "evolver module": []}
    for repeat in range(args.repeats):
        runs["plain"].append(plain_epoch(args.model, loaders, args.epochs, lr, decay))
        bare = BareClassifier(args.model, 10, lr, decay, smoothing=0.1)
        runs["bare Lightning"].append(lightning_epoch(bare, loaders, args.epochs))
        module = FineTuneClassifier(args.model, images.num_classes, classes, settings)
        runs["evolver module"].append(lightning_epoch(module, loaders, args.epochs))
        print(f"run {repeat + 1}: " + ", ".join(f"{k} {v[-1]:.3f} s" for k, v in runs.items()))
    best = {name: min(seconds) for name, seconds in runs.items()}
    title = f"{args.model}: training epoch alone (median epoch, best of {args.repeats})"
    table = Table(title=title)
    for column in ("variant", "s/epoch", "vs plain", "spread over runs"):
        table.add_column(column, justify="left" if column == "variant" else "right")
    for name, seconds in runs.items():
        spread = max(seconds) / min(seconds) - 1
        table.add_row(
            name, f"{best[name]:.3f}", f"{best[name] / best['plain']:.3f}", f"{spread:.0%}"
        )
    Console(width=100).print(table)


if __name__ == "__main__":
    main()
