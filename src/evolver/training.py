"""K-fold cross-validation: one Lightning fit per fold, records and out-of-fold predictions."""

from __future__ import annotations

import logging
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, RichProgressBar

from evolver.callbacks import DynamicsRecorder, PhaseTwoEarlyStopping, TwoPhaseFinetuning
from evolver.callbacks.end_state import FitEndState
from evolver.callbacks.last_weights import LastEpochWeights
from evolver.callbacks.progress import EpochLinePrinter
from evolver.checkpoint_writes import checkpoint_io, resolved_writes
from evolver.checkpoints import load_weights_into, read_checkpoint
from evolver.continuation import Continuation, end_state_path
from evolver.data.loaders import TransformSettings, fold_splits, make_fold_loaders
from evolver.data.sources import ImageSet
from evolver.diagnosis import posthoc
from evolver.model import FineTuneClassifier
from evolver.records import (
    CHECKPOINT_DIR,
    CHECKPOINT_SUFFIX,
    CONTINUED_KEY,
    OOF_CANDIDATES_FILE,
    POSTHOC_KEY,
    CvScores,
    FoldSummary,
    RunSummary,
    StopInfo,
    checkpoint_name,
    cv_losses,
    summarize_fold,
    write_history,
    write_oof,
    write_summary,
)
from evolver.settings import TrainingSettings

log = logging.getLogger(__name__)

# Every fold saves into the run's one checkpoints/ folder, under its own fold{k}- names.
warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
# A continued fold (checkpoint.continue_from) with early stopping now off resumes from a state
# that has the base's early-stopping callback: leaving it out is the point.
warnings.filterwarnings("ignore", message=r"Be aware that when using `ckpt_path`, callbacks")


@dataclass(frozen=True)
class HardwareSettings:
    accelerator: str
    devices: Any
    precision: str
    channels_last: bool
    deterministic: bool
    progress_bar: bool
    profiler: str | None = None
    checkpoint_writes: str = "immediate"  # resolved: immediate, background or fit_end

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
            profiler=trainer.get("profiler"),
            checkpoint_writes=resolved_writes(str(trainer.get("checkpoint_writes", "auto")), gpu),
        )

    def plugins(self) -> list[Any]:
        plugin = checkpoint_io(self.checkpoint_writes)
        return [] if plugin is None else [plugin]


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
def view_log_probabilities(
    module: FineTuneClassifier, loader: Any, views: Sequence[str], device: torch.device
) -> np.ndarray:
    """(views, samples, classes) float32 log-softmax of each view, one loader pass for all."""
    module.eval().to(device)
    batches = []
    for images, _ in loader:
        images = images.to(device, non_blocking=True)
        logits = torch.stack([module(apply_view(images, v)).float() for v in views])
        batches.append(logits.log_softmax(2).cpu())
    return torch.cat(batches, dim=1).numpy()


def predict_probabilities(
    module: FineTuneClassifier, loader: Any, views: Sequence[str], device: torch.device
) -> np.ndarray:
    """Softmax probabilities averaged over the TTA views, one row per sample of `loader`: the
    arithmetic of the post-hoc candidates, so a run's score and its candidate agree."""
    log_probs = view_log_probabilities(module, loader, views, device)
    return posthoc.mean_probabilities(log_probs, range(len(views)))


