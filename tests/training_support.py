"""Helpers for the training-core tests: composing configs and generating image folders."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

# The overrides that make `evolver train` small enough for a test: tiny model, 2 folds, a few
# epochs, a slice of digits. Modules extend them with what they exercise.
TINY = [
    "model=tiny",
    "cv.folds=2",
    "finetune.phase1_epochs=1",
    "finetune.phase2_epochs=3",
    "data.limit=400",
    "data.num_workers=0",
    "trainer.enable_progress_bar=false",
    "tracking.enabled=false",
]


def tiny(*changes: str) -> list[str]:
    """TINY with some values changed (same key) or added (new key)."""
    keys = {change.split("=", 1)[0]: change for change in changes}
    kept = [o for o in TINY if o.split("=", 1)[0] not in keys]
    return kept + list(changes)


# Tiny training on small generated images (the image-folder, csv and predict tests).
SMALL = tiny(
    "data.image_size=16",
    "data.crop_pct=1.0",
    "data.batch_size=8",
    "finetune.phase2_epochs=1",
    "diagnosis.enabled=false",
)


def compose_cfg(overrides: list[str]) -> Any:
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module="evolver.conf", version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def write_image(path: Path, value: int, size: int = 24) -> None:
    from PIL import Image

    rng = np.random.default_rng(value)
    pixels = np.clip(rng.normal(value, 20, (size, size, 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def make_kaggle_folder(root: Path, per_class: int = 12, test_images: int = 5) -> Path:
    """dogs-vs-cats layout: train/<label>.<id>.png and test/<id>.png; cats dark, dogs bright."""
    for i in range(per_class):
        write_image(root / "train" / f"cat.{i}.png", 40 + i)
        write_image(root / "train" / f"dog.{i}.png", 200 - i)
    for i in range(1, test_images + 1):
        write_image(root / "test" / f"{i}.png", 40 if i % 2 else 200)
    return root


def make_class_folders(root: Path, classes: dict[str, int], per_class: int = 8) -> Path:
    """One folder per class, each with a distinct mean brightness."""
    for name, value in classes.items():
        for i in range(per_class):
            write_image(root / name / f"img_{i}.png", value + i)
    return root
