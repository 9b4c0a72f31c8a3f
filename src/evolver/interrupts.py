"""Ctrl-C and SIGTERM stop the current run or trial cleanly, then exit with 130 or 143.

`handled()` (entered by the `evolver train` and `evolver loop` entry points) turns the first
SIGINT or SIGTERM into an `Interrupted` exception raised in the main thread. It is deliberately
not a KeyboardInterrupt: Lightning's `fit` turns a KeyboardInterrupt into `sys.exit(1)`, while
any other exception goes through its `on_exception` hooks and teardown and is re-raised as is.
During `fit`, Lightning's own SIGTERM handler records the signal and then calls this one.

The run's records are written on the way out; a second signal during that shutdown exits at
once, without waiting for them.

Jobs that a launcher runs in other processes (joblib) install the handlers in their worker
(`run_job`); there an interrupted job is reported as a failed job (`InterruptedJob`), so that
the launcher collects every job's end instead of killing the others. Meanwhile the sweeper
defers its own interrupt (`deferred(forward=True)`): it passes the signal on to its worker
processes and raises once the launcher returns.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from types import FrameType
from typing import Any, TypeVar

HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM)
T = TypeVar("T")


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived; `where` and `hint` complete the one line that reports it."""

    def __init__(self, signum: int, where: str | None = None, hint: str | None = None) -> None:
        super().__init__(int(signum))
        self.signum = int(signum)
        self.where = where
        self.hint = hint

    @property
    def signal_name(self) -> str:
        return signal_name(self.signum)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    def __str__(self) -> str:
        return self.signal_name

    def line(self, program: str) -> str:
        text = f"{program}: interrupted ({self.signal_name})"
        if self.where:
            text += f" during {self.where}"
        return text + (f"; {self.hint}" if self.hint else "")


class InterruptedJob(Exception):
    """A job that a signal stopped in a launcher's worker process (its records are written)."""

    def __init__(self, signum: int) -> None:
        super().__init__(int(signum))
        self.signum = int(signum)

    def __str__(self) -> str:
        return f"interrupted ({signal_name(self.signum)})"


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def interrupt_signal(error: BaseException | None) -> int | None:
    """The signal behind an `Interrupted` or `InterruptedJob`, else None."""
    if isinstance(error, Interrupted | InterruptedJob):
        return error.signum
    return None


@dataclass
class _State:
    installed_pid: int | None = None
    entry: bool = False  # the process the user started (a second signal exits it at once)
    received: int | None = None
    deferring: bool = False
    forwarding: bool = False
    in_job: bool = False


_state = _State()


def _reset(**values: Any) -> None:
    for item in fields(_State):
        setattr(_state, item.name, values.get(item.name, item.default))


def received() -> int | None:
    """The first SIGINT or SIGTERM this process handled, if any."""
    return _state.received if _state.installed_pid == os.getpid() else None


def _install() -> dict[int, Any]:
    """Handle the signals still at their default disposition: an ignored SIGINT (a background
    job) stays ignored, and a handler someone else installed is kept."""
    previous: dict[int, Any] = {}
    for signum in HANDLED_SIGNALS:
        current = signal.getsignal(signum)
        if current in (signal.SIG_DFL, signal.default_int_handler):
            previous[signum] = signal.signal(signum, _handle)
    return previous


@contextmanager
def handled() -> Iterator[None]:
    """Ctrl-C and SIGTERM raise `Interrupted` in this (the user's) process until the block ends."""
    saved = dict(vars(_state))
    _reset(installed_pid=os.getpid(), entry=True)
    previous = _install()
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        _reset(**saved)


@contextmanager
def in_job() -> Iterator[None]:
    """Run one job of a worker process: a signal raises `Interrupted` only while it runs (an
    idle worker just remembers it, and refuses its next job)."""
    if _state.installed_pid != os.getpid():
        # Installed for the worker's lifetime: an idle worker killed by a signal would break
        # the launcher's pool, and with it the jobs still writing their records.
        _reset(installed_pid=os.getpid())
        _install()
    if _state.received is not None:
        raise InterruptedJob(_state.received)
    _state.in_job = True
    try:
        yield
    finally:
        _state.in_job = False


def run_job(job: Callable[[], T], *, in_worker_process: bool) -> T:
    """Run one launched job; in a launcher's worker process an interrupt ends it as a failed
    job (its records written), so that the launcher collects every job's end instead of killing
    the others."""
    if not in_worker_process:
        return job()
    with in_job():
        try:
            return job()
        except Interrupted as interrupted:
            raise InterruptedJob(interrupted.signum) from None


@contextmanager
def deferred(forward: bool = False) -> Iterator[None]:
    """Hold a first signal back (`received()` tells it afterwards): for steps that must not be
    cut in half, and while a launcher's worker processes run the jobs (`forward` passes the
    signal on to them, so that they stop their jobs cleanly)."""
    before = (_state.deferring, _state.forwarding)
    _state.deferring, _state.forwarding = True, forward
    try:
        yield
    finally:
        _state.deferring, _state.forwarding = before


def raise_if_received(where: str | None = None, hint: str | None = None) -> None:
    signum = received()
    if signum is not None and not _state.deferring:
        raise Interrupted(signum, where, hint)


def _handle(signum: int, frame: FrameType | None) -> None:
    state = _state
    if os.getpid() != state.installed_pid:
        # A forked child (a data-loader worker): behave as if nothing were installed.
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        _die(signum)
    if state.received is not None:
        if state.entry:
            _die(signum)  # a second signal while shutting down: exit at once
        # A worker finishing its job's records: the terminal and the sweeper both signal it.
        return
    state.received = signum
    if state.deferring:
        if state.forwarding:
            _forward(signum)
        return
    if not state.entry and not state.in_job:
        return
    raise Interrupted(signum)


def _die(signum: int) -> None:
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def _forward(signum: int) -> None:
    for child in multiprocessing.active_children():
        if child.pid is not None:
            try:
                os.kill(child.pid, signum)
            except OSError:  # it ended meanwhile
                continue
