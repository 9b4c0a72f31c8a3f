"""The runs folder of a config, and the loop's Optuna storage in it unless `loop.storage` names
another: one answer for the loop, its jobs, `evolver status`, `evolver ui` and MLflow tracking."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from evolver.database_url import normalize_database_url
from evolver.validation import setting

DEFAULT_RUNS_DIR = "runs"
OPTUNA_DB_FILE = "optuna.db"


def runs_dir_of(cfg: Any) -> Path:
    """`runs_dir` of a config (dict or OmegaConf), absolute."""
    return Path(str(setting(cfg, "runs_dir") or DEFAULT_RUNS_DIR)).expanduser().resolve()


def default_storage_path(runs_dir: str | Path) -> Path:
    return Path(runs_dir).expanduser().resolve() / OPTUNA_DB_FILE


def default_storage_url(runs_dir: str | Path) -> str:
    """`sqlite:///<runs_dir>/optuna.db`, the path absolute."""
    return f"sqlite:///{default_storage_path(runs_dir)}"


def optuna_storage_url(cfg: Any) -> str:
    """`loop.storage`, else the SQLite file under `runs_dir`; normalized for the installed driver
    (jobs and optuna-dashboard get this URL as it is)."""
    storage = setting(setting(cfg, "loop"), "storage")
    url = str(storage) if storage else default_storage_url(runs_dir_of(cfg))
    return normalize_database_url(url)
