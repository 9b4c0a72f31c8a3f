"""Tracking calls kept on disk while the MLflow store cannot be reached.

A buffer is a folder (`mlflow-buffer/` in a run directory, or in a loop's folder) holding
`batches.jsonl`: a header line (the store, the experiment, and the run ids that replayed
placeholders stand for) then one line per MLflow call, in order. A call replayed successfully is
removed at once by an atomic rewrite of the file (a temporary file moved over it), together with
the run id it created: after a crash the file holds exactly the calls not yet confirmed. A
`lock` file (fcntl) lets one process at a time append or replay; the folder goes when empty.

Nothing here imports MLflow.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BUFFER_FOLDER = "mlflow-buffer"
BATCHES_FILE = "batches.jsonl"
LOCK_FILE = "lock"
FILES_FOLDER = "files"


@dataclass
class BufferContents:
    header: dict[str, Any]
    entries: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ids(self) -> dict[str, str]:
        """Placeholder run id -> the MLflow run id it was replayed as."""
        return dict(self.header.get("ids") or {})


class TrackingBuffer:
    """One buffer folder. Every method but `pending` must run inside `locked()`."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.path = self.folder / BATCHES_FILE

    @classmethod
    def of(cls, directory: Path) -> TrackingBuffer:
        return cls(Path(directory) / BUFFER_FOLDER)

    def pending(self) -> bool:
        """Whether calls wait in this buffer (a cheap check, without the lock)."""
        return self.path.is_file()

    @contextlib.contextmanager
    def locked(self, wait: bool = True) -> Iterator[bool]:
        """Hold the buffer's lock; yields False (without it) when `wait` is False and another
        process holds it."""
        while True:
            self.folder.mkdir(parents=True, exist_ok=True)
            lock_path = self.folder / LOCK_FILE
            handle = lock_path.open("a")
            try:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
                except BlockingIOError:
                    yield False
                    return
                if not _same_file(handle, lock_path):
                    continue  # the holder emptied and removed the folder meanwhile: start over
                yield True
                return
            finally:
                handle.close()

    def read(self) -> BufferContents:
        if not self.path.is_file():
            return BufferContents(header={})
        lines = self.path.read_text().splitlines()
        records = []
        for line in lines:
            try:
                records.append(json.loads(line))
            except ValueError:  # a line cut short by a crash while it was appended
                continue
        if not records:
            return BufferContents(header={})
        return BufferContents(header=records[0], entries=records[1:])

    def append(self, call: dict[str, Any], header: dict[str, Any]) -> dict[str, Any]:
        """Add `call` (as the next entry); `header` starts a new buffer. Returns the entry."""
        contents = self.read()
        seq = max((int(entry["seq"]) for entry in contents.entries), default=0) + 1
        entry = {"seq": seq, **call}
        if contents.header:
            with self.path.open("a") as handle:
                handle.write(json.dumps(entry) + "\n")
                handle.flush()
                os.fsync(handle.fileno())
        else:
            self._write(BufferContents(header={**header, "ids": {}}, entries=[entry]))
        return entry

    def keep_copy(self, source: Path) -> Path:
        """A copy of `source` that lives as long as its entry (for files about to vanish)."""
        target = self.folder / FILES_FOLDER / uuid.uuid4().hex / source.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)
        return target

    def remove(self, seq: int, ids: dict[str, str]) -> None:
        """Drop entry `seq` (sent) and record `ids` in one atomic step; the folder goes when the
        last entry does."""
        contents = self.read()
        removed = [entry for entry in contents.entries if int(entry["seq"]) == seq]
        remaining = [entry for entry in contents.entries if int(entry["seq"]) != seq]
        if remaining:
            header = {**contents.header, "ids": {**contents.ids, **ids}}
            self._write(BufferContents(header=header, entries=remaining))
            files = self.folder / FILES_FOLDER
            for entry in removed:
                copy = Path(str(entry.get("path") or ""))
                if copy.parent.parent == files:
                    shutil.rmtree(copy.parent, ignore_errors=True)
            return
        self.path.unlink(missing_ok=True)
        shutil.rmtree(self.folder / FILES_FOLDER, ignore_errors=True)
        # Last: waiters on the lock see it gone and start over on a fresh folder.
        (self.folder / LOCK_FILE).unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            self.folder.rmdir()

    def _write(self, contents: BufferContents) -> None:
        temporary = self.path.with_name(f".{BATCHES_FILE}.tmp")
        with temporary.open("w") as handle:
            for record in [contents.header, *contents.entries]:
                handle.write(json.dumps(record) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, self.path)


def _same_file(handle: Any, path: Path) -> bool:
    try:
        return os.fstat(handle.fileno()).st_ino == path.stat().st_ino
    except FileNotFoundError:
        return False


def find_buffers(directory: Path) -> list[TrackingBuffer]:
    """The buffers in `directory` and below it (a run, a loop, or a whole runs folder), outer
    ones first: a loop's buffer creates the iteration runs that its trials' buffers nest under."""
    folders = {path.parent for path in Path(directory).rglob(f"{BUFFER_FOLDER}/{BATCHES_FILE}")}
    return [TrackingBuffer(f) for f in sorted(folders, key=lambda f: (len(f.parts), str(f)))]
