"""Tracking that never blocks training: bounded calls, a buffer on disk, replay when back.

`ResilientStore` sends each MLflow call at once while the store answers. When a call fails and a
cheap probe (the server's /health, or a database connect) says the store is unreachable, the
call goes to the buffer (evolver.tracking.buffer) and so does every later one, without touching
the network, until the next probe is due (`tracking.retry_interval_s`). When the store answers
again the buffer is replayed in order, then new calls go straight out again. A call the store
itself refuses while it answers would be refused again: it is dropped with a warning (the run's
local records hold everything anyway).

Runs created while the store is away get a placeholder id (`pending-<hex>`); later calls name
the placeholder, and the replay maps it to the run it creates. A run is created at replay only
if it does not exist yet (found by a filter on its tags): a replay cut short by a crash between
a call and its removal from the buffer sends that call again, which MLflow's stores absorb
(metric points carry their original timestamps; params and tags are set to the same values).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from mlflow.entities import Metric, Param, RunTag

from evolver.database_url import redact
from evolver.errors import ConfigError, EvolverError
from evolver.tracking.backend import Batch, CallLimits, MlflowStore, now_ms, plan_batches
from evolver.tracking.buffer import TrackingBuffer
from evolver.tracking.store import TrackingSettings, check_reachable

log = logging.getLogger("evolver.tracking")

T = TypeVar("T")
PLACEHOLDER_PREFIX = "pending-"


class TrackingError(EvolverError):
    """A tracking call failed under `tracking.on_error=fail`: the run fails."""

    exit_code = 1


class Unresolved(Exception):
    """A call names a run that is not created yet (its creation waits in another buffer)."""


def new_placeholder() -> str:
    return f"{PLACEHOLDER_PREFIX}{uuid.uuid4().hex}"


def is_placeholder(run_id: str | None) -> bool:
    return bool(run_id) and str(run_id).startswith(PLACEHOLDER_PREFIX)


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


@dataclass
class Outage:
    """Whether one store is away, as this process saw it; warns once per outage."""

    shown_uri: str
    retry_interval_s: float
    down_since: float | None = None
    next_check: float = 0.0

    @property
    def down(self) -> bool:
        return self.down_since is not None

    def check_due(self) -> bool:
        return time.monotonic() >= self.next_check

    def failed(self, reason: str) -> None:
        now = time.monotonic()
        if self.down_since is None:
            self.down_since = now
            log.warning(
                "MLflow: %s; tracking goes to a buffer in the run directory and training goes "
                "on (the store is checked again every %g s)",
                reason,
                self.retry_interval_s,
            )
        self.next_check = now + self.retry_interval_s

    def recovered(self) -> None:
        if self.down_since is not None:
            log.warning(
                "MLflow: %s answers again after %.0f s; sending the buffered tracking",
                self.shown_uri,
                time.monotonic() - self.down_since,
            )
            self.down_since = None


_OUTAGES: dict[str, Outage] = {}


def outage_of(settings: TrackingSettings) -> Outage:
    """The process-wide outage state of a store: a loop's trials learn of it from the loop."""
    outage = _OUTAGES.get(settings.uri)
    if outage is None:
        outage = _OUTAGES[settings.uri] = Outage(redact(settings.uri), settings.retry_interval_s)
    outage.retry_interval_s = settings.retry_interval_s
    return outage


def unreachable_reason(settings: TrackingSettings) -> str | None:
    """Why the store cannot be reached now (None when it answers): one cheap, bounded probe."""
    try:
        check_reachable(settings.uri, min(settings.timeout_s, settings.preflight_timeout_s))
    except ConfigError as error:
        return str(error).removeprefix("tracking.uri: ")
    return None


