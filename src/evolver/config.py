"""Validation of a composed config: every user mistake becomes a one-line error before any
data is read or any model is trained."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from evolver.errors import ConfigError, DataError
from evolver.settings import TrainingSettings
from evolver.validation import choice, integer, number, positive

TTA_VIEWS = ("identity", "hflip", "vflip")
CHECKPOINT_CHOICES = ("best", "last", "average")
OBJECTIVES = (
    "cv.loss_best",
    "cv.loss_final",
    "cv.oof_log_loss",
    "cv.oof_log_loss_calibrated",
)
PROFILERS = ("simple", "advanced", "pytorch")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")
# When fold checkpoints reach the disk: evolver.checkpoint_writes.
CHECKPOINT_WRITES = ("auto", "immediate", "background", "fit_end")
PRECISIONS = ("auto", "32-true", "32", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true")


def validate(cfg: Any) -> TrainingSettings:
    """Raise ConfigError/DataError for the first invalid setting (config first, then data);
    returns the training settings, checked, for the run to carry on unchanged."""
    settings = validate_settings(cfg)
    validate_data(cfg)
    diagnosis = cfg.get("diagnosis")
    if diagnosis is not None:
        from evolver.diagnosis import validate_options

        validate_options(diagnosis)
    return settings


def validate_settings(cfg: Any) -> TrainingSettings:
    from evolver.optimizers import check_optimizer

    _model(cfg)
    settings = TrainingSettings.from_cfg(cfg)
    check_optimizer(settings.optim)
    choice("checkpoint.select", cfg.checkpoint.select, CHECKPOINT_CHOICES)
    views = cfg.tta.get("views")
    if not views:
        raise ConfigError("tta.views", "needs at least one view (identity, hflip, vflip)")
    for view in views:
        choice("tta.views", view, TTA_VIEWS)
    _int_at_least("cv.folds", cfg.cv.folds, 2)
    data = cfg.data
    _int_at_least("data.batch_size", data.batch_size, 1)
    _int_at_least("data.num_workers", data.num_workers, 0)
    _int_at_least("data.image_size", data.image_size, 8)
    if data.get("limit") is not None:
        _int_at_least("data.limit", data.limit, 2)
    choice("objective", cfg.get("objective", "cv.loss_best"), OBJECTIVES)
    validate_predict(cfg.get("predict"))
    choice("trainer.accelerator", cfg.trainer.accelerator, ACCELERATORS)
    choice("trainer.precision", cfg.trainer.get("precision", "auto"), PRECISIONS)
    if cfg.trainer.get("profiler") is not None:
        choice("trainer.profiler", cfg.trainer.profiler, PROFILERS)
    choice(
        "trainer.checkpoint_writes", cfg.trainer.get("checkpoint_writes", "auto"), CHECKPOINT_WRITES
    )
    reg = cfg.regularization
    if (reg.get("mixup") or reg.get("cutmix")) and int(data.batch_size) % 2:
        raise ConfigError("data.batch_size", "mixup/cutmix need an even batch size")
    return settings


def validate_predict(predict: Any) -> None:
    """`predict.temperature` > 0 and `predict.clip` in (0, 0.5), each null for the study's."""
    if predict is None:
        return
    temperature, clip = predict.get("temperature"), predict.get("clip")
    if temperature is not None:
        positive("predict.temperature", temperature)
    if clip is not None and not 0 < number("predict.clip", clip, convert=True) < 0.5:
        raise ConfigError("predict.clip", f"must be in (0, 0.5), got {clip}")


def validate_data(cfg: Any) -> None:
    """Open the data listing (not the pixels) and check every image file's header."""
    from evolver.data.sources import check_readable, load_image_set

    images = load_image_set(cfg.data)
    folds = int(cfg.cv.folds)
    if len(images) < folds:
        raise DataError(f"data: {len(images)} images cannot be split into {folds} folds")
    if images.num_classes < 2:
        raise DataError(f"data: found one class only ({images.class_names[0]!r}); need two or more")
    if cfg.cv.get("stratified", True):
        counts = {
            name: int((images.targets == i).sum()) for i, name in enumerate(images.class_names)
        }
        scarce = {k: v for k, v in counts.items() if v < folds}
        if scarce:
            name, count = next(iter(scarce.items()))
            raise DataError(
                f"data: class {name!r} has {count} image(s), fewer than cv.folds={folds}"
            )
    paths = [s for s in images.samples if isinstance(s, Path)]
    check_readable(paths)


def _model(cfg: Any) -> None:
    import timm

    name = str(cfg.model.name)
    if not timm.is_model(name):
        raise ConfigError("model.name", f"unknown timm model {name!r}")
    from evolver.weights import resolve_pretrained_path

    # `bundled:<name>` is a file shipped with the package, checked against its sha256 here.
    path = resolve_pretrained_path(cfg.model.get("pretrained_path"))
    if path and not Path(path).is_file():
        raise DataError(f"model.pretrained_path: weights file {path} does not exist")
    if cfg.model.get("pretrained") and not path:
        from evolver.model import create_backbone

        # Fetches (or finds cached) the weights now, so a machine without them fails here.
        create_backbone(name, num_classes=2, pretrained=True)


def _int_at_least(field: str, value: Any, minimum: int) -> None:
    integer(field, value, minimum=minimum, whole_floats=True)
