"""The loop's storage through database outages, against a SQLite study whose connection fails
on demand: retries with backoff, one log line per outage edge, a bound, idempotent writes."""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.exceptions import StorageInternalError
from optuna.storages._heartbeat import is_heartbeat_enabled
from optuna.trial import TrialState
from sqlalchemy.exc import IntegrityError, OperationalError

from evolver.errors import ConfigError
from evolver.loop import resilient_storage
from evolver.loop.resilient_storage import (
    CREATE_TOKEN_KEY,
    Backoff,
    ResilientStorage,
    StorageUnavailableError,
    is_transient,
)
from evolver.loop.study import HeartbeatThread, LoopSettings, claim, make_storage

FAST = Backoff(limit_s=5.0, first_s=0.01, max_s=0.04)


def dropped() -> Exception:
    """What Optuna raises when the server closed the connection under a call."""
    cause = OperationalError(
        "SELECT 1", {}, Exception("server closed the connection unexpectedly"), True
    )
    try:
        raise StorageInternalError("An exception is raised during the commit.") from cause
    except StorageInternalError as error:
        return error


class Flaky:
    """Makes the next `failures` calls of `storage._cached.<name>` fail with a dropped
    connection, each one after (`applied=True`) or before the real call."""

    def __init__(self, storage: ResilientStorage, name: str, failures: int, applied=False) -> None:
        self.real = getattr(storage._cached, name)
        self.failures = failures
        self.applied = applied
        self.calls = 0
        setattr(storage._cached, name, self)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        if self.failures > 0:
            self.failures -= 1
            if self.applied:
                self.real(*args, **kwargs)
            raise dropped()
        return self.real(*args, **kwargs)


@pytest.fixture
def storage(tmp_path: Path) -> Iterator[ResilientStorage]:
    # Each test gets its own database, hence its own outage record.
    backend = make_storage(f"sqlite:///{tmp_path / 'study.db'}")
    yield ResilientStorage(backend.backend, label=backend.label, backoff=FAST)


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    recorded: list[float] = []
    real_sleep = resilient_storage.time.sleep

    def sleep(seconds: float) -> None:
        recorded.append(seconds)
        real_sleep(seconds)

    monkeypatch.setattr(resilient_storage.time, "sleep", sleep)
    return recorded


def new_study(storage: ResilientStorage) -> optuna.Study:
    return optuna.create_study(study_name="s", storage=storage, load_if_exists=True)


def outage_lines(caplog: pytest.LogCaptureFixture) -> tuple[int, int]:
    messages = [r.getMessage() for r in caplog.records if r.name == "evolver.loop"]
    lost = [m for m in messages if "lost the connection" in m]
    back = [m for m in messages if "is back after an outage of" in m]
    return len(lost), len(back)


def test_optuna_uses_the_storage_itself_with_its_heartbeats(tmp_path: Path) -> None:
    cfg = {"loop": {"name": "x", "iterations": 1, "trials_per_iteration": 1}}
    from omegaconf import OmegaConf

    settings = LoopSettings.from_cfg(OmegaConf.create({**cfg, "runs_dir": str(tmp_path)}))
    with_beats = make_storage(f"sqlite:///{tmp_path / 'a.db'}", settings)
    study = optuna.create_study(storage=with_beats)
    assert study._storage is with_beats and is_heartbeat_enabled(with_beats)
    assert with_beats.backoff.limit_s == settings.storage_retry_s == 300
    assert not is_heartbeat_enabled(make_storage(f"sqlite:///{tmp_path / 'b.db'}"))


def test_storage_retry_s_must_not_be_negative(tmp_path: Path) -> None:
    from omegaconf import OmegaConf

    cfg = {"name": "x", "iterations": 1, "trials_per_iteration": 1, "storage_retry_s": -1}
    with pytest.raises(ConfigError, match=r"^loop\.storage_retry_s"):
        LoopSettings.from_cfg(OmegaConf.create({"loop": cfg, "runs_dir": str(tmp_path)}))


