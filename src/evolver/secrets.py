"""Credentials written in URLs (database passwords, http basic auth) never leave the process.

`evolver train` and `evolver loop` take the passwords out of the URLs in their arguments and
config before Hydra sees them: what Hydra logs and saves, each `config.yaml`, MLflow params and
tags, reports and errors then hold the URL without its password. The passwords stay in the process
and in one environment variable that job processes inherit (`PASSWORDS_ENV`), and go back only
where a connection opens: a SQLAlchemy hook gives each database connection the password of its
host, port and user, and MLflow's http client reads `MLFLOW_TRACKING_USERNAME`/`PASSWORD`.
Log records and the output streams are redacted as a second line of defence.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import json
import logging
import os
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit, urlunsplit

from evolver.environment import restored_environment

# Database passwords taken out of URLs: JSON {"<host>:<port>/<user>": password}.
PASSWORDS_ENV = "EVOLVER_URL_PASSWORDS"
MLFLOW_USERNAME_ENV = "MLFLOW_TRACKING_USERNAME"
MLFLOW_PASSWORD_ENV = "MLFLOW_TRACKING_PASSWORD"
# Credentials users give in the environment: redacted from output too.
ENV_SECRETS = ("PGPASSWORD", MLFLOW_PASSWORD_ENV)
MASK = "***"
# Shorter values would mask ordinary words in the output; such passwords are not worth hiding.
MIN_MASKED_LENGTH = 4
HTTP_SCHEMES = ("http", "https")
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s'\"<>]+")
_QUERY_PASSWORD = re.compile(r"(?i)([?&]password=)[^&#\s'\"]*")


# -- redaction ------------------------------------------------------------------------------------
def redact(url: str) -> str:
    """The URL with its password masked, for messages, hints and tags."""
    url = _QUERY_PASSWORD.sub(rf"\g<1>{MASK}", url)
    parts = _split(url)
    if parts is None or parts.password is None:
        return url
    userinfo, _, host = parts.netloc.rpartition("@")
    user = userinfo.partition(":")[0]
    return urlunsplit(parts._replace(netloc=f"{user}:{MASK}@{host}"))


def redact_text(text: str) -> str:
    """`text` with every URL password and every known secret masked."""
    if "://" in text:
        text = _URL.sub(lambda match: redact(match.group(0)), text)
    for secret in known_secrets():
        if secret in text:
            text = text.replace(secret, MASK)
    return text


def known_secrets() -> tuple[str, ...]:
    """The passwords this process holds (taken from URLs or given in the environment)."""
    return _secrets_of(
        os.environ.get(PASSWORDS_ENV, ""), *(os.environ.get(name, "") for name in ENV_SECRETS)
    )


@functools.lru_cache(maxsize=8)
def _secrets_of(stored: str, *from_env: str) -> tuple[str, ...]:
    values = {*dict(_parse(stored)).values(), *from_env}
    # Both spellings: the one written in the URL and the decoded one a library may print.
    values |= {unquote(value) for value in values} | {quote(value, safe="") for value in values}
    # Longest first, so that a password containing another one is masked whole.
    return tuple(sorted((v for v in values if len(v) >= MIN_MASKED_LENGTH), key=len, reverse=True))


# -- taking passwords out -------------------------------------------------------------------------
def strip_password(url: str) -> str:
    """`url` without its credentials, which this process (and its jobs) keep for connections.

    Database URLs keep their user (the password is looked up by host, port and user, as libpq's
    ~/.pgpass does); http URLs lose user and password, which MLflow's client reads from
    MLFLOW_TRACKING_USERNAME/PASSWORD instead.
    """
    parts = _split(url)
    if parts is None:
        return url
    query = parse_qsl(parts.query, keep_blank_values=True)
    query_password = next((v for k, v in query if k.lower() == "password"), None)
    password = parts.password if parts.password is not None else query_password
    if password is None:
        return url
    userinfo, _, host = parts.netloc.rpartition("@")
    user = userinfo.partition(":")[0]
    if parts.scheme.lower() in HTTP_SCHEMES:
        os.environ[MLFLOW_USERNAME_ENV] = unquote(user)
        os.environ[MLFLOW_PASSWORD_ENV] = unquote(password)
        netloc = host
    else:
        _remember(server_key(parts.hostname, parts.port, unquote(user)), unquote(password))
        netloc = f"{user}@{host}" if user else host
    if query_password is not None:
        query_text = urlencode([(k, v) for k, v in query if k.lower() != "password"])
        parts = parts._replace(query=query_text)
    return urlunsplit(parts._replace(netloc=netloc))


def strip_passwords(text: str) -> str:
    """`text` (a Hydra override, a message) with the credentials of every URL in it taken out."""
    if "://" not in text:
        return text
    return _URL.sub(lambda match: strip_password(match.group(0)), text)


def sanitize_config(cfg: Any) -> dict[str, str]:
    """Take the credentials out of every URL in `cfg` (in place, the `hydra` node's overrides
    included); returns the changed values as {dotted key: URL without password}."""
    from omegaconf import DictConfig, read_write

    if not isinstance(cfg, DictConfig):
        return {}
    changed: dict[str, str] = {}
    with read_write(cfg):
        _sanitize_node(cfg, "", changed)
        hydra = cfg._get_node("hydra") if "hydra" in cfg else None
        if isinstance(hydra, DictConfig) and "overrides" in hydra:
            for node in hydra.overrides.values():
                for index, line in enumerate(node or []):
                    if isinstance(line, str) and strip_passwords(line) != line:
                        node[index] = strip_passwords(line)
    return changed


def _sanitize_node(node: Any, prefix: str, changed: dict[str, str]) -> None:
    from omegaconf import Container
    from omegaconf.errors import OmegaConfBaseException

    keys = list(node.keys()) if hasattr(node, "keys") else list(range(len(node)))
    for key in keys:
        if not prefix and key == "hydra":
            continue
        try:
            value = node[key]
        except OmegaConfBaseException:  # missing, or an interpolation not resolvable here
            continue
        path = f"{prefix}{key}"
        if isinstance(value, Container):
            _sanitize_node(value, f"{path}.", changed)
        elif isinstance(value, str) and "://" in value:
            clean = strip_passwords(value)
            if clean != value:
                node[key] = clean
                changed[path] = clean


def _split(url: str) -> Any:
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError:
        return None
    return parts if parts.scheme and parts.netloc else None


# -- keeping them ---------------------------------------------------------------------------------
def server_key(host: Any, port: Any, user: Any) -> str:
    return f"{str(host or '').lower()}:{port or ''}/{user or ''}"


def stored_passwords() -> dict[str, str]:
    return dict(_parse(os.environ.get(PASSWORDS_ENV, "")))


def password_for(host: Any, port: Any, user: Any) -> str | None:
    """The password taken from a URL for this server and user, if any."""
    stored = stored_passwords()
    found = stored.get(server_key(host, port, user))
    if found is None and user and (not host or str(host).startswith("/")):
        # A socket folder (`?host=/run/postgresql`) or no host: the user's only password.
        mine = [value for key, value in stored.items() if key.endswith(f"/{user}")]
        found = mine[0] if len(set(mine)) == 1 else None
    return found


def _remember(key: str, password: str) -> None:
    stored = stored_passwords()
    if stored.get(key) != password:
        stored[key] = password
        os.environ[PASSWORDS_ENV] = json.dumps(stored, sort_keys=True)
    install_connection_hook()


@functools.lru_cache(maxsize=8)
def _parse(stored: str) -> tuple[tuple[str, str], ...]:
    try:
        data = json.loads(stored) if stored else {}
    except ValueError:
        return ()
    return tuple((str(k), str(v)) for k, v in data.items()) if isinstance(data, dict) else ()


# -- putting them back where connections open -----------------------------------------------------
@functools.cache
def install_connection_hook() -> None:
    """Every SQLAlchemy connection of this process gets its stored password (if its URL has
    none): Optuna storages, MLflow stores and reachability checks alike."""
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    event.listen(Engine, "do_connect", _add_password)


def _add_password(dialect: Any, connection_record: Any, cargs: Any, cparams: dict) -> None:
    if cparams.get("password") or cparams.get("passwd"):
        return
    user = cparams.get("user") or cparams.get("username")
    password = password_for(cparams.get("host"), cparams.get("port"), user)
    if password is not None:
        cparams["password"] = password


def http_address(url: str) -> tuple[str, dict[str, str]]:
    """An http URL without credentials, and the basic-auth header of its credentials (those in
    the URL, else MLFLOW_TRACKING_USERNAME/PASSWORD): for requests made outside MLflow."""
    parts = _split(url)
    user, password = os.environ.get(MLFLOW_USERNAME_ENV), os.environ.get(MLFLOW_PASSWORD_ENV)
    if parts is not None and "@" in parts.netloc:
        user, password = unquote(parts.username or ""), unquote(parts.password or "")
        url = urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
    if not user and not password:
        return url, {}
    token = base64.b64encode(f"{user or ''}:{password or ''}".encode()).decode()
    return url, {"Authorization": f"Basic {token}"}


# -- redacting output -----------------------------------------------------------------------------
class RedactingStream:
    """A text stream that masks secrets in what is written to it."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def write(self, text: str) -> int:
        self.stream.write(redact_text(text))
        return len(text)

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


