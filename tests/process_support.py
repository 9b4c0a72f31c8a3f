"""Processes that tests start and read line by line while they run."""

from __future__ import annotations

import subprocess
import threading
import urllib.request


class OutputLines:
    """A started process whose stdout lines a thread collects as they come."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.process = process
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))

    def reader_alive(self) -> bool:
        return self._reader.is_alive()

    def join_reader(self, timeout_s: float = 10) -> None:
        self._reader.join(timeout=timeout_s)


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except OSError:
        return False
