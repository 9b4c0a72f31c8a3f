"""Loading a run directory: `history.csv` (required), `summary.json` and `config.yaml` (optional).

A history alone is enough: users with logs from elsewhere can write one by hand. The summary and
the config add what a history cannot tell (max epochs, patience, stop reasons, learning rates,
schedule); whatever neither provides stays unknown (None) rather than guessed.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from evolver.errors import DataError
from evolver.records import CONFIG_FILE, HISTORY_COLUMNS, HISTORY_FILE, SUMMARY_FILE

# Columns a hand-written history must have; the others are filled with NaN when absent.
REQUIRED_HISTORY_COLUMNS = ("fold", "epoch", "val_loss")


@dataclass(frozen=True)
class RunSettings:
    """What the run was configured to do. Every field is None when the records do not say."""

    max_phase1_epochs: int | None = None
    max_phase2_epochs: int | None = None
    early_stop_enabled: bool | None = None
    patience: int | None = None
    min_delta: float | None = None
    monitor: str | None = None
    checkpoint: str | None = None
    lr_backbone: float | None = None
    lr_head: float | None = None
    batch_size: int | None = None
    schedule: str | None = None
    warmup_epochs: int | None = None
    n_folds: int | None = None
    model: str | None = None
    optimizer: str | None = None
    label_smoothing: float | None = None
    mixup: float | None = None
    cutmix: float | None = None
    random_erasing: float | None = None
    drop_path_rate: float | None = None
    objective_name: str | None = None
    num_classes: int | None = None

    @property
    def max_epochs(self) -> int | None:
        if self.max_phase1_epochs is None or self.max_phase2_epochs is None:
            return None
        return self.max_phase1_epochs + self.max_phase2_epochs

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}

    @classmethod
    def from_records(
        cls, summary: Mapping[str, Any] | None, config: Mapping[str, Any] | None
    ) -> RunSettings:
        """Settings from summary.json's `settings` first, then the resolved config."""
        summary = summary or {}
        saved = summary.get("settings") or {}
        config = config or {}

        def value(name: str) -> Any:
            """summary.json's `settings` value (same name as the field), else the config's."""
            if saved.get(name) is not None:
                return saved[name]
            group, key = CONFIG_PATHS[name]
            node = config.get(group)
            return node.get(key) if isinstance(node, Mapping) else None

        early_stop = config.get("early_stop")
        enabled = early_stop.get("enabled") if isinstance(early_stop, Mapping) else None
        if "patience" in saved:
            # The summary records patience as null exactly when early stopping was off.
            enabled = saved["patience"] is not None
        values = {name: _typed(name, value(name)) for name in CONFIG_PATHS}
        if enabled is False:
            values["patience"] = None
        return cls(
            **values,
            early_stop_enabled=enabled,
            objective_name=summary.get("objective_name") or config.get("objective"),
            num_classes=_int(saved.get("num_classes")),
        )


# Where each RunSettings value sits in the resolved config (config.yaml), for the values that
# summary.json's `settings` (keys named as the fields) lacks or that only the config holds.
CONFIG_PATHS: dict[str, tuple[str, str]] = {
    "max_phase1_epochs": ("finetune", "phase1_epochs"),
    "max_phase2_epochs": ("finetune", "phase2_epochs"),
    "patience": ("early_stop", "patience"),
    "min_delta": ("early_stop", "min_delta"),
    "monitor": ("early_stop", "monitor"),
    "checkpoint": ("checkpoint", "select"),
    "lr_backbone": ("finetune", "lr_backbone"),
    "lr_head": ("finetune", "lr_head"),
    "batch_size": ("data", "batch_size"),
    "schedule": ("schedule", "name"),
    "warmup_epochs": ("schedule", "warmup_epochs"),
    "n_folds": ("cv", "folds"),
    "model": ("model", "name"),
    "optimizer": ("optim", "name"),
    "label_smoothing": ("regularization", "label_smoothing"),
    "mixup": ("regularization", "mixup"),
    "cutmix": ("regularization", "cutmix"),
    "random_erasing": ("regularization", "random_erasing"),
    "drop_path_rate": ("regularization", "drop_path_rate"),
}

INT_SETTINGS = frozenset(
    {"max_phase1_epochs", "max_phase2_epochs", "patience", "batch_size", "warmup_epochs", "n_folds"}
)
FLOAT_SETTINGS = frozenset(
    {"min_delta", "lr_backbone", "lr_head", "label_smoothing", "mixup", "cutmix"}
    | {"random_erasing", "drop_path_rate"}
)


@dataclass(frozen=True)
class SavedFold:
    """One fold as summary.json records it (the trainer's view, including why it stopped)."""

    fold: int
    best_val_loss: float | None = None
    best_epoch: int | None = None
    final_val_loss: float | None = None
    epochs_trained: int | None = None
    phase1_epochs: int | None = None
    phase2_epochs: int | None = None
    early_stopped: bool | None = None
    stop_reason: str | None = None
    nonfinite: bool | None = None

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], source: str) -> SavedFold:
        if "fold" not in values:
            raise DataError(f"{source}: a fold entry has no 'fold' number")
        return cls(
            fold=int(values["fold"]),
            best_val_loss=_float(values.get("best_val_loss")),
            best_epoch=_int(values.get("best_epoch")),
            final_val_loss=_float(values.get("final_val_loss")),
            epochs_trained=_int(values.get("epochs_trained")),
            phase1_epochs=_int(values.get("phase1_epochs")),
            phase2_epochs=_int(values.get("phase2_epochs")),
            early_stopped=values.get("early_stopped"),
            stop_reason=values.get("stop_reason"),
            nonfinite=values.get("nonfinite"),
        )


