"""`evolver predict <run_dir> <images>`: average a run's fold checkpoints (with its TTA views)
over new images and write a Kaggle submission: `id,label` (positive-class probability) for two
classes, `id,<class>...` otherwise. By default it applies the checkpoint, TTA, temperature and
clip bound that the run's post-hoc study chose; `<submission>.json` records what it applied."""

from __future__ import annotations

import argparse
import csv
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from evolver import records
from evolver.config import CHECKPOINT_CHOICES
from evolver.diagnosis.posthoc import TTA_CHOICES, tta_name
from evolver.errors import ConfigError, DataError
from evolver.records import (
    CHECKPOINT_DIR,
    CHECKPOINT_SUFFIX,
    CONFIG_FILE,
    POSTHOC_KEY,
    SUBMISSION_FILE,
    SUMMARY_FILE,
    checkpoint_name,
)
from evolver.writable import unwritable_file_reason


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
        choices=CHECKPOINT_CHOICES,
        default=None,
        help="fold weights: best, last or their average (default: the run's post-hoc choice, "
        "else its checkpoint.select)",
    )
    parser.add_argument(
        "--tta",
        choices=tuple(TTA_CHOICES),
        default=None,
        help="TTA views: none, hflip, flips (default: the run's post-hoc choice, else its tta)",
    )
    parser.add_argument(
        "--temperature",
        type=float,
        default=None,
        help="divide the log-probabilities by this (> 0; default: the run's post-hoc choice)",
    )
    parser.add_argument(
        "--clip",
        type=float,
        default=None,
        help="bound probabilities to [clip, 1 - clip], clip in (0, 0.5) (default: the run's)",
    )
    parser.add_argument(
        "--no-posthoc",
        action="store_true",
        help="ignore the run's post-hoc choice: predict with its config as trained",
    )
    parser.add_argument("--batch-size", type=int, default=None)
    return parser.parse_args(list(argv))


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    config = load_run_config(args.run_dir)
    applied = resolve_applied(args, config, read_run_summary(args.run_dir))
    weight_sets = fold_weight_sets(args.run_dir, applied.checkpoint)
    output = args.output or args.run_dir / SUBMISSION_FILE
    check_output(output)  # before inference, not after it

    from evolver.data.sources import check_readable, load_prediction_images

    ids, paths = load_prediction_images(args.images)
    check_readable(paths)
    probabilities, class_names = predict_applied(
        config, weight_sets, paths, args.batch_size, applied
    )
    write_submission(output, ids, probabilities, class_names)
    applied_path = write_applied(output, applied, len(weight_sets), len(ids))
    print(
        f"{len(ids)} predictions from {len(weight_sets)} folds ({applied.describe()}) -> {output}"
        f" (applied: {applied_path.name})"
    )
    return 0


