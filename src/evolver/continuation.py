"""Continuing a run's folds from where another run's folds ended, instead of from scratch.

`checkpoint.continue_from=RUN_DIR` starts each fold from the full training state that run saved
when the fold's fit ended (`checkpoints/fold<k>-end.ckpt`: weights, optimizer, LR scheduler,
early-stopping wait, the epoch rows so far) and trains on to this run's epochs. That equals
training from scratch with this run's settings when the two runs differ only in what happens
after the base ended:

- more phase-2 epochs (`finetune.phase2_epochs` raised);
- more early-stopping patience, or early stopping off;
- which checkpoint scores the folds (`checkpoint.select`).

`checkpoint.continue_lr_scale=S` continues at a lower (or higher) learning rate instead: every
parameter group's rate, and the schedule's base rates, are multiplied by S where the base
ended, and the early-stopping wait starts again from zero (the best score is kept). That is
no longer what a run from scratch would do; it is a new run made of the base's epochs followed
by more at the new rates, and its `summary.json` says so (`continued_from.lr_scale`).

The schedule must not depend on the number of epochs (`plateau`, `constant`): a cosine or
one-cycle schedule stretched over more epochs would have taken other steps from the start.
Anything else that differs (a learning rate, the data, the model, the folds) blocks it.

The rule (`evolver.continuable`) is pure Python on flattened configs, so the loop applies the
same one when it decides which proposals continue their base trial; preparing the resume
file needs torch.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evolver.continuable import (
    CONTINUE_FROM_KEY,
    LR_SCALE_KEY,
    UNCHANGED_LR,
    blockers,
    flatten,
)
from evolver.errors import ConfigError
from evolver.records import (
    CHECKPOINT_DIR,
    CHECKPOINT_SUFFIX,
    CONFIG_FILE,
    SUMMARY_FILE,
    checkpoint_name,
)
from evolver.validation import positive

log = logging.getLogger(__name__)

# The checkpoint kind FitEndState writes: the fold's full state when its fit ended.
END_STATE = "end"


@dataclass(frozen=True)
class Continuation:
    """The base run a run continues, checked against the run's own config."""

    base: Path
    lr_scale: float = UNCHANGED_LR

    @classmethod
    def from_cfg(cls, cfg: Any) -> Continuation | None:
        """The run's continuation (None without `checkpoint.continue_from`); a base that is
        missing, has no end states, or differs in more than the continuable settings is a
        ConfigError naming `checkpoint.continue_from`."""
        from omegaconf import OmegaConf

        checkpoint = cfg.get("checkpoint") or {}
        value = checkpoint.get("continue_from")
        lr_scale = positive(LR_SCALE_KEY, checkpoint.get("continue_lr_scale", UNCHANGED_LR))
        if value in (None, ""):
            if lr_scale != UNCHANGED_LR:
                raise ConfigError(
                    LR_SCALE_KEY,
                    f"scales the rates of a continued run: set {CONTINUE_FROM_KEY}",
                )
            return None
        field = CONTINUE_FROM_KEY
        base = Path(str(value)).expanduser()
        config_path = base / CONFIG_FILE
        if not config_path.is_file():
            raise ConfigError(field, f"{base} is not a run directory (no {CONFIG_FILE})")
        if not fold_end_states(base):
            raise ConfigError(
                field,
                f"{base} kept no fold end states ({checkpoint_name('<k>', END_STATE)}"
                f"{CHECKPOINT_SUFFIX}); it ran before continuation existed, or with "
                "checkpoint.keep_end_state=false",
            )
        base_cfg = flatten(OmegaConf.to_container(OmegaConf.load(config_path), resolve=False))
        new_cfg = flatten(OmegaConf.to_container(cfg, resolve=True))
        reasons = blockers(base_cfg, new_cfg)
        if reasons:
            raise ConfigError(field, f"cannot continue {base}: {'; '.join(reasons)}")
        return cls(base, lr_scale)

    def end_state(self, fold: int) -> Path | None:
        path = end_state_path(self.base / CHECKPOINT_DIR, fold)
        return path if path.is_file() else None

    def base_fold_seconds(self) -> dict[int, float]:
        """Seconds the base run (and whatever it continued) spent on each fold."""
        import json

        path = self.base / SUMMARY_FILE
        try:
            folds = json.loads(path.read_text()).get("folds") or []
        except (OSError, ValueError):
            return {}
        seconds = {}
        for fold in folds:
            spent = (fold.get("seconds") or 0.0) + (fold.get("seconds_saved") or 0.0)
            seconds[int(fold["fold"])] = float(spent)
        return seconds

    def prepare(self, fold: int, folder: Path) -> tuple[Path, int] | None:
        """A resume checkpoint for `fold` in this run's checkpoint `folder`, and the epoch the
        base fold ended at; None when the base kept no end state for the fold.

        The base's best and last checkpoints are copied in, and the checkpoint callbacks' state
        is pointed at the copies, so the best checkpoint stays the best over all epochs (the
        base's included) and `checkpoint.select` reads this run's folder only."""
        import torch

        source = self.end_state(fold)
        if source is None:
            return None
        folder.mkdir(parents=True, exist_ok=True)
        state = torch.load(source, map_location="cpu", weights_only=True)
        renamed: dict[str, str] = {}
        for kind in ("best", "last"):
            name = f"{checkpoint_name(fold, kind)}{CHECKPOINT_SUFFIX}"
            if (self.base / CHECKPOINT_DIR / name).is_file():
                shutil.copy2(self.base / CHECKPOINT_DIR / name, folder / name)
            renamed[str(self.base.resolve() / CHECKPOINT_DIR / name)] = str(folder / name)
        for key, callback_state in (state.get("callbacks") or {}).items():
            if key.startswith("ModelCheckpoint"):
                _repoint(callback_state, folder, renamed)
        if self.lr_scale != UNCHANGED_LR:
            scale_learning_rates(state, self.lr_scale)
        target = folder / f"{checkpoint_name(fold, 'resume')}{CHECKPOINT_SUFFIX}"
        torch.save(state, target)
        # Saved when the fit ended: the trainer's epoch counter is the number of epochs done.
        return target, int(state.get("epoch", 0))