@dataclass
class RunRecords:
    """Everything the diagnosis reads about one run.

    `history` has the columns of `HISTORY_COLUMNS` (possibly no rows when only a summary exists);
    `saved_folds` maps fold number to the summary's fold entry; `summary` and `config` are the raw
    mappings (empty when the files are absent).
    """

    history: pd.DataFrame
    settings: RunSettings = field(default_factory=RunSettings)
    saved_folds: dict[int, SavedFold] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    run_dir: Path | None = None

    @property
    def folds(self) -> list[int]:
        in_history = set(self.history["fold"].astype(int)) if len(self.history) else set()
        return sorted(in_history | set(self.saved_folds))

    @property
    def status(self) -> str | None:
        return self.summary.get("status")

    @property
    def objective(self) -> float | None:
        return _float(self.summary.get("objective"))

    @classmethod
    def from_parts(
        cls,
        history: pd.DataFrame | None = None,
        summary: Mapping[str, Any] | None = None,
        config: Mapping[str, Any] | None = None,
        run_dir: Path | None = None,
    ) -> RunRecords:
        """Records from in-memory parts (what `load_run` does after reading the files)."""
        source = str(run_dir / SUMMARY_FILE) if run_dir else SUMMARY_FILE
        summary = dict(summary or {})
        config = dict(config or {})
        saved = [SavedFold.from_dict(entry, source) for entry in summary.get("folds") or []]
        frame = normalize_history(history, str(run_dir / HISTORY_FILE) if run_dir else "history")
        if frame.empty and not saved:
            raise DataError(f"{run_dir or 'run'}: no history rows and no folds in a summary")
        return cls(
            history=frame,
            settings=RunSettings.from_records(summary, config),
            saved_folds={entry.fold: entry for entry in saved},
            summary=summary,
            config=config,
            run_dir=run_dir,
        )


def load_run(run_dir: str | Path) -> RunRecords:
    """Read a run directory. Raises DataError naming the path when it cannot be diagnosed."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise DataError(f"{run_dir}: not a run directory")
    history_path, summary_path = run_dir / HISTORY_FILE, run_dir / SUMMARY_FILE
    if not history_path.is_file() and not summary_path.is_file():
        raise DataError(f"{run_dir}: has neither {HISTORY_FILE} nor {SUMMARY_FILE}")
    history = read_history(history_path) if history_path.is_file() else None
    summary = _read_json(summary_path) if summary_path.is_file() else None
    config = _read_yaml(run_dir / CONFIG_FILE) if (run_dir / CONFIG_FILE).is_file() else None
    return RunRecords.from_parts(history, summary, config, run_dir=run_dir)


def read_history(path: Path) -> pd.DataFrame:
    try:
        frame = pd.read_csv(path)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: cannot read history ({error.__class__.__name__})") from error
    return normalize_history(frame, str(path))


def normalize_history(frame: pd.DataFrame | None, source: str) -> pd.DataFrame:
    """Validate a history and bring it to the standard columns, sorted by fold and epoch.

    A history without a `phase` column counts every epoch as phase 2 (no frozen-backbone phase).
    """
    if frame is None:
        return pd.DataFrame({name: pd.Series(dtype=float) for name in HISTORY_COLUMNS})
    frame = frame.rename(columns=lambda name: str(name).strip())
    missing = [name for name in REQUIRED_HISTORY_COLUMNS if name not in frame.columns]
    if missing:
        raise DataError(f"{source}: missing column {missing[0]!r}")
    frame = frame.copy()
    for name in HISTORY_COLUMNS:
        if name not in frame.columns:
            frame[name] = 2 if name == "phase" else math.nan
        try:
            frame[name] = pd.to_numeric(frame[name])
        except (ValueError, TypeError) as error:
            raise DataError(f"{source}: column {name!r} is not numeric") from error
    for name in ("fold", "epoch", "phase"):
        if frame[name].isna().any():
            raise DataError(f"{source}: column {name!r} has empty values")
        frame[name] = frame[name].astype(int)
    if (frame["epoch"] < 1).any() or (frame["fold"] < 1).any():
        raise DataError(f"{source}: folds and epochs count from 1")
    if not frame["phase"].isin([1, 2]).all():
        raise DataError(f"{source}: column 'phase' must hold 1 or 2")
    if frame.duplicated(["fold", "epoch"]).any():
        raise DataError(f"{source}: a fold has the same epoch twice")
    frame = frame.sort_values(["fold", "epoch"], kind="stable").reset_index(drop=True)
    return frame[list(HISTORY_COLUMNS)]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise DataError(f"{path}: cannot read JSON ({error.__class__.__name__})") from error
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object")
    return data


def _read_yaml(path: Path) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as error:
        raise DataError(f"{path}: cannot read YAML ({error.__class__.__name__})") from error
    return data if isinstance(data, dict) else {}


def _float(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _typed(name: str, value: Any) -> Any:
    if name in INT_SETTINGS:
        return _int(value)
    return _float(value) if name in FLOAT_SETTINGS else value


def _int(value: Any) -> int | None:
    number = _float(value)
    return None if number is None or not math.isfinite(number) else int(number)
