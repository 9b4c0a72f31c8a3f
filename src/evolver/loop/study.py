"""The loop's Optuna study: settings from `cfg.loop`, storage with heartbeats, sampler, pruner,
and an atomic claim so that one worker among many does each once-only step."""

from __future__ import annotations

import hashlib
import json
import random
import threading
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evolver.database_url import normalize_database_url, redact
from evolver.errors import ConfigError
from evolver.secrets import strip_password
from evolver.storage_url import DEFAULT_RUNS_DIR, optuna_storage_url
from evolver.validation import integer, number, one_of

SAMPLERS = ("tpe", "tpe_multivariate", "random", "cmaes", "gp")
PRUNERS = ("median", "none", "hyperband", "successive_halving")


@dataclass(frozen=True)
class LoopSettings:
    """`cfg.loop`, validated."""

    name: str
    storage: str
    runs_dir: Path
    iterations: int
    trials_per_iteration: int
    parallel: int
    target: float | None
    patience: int | None
    min_improvement: float
    max_failure_rate: float
    sampler: str
    seed: int | None
    startup_trials: int
    pruner: str
    pruner_warmup_epochs: int
    pruner_startup_trials: int
    proposals: bool
    adapt_space: bool
    max_proposals: int | None
    proposal_bases: int
    constraints: bool
    degradation_tolerance: float
    heartbeat_interval: int
    grace_period: int
    max_retry: int
    poll_interval: float
    retry_failed: bool = True
    storage_retry_s: float = 300.0
    objective: str = "cv.loss_best"
    race_sigmas: float | None = 2.0
    continue_proposals: bool = True
    proposal_prune_tolerance: float | None = 0.5
    budget_seconds: float | None = None
    remedy_failures: int | None = 2
    baseline_first: bool = True

    @property
    def loop_dir(self) -> Path:
        return (self.runs_dir / "loops" / self.name).resolve()

    def proposal_slots(self, size: int) -> int:
        """How many of an iteration's trials may be proposals (the rest are sampled)."""
        cap = self.max_proposals if self.max_proposals is not None else max(1, size - 1)
        return max(0, min(cap, size))

    @classmethod
    def from_cfg(cls, cfg: Any) -> LoopSettings:
        loop = cfg.loop
        runs_dir = Path(str(cfg.get("runs_dir") or DEFAULT_RUNS_DIR))
        name = str(loop.get("name") or "")
        if not name or "/" in name or name.startswith("."):
            raise ConfigError("loop.name", f"must be a plain name (no '/'), got {name!r}")
        diagnosis = cfg.get("diagnosis") or {}
        settings = cls(
            name=name,
            storage=optuna_storage_url(cfg),
            runs_dir=runs_dir,
            iterations=_int(loop, "iterations", minimum=1),
            trials_per_iteration=_int(loop, "trials_per_iteration", minimum=1),
            parallel=_int(loop, "parallel", minimum=1, default=1),
            target=_float_or_none(loop, "target"),
            patience=_int(loop, "patience", minimum=1, default=None),
            min_improvement=_float(loop, "min_improvement", 0.0),
            max_failure_rate=_float(loop, "max_failure_rate", 0.5),
            sampler=_choice(loop, "sampler", SAMPLERS, "tpe"),
            seed=_int(loop, "seed", default=None),
            startup_trials=_int(loop, "startup_trials", minimum=0, default=3),
            pruner=_choice(loop, "pruner", PRUNERS, "median"),
            pruner_warmup_epochs=_int(loop, "pruner_warmup_epochs", minimum=0, default=2),
            pruner_startup_trials=_int(loop, "pruner_startup_trials", minimum=0, default=2),
            proposals=bool(loop.get("proposals", True)),
            adapt_space=bool(loop.get("adapt_space", True)),
            max_proposals=_int(loop, "max_proposals", minimum=0, default=None),
            proposal_bases=_int(loop, "proposal_bases", minimum=1, default=3),
            constraints=bool(loop.get("constraints", True)),
            degradation_tolerance=float(diagnosis.get("degradation_tolerance", 0.01) or 0.01),
            heartbeat_interval=_int(loop, "heartbeat_interval", minimum=1, default=10),
            grace_period=_int(loop, "grace_period", minimum=2, default=30),
            max_retry=_int(loop, "max_retry", minimum=0, default=3),
            poll_interval=_float(loop, "poll_interval", 2.0),
            retry_failed=bool(loop.get("retry_failed", True)),
            storage_retry_s=_float(loop, "storage_retry_s", 300.0),
            objective=str(cfg.get("objective") or "cv.loss_best"),
            race_sigmas=_float_or_none(loop, "race_sigmas", default=2.0),
            continue_proposals=bool(loop.get("continue_proposals", True)),
            proposal_prune_tolerance=_float_or_none(loop, "proposal_prune_tolerance", 0.5),
            budget_seconds=_float_or_none(loop, "budget_seconds"),
            remedy_failures=_int_or_none(loop, "remedy_failures", minimum=1, default=2),
            baseline_first=bool(loop.get("baseline_first", True)),
        )
        if settings.budget_seconds is not None and not settings.budget_seconds > 0:
            raise ConfigError("loop.budget_seconds", "must be > 0 (seconds) or null")
        tolerance = settings.proposal_prune_tolerance
        if tolerance is not None and not tolerance >= 0:
            raise ConfigError("loop.proposal_prune_tolerance", "must be >= 0 (or null)")
        if settings.race_sigmas is not None and not settings.race_sigmas > 0:
            raise ConfigError("loop.race_sigmas", "must be > 0 (or null: no fold racing)")
        if not 0 <= settings.max_failure_rate <= 1:
            raise ConfigError("loop.max_failure_rate", "must lie between 0 and 1")
        if settings.grace_period <= settings.heartbeat_interval:
            raise ConfigError("loop.grace_period", "must exceed loop.heartbeat_interval")
        if settings.storage_retry_s < 0:
            raise ConfigError("loop.storage_retry_s", "must be >= 0 (seconds)")
        return settings


