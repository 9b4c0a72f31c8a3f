"""Torch datasets and loaders: timm transforms over an `ImageSet`, split into K folds."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from timm.data import create_transform
from torch.utils.data import DataLoader, Dataset

from evolver.data.sources import ImageSet, Sample


class ImageDataset(Dataset):
    """Images (paths or arrays) through a transform, with targets (-1 when unlabelled)."""

    def __init__(self, samples: Sequence[Sample], targets: np.ndarray | None, transform: Any):
        self.samples = samples
        self.targets = targets
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        sample = self.samples[index]
        if isinstance(sample, Path):
            with Image.open(sample) as raw:
                image = raw.convert("RGB")
        else:
            image = Image.fromarray(sample).convert("RGB")
        target = -1 if self.targets is None else int(self.targets[index])
        return self.transform(image), target


@dataclass(frozen=True)
class TransformSettings:
    image_size: int
    crop_pct: float
    scale: tuple[float, float]
    hflip: float
    vflip: float
    color_jitter: float | None
    auto_augment: str | None
    random_erasing: float

    @classmethod
    def from_cfg(cls, cfg: Any) -> TransformSettings:
        augment = cfg.data.get("augment") or {}
        scale = augment.get("scale") or (0.08, 1.0)
        jitter = augment.get("color_jitter")
        return cls(
            image_size=int(cfg.data.image_size),
            crop_pct=float(cfg.data.get("crop_pct") or 1.0),
            scale=(float(scale[0]), float(scale[1])),
            hflip=float(augment.get("hflip", 0.5) or 0.0),
            vflip=float(augment.get("vflip", 0.0) or 0.0),
            color_jitter=None if jitter is None else float(jitter),
            auto_augment=augment.get("auto_augment"),
            random_erasing=float(cfg.regularization.get("random_erasing", 0.0) or 0.0),
        )

    def train_transform(self) -> Any:
        return create_transform(
            input_size=self.image_size,
            is_training=True,
            scale=self.scale,
            hflip=self.hflip,
            vflip=self.vflip,
            color_jitter=self.color_jitter,
            auto_augment=self.auto_augment,
            re_prob=self.random_erasing,
        )

    def eval_transform(self) -> Any:
        return create_transform(
            input_size=self.image_size, is_training=False, crop_pct=self.crop_pct
        )


def fold_splits(
    targets: np.ndarray, folds: int, stratified: bool, seed: int
) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """(fold number from 1, train indices, validation indices) from scikit-learn's splitters."""
    from sklearn.model_selection import KFold, StratifiedKFold

    splitter = (
        StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
        if stratified
        else KFold(n_splits=folds, shuffle=True, random_state=seed)
    )
    for number, (train_idx, val_idx) in enumerate(
        splitter.split(np.zeros(len(targets)), targets), 1
    ):
        yield number, train_idx, val_idx


@dataclass
class FoldLoaders:
    train: DataLoader
    val: DataLoader
    val_indices: np.ndarray


def make_fold_loaders(
    images: ImageSet,
    train_idx: np.ndarray,
    val_idx: np.ndarray,
    transforms: TransformSettings,
    batch_size: int,
    num_workers: int,
    seed: int,
) -> FoldLoaders:
    samples = images.samples
    train_set = ImageDataset(
        [samples[i] for i in train_idx], images.targets[train_idx], transforms.train_transform()
    )
    val_set = ImageDataset(
        [samples[i] for i in val_idx], images.targets[val_idx], transforms.eval_transform()
    )
    generator = torch.Generator().manual_seed(seed)
    common = {
        "batch_size": batch_size,
        "num_workers": num_workers,
        "persistent_workers": num_workers > 0,
        "pin_memory": torch.cuda.is_available(),
    }
    # drop_last keeps BatchNorm away from a final batch of one sample.
    train = DataLoader(
        train_set,
        shuffle=True,
        drop_last=len(train_set) > batch_size,
        generator=generator,
        **common,
    )
    val = DataLoader(val_set, shuffle=False, **common)
    return FoldLoaders(train=train, val=val, val_indices=val_idx)


def make_eval_loader(
    samples: Sequence[Sample], transforms: TransformSettings, batch_size: int, num_workers: int
) -> DataLoader:
    dataset = ImageDataset(samples, None, transforms.eval_transform())
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
