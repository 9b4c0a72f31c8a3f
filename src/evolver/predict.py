"""`evolver predict <run_dir> <images>`: average a run's fold checkpoints (with its TTA views)
over new images and write a Kaggle submission: `id,label` (positive-class probability) for two
classes, `id,<class>...` otherwise."""

from __future__ import annotations

import argparse
import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from evolver.errors import DataError

SUBMISSION_FILE = "submission.csv"


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="evolver predict", description=__doc__)
    parser.add_argument("run_dir", type=Path, help="a run directory written by `evolver train`")
    parser.add_argument("images", type=Path, help="an image, or a folder of images (or its test/)")
    parser.add_argument(
        "-o",
        "--output",
        type=Path,
        default=None,
        help=f"submission file (default: <run_dir>/{SUBMISSION_FILE})",
    )
    parser.add_argument(
        "--checkpoint",
        choices=("best", "last"),
        default=None,
        help="which fold weights to average (default: the run's checkpoint.select)",
    )
    parser.add_argument("--batch-size", type=int, default=None)
    return parser.parse_args(list(argv))


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    config = load_run_config(args.run_dir)
    select = args.checkpoint or str(config.checkpoint.select)
    checkpoints = fold_checkpoints(args.run_dir, select)

    from evolver.data.sources import check_readable, load_prediction_images

    ids, paths = load_prediction_images(args.images)
    check_readable(paths)
    probabilities, class_names = predict_files(config, checkpoints, paths, args.batch_size)
    output = args.output or args.run_dir / SUBMISSION_FILE
    write_submission(output, ids, probabilities, class_names)
    print(f"{len(ids)} predictions from {len(checkpoints)} fold checkpoints ({select}) -> {output}")
    return 0


def load_run_config(run_dir: Path) -> Any:
    from omegaconf import OmegaConf

    path = run_dir / "config.yaml"
    if not path.is_file():
        raise DataError(f"{path}: not a run directory (no config.yaml)")
    return OmegaConf.load(path)


def fold_checkpoints(run_dir: Path, select: str) -> list[Path]:
    found = sorted((run_dir / "checkpoints").glob(f"fold*-{select}.ckpt"))
    if not found:
        raise DataError(f"{run_dir / 'checkpoints'}: no fold*-{select}.ckpt checkpoints")
    return found


def predict_files(
    config: Any, checkpoints: Sequence[Path], paths: Sequence[Path], batch_size: int | None
) -> tuple[np.ndarray, list[str]]:
    """Mean over fold checkpoints of the TTA-averaged class probabilities."""
    import torch

    from evolver.data.loaders import TransformSettings, make_eval_loader
    from evolver.model import FineTuneClassifier
    from evolver.training import predict_probabilities, tta_views

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    loader = make_eval_loader(
        list(paths),
        TransformSettings.from_cfg(config),
        batch_size or int(config.data.batch_size),
        int(config.data.num_workers),
    )
    views = tta_views(config)
    total: np.ndarray | None = None
    class_names: list[str] = []
    for checkpoint in checkpoints:
        module = FineTuneClassifier.load_from_checkpoint(checkpoint, map_location="cpu")
        class_names = list(module.hparams.class_names)
        probabilities = predict_probabilities(module, loader, views, device)
        total = probabilities if total is None else total + probabilities
    assert total is not None
    return total / len(checkpoints), class_names


def write_submission(
    path: Path, ids: Sequence[str], probabilities: np.ndarray, class_names: Sequence[str]
) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        if len(class_names) == 2:
            writer.writerow(["id", "label"])
            writer.writerows([i, f"{p[1]:.6f}"] for i, p in zip(ids, probabilities, strict=True))
        else:
            writer.writerow(["id", *class_names])
            writer.writerows(
                [i, *[f"{v:.6f}" for v in p]] for i, p in zip(ids, probabilities, strict=True)
            )
    return path