def make_storage(
    url: str,
    settings: LoopSettings | None = None,
    *,
    retry_s: float | None = None,
    wait_for_database: bool = False,
) -> Any:
    """An RDB storage whose calls ride out database outages of up to `retry_s` seconds (default
    `settings.storage_retry_s`), see `resilient_storage`; with `settings`, heartbeats on and
    stale trials retried.

    A database that cannot be opened is a one-line error naming `loop.storage` (a wrong URL
    fails at once), unless `wait_for_database`: a job of a running loop, whose worker reached
    the database, waits for it as for any call.
    """
    import optuna

    from evolver.loop.resilient_storage import (
        DEFAULT_RETRY_S,
        Backoff,
        ResilientStorage,
        Retrier,
        StorageUnavailableError,
    )

    url = strip_password(normalize_database_url(url))  # it goes back as the connection opens
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    engine_kwargs = _engine_kwargs(url)
    if retry_s is None:
        retry_s = settings.storage_retry_s if settings is not None else DEFAULT_RETRY_S
    backoff = Backoff(limit_s=retry_s)
    label = redact(url)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            options: dict[str, Any] = {}
            if settings is not None:
                options = {
                    "heartbeat_interval": settings.heartbeat_interval,
                    "grace_period": settings.grace_period,
                    "heartbeat_stale_trial_callback": (
                        optuna.storages.RetryHeartbeatStaleTrialCallback(
                            max_retry=settings.max_retry
                        )
                    ),
                }

            def open_backend(retrying: bool) -> Any:
                return _create_rdb_storage(url, engine_kwargs, options)

            if wait_for_database:
                backend = Retrier(label, backoff).call(open_backend)
            else:
                backend = open_backend(False)
    except StorageUnavailableError:
        raise
    except Exception as error:  # a wrong URL, driver or unreachable server
        first = (str(error).strip().splitlines() or [repr(error)])[0]
        raise ConfigError("loop.storage", f"cannot open {redact(url)}: {first}") from None
    return ResilientStorage(backend, label=label, backoff=backoff)


def _engine_kwargs(url: str) -> dict[str, Any]:
    if url.startswith("sqlite"):
        return {"connect_args": {"timeout": 60}}
    # Pooled connections die with a server restart: test each one before use, and bound a
    # connection attempt to a host that does not answer (the OS default is minutes).
    kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if url.startswith(("postgresql", "postgres")):
        kwargs["connect_args"] = {"connect_timeout": 10}
    return kwargs


