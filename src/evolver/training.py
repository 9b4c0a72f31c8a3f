"""K-fold cross-validation: one Lightning fit per fold, records and out-of-fold predictions."""

from __future__ import annotations

import logging
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, RichProgressBar

from evolver.callbacks import DynamicsRecorder, PhaseTwoEarlyStopping, TwoPhaseFinetuning
from evolver.callbacks.progress import EpochLinePrinter
from evolver.data.loaders import TransformSettings, fold_splits, make_fold_loaders
from evolver.data.sources import ImageSet
from evolver.model import FineTuneClassifier
from evolver.records import (
    CvScores,
    FoldSummary,
    RunSummary,
    StopInfo,
    cv_losses,
    summarize_fold,
    write_history,
    write_oof,
    write_summary,
)

log = logging.getLogger(__name__)

# Every fold saves into the run's one checkpoints/ folder, under its own fold{k}- names.
warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")

CHECKPOINT_DIR = "checkpoints"


@dataclass(frozen=True)
class HardwareSettings:
    accelerator: str
    devices: Any
    precision: str
    channels_last: bool
    deterministic: bool
    progress_bar: bool

    @classmethod
    def from_cfg(cls, cfg: Any) -> HardwareSettings:
        trainer = cfg.trainer
        gpu = torch.cuda.is_available() and str(trainer.accelerator) in ("auto", "gpu", "cuda")
        precision = str(trainer.get("precision", "auto"))
        if precision == "auto":
            precision = "bf16-mixed" if gpu and torch.cuda.is_bf16_supported() else "32-true"
        channels_last = trainer.get("channels_last", "auto")
        if channels_last == "auto":
            channels_last = gpu
        threads = trainer.get("num_threads")
        if threads:
            torch.set_num_threads(int(threads))
        return cls(
            accelerator=str(trainer.accelerator),
            devices=trainer.get("devices", 1),
            precision=precision,
            channels_last=bool(channels_last),
            deterministic=bool(trainer.get("deterministic", False)),
            progress_bar=bool(trainer.get("enable_progress_bar", True)),
        )


def tta_views(cfg: Any) -> list[str]:
    views = (cfg.get("tta") or {}).get("views") or ["identity"]
    return [str(v) for v in views]


def apply_view(images: torch.Tensor, view: str) -> torch.Tensor:
    if view == "hflip":
        return torch.flip(images, dims=[3])
    if view == "vflip":
        return torch.flip(images, dims=[2])
    return images


@torch.inference_mode()
def predict_probabilities(
    module: FineTuneClassifier, loader: Any, views: Sequence[str], device: torch.device
) -> np.ndarray:
    """Softmax probabilities averaged over the TTA views, one row per sample of `loader`."""
    module.eval().to(device)
    batches = []
    for images, _ in loader:
        images = images.to(device, non_blocking=True)
        probs = torch.stack([module(apply_view(images, v)).float().softmax(1) for v in views])
        batches.append(probs.mean(0).cpu())
    probabilities = torch.cat(batches).numpy().astype(np.float64)
    return probabilities / probabilities.sum(axis=1, keepdims=True)


def load_weights(module: FineTuneClassifier, checkpoint: Path) -> None:
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    module.load_state_dict(state["state_dict"])


@dataclass
class FoldOutcome:
    summary: FoldSummary
    val_indices: np.ndarray
    probabilities: np.ndarray | None


