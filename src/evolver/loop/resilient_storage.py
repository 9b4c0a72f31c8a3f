"""An Optuna storage that rides out database outages: a restart, a failover, a network blip.

Every storage call of the loop (the runner, its heartbeat thread, the jobs' reports, the claims)
goes through `ResilientStorage`. It delegates to Optuna's cached RDB storage and retries calls
that failed on a lost connection, with capped exponential backoff and jitter, until the database
is back or the outage has lasted `loop.storage_retry_s` seconds; then the call raises
`StorageUnavailableError`, one line naming `loop.storage`. An outage is logged once per process
and database: a warning when it starts, one line with its length when the database is back.

A write whose connection dropped during its commit may have been applied. Retried writes are
therefore idempotent:

- attribute, parameter, intermediate-value and heartbeat writes are upserts in Optuna;
- a new trial carries a fresh token (a trial system attribute) in its own insert; a retry first
  looks the token up and returns the trial it finds instead of inserting a second one;
- taking a WAITING trial (the pop) writes a token in the same transaction as the state change;
  a retry that finds the trial already taken checks whether the token is its own;
- a retry that finds a trial already finished in the state and with the values it was asked to
  write reports success (so a stale trial failed during an outage is still re-enqueued once);
- a retried study creation that finds the study returns its id.

Optuna's own retry of trial creation on deadlocks runs inside one attempt and is not covered.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import random
import threading
import time
import uuid
from collections.abc import Callable, Container, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

from optuna.distributions import BaseDistribution
from optuna.exceptions import DuplicatedStudyError, UpdateFinishedTrialError
from optuna.storages import BaseStorage, RDBStorage, _CachedStorage
from optuna.storages._heartbeat import BaseHeartbeat
from optuna.study import StudyDirection
from optuna.study._frozen import FrozenStudy
from optuna.trial import FrozenTrial, TrialState, create_trial

from evolver.errors import EvolverError

log = logging.getLogger("evolver.loop")

T = TypeVar("T")
CREATE_TOKEN_KEY = "evolver.create_token"
RUN_TOKEN_KEY = "evolver.run_token"
DEFAULT_RETRY_S = 300.0


class StorageUnavailableError(EvolverError):
    """The loop's database stayed away longer than `loop.storage_retry_s`.

    Exit code 1, not 2: nothing in the input is wrong, and rerunning the same command resumes the
    loop where it stopped once the database is back."""

    exit_code = 1

    def __init__(self, label: str, seconds: float, limit_s: float, error: BaseException) -> None:
        super().__init__(
            f"loop.storage: {label} unreachable for {seconds:.0f} s "
            f"(loop.storage_retry_s is {limit_s:g}): {first_line(error)}"
        )


def first_line(error: BaseException) -> str:
    cause = next((c for c in causes(error) if c is not error and is_connection_error(c)), error)
    text = (str(cause).strip().splitlines() or [""])[0]
    return f"{type(cause).__name__}: {text}" if text else type(cause).__name__


def causes(error: BaseException) -> Iterator[BaseException]:
    """The error and the ones it was raised from or while handling, each once."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def is_connection_error(error: BaseException) -> bool:
    """A lost or refused database connection, or a transaction the server aborted (deadlock,
    shutdown): worth retrying. A missing table or a constraint violation is not."""
    from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

    if isinstance(error, DBAPIError):
        if error.connection_invalidated:
            return True
        if isinstance(error, OperationalError | InterfaceError):
            return _driver_error_is_transient(error.orig)
        return False
    module = type(error).__module__
    if module.startswith(("psycopg", "sqlite3")):
        names = {kind.__name__ for kind in type(error).__mro__}
        if names & {"OperationalError", "InterfaceError"}:
            return _driver_error_is_transient(error)
    return False


def is_transient(error: BaseException) -> bool:
    if isinstance(error, StorageUnavailableError):  # a nested call already gave up
        return False
    return any(is_connection_error(cause) for cause in causes(error))


def _driver_error_is_transient(error: BaseException | None) -> bool:
    if error is not None and type(error).__module__.startswith("sqlite3"):
        # SQLite has no server to lose: only a held lock goes away by waiting.
        return "locked" in str(error) or "busy" in str(error)
    return True