def average_state_dicts(
    first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The mean of two state dicts; integer buffers (BatchNorm's batch counts) from `second`."""
    return {
        key: (first[key] + value) / 2 if value.is_floating_point() else value.clone()
        for key, value in second.items()
    }


def state_copy(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in module.state_dict().items()}


def same_weights(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> bool:
    return first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


class FoldCheckpoints:
    """A fold's two weights-only checkpoints: its best epoch's (lowest val loss, saved by
    Lightning's ModelCheckpoint at the end of each epoch that improved it, on the disk when
    `trainer.checkpoint_writes` says: evolver.checkpoint_writes) and its last epoch's (saved
    once, when training ends: `LastEpochWeights`).

    Since Lightning 2.6 a monitored ModelCheckpoint with `save_last=True` writes "last" only in
    epochs that also wrote a new best, so its "last" would be the best epoch's weights.
    """

    def __init__(self, folder: Path, fold: int) -> None:
        # The weights are enough to score the fold and serve predict; leaving out the optimizer
        # state cuts the write to about a third.
        self.best = ModelCheckpoint(
            dirpath=folder,
            filename=checkpoint_name(fold, "best"),
            monitor="val_loss",
            mode="min",
            save_top_k=1,
            save_weights_only=True,
            save_on_train_epoch_end=True,
            enable_version_counter=False,
        )
        self.last = LastEpochWeights(folder / (checkpoint_name(fold, "last") + CHECKPOINT_SUFFIX))
        self.callbacks: list[Callback] = [self.best, self.last]

    @property
    def best_path(self) -> str:
        return self.best.best_model_path

    @property
    def last_path(self) -> str:
        return str(self.last.path) if self.last.written else ""


def load_weights(module: FineTuneClassifier, checkpoint: Path) -> None:
    """A fold checkpoint's weights, loaded weights-only (evolver.checkpoints)."""
    load_weights_into(module, checkpoint, read_checkpoint(checkpoint))


@dataclass
class FoldOutcome:
    summary: FoldSummary
    val_indices: np.ndarray
    probabilities: np.ndarray | None
    # (checkpoints, views, samples, classes) log-probabilities of posthoc.CHECKPOINTS x VIEWS.
    candidates: np.ndarray | None = None


@dataclass
class CrossValidation:
    """Runs the folds of one experiment and keeps what each produced, even when one fails."""

    cfg: Any
    run_dir: Path
    images: ImageSet
    extra_callbacks: Callable[[int], list[Callback]] = lambda fold: []
    # Called with each finished fold's outcome; may stop the run by raising (fold racing).
    after_fold: Callable[[FoldOutcome], None] = lambda outcome: None
    rows: list[dict[str, Any]] = field(default_factory=list)
    outcomes: list[FoldOutcome] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)
    # Predict every checkpoint x TTA candidate for the post-hoc study (False: the configured
    # choice only, as a baseline for benchmarks).
    posthoc: bool = True
    posthoc_seconds: float = 0.0
    # The settings `evolver.config.validate` checked and returned; built from `cfg` when None.
    checked_settings: TrainingSettings | None = None

    def __post_init__(self) -> None:
        self.training = self.checked_settings or TrainingSettings.from_cfg(self.cfg)
        self.hardware = HardwareSettings.from_cfg(self.cfg)
        self.transforms = TransformSettings.from_cfg(self.cfg)
        self.views = tta_views(self.cfg)
        self.seed = int(self.cfg.seed)
        cv_seed = self.cfg.cv.get("seed")
        self.cv_seed = self.seed if cv_seed is None else int(cv_seed)
        self.folds = int(self.cfg.cv.folds)
        checkpoint = self.cfg.checkpoint
        self.keep_end_state = bool(checkpoint.get("keep_end_state", True))
        self.continuation = Continuation.from_cfg(self.cfg)
        self._current: tuple[int, DynamicsRecorder, PhaseTwoEarlyStopping | None] | None = None

    def run(self) -> None:
        splits = fold_splits(
            self.images.targets, self.folds, bool(self.cfg.cv.get("stratified", True)), self.cv_seed
        )
        for fold, train_idx, val_idx in splits:
            outcome = self.fit_fold(fold, train_idx, val_idx)
            self.outcomes.append(outcome)
            self.after_fold(outcome)

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
            cfg,
            self.training,
            self.images.num_classes,
            self.images.class_names,
            self.hardware.channels_last,
        )
        phase1 = self.training.finetune.phase1_epochs
        recorder = DynamicsRecorder(fold)
        early_stop = self._early_stopping(phase1)
        self._current = (fold, recorder, early_stop)
        folder = self.run_dir / CHECKPOINT_DIR
        checkpoint = FoldCheckpoints(folder, fold)
        callbacks: list[Callback] = [TwoPhaseFinetuning(phase1), recorder, *checkpoint.callbacks]
        if self.keep_end_state:
            callbacks.append(FitEndState(end_state_path(folder, fold)))
        if early_stop is not None:
            callbacks.append(early_stop)
        progress = self._progress(fold)
        callbacks += progress + self.extra_callbacks(fold)
        trainer = pl.Trainer(
            max_epochs=self.training.finetune.max_epochs,
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
            profiler=self.hardware.profiler,
            plugins=self.hardware.plugins(),
        )
        resume = self.continuation.prepare(fold, folder) if self.continuation else None
        started = time.perf_counter()
        try:
            trainer.fit(
                module,
                loaders.train,
                loaders.val,
                ckpt_path=resume[0] if resume else None,
                weights_only=True,
            )
        finally:
            if resume:
                resume[0].unlink(missing_ok=True)
        seconds = time.perf_counter() - started
        stop = self._stop_info(recorder, early_stop, "max_epochs")
        self.rows += [asdict(r) for r in recorder.records]
        self._current = None
        summary = replace(summarize_fold(fold, self.rows, stop), seconds=round(seconds, 3))
        if resume and self.continuation:
            saved = self.continuation.base_fold_seconds().get(fold)
            summary = replace(summary, continued_after_epoch=resume[1], seconds_saved=saved)

        device = trainer.strategy.root_device
        if not self.posthoc:
            chosen = Path(checkpoint.best_path if self.select == "best" else checkpoint.last_path)
            if chosen.is_file():
                load_weights(module, chosen)
            probabilities = predict_probabilities(module, loaders.val, self.views, device)
            summary = self._with_log_loss(summary, loaders.val_indices, probabilities)
            return FoldOutcome(summary, loaders.val_indices, probabilities)
        candidates = self._candidate_predictions(module, checkpoint, loaders.val, device)
        probabilities = posthoc.mean_probabilities(
            candidates[posthoc.CHECKPOINTS.index(self.select)],
            [posthoc.VIEWS.index(view) for view in self.views],
        )
        summary = self._with_log_loss(summary, loaders.val_indices, probabilities)
        return FoldOutcome(summary, loaders.val_indices, probabilities, candidates)

    def _with_log_loss(
        self, summary: FoldSummary, indices: np.ndarray, probabilities: np.ndarray
    ) -> FoldSummary:
        from sklearn.metrics import log_loss

        if not np.isfinite(probabilities).all():
            return summary
        loss = log_loss(
            self.images.targets[indices],
            probabilities,
            labels=list(range(self.images.num_classes)),
        )
        return replace(summary, oof_log_loss=float(loss))

    def _candidate_predictions(
        self, module: FineTuneClassifier, checkpoint: FoldCheckpoints, loader: Any, device: Any
    ) -> np.ndarray:
        """The fold's validation set under its best and last weights and their average, each
        with every flip view: one loader pass per distinct set of weights."""
        started = time.perf_counter()
        weights: dict[str, dict[str, torch.Tensor]] = {}
        for name, path in (
            ("last", checkpoint.last_path),
            ("best", checkpoint.best_path),
        ):
            if path and Path(path).is_file():
                load_weights(module, Path(path))
            weights[name] = state_copy(module)
        weights["average"] = average_state_dicts(weights["best"], weights["last"])
        predictions: dict[str, np.ndarray] = {}
        seconds: dict[str, float] = {}
        for name in posthoc.CHECKPOINTS:
            # Equal weights predict alike: a fold whose best epoch is its last runs once.
            twin = next((k for k in predictions if same_weights(weights[k], weights[name])), None)
            if twin is not None:
                predictions[name], seconds[name] = predictions[twin], seconds[twin]
                continue
            pass_started = time.perf_counter()
            module.load_state_dict(weights[name])
            predictions[name] = view_log_probabilities(module, loader, posthoc.VIEWS, device)
            seconds[name] = time.perf_counter() - pass_started
        # What predicting only the configured choice would have cost, as before the candidates.
        configured = seconds.get(self.select, 0.0) * len(self.views) / len(posthoc.VIEWS)
        self.posthoc_seconds += time.perf_counter() - started - configured
        return np.stack([predictions[name] for name in posthoc.CHECKPOINTS])

    @property
    def select(self) -> str:
        return str(self.cfg.checkpoint.select)

    def interrupted(self, reason: str) -> int | None:
        """Keep the epochs of a fold cut short (pruned, failed or interrupted by a signal) in the
        records; returns that fold (None when no fit was running)."""
        if self._current is None:
            return None
        fold, recorder, early_stop = self._current
        self._current = None
        self.rows += [asdict(r) for r in recorder.records]
        stop = self._stop_info(recorder, early_stop, reason)
        self.outcomes.append(FoldOutcome(summarize_fold(fold, self.rows, stop), np.array([]), None))
        return fold

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
        study = self._posthoc_study(complete, status)
        summary = self.summary(status, error)
        if self.continuation is not None:
            summary.extra[CONTINUED_KEY] = self.continued_record()
        if study is not None:
            summary.cv.oof_log_loss_calibrated = study.log_loss
            summary.extra[POSTHOC_KEY] = {
                **study.summary(),
                "seconds": round(self.posthoc_seconds, 3),
            }
        write_summary(self.run_dir, summary)
        return summary

    def continued_record(self) -> dict[str, Any]:
        """summary.json's `continued_from`: the base run, the epoch each fold continued after,
        the training seconds the base had spent on them and the factor on the rates."""
        assert self.continuation is not None
        continued = [o.summary for o in self.outcomes if o.summary.continued_after_epoch]
        return {
            "run_dir": str(self.continuation.base),
            "epochs": {str(f.fold): f.continued_after_epoch for f in continued},
            "seconds_saved": round(sum(f.seconds_saved or 0.0 for f in continued), 3),
            "lr_scale": self.continuation.lr_scale,
        }

    def _posthoc_study(
        self, complete: list[FoldOutcome], status: str
    ) -> posthoc.PosthocStudy | None:
        """Store every fold's candidates; study them when every fold completed."""
        if not complete or any(o.candidates is None for o in complete):
            return None
        started = time.perf_counter()
        indices = np.concatenate([o.val_indices for o in complete])
        order = np.argsort(indices, kind="stable")
        candidates = posthoc.OofCandidates(
            index=indices[order],
            fold=np.concatenate([np.full(len(o.val_indices), o.summary.fold) for o in complete])[
                order
            ],
            target=self.images.targets[indices][order],
            log_probs=np.concatenate([o.candidates for o in complete], axis=2)[:, :, order],
        )
        candidates.save(self.run_dir / OOF_CANDIDATES_FILE)
        study = None
        if status == "complete":
            study = posthoc.study_candidates(candidates, self.select, self.views)
        self.posthoc_seconds += time.perf_counter() - started
        return study

    def settings(self) -> dict[str, Any]:
        """summary.json's `settings` (diagnosis.RunSettings reads them back)."""
        cfg, training = self.cfg, self.training
        finetune, early = training.finetune, training.early_stop
        return {
            "max_phase1_epochs": finetune.phase1_epochs,
            "max_phase2_epochs": finetune.phase2_epochs,
            "patience": early.patience,
            "min_delta": early.min_delta,
            "monitor": early.monitor,
            "checkpoint": self.select,
            "lr_backbone": finetune.lr_backbone,
            "lr_head": finetune.lr_head,
            "batch_size": int(cfg.data.batch_size),
            "schedule": training.schedule.name,
            "warmup_epochs": training.schedule.warmup_epochs,
            "n_folds": self.folds,
            "model": str(cfg.model.name),
            "tta": self.views,
            "num_classes": self.images.num_classes,
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
        early = self.training.early_stop
        if early.patience is None:
            return None
        return PhaseTwoEarlyStopping(
            phase1,
            monitor=early.monitor,
            patience=early.patience,
            min_delta=early.min_delta,
            mode="max" if "acc" in early.monitor else "min",
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