def test_connection_errors_are_retried_with_growing_capped_delays(
    storage: ResilientStorage, sleeps: list[float], caplog: pytest.LogCaptureFixture
) -> None:
    study = new_study(storage)
    flaky = Flaky(storage, "get_all_trials", failures=6)
    with caplog.at_level(logging.INFO, logger="evolver.loop"):
        assert study.get_trials() == []
    assert flaky.calls == 7
    ceilings = [0.01, 0.02, 0.04, 0.04, 0.04, 0.04]
    assert len(sleeps) == 6
    for delay, ceiling in zip(sleeps, ceilings, strict=True):
        assert ceiling / 2 <= delay <= ceiling
    assert outage_lines(caplog) == (1, 1)


def test_an_outage_is_logged_once_whatever_the_calls_and_threads(
    storage: ResilientStorage, caplog: pytest.LogCaptureFixture
) -> None:
    study = new_study(storage)
    trial_id = study.ask()._trial_id
    failing = threading.Event()
    failing.set()
    real_get = storage._cached.get_all_trials
    real_beat = storage._cached.record_heartbeat

    def while_failing(real: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            if failing.is_set():
                raise dropped()
            return real(*args, **kwargs)

        return call

    storage._cached.get_all_trials = while_failing(real_get)
    storage._cached.record_heartbeat = while_failing(real_beat)
    with caplog.at_level(logging.INFO, logger="evolver.loop"):
        readers = [threading.Thread(target=study.get_trials) for _ in range(3)]
        for reader in readers:
            reader.start()
        assert storage.try_record_heartbeat(trial_id) is False
        threading.Timer(0.3, failing.clear).start()
        for reader in readers:
            reader.join(timeout=10)
        assert storage.try_record_heartbeat(trial_id) is True
        assert outage_lines(caplog) == (1, 1)
        # A second outage is a second pair of lines.
        failing.set()
        threading.Timer(0.1, failing.clear).start()
        study.get_trials()
    assert outage_lines(caplog) == (2, 2)


def test_an_outage_longer_than_the_bound_is_one_error_naming_loop_storage(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    backend = make_storage(f"sqlite:///{tmp_path / 'c.db'}")
    storage = ResilientStorage(
        backend.backend, label="postgresql://u@db/x", backoff=Backoff(0.3, 0.01, 0.05)
    )
    study = new_study(storage)
    Flaky(storage, "get_all_trials", failures=10**6)
    with pytest.raises(StorageUnavailableError) as raised:
        study.get_trials()
    message = str(raised.value)
    assert message.startswith("loop.storage: postgresql://u@db/x unreachable for 0 s")
    assert "loop.storage_retry_s is 0.3" in message and "server closed the connection" in message
    assert "\n" not in message and raised.value.exit_code == 1
    # The outage goes on: later calls give up at once instead of waiting the bound again.
    with pytest.raises(StorageUnavailableError):
        study.get_trials()


def test_other_errors_are_not_retried(storage: ResilientStorage, sleeps: list[float]) -> None:
    with pytest.raises(KeyError):
        storage.get_study_id_from_name("absent")
    assert sleeps == []
    assert not is_transient(IntegrityError("INSERT", {}, Exception("duplicate key")))
    import sqlite3

    missing_table = OperationalError("SELECT", {}, sqlite3.OperationalError("no such table: x"))
    assert not is_transient(missing_table)
    assert is_transient(OperationalError("SELECT", {}, sqlite3.OperationalError("locked")))


def test_a_trial_created_before_the_connection_dropped_is_not_created_twice(
    storage: ResilientStorage,
) -> None:
    study = new_study(storage)
    flaky = Flaky(storage, "create_new_trial", failures=1, applied=True)
    study.enqueue_trial({"x": 1.0})
    assert flaky.calls == 1  # the retry found its token instead of inserting again
    trials = study.get_trials()
    assert len(trials) == 1 and trials[0].state == TrialState.WAITING
    assert trials[0].system_attrs["fixed_params"] == {"x": 1.0}
    assert CREATE_TOKEN_KEY in trials[0].system_attrs
    # A connection lost before the insert: the retry inserts it.
    Flaky(storage, "create_new_trial", failures=1, applied=False)
    study.enqueue_trial({"x": 2.0})
    assert [t.system_attrs["fixed_params"]["x"] for t in study.get_trials()] == [1.0, 2.0]


def test_a_pop_applied_before_the_connection_dropped_is_still_this_workers(
    storage: ResilientStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    study = new_study(storage)
    study.enqueue_trial({"x": 1.0})
    trial_id = study.get_trials()[0]._trial_id
    session = storage.backend.scoped_session()
    real_commit = session.commit
    commits: list[int] = []

    def commit_then_drop() -> None:
        real_commit()
        commits.append(1)
        if len(commits) == 1:
            raise dropped()

    monkeypatch.setattr(session, "commit", commit_then_drop)
    assert storage.set_trial_state_values(trial_id, TrialState.RUNNING) is True
    assert commits == [1]  # no second state change
    assert storage.get_trial(trial_id).state == TrialState.RUNNING
    # Any other pop of the trial, by this storage or another worker's, finds it taken.
    other = make_storage(f"sqlite:///{storage.backend.url.split(':///', 1)[1]}")
    assert other.set_trial_state_values(trial_id, TrialState.RUNNING) is False
    assert storage.set_trial_state_values(trial_id, TrialState.RUNNING) is False


def test_a_trial_finished_before_the_connection_dropped_is_told_once(
    storage: ResilientStorage,
) -> None:
    study = new_study(storage)
    trial = study.ask()
    Flaky(storage, "set_trial_state_values", failures=1, applied=True)
    study.tell(trial, 0.25)
    assert study.trials[0].state == TrialState.COMPLETE and study.trials[0].value == 0.25
    # Finished with another state or value: still refused.
    with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):
        storage.set_trial_state_values(trial._trial_id, TrialState.COMPLETE, [0.5])


class CommitThenDrop:
    """The storage, with claims whose first transaction commits and then loses its connection."""

    def __init__(self, storage: ResilientStorage) -> None:
        self.storage = storage
        self.commits = 0

    @property
    def engine(self) -> CommitThenDrop:
        return self

    @contextlib.contextmanager
    def begin(self) -> Iterator[Any]:
        with self.storage.engine.begin() as connection:
            yield connection
        self.commits += 1
        if self.commits == 1:
            raise dropped()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.storage, name)


def test_a_claim_applied_before_the_connection_dropped_stays_this_workers(
    storage: ResilientStorage,
) -> None:
    study_id = new_study(storage)._study_id
    dropping = CommitThenDrop(storage)
    assert claim(dropping, study_id, "evolver.build.1", "worker-a") is True
    assert dropping.commits == 1  # the retry met its own row and committed nothing
    assert claim(storage, study_id, "evolver.build.1", "worker-b") is False
    assert claim(storage, study_id, "evolver.build.1", "worker-a") is True


@pytest.mark.serial
@pytest.mark.filterwarnings("ignore:Heartbeat of storage")
def test_stale_trials_wait_a_grace_period_after_an_outage(tmp_path: Path) -> None:
    from omegaconf import OmegaConf

    loop = {"name": "x", "iterations": 1, "trials_per_iteration": 1}
    loop |= {"heartbeat_interval": 1, "grace_period": 2}
    settings = LoopSettings.from_cfg(OmegaConf.create({"loop": loop, "runs_dir": str(tmp_path)}))
    made = make_storage(f"sqlite:///{tmp_path / 'd.db'}", settings)
    storage = ResilientStorage(made.backend, label=made.label, backoff=FAST)
    study = new_study(storage)
    trial_id = study.ask()._trial_id
    storage.record_heartbeat(trial_id)
    with HeartbeatThread(storage, [trial_id], interval=1):
        pass  # beats once
    import time

    deadline = time.monotonic() + 15  # the grace period is 2 s; a loaded machine may lag
    while not storage._get_stale_trial_ids(study._study_id) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert storage._get_stale_trial_ids(study._study_id) == [trial_id]
    Flaky(storage, "get_all_trials", failures=2)
    study.get_trials()  # an outage, over now
    assert storage.settle_s == pytest.approx(2 + FAST.max_s)
    assert storage._get_stale_trial_ids(study._study_id) == []
    time.sleep(storage.settle_s)
    deadline = time.monotonic() + 15
    while not storage._get_stale_trial_ids(study._study_id) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert storage._get_stale_trial_ids(study._study_id) == [trial_id]


@pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def test_workers_popping_at_once_never_take_the_same_trial(
    tmp_path: Path, backend: str, request: pytest.FixtureRequest
) -> None:
    # SQLite runs a plain SELECT outside the write transaction: a pop that reads the state and
    # then writes it lets two workers both see WAITING. The transaction must lock from its read.
    if backend == "sqlite":
        url = f"sqlite:///{tmp_path / 'study.db'}"
    else:
        url = request.getfixturevalue("postgres_url")
    study = optuna.create_study(study_name="s", storage=make_storage(url))
    for x in range(60):
        study.enqueue_trial({"x": float(x)})
    trial_ids = [t._trial_id for t in study.get_trials()]
    workers = [make_storage(url) for _ in range(4)]
    taken: list[list[int]] = [[] for _ in workers]
    start = threading.Barrier(len(workers))

    def pop_all(index: int) -> None:
        start.wait()
        for trial_id in trial_ids:
            if workers[index].set_trial_state_values(trial_id, TrialState.RUNNING):
                taken[index].append(trial_id)

    threads = [threading.Thread(target=pop_all, args=(i,)) for i in range(len(workers))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    every = sorted(trial_id for ids in taken for trial_id in ids)
    assert every == sorted(trial_ids)


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")
def test_workers_failing_stale_trials_at_once_retry_each_once(tmp_path: Path) -> None:
    # Failing a stale trial reads RUNNING, then writes FAIL and enqueues its retry: on SQLite
    # two workers could both read RUNNING and both enqueue a retry, unless the read is inside
    # the write transaction.
    import time

    from omegaconf import OmegaConf

    loop = {"name": "x", "iterations": 1, "trials_per_iteration": 1}
    loop |= {"heartbeat_interval": 1, "grace_period": 2}
    settings = LoopSettings.from_cfg(OmegaConf.create({"loop": loop, "runs_dir": str(tmp_path)}))
    url = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(study_name="s", storage=make_storage(url, settings))
    stale = [study.ask({"x": optuna.distributions.FloatDistribution(0, 1)}) for _ in range(80)]
    for trial in stale:
        study._storage.record_heartbeat(trial._trial_id)
    time.sleep(3)
    studies = [
        optuna.load_study(study_name="s", storage=make_storage(url, settings)) for _ in range(4)
    ]
    start = threading.Barrier(len(studies))

    def fail_stale(worker: optuna.Study) -> None:
        start.wait()
        optuna.storages.fail_stale_trials(worker)

    threads = [threading.Thread(target=fail_stale, args=(s,)) for s in studies]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    trials = study.get_trials()
    retried = sorted(
        t.system_attrs["failed_trial"] for t in trials if "failed_trial" in t.system_attrs
    )
    assert retried == [trial.number for trial in stale]


def test_a_sqlite_transaction_holds_the_write_lock_from_its_first_read(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "study.db"
    storage = make_storage(f"sqlite:///{path}")
    optuna.create_study(study_name="s", storage=storage)
    other_worker = sqlite3.connect(path, timeout=0.2, isolation_level=None)
    with storage.engine.connect() as connection:
        assert connection.exec_driver_sql("SELECT count(*) FROM trials").scalar() == 0
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            other_worker.execute("UPDATE studies SET study_name = study_name")
        connection.commit()
    other_worker.execute("UPDATE studies SET study_name = study_name")
    other_worker.close()
