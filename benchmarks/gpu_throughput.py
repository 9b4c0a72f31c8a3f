"""GPU training throughput: evolver's LightningModule under Lightning's Trainer against a plain
PyTorch loop, in fp32, bf16-mixed, and bf16-mixed with channels_last (evolver's GPU default,
`trainer.precision=auto trainer.channels_last=auto`).

    python benchmarks/gpu_throughput.py [--models resnet18 resnet50 efficientnet_b4]
        [--image-size 224] [--batch-size 128] [--steps 30] [--warmup 10] [--repeats 2]

Both sides train the same timm model (random weights) on the same synthetic batches already on
the GPU, so the figures are the training step alone (forward, backward, optimizer), not data
loading. Each row: images per second over `--steps` timed steps after `--warmup` steps (best of
`--repeats` alternating runs per side), the evolver/plain ratio, the speed-up over fp32, and the
peak GPU memory of evolver's side. Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Iterator

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from rich.console import Console
from rich.table import Table
from torch.utils.data import DataLoader, IterableDataset

from evolver.model import FineTuneClassifier, create_backbone
from evolver.settings import (
    EarlyStopSettings,
    FinetuneSettings,
    OptimizerSettings,
    RegularizationSettings,
    ScheduleSettings,
    TrainingSettings,
)

NUM_CLASSES = 10
# (label, Lightning precision, channels_last)
VARIANTS = (
    ("fp32", "32-true", False),
    ("bf16", "bf16-mixed", False),
    ("bf16 + channels_last", "bf16-mixed", True),
)


class Batches(IterableDataset):
    """The same pre-made GPU batches, cycled `count` times."""

    def __init__(self, batches: list[tuple[torch.Tensor, torch.Tensor]], count: int) -> None:
        self.batches, self.count = batches, count

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for index in range(self.count):
            yield self.batches[index % len(self.batches)]


class StepClock(Callback):
    """Wall time of the training steps after the first `warmup`, GPU work included. It waits
    for the GPU only at the two ends, so the CPU still queues steps ahead as in real training."""

    def __init__(self, warmup: int, steps: int) -> None:
        self.warmup, self.steps, self.start, self.end = warmup, steps, 0.0, 0.0

    def on_train_batch_start(self, trainer: pl.Trainer, *args: object) -> None:
        if trainer.global_step == self.warmup:
            torch.cuda.synchronize()
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, *args: object) -> None:
        if trainer.global_step == self.warmup + self.steps:
            torch.cuda.synchronize()
            self.end = time.perf_counter()


def make_batches(size: int, batch: int, count: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator(device="cuda").manual_seed(0)
    return [
        (
            torch.randn(batch, 3, size, size, device="cuda", generator=generator),
            torch.randint(0, NUM_CLASSES, (batch,), device="cuda", generator=generator),
        )
        for _ in range(count)
    ]


def evolver_side(
    model: str, precision: str, channels_last: bool, batches: list, warmup: int, steps: int
) -> tuple[float, float]:
    """(images/s, peak GiB) of FineTuneClassifier in phase 2 under Lightning's Trainer."""
    settings = TrainingSettings(
        finetune=FinetuneSettings(0, 1, lr_backbone=1e-4, lr_head=1e-3),
        optim=OptimizerSettings(name="adamw", weight_decay=0.01),
        schedule=ScheduleSettings(name="constant", warmup_epochs=0),
        early_stop=EarlyStopSettings(patience=None, monitor="val_loss", min_delta=0.0),
        regularization=RegularizationSettings(0.0, 0.0, 0.0, 0.0, 0.0, 0.0),
    )
    module = FineTuneClassifier(
        model,
        NUM_CLASSES,
        [str(c) for c in range(NUM_CLASSES)],
        settings,
        channels_last=channels_last,
    )
    clock = StepClock(warmup, steps)
    trainer = pl.Trainer(
        accelerator="gpu",
        devices=1,
        precision=precision,
        max_steps=warmup + steps,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[clock],
    )
    torch.cuda.reset_peak_memory_stats()
    loader = DataLoader(Batches(batches, warmup + steps), batch_size=None)
    trainer.fit(module, train_dataloaders=loader)
    images = steps * batches[0][0].shape[0]
    return images / (clock.end - clock.start), torch.cuda.max_memory_allocated() / 2**30


def plain_side(
    model: str, precision: str, channels_last: bool, batches: list, warmup: int, steps: int
) -> float:
    """Images/s of the same model, optimizer and batches in a hand-written loop."""
    net = create_backbone(model, NUM_CLASSES).cuda()
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4, weight_decay=0.01)
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if precision == "bf16-mixed"
        else contextlib.nullcontext()
    )
    net.train()
    start = 0.0
    for index in range(warmup + steps):
        if index == warmup:
            torch.cuda.synchronize()
            start = time.perf_counter()
        images, targets = batches[index % len(batches)]
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast:
            loss = F.cross_entropy(net(images), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    torch.cuda.synchronize()
    return steps * batches[0][0].shape[0] / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["resnet18", "resnet50", "efficientnet_b4"])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=2, help="runs per side, best kept")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit(
            "gpu_throughput.py: no CUDA GPU visible (torch.cuda.is_available() is False)"
        )
    torch.backends.cudnn.benchmark = True
    batches = make_batches(args.image_size, args.batch_size)
    gpu = torch.cuda.get_device_name()
    table = Table(
        title=f"Training images/s on {gpu}, {args.image_size} px, batch {args.batch_size}, "
        f"{args.steps} steps after {args.warmup}"
    )
    for column in (
        "model",
        "variant",
        "evolver (img/s)",
        "plain (img/s)",
        "ratio",
        "vs fp32",
        "peak GiB",
    ):
        table.add_column(column, justify="right")
    for model in args.models:
        fp32 = None
        for label, precision, channels_last in VARIANTS:
            # Alternating the sides and keeping each one's best damps clock and order effects.
            plains, evolvers = [], []
            for _ in range(args.repeats):
                plains.append(
                    plain_side(model, precision, channels_last, batches, args.warmup, args.steps)
                )
                evolvers.append(
                    evolver_side(model, precision, channels_last, batches, args.warmup, args.steps)
                )
            plain = max(plains)
            evolver, peak = max(evolvers)
            fp32 = fp32 or evolver
            table.add_row(
                model,
                label,
                f"{evolver:,.0f}",
                f"{plain:,.0f}",
                f"{evolver / plain:.3f}",
                f"{evolver / fp32:.2f}x",
                f"{peak:.1f}",
            )
            print(f"{model} {label}: evolver {evolver:.0f} img/s, plain {plain:.0f}", flush=True)
    Console(width=140).print(table)
    print(f"torch {torch.__version__}, lightning {pl.__version__}")


if __name__ == "__main__":
    main()
