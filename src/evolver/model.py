"""The LightningModule: a timm classifier fine-tuned in two phases with discriminative LRs.

Phase 1 optimises the head only (the backbone is frozen by `TwoPhaseFinetuning`); phase 2
optimises backbone and head with their own learning rates and the configured schedule. The
optimizer is rebuilt at the phase switch, so `configure_optimizers` depends on `self.phase`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import lightning.pytorch as pl
import timm
import torch
import torch.nn.functional as F
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from timm.scheduler.scheduler import Scheduler as TimmScheduler

from evolver.errors import ConfigError


@dataclass(frozen=True)
class OptimSettings:
    """What phase 1 and phase 2 optimise with; saved in checkpoints as hyperparameters."""

    optimizer: str = "adamw"
    lr_backbone: float = 1e-4
    lr_head: float = 1e-3
    weight_decay: float = 0.01
    momentum: float = 0.9
    nesterov: bool = True
    betas: tuple[float, float] = (0.9, 0.999)
    schedule: str = "plateau"
    warmup_epochs: int = 0
    plateau_factor: float = 0.5
    plateau_patience: int = 1
    min_lr: float = 1e-7
    pct_start: float = 0.3
    phase1_epochs: int = 3
    phase2_epochs: int = 8
    monitor: str = "val_loss"

    @classmethod
    def from_cfg(cls, cfg: Any) -> OptimSettings:
        optim, schedule, finetune = cfg.optim, cfg.schedule, cfg.finetune
        betas = optim.get("betas") or (0.9, 0.999)
        return cls(
            optimizer=str(optim.name),
            lr_backbone=float(finetune.lr_backbone),
            lr_head=float(finetune.lr_head),
            weight_decay=float(optim.get("weight_decay", 0.0) or 0.0),
            momentum=float(optim.get("momentum", 0.9)),
            nesterov=bool(optim.get("nesterov", True)),
            betas=(float(betas[0]), float(betas[1])),
            schedule=str(schedule.name),
            warmup_epochs=int(schedule.get("warmup_epochs", 0) or 0),
            plateau_factor=float(schedule.get("factor", 0.5)),
            plateau_patience=int(schedule.get("patience", 1)),
            min_lr=float(schedule.get("min_lr", 1e-7)),
            pct_start=float(schedule.get("pct_start", 0.3)),
            phase1_epochs=int(finetune.phase1_epochs),
            phase2_epochs=int(finetune.phase2_epochs),
            monitor=str(cfg.early_stop.get("monitor") or "val_loss"),
        )


@dataclass(frozen=True)
class LossSettings:
    label_smoothing: float = 0.0
    mixup: float = 0.0
    cutmix: float = 0.0

    @classmethod
    def from_cfg(cls, cfg: Any) -> LossSettings:
        reg = cfg.regularization
        return cls(
            label_smoothing=float(reg.get("label_smoothing", 0.0) or 0.0),
            mixup=float(reg.get("mixup", 0.0) or 0.0),
            cutmix=float(reg.get("cutmix", 0.0) or 0.0),
        )


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
        kwargs["pretrained_cfg_overlay"] = {"file": str(pretrained_path)}
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


class FineTuneClassifier(pl.LightningModule):
    def __init__(
        self,
        model_name: str,
        num_classes: int,
        class_names: list[str],
        optim: dict[str, Any],
        loss: dict[str, Any],
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        channels_last: bool = False,
        pretrained: bool = False,
        pretrained_path: str | None = None,
    ) -> None:
        super().__init__()
        # Weights come from the checkpoint when reloading: never download them again.
        self.save_hyperparameters(ignore=["pretrained", "pretrained_path"])
        self.model = create_backbone(
            model_name, num_classes, pretrained, pretrained_path, drop_rate, drop_path_rate
        )
        self.optim = OptimSettings(**{**optim, "betas": tuple(optim.get("betas", (0.9, 0.999)))})
        self.loss_settings = LossSettings(**loss)
        self.channels_last = channels_last
        self.phase = 1 if self.optim.phase1_epochs > 0 else 2
        self.mixup = self._make_mixup(num_classes)
        self.register_buffer("_one", torch.ones(()), persistent=False)
        self._train_totals = torch.zeros(2)
        self._val_totals = torch.zeros(3)
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)

    @classmethod
    def from_settings(
        cls, cfg: Any, num_classes: int, class_names: list[str], channels_last: bool
    ) -> FineTuneClassifier:
        reg = cfg.regularization
        return cls(
            model_name=str(cfg.model.name),
            num_classes=num_classes,
            class_names=list(class_names),
            optim=asdict(OptimSettings.from_cfg(cfg)),
            loss=asdict(LossSettings.from_cfg(cfg)),
            drop_rate=float(reg.get("drop_rate", 0.0) or 0.0),
            drop_path_rate=float(reg.get("drop_path_rate", 0.0) or 0.0),
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
                self(images), targets, label_smoothing=self.loss_settings.label_smoothing
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
        settings = self.optim
        groups = [{"params": self.head_parameters(), "lr": settings.lr_head, "name": "head"}]
        if self.phase == 2:
            groups.insert(
                0,
                {
                    "params": self.backbone_parameters(),
                    "lr": settings.lr_backbone,
                    "name": "backbone",
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
        return self.optim.phase1_epochs

    def _make_optimizer(self, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        s = self.optim
        if s.optimizer == "sgd":
            return torch.optim.SGD(
                groups,
                lr=s.lr_head,
                momentum=s.momentum,
                nesterov=s.nesterov,
                weight_decay=s.weight_decay,
            )
        return torch.optim.AdamW(groups, lr=s.lr_head, betas=s.betas, weight_decay=s.weight_decay)

    def _make_scheduler(self, optimizer: torch.optim.Optimizer) -> dict[str, Any] | None:
        s = self.optim
        if s.schedule == "plateau":
            plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
                optimizer,
                mode="min",
                factor=s.plateau_factor,
                patience=s.plateau_patience,
                min_lr=s.min_lr,
            )
            return {"scheduler": plateau, "monitor": s.monitor, "interval": "epoch"}
        if s.schedule == "cosine":
            from timm.scheduler import CosineLRScheduler

            cosine = CosineLRScheduler(
                optimizer,
                t_initial=max(1, s.phase2_epochs - s.warmup_epochs),
                lr_min=s.min_lr,
                warmup_t=s.warmup_epochs,
                warmup_lr_init=s.min_lr,
                warmup_prefix=True,
            )
            return {"scheduler": cosine, "interval": "epoch"}
        if s.schedule == "onecycle":
            steps = self._steps_per_epoch() * max(1, s.phase2_epochs) + 1
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
        s = self.loss_settings
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
