"""Where MLflow keeps runs and artifacts, and whether that place can be reached.

Nothing here imports MLflow at module load: `evolver report`/`status` import this cheaply.
"""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from evolver.database_url import normalize_database_url, redact
from evolver.errors import ConfigError
from evolver.secrets import http_address, redact_text, strip_password
from evolver.storage_url import runs_dir_of
from evolver.validation import integer_between, is_number, one_of, setting

DATABASE_SCHEMES = ("postgresql", "mysql", "mssql", "sqlite")
ON_ERROR_POLICIES = ("buffer", "fail")


def default_tracking_uri(runs_dir: Path) -> str:
    return f"sqlite:///{runs_dir / 'mlflow.db'}"


def default_artifact_root(runs_dir: Path) -> Path:
    return runs_dir / "mlartifacts"


def scheme_of(uri: str) -> str:
    return urlsplit(uri).scheme.split("+", 1)[0].lower()


def is_http(uri: str) -> bool:
    return scheme_of(uri) in {"http", "https"}


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "experiment"


@dataclass(frozen=True)
class TrackingSettings:
    """The resolved `tracking` config group."""

    enabled: bool
    uri: str
    artifact_root: str | None
    experiment: str
    parent_run_id: str | None = None
    run_name: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    log_checkpoints: bool = False
    preflight_timeout_s: float = 5.0
    # Bounds of every MLflow call, and what a failed call does (see conf/tracking/default.yaml).
    timeout_s: float = 10.0
    retries: int = 2
    retry_interval_s: float = 30.0
    on_error: str = "buffer"
    # Epoch values are sent at most this often while a fold trains (0: every epoch).
    live_interval_s: float = 2.0

    @classmethod
    def from_cfg(cls, cfg: Any) -> TrackingSettings:
        node = setting(cfg, "tracking")
        runs_dir = runs_dir_of(cfg)
        uri = normalize_database_url(str(setting(node, "uri") or default_tracking_uri(runs_dir)))
        artifact_location = setting(node, "artifact_location")
        if artifact_location:
            artifact_root: str | None = _as_uri(str(artifact_location))
        elif is_http(str(uri)):
            artifact_root = None  # the server decides (usually its proxied artifact store)
        else:
            artifact_root = default_artifact_root(runs_dir).as_uri()
        tags = setting(node, "tags") or {}
        if not isinstance(tags, dict):
            from omegaconf import OmegaConf

            tags = OmegaConf.to_container(tags, resolve=True)
        return cls(
            enabled=bool(setting(node, "enabled", True)),
            uri=str(uri),
            artifact_root=artifact_root,
            experiment=str(setting(node, "experiment") or "evolver"),
            parent_run_id=_optional_str(setting(node, "parent_run_id")),
            run_name=_optional_str(setting(node, "run_name")),
            tags=flatten_tags(tags),
            log_checkpoints=bool(setting(node, "log_checkpoints", False)),
            preflight_timeout_s=float(setting(node, "preflight_timeout_s", 5.0) or 5.0),
            timeout_s=_seconds(node, "timeout_s", 10.0),
            # MLflow refuses more than 10 retries of one HTTP request.
            retries=integer_between("tracking.retries", setting(node, "retries", 2), 0, 10),
            retry_interval_s=_seconds(node, "retry_interval_s", 30.0),
            on_error=one_of(
                "tracking.on_error", setting(node, "on_error", "buffer"), ON_ERROR_POLICIES
            ),
            live_interval_s=_seconds(node, "live_interval_s", 2.0, zero_allowed=True),
        )


def _seconds(node: Any, key: str, default: float, zero_allowed: bool = False) -> float:
    value = setting(node, key, default)
    if not (is_number(value) and (value > 0 or (zero_allowed and value == 0))):
        bound = ">= 0" if zero_allowed else "> 0"
        raise ConfigError(f"tracking.{key}", f"must be a number of seconds {bound}, got {value!r}")
    return float(value)


def _optional_str(value: Any) -> str | None:
    return None if value is None or value == "" else str(value)


def _as_uri(location: str) -> str:
    if "://" in location or location.startswith("file:"):
        return location
    return Path(location).expanduser().resolve().as_uri()


def flatten_tags(tags: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """`{"optuna": {"study": "x"}}` -> `{"optuna.study": "x"}`; values become strings."""
    flat: dict[str, str] = {}
    for key, value in tags.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_tags(value, f"{name}."))
        elif value is not None:
            flat[name] = value if isinstance(value, str) else json.dumps(value)
    return flat


def check_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """Raise ConfigError naming `tracking.uri` when the store cannot be used."""
    scheme = scheme_of(uri)
    if scheme in {"http", "https"}:
        _check_http(uri, timeout_s)
    elif scheme == "sqlite":
        _check_sqlite(uri)
    elif scheme in DATABASE_SCHEMES:
        _check_database(uri, timeout_s)
    elif scheme in {"", "file"}:
        raise ConfigError(
            "tracking.uri",
            f"{redact(uri)!r}: the file store is not supported; use a sqlite:/// path, a database "
            "URL or an http:// tracking server",
        )
    else:
        raise ConfigError("tracking.uri", f"unsupported scheme {scheme!r} in {redact(uri)!r}")


def _check_http(uri: str, timeout_s: float) -> None:
    # Credentials travel as a header, never in the URL that messages show.
    address, headers = http_address(uri)
    shown = redact(uri)
    health = urllib.request.Request(address.rstrip("/") + "/health", headers=headers)
    try:
        with urllib.request.urlopen(health, timeout=timeout_s) as response:
            if response.status >= 400:
                raise ConfigError(
                    "tracking.uri", f"MLflow server at {shown} answered HTTP {response.status}"
                )
    except urllib.error.HTTPError as error:
        raise ConfigError(
            "tracking.uri", f"MLflow server at {shown} answered HTTP {error.code}"
        ) from None
    except (urllib.error.URLError, OSError, ValueError) as error:  # ValueError: a malformed URL
        reason = redact_text(str(getattr(error, "reason", error)))
        raise ConfigError(
            "tracking.uri", f"cannot reach MLflow tracking server at {shown} ({reason})"
        ) from None


def _check_sqlite(uri: str) -> None:
    path = uri.split(":///", 1)[-1] if ":///" in uri else ""
    if not path or path == ":memory:":
        return
    folder = Path(path).parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError("tracking.uri", f"cannot create {folder} ({error.strerror})") from None


def _check_database(uri: str, timeout_s: float) -> None:
    import sqlalchemy

    uri = strip_password(normalize_database_url(uri))  # it goes back as the connection opens
    connect_args = {"connect_timeout": int(max(timeout_s, 1))} if uri.startswith("postgres") else {}
    try:
        engine = sqlalchemy.create_engine(uri, connect_args=connect_args)
    except Exception as error:  # unknown dialect or missing driver
        raise ConfigError("tracking.uri", f"cannot use {redact(uri)} ({error})") from None
    try:
        with engine.connect():
            pass
    except Exception as error:  # any driver error means "not usable"
        first_line = str(getattr(error, "orig", error)).strip().splitlines()[0:1]
        reason = first_line[0] if first_line else type(error).__name__
        raise ConfigError(
            "tracking.uri", f"cannot connect to database {redact(uri)} ({reason})"
        ) from None
    finally:
        engine.dispose()