class ResilientStore:
    """The MLflow calls of one run (or one loop), sent now or buffered in `buffer_folder`."""

    def __init__(
        self,
        settings: TrackingSettings,
        buffer_folder: Path,
        experiment: str,
        store: MlflowStore | None = None,
    ) -> None:
        self.settings = settings
        limits = CallLimits(settings.timeout_s, settings.retries)
        self.store = store or MlflowStore(settings.uri, settings.artifact_root, limits)
        self.buffer = TrackingBuffer(buffer_folder)
        self.experiment = experiment
        self.outage = outage_of(settings)
        self.ids: dict[str, str] = {}
        self.finders: dict[str, str] = {}
        self._experiment_ids: dict[str, str] = {}
        self.replayed = 0

    @property
    def client(self) -> Any:
        return self.store.client

    def sibling(self, buffer_folder: Path) -> ResilientStore:
        """The same store and outage state with another buffer (another run's)."""
        return ResilientStore(self.settings, buffer_folder, self.experiment, self.store)

    # -- calls ------------------------------------------------------------------------------------
    def create_run(
        self,
        run_name: str | None,
        tags: Mapping[str, str],
        parent: str | None = None,
        *,
        find: str | None = None,
        reopen: bool = False,
        what: str = "start the run",
    ) -> str | None:
        """The run's id: created now, or a placeholder that the replay creates. With `find` (a
        search filter) an existing matching run is used instead (reopened with `reopen`)."""
        run_id = new_placeholder()
        if find:
            self.finders[run_id] = find
        call = {
            "op": "create_run",
            "run_id": run_id,
            "experiment": self.experiment,
            "run_name": run_name,
            "tags": dict(tags),
            "parent": parent,
            "reopen": reopen,
            "start_time": now_ms(),
        }
        return self._submit(call, what)

    def log(
        self,
        run_id: str,
        metrics: Iterable[Metric] = (),
        params: Mapping[str, str] | None = None,
        tags: Mapping[str, str] | None = None,
        what: str = "log",
    ) -> int:
        """One call per `log_batch` MLflow's limits allow; returns how many."""
        batches = plan_batches(metrics, params, tags)
        for batch in batches:
            call = {
                "op": "log_batch",
                "run_id": run_id,
                "metrics": [[m.key, m.value, m.timestamp, m.step] for m in batch.metrics],
                "params": {p.key: p.value for p in batch.params},
                "tags": {t.key: t.value for t in batch.tags},
            }
            self._submit(call, what)
        return len(batches)

    def log_files(
        self,
        run_id: str,
        files: Iterable[Path],
        artifact_path: str | None,
        what: str = "upload files",
        temporary: bool = False,
    ) -> None:
        """One call per file; `temporary` files are copied into the buffer if buffered."""
        for path in files:
            call = {
                "op": "log_artifact",
                "run_id": run_id,
                "path": str(path),
                "artifact_path": artifact_path,
                "temporary": temporary,
            }
            self._submit(call, f"{what} ({Path(path).name})")

    def log_folder(self, run_id: str, folder: Path, artifact_path: str | None, what: str) -> None:
        call = {
            "op": "log_folder",
            "run_id": run_id,
            "path": str(folder),
            "artifact_path": artifact_path,
        }
        self._submit(call, what)

    def terminate(self, run_id: str, status: str, what: str = "close the run") -> None:
        call = {"op": "terminate", "run_id": run_id, "status": status, "end_time": now_ms()}
        self._submit(call, what)

    def expect(self, placeholder: str, find: str) -> None:
        """How to find the run that another process's placeholder stands for, once replayed."""
        self.finders[placeholder] = find

    def attempt(self, what: str, action: Callable[[], T], default: T) -> T:
        """`action()` now if the store is not known to be away; `default` when it fails (these
        calls are not buffered: reads, and clean-ups that the next run repeats)."""
        if self.outage.down and not self._store_is_back():
            return default
        try:
            return action()
        except Exception as error:
            self._fail_or_raise(error, what)
            return default

    # -- replay -----------------------------------------------------------------------------------
    def pending(self) -> int:
        """How many calls wait in the buffer."""
        if not self.buffer.pending():
            return 0
        with self.buffer.locked():
            return len(self.buffer.read().entries)

    def sync(self, force: bool = False, wait: bool = True) -> bool:
        """Replay the buffer if the store answers (probing at most every retry interval, or now
        with `force`); True when nothing is left in it."""
        if not self.buffer.pending():
            return True
        if (self.outage.down or not self.store.connected) and not self._store_is_back(force):
            return False
        return self._replay(wait)

    def resolve(self, run_id: str | None) -> str | None:
        """The MLflow id of `run_id` if known or findable now; else `run_id` as it is."""
        if not is_placeholder(run_id) or run_id in self.ids:
            return self.ids.get(str(run_id), run_id)
        if self.outage.down and not self._store_is_back():
            return run_id
        try:
            return self._resolve(str(run_id), {})
        except Unresolved:
            return run_id
        except Exception as error:
            self._fail_or_raise(error, "find a run")
            return run_id

    def _store_is_back(self, force: bool = False) -> bool:
        if self.outage.down and not (force or self.outage.check_due()):
            return False
        reason = unreachable_reason(self.settings)
        if reason is not None:
            self.outage.failed(reason)
            return False
        self.outage.recovered()
        return True

    def _replay(self, wait: bool) -> bool:
        with self.buffer.locked(wait) as held:
            if not held:
                return False
            contents = self.buffer.read()
            self.ids.update(contents.ids)
            for entry in contents.entries:
                try:
                    self._apply(entry)
                except Unresolved:
                    return False
                except Exception as error:
                    if not self._store_answers(error):
                        return False
                    log.warning(
                        "MLflow: dropped a buffered %s call that %s refuses (%s: %s)",
                        entry["op"],
                        self.outage.shown_uri,
                        type(error).__name__,
                        first_line(error),
                    )
                self.buffer.remove(int(entry["seq"]), self.ids)
                self.replayed += 1
            return True

    # -- internals --------------------------------------------------------------------------------
    def _submit(self, call: dict[str, Any], what: str) -> str | None:
        self._annotate(call)
        if self.settings.on_error == "fail":
            try:
                return self._apply(call)
            except Exception as error:
                self._fail_or_raise(error, what)
                return None
        if not self.store.connected and not self.outage.down:
            self._store_is_back(force=True)  # a client is made only for a store that answers
        if self.outage.down or self.buffer.pending():
            self._append(call)
            self.sync()
            return self._result(call)
        try:
            return self._apply(call)
        except Unresolved:
            self._append(call)
            return self._result(call)
        except Exception as error:
            if self._store_answers(error):
                log.warning(
                    "MLflow: could not %s (%s: %s)", what, type(error).__name__, first_line(error)
                )
                return None
            self._append(call)
            return self._result(call)

    def _fail_or_raise(self, error: Exception, what: str) -> None:
        if self.settings.on_error == "fail":
            raise TrackingError(
                f"tracking.uri: MLflow at {self.outage.shown_uri} could not {what} "
                f"({type(error).__name__}: {first_line(error)}); tracking.on_error=fail stops "
                "the run"
            ) from None
        if self._store_answers(error):
            log.warning(
                "MLflow: could not %s (%s: %s)", what, type(error).__name__, first_line(error)
            )

    def _store_answers(self, error: Exception) -> bool:
        """After a failed call: True if the store answers (the call itself was refused)."""
        reason = unreachable_reason(self.settings)
        if reason is None:
            return True
        self.outage.failed(reason or first_line(error))
        return False

    def _annotate(self, call: dict[str, Any]) -> None:
        """Record in the call how to find the runs it names, for a replay in another process."""
        named = [call.get("run_id"), call.get("parent")]
        finders = {pid: self.finders[pid] for pid in named if pid and pid in self.finders}
        if finders:
            call["find"] = finders

    def _append(self, call: dict[str, Any]) -> None:
        header = {
            "uri": self.store.uri,
            "artifact_root": self.settings.artifact_root,
            "experiment": self.experiment,
        }
        with self.buffer.locked():
            if call.get("temporary"):
                call = {**call, "path": str(self.buffer.keep_copy(Path(call["path"])))}
            self.buffer.append(call, header)

    def _result(self, call: dict[str, Any]) -> str | None:
        if call["op"] != "create_run":
            return None
        return self.ids.get(call["run_id"], call["run_id"])

    def _apply(self, call: dict[str, Any]) -> str | None:
        if call["op"] == "create_run":
            return self._create(call)
        run_id = self._resolve(call["run_id"], call)
        kind = call["op"]
        if kind == "log_batch":
            batch = Batch(
                metrics=[Metric(k, v, t, s) for k, v, t, s in call["metrics"]],
                params=[Param(k, v) for k, v in call["params"].items()],
                tags=[RunTag(k, v) for k, v in call["tags"].items()],
            )
            self.store.send(run_id, batch)
        elif kind == "log_artifact":
            self.store.client.log_artifact(run_id, call["path"], call["artifact_path"])
        elif kind == "log_folder":
            self.store.client.log_artifacts(run_id, call["path"], call["artifact_path"])
        elif kind == "terminate":
            self.store.terminate(run_id, call["status"], call["end_time"])
        else:
            raise ValueError(f"unknown buffered call {kind!r}")
        return None

    def _create(self, call: dict[str, Any]) -> str:
        placeholder = call["run_id"]
        parent = self._resolve(call["parent"], call) if call.get("parent") else None
        if parent:
            experiment_id = self.store.client.get_run(parent).info.experiment_id
        else:
            experiment_id = self._experiment_id(call["experiment"])
        existing = self._find(placeholder, call, experiment_id)
        if existing is not None:
            if call.get("reopen"):
                self.store.reopen_as_running(existing)
            return existing
        run_id = self.store.create_run(
            experiment_id, call["run_name"], call["tags"], parent, start_time=call["start_time"]
        )
        self.ids[placeholder] = run_id
        return run_id

    def _resolve(self, run_id: str, call: Mapping[str, Any]) -> str:
        if not is_placeholder(run_id):
            return run_id
        found = self._find(run_id, call, self._experiment_id(self.experiment))
        if found is None:
            raise Unresolved(run_id)
        return found

    def _find(self, placeholder: str, call: Mapping[str, Any], experiment_id: str) -> str | None:
        if placeholder in self.ids:
            return self.ids[placeholder]
        finder = (call.get("find") or {}).get(placeholder) or self.finders.get(placeholder)
        if not finder:
            return None
        found = self.store.find_run(experiment_id, finder)
        if found is not None:
            self.ids[placeholder] = found
        return found

    def _experiment_id(self, name: str) -> str:
        if name not in self._experiment_ids:
            self._experiment_ids[name] = self.store.experiment_id(name)
        return self._experiment_ids[name]


def tag_filter(tags: Mapping[str, str]) -> str | None:
    """An MLflow search filter matching these tag values (None if a value holds a quote)."""
    if any("'" in str(value) for value in tags.values()):
        return None
    return " AND ".join(f"tags.`{key}` = '{value}'" for key, value in tags.items())
