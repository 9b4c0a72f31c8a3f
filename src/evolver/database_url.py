"""Database URLs as users write them, made to work with the driver that is installed."""

from __future__ import annotations

import importlib.util
from urllib.parse import urlsplit, urlunsplit


def normalize_database_url(url: str) -> str:
    """`postgresql://` names SQLAlchemy's default driver (psycopg 3); use psycopg2 when that is
    the one installed, so plain PostgreSQL URLs work for Optuna storages and MLflow stores alike."""
    if not url.startswith(("postgresql://", "postgres://")):
        return url
    if importlib.util.find_spec("psycopg") is None and importlib.util.find_spec("psycopg2"):
        return "postgresql+psycopg2://" + url.split("://", 1)[1]
    return url


def redact(url: str) -> str:
    """The URL without its password, for messages, hints and tags."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))
