"""A thin layer over `MlflowClient`: experiments by name, batched logging within MLflow's limits."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.validation import (
    MAX_METRICS_PER_BATCH,
    MAX_PARAM_VAL_LENGTH,
    MAX_PARAMS_TAGS_PER_BATCH,
    MAX_TAG_VAL_LENGTH,
)

from evolver.environment import restored_environment
from evolver.secrets import strip_password
from evolver.tracking.store import scheme_of, slug

log = logging.getLogger("evolver.tracking")

T = TypeVar("T")

PARENT_RUN_TAG = "mlflow.parentRunId"
RUN_NAME_TAG = "mlflow.runName"
NOTE_TAG = "mlflow.note.content"


def chunks(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def now_ms() -> int:
    return int(time.time() * 1000)


def flatten_params(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> `{"finetune.lr_head": "0.001", ...}`, values cut to MLflow's limit."""
    flat: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten_params(value, f"{name}."))
            continue
        text = value if isinstance(value, str) else json.dumps(value, default=str)
        flat[name] = text[:MAX_PARAM_VAL_LENGTH]
    return flat


@dataclass(frozen=True)
class Batch:
    """The contents of one `log_batch` call, within MLflow's limits."""

    metrics: list[Metric] = field(default_factory=list)
    params: list[Param] = field(default_factory=list)
    tags: list[RunTag] = field(default_factory=list)


def plan_batches(
    metrics: Iterable[Metric] = (),
    params: Mapping[str, str] | None = None,
    tags: Mapping[str, str] | None = None,
) -> list[Batch]:
    """Everything in as few `log_batch` calls as MLflow's limits allow."""
    metric_list = [m for m in metrics if m.value is not None]
    param_list = [Param(k, str(v)[:MAX_PARAM_VAL_LENGTH]) for k, v in (params or {}).items()]
    tag_list = [RunTag(k, str(v)[:MAX_TAG_VAL_LENGTH]) for k, v in (tags or {}).items()]
    metric_batches = list(chunks(metric_list, MAX_METRICS_PER_BATCH))
    param_batches = list(chunks(param_list, MAX_PARAMS_TAGS_PER_BATCH))
    tag_batches = list(chunks(tag_list, MAX_PARAMS_TAGS_PER_BATCH))
    batches: list[Batch] = []
    for index in range(max(len(metric_batches), len(param_batches), len(tag_batches))):
        # Params and tags each count against the 100 limit; metrics and them against 1000.
        batch_metrics = list(metric_batches[index]) if index < len(metric_batches) else []
        batch_params = list(param_batches[index]) if index < len(param_batches) else []
        batch_tags = list(tag_batches[index]) if index < len(tag_batches) else []
        if len(batch_metrics) + len(batch_params) + len(batch_tags) > MAX_METRICS_PER_BATCH:
            batches += [Batch(metrics=batch_metrics), Batch(params=batch_params, tags=batch_tags)]
        else:
            batches.append(Batch(batch_metrics, batch_params, batch_tags))
    return batches


@dataclass(frozen=True)
class CallLimits:
    """How long one MLflow call may take: a timeout per request and a few quick retries."""

    timeout_s: float = 10.0
    retries: int = 2

    def environment(self) -> dict[str, str]:
        """MLflow's http client reads these on every request (mlflow.utils.rest_utils); its
        defaults (7 retries, backoff factor 2, 120 s timeout) block a dead server's call ~4 min."""
        return {
            "MLFLOW_HTTP_REQUEST_TIMEOUT": str(max(1, math.ceil(self.timeout_s))),
            "MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(self.retries),
            "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
            "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5",
        }


_ENVIRONMENT_LOCK = threading.RLock()


@contextlib.contextmanager
def bounded(limits: CallLimits) -> Iterator[None]:
    """MLflow's http settings set to `limits` for the calls made inside, restored after."""
    values = limits.environment()
    with _ENVIRONMENT_LOCK, restored_environment(values):
        os.environ.update(values)
        yield


