"""Pretrain timm's `test_resnet` on the generated shapes: the bundled "ImageNet" of the CPU task.

The seed's task fine-tunes an ImageNet-pretrained ResNet50 on dogs vs cats. Offline and on a CPU,
this script makes the same kind of pair: a backbone pretrained on a larger source task (the six
`evolver.data.shapes.SHAPES` kinds, thousands of images) that `conf/model/tiny_pretrained.yaml`
fine-tunes on a smaller, different target task (`conf/data/shapes_target.yaml`: kinds from
`EXTRA_SHAPES` that the source never showed).

    python benchmarks/pretrain_backbone.py            # writes the bundled weights file
    python benchmarks/pretrain_backbone.py --check    # retrains and compares with the bundled one

The weights file holds the backbone only (no classifier: a fine-tune always starts a new head).
Seeded, with a fixed thread count and deterministic algorithms: on the same machine and library
versions the same bytes come out. Elsewhere float rounding may differ; `--check` then compares the
source-task accuracy instead, and the committed file stays the reference (its sha256 is recorded
in `evolver.weights.PRETRAINED`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

MODEL = "test_resnet"
NAME = "test_resnet_shapes"
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "src/evolver/weights" / f"{NAME}.safetensors"
SEED = 20260
THREADS = 1  # one thread: the same reductions on every run, and fast enough here
IMAGE_SIZE = 32
PER_CLASS = 1000  # source training images per kind (6,000 in all)
VAL_PER_CLASS = 200  # held-out source images per kind, generated with another seed
EPOCHS = 30
BATCH = 128
LR = 3e-3
WEIGHT_DECAY = 0.05
ACCURACY_TOLERANCE = 0.03  # --check: how far a retrained accuracy may fall from the bundled one


def source_tensors(per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The source task: SHAPES images as normalised NCHW floats (timm's ImageNet mean and std,
    as `create_transform` uses in training), with their targets."""
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    from evolver.data.shapes import SHAPES, generate_shapes

    images, targets = generate_shapes(per_class, IMAGE_SIZE, seed, SHAPES)
    pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1)
    return (pixels - mean) / std, torch.from_numpy(targets)


def augment(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random flips (both axes, as the project's shapes preset) and a random shift of up to 4
    pixels with reflected borders: cheap tensor augmentation, deterministic under `generator`."""
    n = batch.shape[0]
    flip_h = torch.rand(n, generator=generator) < 0.5
    flip_v = torch.rand(n, generator=generator) < 0.5
    batch = torch.where(flip_h.view(-1, 1, 1, 1), batch.flip(3), batch)
    batch = torch.where(flip_v.view(-1, 1, 1, 1), batch.flip(2), batch)
    pad = 4
    padded = F.pad(batch, (pad, pad, pad, pad), mode="reflect")
    dx, dy = torch.randint(0, 2 * pad + 1, (2,), generator=generator).tolist()
    return padded[:, :, dy : dy + IMAGE_SIZE, dx : dx + IMAGE_SIZE]


@torch.no_grad()
def accuracy(model: torch.nn.Module, images: torch.Tensor, targets: torch.Tensor) -> float:
    model.eval()
    correct = 0
    for start in range(0, len(images), 500):
        logits = model(images[start : start + 500])
        correct += int((logits.argmax(1) == targets[start : start + 500]).sum())
    return correct / len(images)


def pretrain(per_class: int, epochs: int, log: bool = True) -> tuple[dict, float]:
    """Train the source task; (backbone state dict, held-out source accuracy)."""
    import timm

    from evolver.data.shapes import SHAPES

    torch.manual_seed(SEED)
    torch.set_num_threads(THREADS)
    torch.use_deterministic_algorithms(True)
    train_x, train_y = source_tensors(per_class, SEED)
    val_x, val_y = source_tensors(VAL_PER_CLASS, SEED + 1)
    model = timm.create_model(MODEL, pretrained=False, num_classes=len(SHAPES))
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    steps_per_epoch = len(train_x) // BATCH
    total = steps_per_epoch * epochs
    warmup = steps_per_epoch

    def rate(step: int) -> float:  # one epoch of linear warmup, then cosine to zero
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, rate)
    generator = torch.Generator().manual_seed(SEED)
    for epoch in range(1, epochs + 1):
        model.train()
        order = torch.randperm(len(train_x), generator=generator)
        losses = []
        for step in range(steps_per_epoch):
            index = order[step * BATCH : (step + 1) * BATCH]
            images = augment(train_x[index], generator)
            loss = F.cross_entropy(model(images), train_y[index], label_smoothing=0.1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
        if log and (epoch % 5 == 0 or epoch == epochs):
            print(
                f"epoch {epoch:3d}  train loss {np.mean(losses):.4f}  "
                f"val acc {accuracy(model, val_x, val_y):.4f}",
                flush=True,
            )
    score = accuracy(model, val_x, val_y)
    head = {f"{name}." for name in ("fc",)}
    state = {
        key: value.detach().clone().contiguous()
        for key, value in model.state_dict().items()
        if not any(key.startswith(prefix) for prefix in head)
    }
    return state, score


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help=f"default: {DEFAULT_OUT}")
    parser.add_argument(
        "--check",
        action="store_true",
        help="retrain into a temporary file and compare it with the bundled weights",
    )
    parser.add_argument("--per-class", type=int, default=PER_CLASS)
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    args = parser.parse_args(argv)
    from safetensors.torch import save_file

    out = args.out
    if out is None:
        if args.check:
            import tempfile

            out = Path(tempfile.mkdtemp()) / f"{NAME}.safetensors"
        else:
            out = DEFAULT_OUT
    started = time.perf_counter()
    state, score = pretrain(args.per_class, args.epochs)
    seconds = time.perf_counter() - started
    out.parent.mkdir(parents=True, exist_ok=True)
    about = {
        "model": MODEL,
        "source": "evolver.data.shapes SHAPES",
        "per_class": args.per_class,
        "epochs": args.epochs,
        "source_accuracy": round(score, 4),
    }
    # One metadata key: safetensors writes several in a random order, changing the file's bytes.
    save_file(state, str(out), metadata={"evolver": json.dumps(about, sort_keys=True)})
    digest = sha256(out)
    print(f"source accuracy {score:.4f}  ({len(state)} tensors, {seconds:.0f} s)")
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB)\nsha256 {digest}")
    if not args.check:
        return 0
    from evolver.weights import PRETRAINED, weights_path

    filename, expected = PRETRAINED[NAME]
    if digest == expected:
        print("check: identical to the bundled weights")
        return 0
    from safetensors import safe_open

    with safe_open(str(weights_path(NAME)), "pt") as bundled:
        reference = float(json.loads(bundled.metadata()["evolver"])["source_accuracy"])
    ok = score >= reference - ACCURACY_TOLERANCE
    print(
        f"check: bytes differ from the bundled {filename} (float rounding on this machine); "
        f"source accuracy {score:.4f} vs bundled {reference:.4f}: {'ok' if ok else 'FAILED'}"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