def _create_rdb_storage(url: str, engine_kwargs: dict[str, Any], options: dict[str, Any]) -> Any:
    """Workers starting together race to create Optuna's tables; the loser retries."""
    import optuna
    from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError

    for attempt in range(5):
        try:
            storage = optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, **options)
            if url.startswith("sqlite"):
                lock_sqlite_transactions(storage.engine)
            return storage
        except (IntegrityError, ProgrammingError, OperationalError):
            if attempt == 4:
                raise
            time.sleep(0.5 + random.random())
    raise AssertionError("unreachable")


def lock_sqlite_transactions(engine: Any) -> None:
    """Every transaction on `engine` takes SQLite's write lock when it begins (`BEGIN IMMEDIATE`).

    Optuna reads a trial's state and then writes it in one transaction (`SELECT ... FOR UPDATE`
    on PostgreSQL). SQLite ignores `FOR UPDATE`, and its Python driver begins the transaction
    only at the first write, so two workers could both read RUNNING and both fail a stale trial
    (two retries), or one fail a trial another is telling. SQLAlchemy's recipe for SQLite's
    transactions: the driver's own handling off, the BEGIN emitted here.
    """
    from sqlalchemy import event

    @event.listens_for(engine, "connect")
    def driver_transactions_off(dbapi_connection: Any, connection_record: Any) -> None:
        dbapi_connection.isolation_level = None

    @event.listens_for(engine, "begin")
    def begin_immediate(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    engine.dispose()  # connections opened while Optuna created its tables lack the first hook


def trial_seed(seed: int | None, number: int, attempt: int = 0) -> int | None:
    """The sampler seed for one sampling attempt of trial `number` (None when `seed` is).

    Derived from the loop seed and the trial number, which the storage makes unique across
    workers and resumes: one uninterrupted worker samples the same loop every time, and no
    worker or resume replays the random sequence of another.
    """
    if seed is None:
        return None
    digest = hashlib.sha256(f"evolver:{seed}:{number}:{attempt}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


def make_sampler(settings: LoopSettings, *, seed: int | None, kind: str | None = None) -> Any:
    """A sampler of `loop.sampler` (or `kind`); model-based ones read their state from the study."""
    import optuna

    kind = kind or settings.sampler
    # Constraints need no function in Optuna 5: the sweeper sets them on each trial
    # (`Trial.set_constraint`) and TPE and GP read them from there.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if kind == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        if kind == "cmaes":
            return optuna.samplers.CmaEsSampler(seed=seed, n_startup_trials=settings.startup_trials)
        if kind == "gp":
            return optuna.samplers.GPSampler(seed=seed, n_startup_trials=settings.startup_trials)
        if kind == "tpe_multivariate":
            return optuna.samplers.TPESampler(
                seed=seed, n_startup_trials=settings.startup_trials, multivariate=True, group=True
            )
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=settings.startup_trials)


def make_pruner(settings: LoopSettings) -> Any:
    import optuna

    if settings.pruner == "none":
        return optuna.pruners.NopPruner()
    if settings.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=max(1, settings.pruner_warmup_epochs))
    if settings.pruner == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(
            min_resource=max(1, settings.pruner_warmup_epochs)
        )
    return optuna.pruners.MedianPruner(
        n_startup_trials=settings.pruner_startup_trials,
        n_warmup_steps=settings.pruner_warmup_epochs,
    )


# The storage each loop worker opened, by database: jobs the basic launcher runs in the worker's
# own process reuse it instead of holding connections of their own.
_WORKER_STORAGES: dict[str, Any] = {}


def storage_key(url: str) -> str:
    return strip_password(normalize_database_url(url))


def worker_storage(url: str) -> Any | None:
    """The storage a loop worker of this process opened on `url`'s database, if any."""
    return _WORKER_STORAGES.get(storage_key(url))


def open_study(settings: LoopSettings, *, heartbeats: bool = True) -> tuple[Any, Any]:
    """(study, backend storage): created on first use, loaded afterwards."""
    import optuna

    storage = make_storage(settings.storage, settings if heartbeats else None)
    _WORKER_STORAGES[storage_key(settings.storage)] = storage
    study = optuna.create_study(
        study_name=settings.name,
        storage=storage,
        sampler=make_sampler(settings, seed=settings.seed),
        pruner=make_pruner(settings),
        direction="minimize",
        load_if_exists=True,
    )
    return study, storage


