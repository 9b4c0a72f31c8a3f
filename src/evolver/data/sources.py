"""Where the images come from: scikit-learn digits, generated shapes or textures, an image
folder (two layouts) or a CSV list.

Every source yields an `ImageSet`: samples (in-memory arrays or file paths), integer targets and
class names. Nothing here imports torch, so config validation can check the data cheaply.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from evolver.errors import ConfigError, DataError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})

Sample = Path | np.ndarray


@dataclass(frozen=True)
class ImageSet:
    """Labelled images: `samples[i]` (a path or an HxW uint8 array) has class `targets[i]`."""

    samples: Sequence[Sample]
    targets: np.ndarray
    class_names: list[str]
    source: str

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def head(self, limit: int | None) -> ImageSet:
        if limit is None or limit >= len(self):
            return self
        return ImageSet(
            list(self.samples[:limit]), self.targets[:limit], self.class_names, self.source
        )


def load_image_set(data_cfg: Any) -> ImageSet:
    """The labelled training images a `data` config names (limited to `data.limit`)."""
    source = str(data_cfg.source)
    if source == "digits":
        images = load_digits_set()
    elif source == "shapes":
        images = load_shapes_set(data_cfg)
    elif source == "textures":
        images = load_textures_set(data_cfg)
    elif source == "image_folder":
        images = load_folder_set(_required_path(data_cfg, "root"))
    elif source == "csv":
        images = load_csv_set(_required_path(data_cfg, "csv"), data_cfg.get("root"))
    else:
        known = "digits, shapes, textures, image_folder, csv"
        raise ConfigError("data.source", f"unknown source {source!r} ({known})")
    limit = data_cfg.get("limit")
    return images.head(None if limit is None else int(limit))


def load_digits_set() -> ImageSet:
    from sklearn.datasets import load_digits

    digits = load_digits()
    # Pixel values run 0..16; stretch them to 8-bit grey levels.
    pixels = np.clip(digits.images * (255.0 / 16.0), 0, 255).astype(np.uint8)
    return ImageSet(
        list(pixels), digits.target.astype(np.int64), [str(c) for c in range(10)], "digits"
    )


def load_shapes_set(data_cfg: Any) -> ImageSet:
    """Generated shapes (`evolver.data.shapes`), drawn at `data.image_size`."""
    from evolver.data.shapes import KINDS, generate_shapes

    return _generated_set(data_cfg, "shapes", KINDS, generate_shapes)


def load_textures_set(data_cfg: Any) -> ImageSet:
    """Generated textures (`evolver.data.textures`), drawn at `data.image_size`."""
    from evolver.data.textures import TEXTURES, generate_textures

    return _generated_set(data_cfg, "textures", tuple(TEXTURES), generate_textures)


def _generated_set(
    data_cfg: Any,
    source: str,
    known: Sequence[str],
    generate: Callable[..., tuple[list[np.ndarray], np.ndarray]],
) -> ImageSet:
    """A generated task's `data.<source>` node (kinds, per_class, seed: their defaults live in
    `conf/data/<source>.yaml`), checked, then drawn."""
    settings = data_cfg.get(source) or {}
    missing = [key for key in ("kinds", "per_class", "seed") if settings.get(key) is None]
    if missing:
        raise ConfigError(f"data.{source}.{missing[0]}", f"missing; select data={source}")
    kinds = [str(kind) for kind in settings["kinds"]]
    unknown = [kind for kind in kinds if kind not in known]
    if unknown:
        raise ConfigError(f"data.{source}.kinds", f"unknown {unknown}; known: {', '.join(known)}")
    per_class = int(settings["per_class"])
    if per_class < 1:
        raise ConfigError(f"data.{source}.per_class", f"must be >= 1, got {per_class}")
    images, targets = generate(per_class, int(data_cfg.image_size), int(settings["seed"]), kinds)
    return ImageSet(images, targets, kinds, source)


def load_folder_set(root: Path) -> ImageSet:
    """A folder in the Kaggle layout (`train/<label>.<id>.<ext>`) or one folder per class."""
    if not root.is_dir():
        raise DataError(f"data.root: folder {root} does not exist")
    train = root / "train" if (root / "train").is_dir() else root
    flat = sorted(p for p in train.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if flat:
        labels = [p.name.split(".", 1)[0] for p in flat]
        if any(p.name.count(".") < 2 for p in flat):
            odd = next(p for p in flat if p.name.count(".") < 2)
            raise DataError(f"{odd}: expected a file name <label>.<id>.<ext> in {train}")
        return _labelled(flat, labels, "image_folder")
    class_dirs = sorted(p for p in train.iterdir() if p.is_dir() and p.name != "test")
    if not class_dirs:
        raise DataError(f"data.root: {train} holds no images and no class folders")
    paths: list[Path] = []
    labels = []
    for class_dir in class_dirs:
        images = sorted(
            p for p in class_dir.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
        )
        if not images:
            raise DataError(f"{class_dir}: class {class_dir.name!r} has no images")
        paths += images
        labels += [class_dir.name] * len(images)
    return _labelled(paths, labels, "image_folder")


def load_csv_set(csv_path: Path, root: Any = None) -> ImageSet:
    if not csv_path.is_file():
        raise DataError(f"data.csv: file {csv_path} does not exist")
    base = Path(root) if root else csv_path.parent
    with csv_path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None or not {"path", "label"} <= set(reader.fieldnames):
            raise DataError(f"{csv_path}: needs the columns path,label")
        rows = list(reader)
    if not rows:
        raise DataError(f"{csv_path}: lists no images")
    paths = [base / row["path"] for row in rows]
    missing = next((p for p in paths if not p.is_file()), None)
    if missing is not None:
        raise DataError(f"{missing}: image listed in {csv_path} does not exist")
    return _labelled(paths, [row["label"] for row in rows], "csv")


def load_prediction_images(location: Path) -> tuple[list[str], list[Path]]:
    """Ids and paths of unlabelled images: a folder (its `test/` subfolder if any) or one file."""
    if location.is_file():
        return [_image_id(location)], [location]
    if not location.is_dir():
        raise DataError(f"{location}: no such file or folder")
    folder = location / "test" if (location / "test").is_dir() else location
    paths = sorted(
        (p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES),
        key=_natural_key,
    )
    if not paths:
        raise DataError(f"{folder}: holds no images")
    return [_image_id(p) for p in paths], paths


def check_readable(paths: Sequence[Path]) -> None:
    """Open every image header-deep; a broken file is a one-line DataError before training."""
    from PIL import Image, UnidentifiedImageError

    for path in paths:
        try:
            with Image.open(path) as image:
                image.verify()
        except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as error:
            raise DataError(f"{path}: unreadable image ({error.__class__.__name__})") from error


def _labelled(paths: list[Path], labels: list[str], source: str) -> ImageSet:
    class_names = sorted(set(labels), key=_natural_key)
    index = {name: i for i, name in enumerate(class_names)}
    targets = np.array([index[label] for label in labels], dtype=np.int64)
    return ImageSet(paths, targets, class_names, source)


def _required_path(data_cfg: Any, key: str) -> Path:
    value = data_cfg.get(key)
    if value in (None, "", "???"):
        raise ConfigError(f"data.{key}", f"required by data source {data_cfg.source!r}")
    return Path(str(value)).expanduser()


def _image_id(path: Path) -> str:
    return path.name.split(".", 1)[0]


def _natural_key(value: Any) -> tuple[Any, ...]:
    text = value.name if isinstance(value, Path) else str(value)
    stem = text.split(".", 1)[0]
    return (0, int(stem), text) if stem.isdigit() else (1, 0, text)
