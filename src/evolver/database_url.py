"""Database URLs as users write them, made to work with the driver that is installed."""

from __future__ import annotations

import importlib.util

from evolver.secrets import redact

__all__ = ["normalize_database_url", "redact"]


def normalize_database_url(url: str) -> str:
    """`postgresql://` names SQLAlchemy's default driver (psycopg 3); use psycopg2 when that is
    the one installed, so plain PostgreSQL URLs work for Optuna storages and MLflow stores alike."""
    if not url.startswith(("postgresql://", "postgres://")):
        return url
    if importlib.util.find_spec("psycopg") is None and importlib.util.find_spec("psycopg2"):
        return "postgresql+psycopg2://" + url.split("://", 1)[1]
    return url