def claim(storage: Any, study_id: int, key: str, owner: str) -> bool:
    """Record `owner` under the study system attribute `key` unless one exists already.

    The insert relies on the table's unique (study, key) constraint, so among concurrent workers
    exactly one succeeds, on SQLite and PostgreSQL alike.
    """
    from optuna.storages._rdb import models
    from sqlalchemy.exc import IntegrityError

    table = models.StudySystemAttributeModel.__table__

    def attempt(retrying: bool) -> bool:
        try:
            with storage.engine.begin() as connection:
                value = json.dumps({"owner": owner, "at": time.time()})
                insert = table.insert().values(study_id=study_id, key=key, value_json=value)
                connection.execute(insert)
        except IntegrityError:
            # Held by another worker, or by this one: a retried insert can meet its own first
            # attempt, committed before the connection dropped.
            held = storage.get_study_system_attrs(study_id).get(key)
            return isinstance(held, dict) and held.get("owner") == owner
        return True

    return _call(storage, attempt)


def claim_age(storage: Any, study_id: int, key: str) -> float | None:
    """Seconds since `key` was claimed (None when it is not)."""
    value = storage.get_study_system_attrs(study_id).get(key)
    return time.time() - float(value["at"]) if isinstance(value, dict) else None


def release(storage: Any, study_id: int, key: str) -> None:
    """Drop a claim, so that another worker (or a later run) can take the step over."""
    from optuna.storages._rdb import models

    table = models.StudySystemAttributeModel.__table__

    def attempt(retrying: bool) -> None:
        with storage.engine.begin() as connection:
            connection.execute(
                table.delete().where(table.c.study_id == study_id).where(table.c.key == key)
            )

    _call(storage, attempt)


def _call(storage: Any, attempt: Callable[[bool], Any]) -> Any:
    """`attempt` through the storage's retries when it has them (see `resilient_storage`)."""
    call = getattr(storage, "call", None)
    return call(attempt) if call is not None else attempt(False)


class HeartbeatThread:
    """Records a heartbeat for the running trials of this worker until stopped.

    The sweeper process beats for its jobs whichever launcher runs them: it waits for every job,
    so it lives exactly as long as they matter; a killed sweeper stops beating and its trials go
    stale, to be failed and re-enqueued by the next worker or resume.
    """

    def __init__(self, storage: Any, trial_ids: Iterable[int], interval: float) -> None:
        self.storage = storage
        self.trial_ids = list(trial_ids)
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="evolver-heartbeat", daemon=True)

    def __enter__(self) -> HeartbeatThread:
        self._beat()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=self.interval + 5)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._beat()

    def _beat(self) -> None:
        # One attempt per beat: a beat lost to a database outage is replaced by the next one,
        # and the storage logs the outage once for the whole process.
        beat = getattr(self.storage, "try_record_heartbeat", self.storage.record_heartbeat)
        for trial_id in self.trial_ids:
            try:
                beat(trial_id)
            except Exception:  # a database error must not kill the loop
                continue


def _int(node: Any, key: str, *, minimum: int | None = None, default: Any = ...) -> Any:
    value = node.get(key, None if default is ... else default)
    if value is None:
        if default is ...:
            raise ConfigError(f"loop.{key}", "is required")
        return default
    return integer(f"loop.{key}", value, minimum=minimum)


def _int_or_none(node: Any, key: str, *, minimum: int, default: int | None) -> int | None:
    """Like `_int`, but an explicit null stays null (off) instead of taking the default."""
    value = node.get(key, default)
    return None if value is None else integer(f"loop.{key}", value, minimum=minimum)


def _float(node: Any, key: str, default: float) -> float:
    value = node.get(key, default)
    return default if value is None else number(f"loop.{key}", value, finite=True)


def _float_or_none(node: Any, key: str, default: float | None = None) -> float | None:
    value = node.get(key, default)
    return None if value is None else number(f"loop.{key}", value, finite=True)


def _choice(node: Any, key: str, choices: tuple[str, ...], default: str) -> str:
    return one_of(f"loop.{key}", str(node.get(key) or default).lower(), choices)
