"""Continuing a run's folds from where another run's folds ended, instead of from scratch.

`checkpoint.continue_from=RUN_DIR` starts each fold from the full training state that run saved
when the fold's fit ended (`checkpoints/fold<k>-end.ckpt`: weights, optimizer, LR scheduler,
early-stopping wait, the epoch rows so far) and trains on to this run's epochs. That equals
training from scratch with this run's settings when the two runs differ only in what happens
after the base ended:

- more phase-2 epochs (`finetune.phase2_epochs` raised);
- more early-stopping patience, or early stopping off;
- which checkpoint scores the folds (`checkpoint.select`).

The schedule must not depend on the number of epochs (`plateau`, `constant`): a cosine or
one-cycle schedule stretched over more epochs would have taken other steps from the start.
Anything else that differs (a learning rate, the data, the model, the folds) blocks it.

The rule is pure Python on flattened configs, so the loop applies the same one when it decides
which proposals continue their base trial; preparing the resume file needs torch.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evolver.errors import ConfigError
from evolver.records import (
    CHECKPOINT_DIR,
    CHECKPOINT_SUFFIX,
    CONFIG_FILE,
    SUMMARY_FILE,
    checkpoint_name,
)

log = logging.getLogger(__name__)

# The checkpoint kind FitEndState writes: the fold's full state when its fit ended.
END_STATE = "end"
CONTINUABLE_SCHEDULES = ("plateau", "constant")
# Keys that say nothing about how a fold trains (where records go, how a run is tracked, what
# predict applies), so they may differ between a base run and its continuation.
FREE_PREFIXES = (
    "loop.",
    "search.",
    "tracking.",
    "diagnosis.",
    "predict.",
    "hydra.",
    "runs_dir",
    "objective",
    "checkpoint.",
    "trainer.enable_progress_bar",
    "trainer.progress",
    "data.num_workers",
    "data.root",
    "data.csv",
)


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """A nested mapping as {dotted.key: leaf value}."""
    flat: dict[str, Any] = {}
    if isinstance(node, Mapping):
        for key, value in node.items():
            flat.update(flatten(value, f"{prefix}{key}."))
        return flat
    if isinstance(node, list | tuple):
        return {prefix.rstrip("."): list(node)}
    return {prefix.rstrip("."): node}


def blockers(base: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Why a run configured `new` cannot continue a run configured `base` (flattened configs);
    empty when it can."""
    reasons = []
    schedule = base.get("schedule.name")
    if schedule not in CONTINUABLE_SCHEDULES:
        reasons.append(
            f"schedule {schedule} depends on the number of epochs (continuable: "
            f"{', '.join(CONTINUABLE_SCHEDULES)})"
        )
    for key in sorted(set(base) | set(new)):
        if key.startswith(FREE_PREFIXES):
            continue
        before, after = base.get(key), new.get(key)
        if before == after:
            continue
        if key == "finetune.phase2_epochs" and _int(after) >= _int(before):
            continue
        if key == "early_stop.patience" and _int(after) >= _int(before):
            continue
        if key == "early_stop.enabled" and before is True and after is False:
            continue
        if key.startswith("early_stop.") and new.get("early_stop.enabled") is False:
            continue  # early stopping is off: its other settings do not matter
        reasons.append(f"{key} differs ({before!r} -> {after!r})")
    return reasons


def _int(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return -1


@dataclass(frozen=True)
class Continuation:
    """The base run a run continues, checked against the run's own config."""

    base: Path

    @classmethod
    def from_cfg(cls, cfg: Any) -> Continuation | None:
        """The run's continuation (None without `checkpoint.continue_from`); a base that is
        missing, has no end states, or differs in more than the continuable settings is a
        ConfigError naming `checkpoint.continue_from`."""
        from omegaconf import OmegaConf

        checkpoint = cfg.get("checkpoint") or {}
        value = checkpoint.get("continue_from")
        if value in (None, ""):
            return None
        field = "checkpoint.continue_from"
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
        return cls(base)

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
        target = folder / f"{checkpoint_name(fold, 'resume')}{CHECKPOINT_SUFFIX}"
        torch.save(state, target)
        # Saved when the fit ended: the trainer's epoch counter is the number of epochs done.
        return target, int(state.get("epoch", 0))


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