@dataclass(frozen=True)
class Backoff:
    """Capped exponential backoff with jitter, within `limit_s` seconds of an outage's start."""

    limit_s: float = DEFAULT_RETRY_S
    first_s: float = 0.25
    max_s: float = 5.0

    def delay(self, attempt: int, remaining_s: float) -> float:
        ceiling = min(self.max_s, self.first_s * 2**attempt)
        return max(0.0, min(remaining_s, ceiling * random.uniform(0.5, 1.0)))


class Outage:
    """One database as this process sees it: whether it is away, since when, and when it last
    came back. Shared by every storage and thread of the process on that database, so that an
    outage is logged once and bounded from its first failure, whoever meets it."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.started: float | None = None
        self.ended: float | None = None
        self._lock = threading.Lock()

    def failed(self, error: BaseException, limit_s: float) -> float:
        """Record a failed call; the seconds since the outage started."""
        with self._lock:
            now = time.monotonic()
            if self.started is None:
                self.started = now
                log.warning(
                    "loop.storage: lost the connection to %s (%s); retrying with backoff for "
                    "up to %g s (loop.storage_retry_s)",
                    self.label,
                    first_line(error),
                    limit_s,
                )
            return now - self.started

    def succeeded(self) -> None:
        if self.started is None:
            return
        with self._lock:
            if self.started is None:
                return
            now = time.monotonic()
            log.warning(
                "loop.storage: %s is back after an outage of %.1f s", self.label, now - self.started
            )
            self.started, self.ended = None, now

    def settling(self, window_s: float) -> bool:
        """Away now, or back for less than `window_s` seconds."""
        if self.started is not None:
            return True
        return self.ended is not None and time.monotonic() - self.ended < window_s


_OUTAGES: dict[str, Outage] = {}
_OUTAGES_LOCK = threading.Lock()


def outage_for(label: str) -> Outage:
    with _OUTAGES_LOCK:
        return _OUTAGES.setdefault(label, Outage(label))


class Retrier:
    """Runs storage calls, retrying connection errors within the current outage's bound."""

    def __init__(self, label: str, backoff: Backoff) -> None:
        self.label = label
        self.backoff = backoff
        self.outage = outage_for(label)

    def call(self, attempt: Callable[[bool], T]) -> T:
        """`attempt(retrying)`; `retrying` is True once an earlier attempt failed, whose write
        may have been applied nonetheless."""
        retrying = False
        failures = 0
        while True:
            try:
                result = attempt(retrying)
            except Exception as error:
                if not is_transient(error):
                    raise
                self.wait_after(error, failures)
                failures += 1
                retrying = True
                continue
            self.outage.succeeded()
            return result

    def once(self, attempt: Callable[[], object]) -> bool:
        """One attempt: False when the connection failed (recorded for the log, not raised)."""
        try:
            attempt()
        except Exception as error:
            if not is_transient(error):
                raise
            self.outage.failed(error, self.backoff.limit_s)
            return False
        self.outage.succeeded()
        return True

    def wait_after(self, error: BaseException, failures: int) -> None:
        elapsed = self.outage.failed(error, self.backoff.limit_s)
        remaining = self.backoff.limit_s - elapsed
        if remaining <= 0:
            raise StorageUnavailableError(
                self.label, elapsed, self.backoff.limit_s, error
            ) from error
        time.sleep(self.backoff.delay(failures, remaining))