def scale_learning_rates(state: dict[str, Any], factor: float) -> None:
    """A fit-end checkpoint's rates multiplied by `factor`, as if the run had been configured
    with them where the base ended: each optimizer group's `lr` (and `initial_lr`), each
    scheduler's base and last rates; a plateau schedule's and early stopping's wait start
    again, with their best scores kept."""
    for optimizer in state.get("optimizer_states") or []:
        for group in optimizer.get("param_groups") or []:
            for key in ("lr", "initial_lr"):
                if isinstance(group.get(key), int | float):
                    group[key] = group[key] * factor
    for scheduler in state.get("lr_schedulers") or []:
        for key in ("base_lrs", "_last_lr"):
            if isinstance(scheduler.get(key), list):
                scheduler[key] = [rate * factor for rate in scheduler[key]]
        for key in ("num_bad_epochs", "cooldown_counter"):
            if key in scheduler:
                scheduler[key] = 0
    for key, callback_state in (state.get("callbacks") or {}).items():
        if "EarlyStopping" in key and "wait_count" in callback_state:
            callback_state["wait_count"] = 0


def _repoint(state: dict[str, Any], folder: Path, renamed: Mapping[str, str]) -> None:
    """A ModelCheckpoint's state with its folder and file paths moved to this run's copies."""

    def moved(path: Any) -> Any:
        if not path:
            return path
        resolved = str(Path(path).resolve())
        return renamed.get(resolved, str(folder / Path(path).name))

    folder = folder.resolve()  # ModelCheckpoint keeps its dirpath resolved, and compares it
    state["dirpath"] = str(folder)
    for key in ("best_model_path", "kth_best_model_path", "last_model_path"):
        if key in state:
            state[key] = moved(state[key])
    if isinstance(state.get("best_k_models"), dict):
        state["best_k_models"] = {moved(k): v for k, v in state["best_k_models"].items()}


def end_state_path(folder: Path, fold: int) -> Path:
    """Where fold `fold`'s end state lives in a run's checkpoint `folder`."""
    return folder / f"{checkpoint_name(fold, END_STATE)}{CHECKPOINT_SUFFIX}"


def fold_end_states(run_dir: Path) -> list[Path]:
    return sorted(
        (run_dir / CHECKPOINT_DIR).glob(checkpoint_name("*", END_STATE) + CHECKPOINT_SUFFIX)
    )
