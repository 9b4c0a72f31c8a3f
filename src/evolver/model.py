"""The LightningModule: a timm classifier fine-tuned in two phases with discriminative LRs.

Phase 1 optimises the head only (the backbone is frozen by `TwoPhaseFinetuning`); phase 2
optimises backbone and head with their own learning rates and the configured schedule. The
optimizer is rebuilt at the phase switch, so `configure_optimizers` depends on `self.phase`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import timm
import torch
import torch.nn.functional as F
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from timm.scheduler.scheduler import Scheduler as TimmScheduler

from evolver.errors import ConfigError
from evolver.optimizers import make_optimizer
from evolver.settings import TrainingSettings


def create_backbone(
    name: str,
    num_classes: int,
    pretrained: bool = False,
    pretrained_path: str | None = None,
    drop_rate: float = 0.0,
    drop_path_rate: float = 0.0,
) -> torch.nn.Module:
    kwargs: dict[str, Any] = {"num_classes": num_classes, "drop_rate": drop_rate}
    if drop_path_rate > 0:
        kwargs["drop_path_rate"] = drop_path_rate
    if pretrained and pretrained_path:
        from evolver.weights import is_bundled, resolve_pretrained_path

        overlay: dict[str, Any] = {"file": resolve_pretrained_path(pretrained_path)}
        if is_bundled(pretrained_path):
            # Bundled files hold no classifier: timm then starts a new head whatever num_classes.
            overlay["num_classes"] = 0
        kwargs["pretrained_cfg_overlay"] = overlay
    if not pretrained or pretrained_path:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    try:
        return timm.create_model(name, pretrained=True, **kwargs)
    except Exception as error:  # hub unreachable and not cached, or no weights published
        cause = (str(error).strip().splitlines() or [type(error).__name__])[0][:160]
        raise ConfigError(
            "model.pretrained",
            f"no pretrained weights for {name!r} could be loaded ({cause}); set "
            "model.pretrained_path to a local weights file, or model.pretrained=false",
        ) from error


def current_hyper_parameters(saved: Mapping[str, Any]) -> dict[str, Any]:
    """A checkpoint's hyper_parameters as `FineTuneClassifier` takes them; checkpoints written
    before `TrainingSettings` hold `optim` and `loss` dicts and the dropout rates instead."""
    if "settings" in saved or "optim" not in saved:
        return dict(saved)
    old = {**saved}
    optim, loss = dict(old.pop("optim")), dict(old.pop("loss", {}))
    settings = {
        "finetune": {
            key: optim[key] for key in ("phase1_epochs", "phase2_epochs", "lr_backbone", "lr_head")
        },
        "optim": {
            "name": optim["optimizer"],
            **{key: optim[key] for key in ("weight_decay", "momentum", "nesterov", "betas")},
        },
        "schedule": {
            "name": optim["schedule"],
            "warmup_epochs": optim["warmup_epochs"],
            "factor": optim["plateau_factor"],
            "plateau_patience": optim["plateau_patience"],
            "min_lr": optim["min_lr"],
            "pct_start": optim["pct_start"],
        },
        "early_stop": {"patience": None, "monitor": optim["monitor"], "min_delta": 0.0},
        "regularization": {
            "label_smoothing": loss.get("label_smoothing", 0.0),
            "mixup": loss.get("mixup", 0.0),
            "cutmix": loss.get("cutmix", 0.0),
            "random_erasing": 0.0,
            "drop_rate": old.pop("drop_rate", 0.0),
            "drop_path_rate": old.pop("drop_path_rate", 0.0),
        },
    }
    return {**old, "settings": settings}


class FineTuneClassifier(pl.LightningModule):
    """A timm classifier trained as `settings` say; a checkpoint holds them as
    `TrainingSettings.to_dict()`, which `settings` accepts too (`load_from_checkpoint`)."""

    def __init__(
        self,
        model_name: str,
        num_classes: int,
        class_names: list[str],
        settings: TrainingSettings | Mapping[str, Any],
        channels_last: bool = False,
        pretrained: bool = False,
        pretrained_path: str | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(settings, TrainingSettings):
            settings = TrainingSettings.from_dict(settings)
        # Weights come from the checkpoint when reloading: never download them again.
        self.save_hyperparameters(
            {
                "model_name": model_name,
                "num_classes": num_classes,
                "class_names": list(class_names),
                "settings": settings.to_dict(),
                "channels_last": channels_last,
            }
        )
        self.settings = settings
        reg = settings.regularization
        self.model = create_backbone(
            model_name,
            num_classes,
            pretrained,
            pretrained_path,
            reg.drop_rate,
            reg.drop_path_rate,
        )
        self.channels_last = channels_last
        self.phase = 1 if settings.finetune.phase1_epochs > 0 else 2
        self.mixup = self._make_mixup(num_classes)
        self.register_buffer("_one", torch.ones(()), persistent=False)
        self._train_totals = torch.zeros(2)
        self._val_totals = torch.zeros(3)
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)

    @classmethod
    def from_settings(
        cls,
        cfg: Any,
        settings: TrainingSettings,
        num_classes: int,
        class_names: list[str],
        channels_last: bool,
    ) -> FineTuneClassifier:
        """The module of `settings`, with the model named by `cfg.model`."""
        return cls(
            model_name=str(cfg.model.name),
            num_classes=num_classes,
            class_names=list(class_names),
            settings=settings,
            channels_last=channels_last,
            pretrained=bool(cfg.model.get("pretrained", False)),
            pretrained_path=cfg.model.get("pretrained_path"),
        )

    # -- parameters ----------------------------------------------------------------------------
    def head_modules(self) -> list[torch.nn.Module]:
        head = self.model.get_classifier()
        return [head] if isinstance(head, torch.nn.Module) else list(head)

    def backbone_parameters(self) -> list[torch.nn.Parameter]:
        head_ids = {id(p) for m in self.head_modules() for p in m.parameters()}
        return [p for p in self.model.parameters() if id(p) not in head_ids]

    def head_parameters(self) -> list[torch.nn.Parameter]:
        return [p for m in self.head_modules() for p in m.parameters()]

    def backbone_modules(self) -> list[torch.nn.Module]:
        heads = {id(m) for m in self.head_modules()}
        return [m for m in self.model.children() if id(m) not in heads]

    # -- steps ---------------------------------------------------------------------------------
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.model(images)

    def training_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int
    ) -> torch.Tensor:
        images, targets = batch
        if self.mixup is not None and images.shape[0] % 2 == 0:
            images, soft_targets = self.mixup(images, targets)
            loss = SoftTargetCrossEntropy()(self(images), soft_targets)
        else:
            loss = F.cross_entropy(
                self(images), targets, label_smoothing=self.settings.regularization.label_smoothing
            )
        # Summed on the device; logged once per epoch (see on_validation_epoch_end).
        self._train_totals += torch.stack(
            [loss.detach() * images.shape[0], self._one * images.shape[0]]
        )
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        images, targets = batch
        logits = self(images)
        # Plain cross-entropy, whatever the training loss: records stay comparable across runs.
        loss = F.cross_entropy(logits, targets)
        correct = (logits.argmax(dim=1) == targets).sum()
        size = images.shape[0]
        self._val_totals += torch.stack(
            [loss.detach() * size, correct.to(loss.dtype), self._one * size]
        )

    def on_train_epoch_start(self) -> None:
        self._train_totals = torch.zeros(2, device=self.device)

    def on_validation_epoch_start(self) -> None:
        self._val_totals = torch.zeros(3, device=self.device)

    def on_validation_epoch_end(self) -> None:
        # Validation closes each training epoch, so the epoch's training loss is complete here:
        # logging it now lets callbacks read train and validation metrics together.
        loss_sum, correct, count = self._val_totals
        self.log("val_loss", loss_sum / count, prog_bar=True)
        self.log("val_acc", correct / count, prog_bar=True)
        train_sum, train_count = self._train_totals
        if not self.trainer.sanity_checking and train_count > 0:
            self.log("train_loss", train_sum / train_count)

    # -- optimisation --------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        # Each group is named after the config leaf of its learning rate.
        finetune = self.settings.finetune
        groups = [{"params": self.head_parameters(), "lr": finetune.lr_head, "name": "lr_head"}]
        if self.phase == 2:
            groups.insert(
                0,
                {
                    "params": self.backbone_parameters(),
                    "lr": finetune.lr_backbone,
                    "name": "lr_backbone",
                },
            )
        optimizer = self._make_optimizer(groups)
        if self.phase == 1:
            return optimizer
        scheduler = self._make_scheduler(optimizer)
        return (
            optimizer if scheduler is None else {"optimizer": optimizer, "lr_scheduler": scheduler}
        )

    def lr_scheduler_step(self, scheduler: Any, metric: Any) -> None:
        if isinstance(scheduler, TimmScheduler):
            # timm schedulers take the epoch whose rate to set: the next epoch of phase 2.
            phase2_epoch = self.current_epoch + 1 - self._phase2_start()
            scheduler.step(epoch=phase2_epoch, metric=metric)
        elif metric is None:
            scheduler.step()
        else:
            scheduler.step(metric)

    def _phase2_start(self) -> int:
        return self.settings.finetune.phase1_epochs

    def _make_optimizer(self, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        return make_optimizer(self.settings.optim, groups, self.settings.finetune.lr_head)

    def _make_scheduler(self, optimizer: torch.optim.Optimizer) -> dict[str, Any] | None:
        s, phase2_epochs = self.settings.schedule, self.settings.finetune.phase2_epochs
        if s.name == "plateau":
            plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
                optimizer,
                mode="min",
                factor=s.factor,
                patience=s.plateau_patience,
                min_lr=s.min_lr,
            )
            return {
                "scheduler": plateau,
                "monitor": self.settings.early_stop.monitor,
                "interval": "epoch",
            }
        if s.name == "cosine":
            from timm.scheduler import CosineLRScheduler

            cosine = CosineLRScheduler(
                optimizer,
                t_initial=max(1, phase2_epochs - s.warmup_epochs),
                lr_min=s.min_lr,
                warmup_t=s.warmup_epochs,
                warmup_lr_init=s.min_lr,
                warmup_prefix=True,
            )
            return {"scheduler": cosine, "interval": "epoch"}
        if s.name == "onecycle":
            steps = self._steps_per_epoch() * max(1, phase2_epochs) + 1
            onecycle = torch.optim.lr_scheduler.OneCycleLR(
                optimizer,
                max_lr=[g["lr"] for g in optimizer.param_groups],
                total_steps=steps,
                pct_start=s.pct_start,
            )
            return {"scheduler": onecycle, "interval": "step"}
        if s.warmup_epochs > 0:
            warmup = s.warmup_epochs
            ramp = torch.optim.lr_scheduler.LambdaLR(
                optimizer, lambda epoch: min(1.0, (epoch + 1) / (warmup + 1))
            )
            return {"scheduler": ramp, "interval": "epoch"}
        return None

    def _steps_per_epoch(self) -> int:
        trainer = self.trainer
        total = trainer.estimated_stepping_batches
        epochs = max(1, trainer.max_epochs or 1)
        return max(1, math.ceil(total / epochs))

    def _make_mixup(self, num_classes: int) -> Mixup | None:
        s = self.settings.regularization
        if s.mixup <= 0 and s.cutmix <= 0:
            return None
        return Mixup(
            mixup_alpha=s.mixup,
            cutmix_alpha=s.cutmix,
            label_smoothing=s.label_smoothing,
            num_classes=num_classes,
        )

    # -- checkpoints ---------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["evolver_phase"] = self.phase

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Resuming inside phase 2 must rebuild the phase-2 optimizer whose state was saved.
        self.phase = int(checkpoint.get("evolver_phase", self.phase))
        if self.phase == 2:
            for parameter in self.model.parameters():
                parameter.requires_grad_(True)