class ResilientStorage(BaseStorage, BaseHeartbeat):
    """Optuna's cached RDB storage, retried through database outages (see the module notes).

    Optuna uses it as it is (it wraps only plain `RDBStorage`s in its cache itself), and it is a
    `BaseHeartbeat` whose heartbeats are on exactly when the RDB storage's are."""

    def __init__(self, backend: RDBStorage, *, label: str, backoff: Backoff | None = None) -> None:
        self.backend = backend
        self.label = label
        self.backoff = backoff or Backoff()
        self._cached = _CachedStorage(backend)
        self.retrier = Retrier(label, self.backoff)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        del state["retrier"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.retrier = Retrier(self.label, self.backoff)

    @property
    def engine(self) -> Any:
        return self.backend.engine

    def call(self, attempt: Callable[[bool], T]) -> T:
        return self.retrier.call(attempt)

    def _delegate(self, name: str, *args: Any, **kwargs: Any) -> Any:
        method = getattr(self._cached, name)
        return self.retrier.call(lambda retrying: method(*args, **kwargs))

    # -- studies --------------------------------------------------------------------------------
    def create_new_study(
        self, directions: Sequence[StudyDirection], study_name: str | None = None
    ) -> int:
        def attempt(retrying: bool) -> int:
            try:
                return self._cached.create_new_study(directions, study_name)
            except DuplicatedStudyError:
                if retrying and study_name is not None:
                    return self._cached.get_study_id_from_name(study_name)
                raise

        return self.retrier.call(attempt)

    def delete_study(self, study_id: int) -> None:
        def attempt(retrying: bool) -> None:
            try:
                self._cached.delete_study(study_id)
            except KeyError:
                if not retrying:
                    raise

        self.retrier.call(attempt)

    def set_study_user_attr(self, study_id: int, key: str, value: Any) -> None:
        self._delegate("set_study_user_attr", study_id, key, value)

    def set_study_system_attr(self, study_id: int, key: str, value: Any) -> None:
        self._delegate("set_study_system_attr", study_id, key, value)

    def get_study_id_from_name(self, study_name: str) -> int:
        return self._delegate("get_study_id_from_name", study_name)

    def get_study_name_from_id(self, study_id: int) -> str:
        return self._delegate("get_study_name_from_id", study_id)

    def get_study_directions(self, study_id: int) -> list[StudyDirection]:
        return self._delegate("get_study_directions", study_id)

    def get_study_user_attrs(self, study_id: int) -> dict[str, Any]:
        return self._delegate("get_study_user_attrs", study_id)

    def get_study_system_attrs(self, study_id: int) -> dict[str, Any]:
        return self._delegate("get_study_system_attrs", study_id)

    def get_all_studies(self) -> list[FrozenStudy]:
        return self._delegate("get_all_studies")

    # -- trials ---------------------------------------------------------------------------------
    def create_new_trial(self, study_id: int, template_trial: FrozenTrial | None = None) -> int:
        token = uuid.uuid4().hex
        template = with_create_token(template_trial, token)

        def attempt(retrying: bool) -> int:
            if retrying:
                found = self._trial_id_with(CREATE_TOKEN_KEY, token)
                if found is not None:
                    return found
            return self._cached.create_new_trial(study_id, template)

        return self.retrier.call(attempt)

    def set_trial_param(
        self,
        trial_id: int,
        param_name: str,
        param_value_internal: float,
        distribution: BaseDistribution,
    ) -> None:
        self._delegate("set_trial_param", trial_id, param_name, param_value_internal, distribution)

    def get_trial_id_from_study_id_trial_number(self, study_id: int, trial_number: int) -> int:
        return self._delegate("get_trial_id_from_study_id_trial_number", study_id, trial_number)

    def get_best_trial(self, study_id: int) -> FrozenTrial:
        return self._delegate("get_best_trial", study_id)

    def set_trial_state_values(
        self, trial_id: int, state: TrialState, values: Sequence[float] | None = None
    ) -> bool:
        if state == TrialState.RUNNING:
            return self._take_waiting_trial(trial_id)

        def attempt(retrying: bool) -> bool:
            try:
                return self._cached.set_trial_state_values(trial_id, state, values)
            except UpdateFinishedTrialError:
                if retrying and self._has_state(trial_id, state, values):
                    return True
                raise

        return self.retrier.call(attempt)

    def set_trial_intermediate_value(
        self, trial_id: int, step: int, intermediate_value: float
    ) -> None:
        self._delegate("set_trial_intermediate_value", trial_id, step, intermediate_value)

    def set_trial_user_attr(self, trial_id: int, key: str, value: Any) -> None:
        self._delegate("set_trial_user_attr", trial_id, key, value)

    def set_trial_system_attr(self, trial_id: int, key: str, value: Any) -> None:
        self._delegate("set_trial_system_attr", trial_id, key, value)

    def get_trial(self, trial_id: int) -> FrozenTrial:
        return self._delegate("get_trial", trial_id)

    def get_all_trials(
        self,
        study_id: int,
        deepcopy: bool = True,
        states: Container[TrialState] | None = None,
    ) -> list[FrozenTrial]:
        return self._delegate("get_all_trials", study_id, deepcopy=deepcopy, states=states)

    def remove_session(self) -> None:
        self.backend.remove_session()

    # -- heartbeats -----------------------------------------------------------------------------
    def record_heartbeat(self, trial_id: int) -> None:
        self._delegate("record_heartbeat", trial_id)

    def try_record_heartbeat(self, trial_id: int) -> bool:
        """One attempt, for periodic beats: a beat lost to an outage is replaced by the next."""
        return self.retrier.once(lambda: self._cached.record_heartbeat(trial_id))

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        # Heartbeats could not be recorded while the database was away: judging staleness before
        # every worker had a grace period to beat again would fail trials that are running.
        if self.retrier.outage.settling(self.settle_s):
            return []
        return self._delegate("_get_stale_trial_ids", study_id)

    @property
    def settle_s(self) -> float:
        interval = self.backend.heartbeat_interval or 0
        grace = self.backend.grace_period or 2 * interval
        return grace + self.backoff.max_s

    def get_heartbeat_interval(self) -> int | None:
        return self.backend.get_heartbeat_interval()

    def get_heartbeat_stale_trial_callback(self) -> Any:
        return self.backend.get_heartbeat_stale_trial_callback()

    # -- idempotence helpers (raw backend calls: they run inside a retried attempt) -------------
    def _take_waiting_trial(self, trial_id: int) -> bool:
        """WAITING -> RUNNING as Optuna's `set_trial_state_values` does it, plus a token written
        in the same transaction, so a retry can tell its own applied pop from another worker's."""
        from optuna.storages._rdb import models

        token = uuid.uuid4().hex

        def attempt(retrying: bool) -> bool:
            if retrying and self._trial_id_with(RUN_TOKEN_KEY, token) == trial_id:
                return True
            session = self.backend.scoped_session()
            try:
                trial = models.TrialModel.find_or_raise_by_id(trial_id, session, for_update=True)
                self.backend.check_trial_is_updatable(trial_id, trial.state)
                if trial.state != TrialState.WAITING:
                    session.rollback()
                    return False
                trial.state = TrialState.RUNNING
                trial.datetime_start = datetime.now()
                attrs = models.TrialSystemAttributeModel
                session.query(attrs).filter(attrs.trial_id == trial_id).filter(
                    attrs.key == RUN_TOKEN_KEY
                ).delete()
                session.add(
                    attrs(trial_id=trial_id, key=RUN_TOKEN_KEY, value_json=json.dumps(token))
                )
                session.commit()
                return True
            except BaseException:
                session.rollback()
                raise
            finally:
                session.close()

        return self.retrier.call(attempt)

    def _trial_id_with(self, key: str, token: str) -> int | None:
        from optuna.storages._rdb import models

        table = models.TrialSystemAttributeModel.__table__
        query = (
            table.select()
            .with_only_columns(table.c.trial_id)
            .where(table.c.key == key)
            .where(table.c.value_json == json.dumps(token))
        )
        with self.engine.connect() as connection:
            row = connection.execute(query).first()
        return None if row is None else int(row[0])

    def _has_state(self, trial_id: int, state: TrialState, values: Sequence[float] | None) -> bool:
        trial = self.backend.get_trial(trial_id)
        if trial.state != state:
            return False
        if values is None:
            return True
        stored = trial.values or []
        return len(stored) == len(values) and all(
            math.isclose(a, b, rel_tol=1e-12) or (math.isnan(a) and math.isnan(b))
            for a, b in zip(stored, values, strict=True)
        )


def with_create_token(template: FrozenTrial | None, token: str) -> FrozenTrial:
    """A copy of `template` (by default a fresh RUNNING trial, as Optuna creates one) carrying
    `token`; tokens copied from another trial (Optuna's retry callback copies them) are dropped."""
    trial = create_trial(state=TrialState.RUNNING) if template is None else copy.deepcopy(template)
    attrs = {
        k: v for k, v in trial.system_attrs.items() if k not in (CREATE_TOKEN_KEY, RUN_TOKEN_KEY)
    }
    attrs[CREATE_TOKEN_KEY] = token
    trial.system_attrs = attrs
    return trial