class BoundedClient:
    """An `MlflowClient` whose every call runs within `limits`."""

    def __init__(self, client: MlflowClient, limits: CallLimits) -> None:
        self._client = client
        self._limits = limits

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._client, name)
        if not callable(attribute):
            return attribute

        def call(*args: Any, **kwargs: Any) -> Any:
            with bounded(self._limits):
                return attribute(*args, **kwargs)

        return call


def with_connect_timeout(uri: str, timeout_s: float) -> str:
    """A PostgreSQL or MySQL URL that gives up connecting after `timeout_s` (unless it says)."""
    if scheme_of(uri) not in {"postgresql", "mysql"}:
        return uri
    parts = urlsplit(uri)
    query = parse_qsl(parts.query, keep_blank_values=True)
    if any(key == "connect_timeout" for key, _ in query):
        return uri
    query.append(("connect_timeout", str(max(1, math.ceil(timeout_s)))))
    return urlunsplit(parts._replace(query=urlencode(query)))


# Stores this process has opened once already: their tables exist.
_OPENED: set[str] = set()
# A fixed key of PostgreSQL's advisory locks: "evolver creates an MLflow store".
_ADVISORY_LOCK_KEY = int.from_bytes(hashlib.sha256(b"evolver.mlflow-store").digest()[:7], "big")


@contextlib.contextmanager
def first_use_of(uri: str) -> Iterator[None]:
    """Serialise the first opening of a database store across processes.

    MLflow creates and migrates a store's tables when a client first opens it; two processes
    doing so at once on a fresh store collide (`table ... already exists`). SQLite: an fcntl lock
    on a file beside the database; PostgreSQL: an advisory lock; other databases: retries.
    """
    scheme = scheme_of(uri)
    if uri in _OPENED or scheme not in {"sqlite", "postgresql", "mysql", "mssql"}:
        yield
        return
    lock = {"sqlite": _sqlite_lock, "postgresql": _postgres_lock}.get(scheme, _no_lock)
    with lock(uri):
        yield
    _OPENED.add(uri)