@contextlib.contextmanager
def redacted_output() -> Iterator[None]:
    saved = sys.stdout, sys.stderr
    if not isinstance(sys.stdout, RedactingStream):
        sys.stdout = RedactingStream(sys.stdout)  # type: ignore[assignment]
    if not isinstance(sys.stderr, RedactingStream):
        sys.stderr = RedactingStream(sys.stderr)  # type: ignore[assignment]
    try:
        yield
    finally:
        sys.stdout, sys.stderr = saved


@functools.cache
def install_log_redaction() -> None:
    """Mask secrets in every log record this process creates, whatever handler (console, a
    job's log file) writes it; a record factory outlives Hydra's logging reconfiguration."""
    make_record = logging.getLogRecordFactory()

    def redacting_record(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = make_record(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: logging reports it when the record is emitted
            return record
        clean = redact_text(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and record.exc_info[0] is not None:
            record.exc_text = redact_text(logging.Formatter().formatException(record.exc_info))
        return record

    logging.setLogRecordFactory(redacting_record)


def install_guards() -> None:
    """The process-wide parts: log redaction, and the connection hook when passwords are kept."""
    install_log_redaction()
    if stored_passwords():
        install_connection_hook()


# -- entry points ---------------------------------------------------------------------------------
def protect_job(cfg: Any) -> None:
    """At the start of a job (in the sweeper's process or a launcher's worker): the config holds
    no password, Hydra's saved copy neither, and connections get theirs back."""
    install_guards()
    if sanitize_config(cfg):
        _rewrite_hydra_config(cfg)


def _rewrite_hydra_config(cfg: Any) -> None:
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    if not HydraConfig.initialized():
        return
    hydra = HydraConfig.get()
    if not hydra.output_subdir:
        return
    saved = Path(hydra.runtime.output_dir) / str(hydra.output_subdir) / "config.yaml"
    if saved.is_file():
        OmegaConf.save(cfg, saved)


def guard_secrets(main: Callable[[list[str]], int]) -> Callable[[Sequence[str]], int]:
    """Wrap a Hydra command: its arguments lose their URL passwords before Hydra sees them, and
    output is redacted while it runs. The environment is restored afterwards."""

    @functools.wraps(main)
    def guarded(argv: Sequence[str]) -> int:
        names = (PASSWORDS_ENV, MLFLOW_USERNAME_ENV, MLFLOW_PASSWORD_ENV)
        with restored_environment(names):
            args = [strip_passwords(arg) for arg in argv]
            install_guards()
            with redacted_output():
                return main(args)

    return guarded


def command_without_passwords(command: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """A server's command line (`mlflow server`, `optuna-dashboard`) with PostgreSQL URLs'
    passwords moved into the child's environment as libpq's PGPASSWORD, so `ps` never shows
    them. A second, different password stays in its URL: libpq reads one PGPASSWORD."""
    cleaned: list[str] = []
    env: dict[str, str] = {}
    for argument in command:
        parts = _split(argument)
        password = parts.password if parts is not None else None
        if (
            parts is None
            or password is None
            or not parts.scheme.lower().startswith("postgres")
            or env.get("PGPASSWORD", unquote(password)) != unquote(password)
        ):
            cleaned.append(argument)
            continue
        env["PGPASSWORD"] = unquote(password)
        userinfo, _, host = parts.netloc.rpartition("@")
        user = userinfo.partition(":")[0]
        cleaned.append(urlunsplit(parts._replace(netloc=f"{user}@{host}" if user else host)))
    return cleaned, env