@dataclass(frozen=True)
class Applied:
    """What a submission applies, and where each value came from (flag, config or posthoc)."""

    checkpoint: str
    views: tuple[str, ...]
    temperature: float = 1.0
    clip: float | None = None
    sources: dict[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        clip = f", clip {self.clip:g}" if self.clip is not None else ""
        return (
            f"{self.checkpoint} weights, TTA {tta_name(self.views)}, "
            f"temperature {self.temperature:.3g}{clip}"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "checkpoint": self.checkpoint,
            "tta": tta_name(self.views),
            "views": list(self.views),
            "temperature": self.temperature,
            "clip": self.clip,
            "sources": dict(self.sources),
        }


def read_run_summary(run_dir: Path) -> dict[str, Any]:
    path = run_dir / SUMMARY_FILE
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        return {}


def resolve_applied(args: argparse.Namespace, config: Any, summary: dict[str, Any]) -> Applied:
    """Flags first; then a config that fixes predict.temperature/clip (a proposal's run) as it
    is; then the run's post-hoc choice; else the config as trained. Bad values raise here,
    before any inference."""
    from evolver.config import validate_predict

    if args.temperature is not None and not args.temperature > 0:
        raise ConfigError("--temperature", f"must be positive, got {args.temperature:g}")
    if args.clip is not None and not 0 < args.clip < 0.5:
        raise ConfigError("--clip", f"must be in (0, 0.5), got {args.clip:g}")
    options = config.get("predict") or {}
    validate_predict(options)
    fixed = options.get("temperature") is not None or options.get("clip") is not None
    chosen = (summary.get(POSTHOC_KEY) or {}).get("chosen")
    if chosen and options.get("posthoc", True) and not fixed and not args.no_posthoc:
        base = Applied(
            str(chosen["checkpoint"]),
            tuple(chosen["views"]),
            float(chosen["temperature"]),
            None if chosen.get("clip") is None else float(chosen["clip"]),
        )
        source = "posthoc"
    else:
        temperature = options.get("temperature")
        clip = options.get("clip")
        base = Applied(
            str(config.checkpoint.select),
            tuple(str(v) for v in (config.get("tta") or {}).get("views") or ["identity"]),
            1.0 if temperature is None else float(temperature),
            None if clip is None else float(clip),
        )
        source = "config"
    values = {
        "checkpoint": args.checkpoint or base.checkpoint,
        "views": TTA_CHOICES[args.tta] if args.tta else base.views,
        "temperature": base.temperature if args.temperature is None else args.temperature,
        "clip": base.clip if args.clip is None else args.clip,
    }
    flags = {"checkpoint": args.checkpoint, "views": args.tta}
    flags |= {"temperature": args.temperature, "clip": args.clip}
    sources = {key: "flag" if flags[key] is not None else source for key in values}
    return Applied(**values, sources=sources)


def fold_weight_sets(run_dir: Path, checkpoint: str) -> list[tuple[Path, ...]]:
    """Per fold, the checkpoint files whose weights it predicts with (two for `average`)."""
    if checkpoint != "average":
        return [(path,) for path in fold_checkpoints(run_dir, checkpoint)]
    best, last = fold_checkpoints(run_dir, "best"), fold_checkpoints(run_dir, "last")
    folds = {path.name.split("-")[0] for path in best}
    if folds != {path.name.split("-")[0] for path in last}:
        raise DataError(f"{run_dir / 'checkpoints'}: averaging needs a best and a last per fold")
    return list(zip(best, last, strict=True))


def predict_applied(
    config: Any,
    weight_sets: Sequence[tuple[Path, ...]],
    paths: Sequence[Path],
    batch_size: int | None,
    applied: Applied,
) -> tuple[np.ndarray, list[str]]:
    """Each fold's TTA-averaged probabilities at the applied temperature, averaged over folds,
    then clipped: the temperature calibrates each fold model as the OOF study fitted it."""
    import torch

    from evolver.checkpoints import classifier_from_checkpoint
    from evolver.data.loaders import TransformSettings, make_eval_loader
    from evolver.diagnosis.posthoc import (
        calibrated_probabilities,
        clip_probabilities,
        log_probabilities,
    )
    from evolver.training import average_state_dicts, load_weights, predict_probabilities

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    loader = make_eval_loader(
        list(paths),
        TransformSettings.from_cfg(config),
        batch_size or int(config.data.batch_size),
        int(config.data.num_workers),
    )
    total: np.ndarray | None = None
    class_names: list[str] = []
    for files in weight_sets:
        module = classifier_from_checkpoint(files[0])
        class_names = list(module.hparams.class_names)
        if len(files) == 2:
            first = {k: v.clone() for k, v in module.state_dict().items()}
            load_weights(module, files[1])
            module.load_state_dict(average_state_dicts(first, module.state_dict()))
        probabilities = predict_probabilities(module, loader, applied.views, device)
        if applied.temperature != 1.0:
            probabilities = calibrated_probabilities(
                log_probabilities(probabilities), applied.temperature
            )
        total = probabilities if total is None else total + probabilities
    assert total is not None
    return clip_probabilities(total / len(weight_sets), applied.clip), class_names


def write_applied(output: Path, applied: Applied, folds: int, images: int) -> Path:
    """`<submission>.json` next to the submission: what produced it."""
    path = output.with_suffix(".json")
    path.write_text(json.dumps({**applied.to_dict(), "folds": folds, "images": images}, indent=2))
    return path


def load_run_config(run_dir: Path) -> Any:
    from omegaconf import OmegaConf

    path = run_dir / CONFIG_FILE
    if not path.is_file():
        raise DataError(f"{path}: not a run directory (no {CONFIG_FILE})")
    return OmegaConf.load(path)


def check_output(output: Path) -> None:
    """The submission (and its record beside it) can be written: a one-line error otherwise."""
    reason = unwritable_file_reason(output)
    if reason is not None:
        raise DataError(f"{output}: cannot write the submission: {reason}")


def fold_checkpoints(run_dir: Path, select: str) -> list[Path]:
    found = records.fold_checkpoints(run_dir, select)
    if not found:
        pattern = checkpoint_name("*", select) + CHECKPOINT_SUFFIX
        raise DataError(f"{run_dir / CHECKPOINT_DIR}: no {pattern} checkpoints")
    return found


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