@contextlib.contextmanager
def _sqlite_lock(uri: str) -> Iterator[None]:
    path = uri.split(":///", 1)[-1] if ":///" in uri else ""
    if not path or path == ":memory:":
        yield
        return
    lock_path = Path(f"{path}.lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def _postgres_lock(uri: str) -> Iterator[None]:
    import sqlalchemy

    engine = sqlalchemy.create_engine(uri, poolclass=sqlalchemy.pool.NullPool)
    try:
        with engine.connect() as connection:
            lock = sqlalchemy.text("SELECT pg_advisory_lock(:key)")
            connection.execute(lock, {"key": _ADVISORY_LOCK_KEY})
            try:
                yield
            finally:
                unlock = sqlalchemy.text("SELECT pg_advisory_unlock(:key)")
                connection.execute(unlock, {"key": _ADVISORY_LOCK_KEY})
    finally:
        engine.dispose()


@contextlib.contextmanager
def _no_lock(uri: str) -> Iterator[None]:
    yield


def with_retries(action: Callable[[], T], attempts: int = 5, first_wait_s: float = 0.5) -> T:
    """`action()`, tried again with a doubling wait when it fails (a store another process is
    still creating)."""
    for attempt in range(attempts):
        try:
            return action()
        except Exception:
            if attempt == attempts - 1:
                raise
            time.sleep(first_wait_s * 2**attempt)
    raise AssertionError("unreachable")


class MlflowStore:
    """One tracking store (URI) and the operations evolver needs from it."""

    def __init__(
        self, uri: str, artifact_root: str | None, limits: CallLimits | None = None
    ) -> None:
        # MLflow never holds the password: it goes back as a connection opens (evolver.secrets).
        self.uri = strip_password(uri)
        self.artifact_root = artifact_root
        self.limits = limits or CallLimits()
        self._client: BoundedClient | None = None

    @property
    def client(self) -> BoundedClient:
        """The MLflow client, made on first use: a database store is created (its tables
        migrated) then, under a lock, so that workers starting together on a fresh store wait
        for the first one instead of racing its migration."""
        if self._client is None:
            uri = with_connect_timeout(self.uri, self.limits.timeout_s)
            with first_use_of(uri):
                if scheme_of(uri) in {"mysql", "mssql"}:  # no lock there: retry instead
                    client = with_retries(lambda: MlflowClient(tracking_uri=uri))
                else:
                    client = MlflowClient(tracking_uri=uri)
            self._client = BoundedClient(client, self.limits)
        return self._client

    @property
    def connected(self) -> bool:
        return self._client is not None

    def experiment_id(self, name: str, tags: Mapping[str, str] | None = None) -> str:
        """The id of experiment `name`, created (with its artifact folder) when missing."""
        experiment = self.client.get_experiment_by_name(name)
        if experiment is not None:
            if experiment.lifecycle_stage == "deleted":
                self.client.restore_experiment(experiment.experiment_id)
            return experiment.experiment_id
        location = f"{self.artifact_root.rstrip('/')}/{slug(name)}" if self.artifact_root else None
        try:
            return self.client.create_experiment(name, artifact_location=location, tags=tags)
        except MlflowException:
            # Another job created it between our look-up and create: use theirs.
            experiment = self.client.get_experiment_by_name(name)
            if experiment is None:
                raise
            return experiment.experiment_id

    def create_run(
        self,
        experiment_id: str,
        run_name: str | None,
        tags: Mapping[str, str],
        parent_run_id: str | None = None,
        start_time: int | None = None,
    ) -> str:
        all_tags = dict(tags)
        if parent_run_id:
            all_tags[PARENT_RUN_TAG] = parent_run_id
        run = self.client.create_run(
            experiment_id, start_time=start_time, tags=all_tags, run_name=run_name
        )
        return run.info.run_id

    def find_run(self, experiment_id: str, filter_string: str) -> str | None:
        """The oldest run of the experiment that matches `filter_string`, if any."""
        runs = self.client.search_runs(
            [experiment_id],
            filter_string=filter_string,
            max_results=1,
            order_by=["attributes.start_time ASC"],
        )
        return runs[0].info.run_id if runs else None

    def log(
        self,
        run_id: str,
        metrics: Iterable[Metric] = (),
        params: Mapping[str, str] | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> int:
        """Log everything in as few `log_batch` calls as MLflow's limits allow; return calls."""
        batches = plan_batches(metrics, params, tags)
        for batch in batches:
            self.send(run_id, batch)
        return len(batches)

    def send(self, run_id: str, batch: Batch) -> None:
        self.client.log_batch(run_id, metrics=batch.metrics, params=batch.params, tags=batch.tags)

    def log_files(self, run_id: str, files: Iterable[Path], artifact_path: str | None) -> None:
        for path in files:
            self.client.log_artifact(run_id, str(path), artifact_path)

    def terminate(self, run_id: str, status: str, end_time: int | None = None) -> None:
        self.client.set_terminated(run_id, status=status, end_time=end_time or now_ms())

    def reopen(self, run_id: str) -> None:
        self.client.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))

    def reopen_as_running(self, run_id: str) -> None:
        """A run that goes on (an iteration resumed): RUNNING, state tag back to running."""
        self.reopen(run_id)
        self.log(run_id, tags={"state": "running"})
        if "state_reason" in self.client.get_run(run_id).data.tags:
            self.client.delete_tag(run_id, "state_reason")


def metric(key: str, value: float, step: int = 0, timestamp: int | None = None) -> Metric:
    number = float(value)
    if math.isinf(number):
        # MLflow's stores reject infinities; keep the sign at the float maximum instead.
        number = math.copysign(1.7976931348623157e308, number)
    return Metric(key, number, timestamp or now_ms(), int(step))