@dataclass
class CrossValidation:
    """Runs the folds of one experiment and keeps what each produced, even when one fails."""

    cfg: Any
    run_dir: Path
    images: ImageSet
    extra_callbacks: Callable[[int], list[Callback]] = lambda fold: []
    rows: list[dict[str, Any]] = field(default_factory=list)
    outcomes: list[FoldOutcome] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)

    def __post_init__(self) -> None:
        self.hardware = HardwareSettings.from_cfg(self.cfg)
        self.transforms = TransformSettings.from_cfg(self.cfg)
        self.views = tta_views(self.cfg)
        self.seed = int(self.cfg.seed)
        cv_seed = self.cfg.cv.get("seed")
        self.cv_seed = self.seed if cv_seed is None else int(cv_seed)
        self.folds = int(self.cfg.cv.folds)
        self._current: tuple[int, DynamicsRecorder, PhaseTwoEarlyStopping | None] | None = None

    def run(self) -> None:
        splits = fold_splits(
            self.images.targets, self.folds, bool(self.cfg.cv.get("stratified", True)), self.cv_seed
        )
        for fold, train_idx, val_idx in splits:
            self.outcomes.append(self.fit_fold(fold, train_idx, val_idx))

    def fit_fold(self, fold: int, train_idx: np.ndarray, val_idx: np.ndarray) -> FoldOutcome:
        cfg = self.cfg
        pl.seed_everything(self.seed + fold, workers=True, verbose=False)
        loaders = make_fold_loaders(
            self.images,
            train_idx,
            val_idx,
            self.transforms,
            int(cfg.data.batch_size),
            int(cfg.data.num_workers),
            self.seed + fold,
        )
        module = FineTuneClassifier.from_settings(
            cfg, self.images.num_classes, self.images.class_names, self.hardware.channels_last
        )
        phase1, phase2 = int(cfg.finetune.phase1_epochs), int(cfg.finetune.phase2_epochs)
        recorder = DynamicsRecorder(fold)
        early_stop = self._early_stopping(phase1)
        self._current = (fold, recorder, early_stop)
        checkpoint = ModelCheckpoint(
            dirpath=self.run_dir / CHECKPOINT_DIR,
            filename=f"fold{fold}-best",
            monitor="val_loss",
            mode="min",
            save_top_k=1,
            save_last=True,
            # The fold checkpoints score the fold and serve predict: the weights are enough, and
            # leaving out the optimizer state cuts the per-epoch write to about a third.
            save_weights_only=True,
            save_on_train_epoch_end=True,
            enable_version_counter=False,
        )
        checkpoint.CHECKPOINT_NAME_LAST = f"fold{fold}-last"
        callbacks: list[Callback] = [TwoPhaseFinetuning(phase1), recorder, checkpoint]
        if early_stop is not None:
            callbacks.append(early_stop)
        progress = self._progress(fold)
        callbacks += progress + self.extra_callbacks(fold)
        trainer = pl.Trainer(
            max_epochs=phase1 + phase2,
            accelerator=self.hardware.accelerator,
            devices=self.hardware.devices,
            precision=self.hardware.precision,
            deterministic=self.hardware.deterministic,
            callbacks=callbacks,
            logger=False,
            num_sanity_val_steps=0,
            enable_model_summary=False,
            enable_progress_bar=any(isinstance(c, RichProgressBar) for c in progress),
            default_root_dir=self.run_dir,
        )
        trainer.fit(module, loaders.train, loaders.val)
        stop = self._stop_info(recorder, early_stop, "max_epochs")
        self.rows += [asdict(r) for r in recorder.records]
        self._current = None
        summary = summarize_fold(fold, self.rows, stop)

        chosen = Path(
            checkpoint.best_model_path if self.select == "best" else checkpoint.last_model_path
        )
        if chosen.is_file():
            load_weights(module, chosen)
        probabilities = predict_probabilities(
            module, loaders.val, self.views, trainer.strategy.root_device
        )
        return FoldOutcome(summary, loaders.val_indices, probabilities)

    @property
    def select(self) -> str:
        return str(self.cfg.checkpoint.select)

    def interrupted(self, reason: str) -> None:
        """Keep the epochs of a fold cut short (pruned or failed) in the records."""
        if self._current is None:
            return
        fold, recorder, early_stop = self._current
        self._current = None
        self.rows += [asdict(r) for r in recorder.records]
        stop = self._stop_info(recorder, early_stop, reason)
        self.outcomes.append(FoldOutcome(summarize_fold(fold, self.rows, stop), np.array([]), None))

    def summary(self, status: str, error: str | None) -> RunSummary:
        folds = [o.summary for o in self.outcomes]
        cv = CvScores()
        # A CV score needs every fold: a pruned or failed run keeps its folds but no scores.
        if status == "complete" and folds:
            cv.loss_best, cv.loss_final = cv_losses(folds)
            cv.oof_log_loss, cv.accuracy = self._oof_scores(self.outcomes)
        return RunSummary(
            status=status,
            error=error,
            folds=folds,
            cv=cv,
            settings=self.settings(),
            objective_name=str(self.cfg.get("objective", "cv.loss_best")),
            duration_s=time.perf_counter() - self.started,
        )

    def write_records(self, status: str, error: str | None) -> RunSummary:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        write_history(self.run_dir, self.rows)
        complete = [o for o in self.outcomes if o.probabilities is not None]
        if complete:
            write_oof(
                self.run_dir,
                indices=np.concatenate([o.val_indices for o in complete]).tolist(),
                folds=[o.summary.fold for o in complete for _ in o.val_indices],
                targets=np.concatenate(
                    [self.images.targets[o.val_indices] for o in complete]
                ).tolist(),
                probabilities=np.concatenate([o.probabilities for o in complete]).tolist(),
            )
        summary = self.summary(status, error)
        write_summary(self.run_dir, summary)
        return summary

    def settings(self) -> dict[str, Any]:
        cfg = self.cfg
        early = cfg.early_stop
        return {
            "max_phase1_epochs": int(cfg.finetune.phase1_epochs),
            "max_phase2_epochs": int(cfg.finetune.phase2_epochs),
            "patience": int(early.patience) if early.enabled else None,
            "min_delta": float(early.min_delta),
            "monitor": str(early.monitor),
            "checkpoint": self.select,
            "lr_backbone": float(cfg.finetune.lr_backbone),
            "lr_head": float(cfg.finetune.lr_head),
            "batch_size": int(cfg.data.batch_size),
            "schedule": str(cfg.schedule.name),
            "warmup_epochs": int(cfg.schedule.get("warmup_epochs", 0) or 0),
            "n_folds": self.folds,
            "model": str(cfg.model.name),
            "tta": self.views,
        }

    def _oof_scores(self, outcomes: list[FoldOutcome]) -> tuple[float, float]:
        from sklearn.metrics import log_loss

        indices = np.concatenate([o.val_indices for o in outcomes])
        probabilities = np.concatenate([o.probabilities for o in outcomes])
        targets = self.images.targets[indices]
        labels = list(range(self.images.num_classes))
        loss = float(log_loss(targets, probabilities, labels=labels))
        accuracy = float((probabilities.argmax(1) == targets).mean())
        return loss, accuracy

    def _early_stopping(self, phase1: int) -> PhaseTwoEarlyStopping | None:
        early = self.cfg.early_stop
        if not early.enabled:
            return None
        return PhaseTwoEarlyStopping(
            phase1,
            monitor=str(early.monitor),
            patience=int(early.patience),
            min_delta=float(early.min_delta),
            mode="max" if "acc" in str(early.monitor) else "min",
            check_finite=True,
        )

    def _progress(self, fold: int) -> list[Callback]:
        if not self.hardware.progress_bar:
            return []
        if sys.stdout.isatty():
            return [RichProgressBar(leave=False)]
        return [EpochLinePrinter(fold, self.folds)]

    @staticmethod
    def _stop_info(
        recorder: DynamicsRecorder, early_stop: PhaseTwoEarlyStopping | None, default_reason: str
    ) -> StopInfo:
        fired = early_stop is not None and early_stop.fired
        return StopInfo(
            early_stopped=fired,
            stop_reason=early_stop.reason_code if fired else default_reason,
            stop_message=early_stop.stopping_reason_message if fired else None,
            nonfinite=recorder.nonfinite,
        )
