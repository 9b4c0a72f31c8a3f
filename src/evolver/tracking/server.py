"""Start and stop the MLflow tracking server and optuna-dashboard as child process groups."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from evolver.errors import EvolverError

# Without this, `mlflow server` also starts a job runner (7 processes, ~2 GB of memory).
SERVER_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


class ServerError(EvolverError):
    """A server process could not be started or did not answer."""


def executable(name: str) -> str:
    """A console script of this environment (next to the interpreter), else from PATH."""
    beside = Path(sys.executable).parent / name
    if beside.is_file():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise ServerError(f"{name} is not installed in this environment")
    return found


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    import socket

    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


@dataclass
class ServerProcess:
    """A server running in its own process group, so stopping it stops all its workers."""

    name: str
    url: str
    process: subprocess.Popen[bytes]
    log_path: Path | None = None

    def running(self) -> bool:
        return self.process.poll() is None

    def wait_until_ready(self, health_path: str, timeout_s: float) -> None:
        """Return once the server answers; stop it (and raise) if it dies, times out or ^C."""
        try:
            self._poll(health_path, timeout_s)
        except BaseException:
            self.stop()
            raise

    def _poll(self, health_path: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        target = self.url.rstrip("/") + health_path
        while time.monotonic() < deadline:
            if not self.running():
                raise ServerError(
                    f"{self.name} exited with code {self.process.returncode}{self._log_hint()}"
                )
            try:
                with urllib.request.urlopen(target, timeout=2) as response:
                    if response.status < 500:
                        return
            except urllib.error.HTTPError as error:
                if error.code < 500:  # it answers; the path is just not a page
                    return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.3)
        waited = f"{timeout_s:.0f} s{self._log_hint()}"
        raise ServerError(f"{self.name} did not answer at {target} in {waited}")

    def stop(self, timeout_s: float = 15.0) -> None:
        if not self.running():
            return
        for sig, wait_s in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 5.0)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, sig)
            try:
                self.process.wait(timeout=wait_s)
                break
            except subprocess.TimeoutExpired:
                continue
        # Workers that outlived their parent (same group) go too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)

    def _log_hint(self) -> str:
        return f" (see {self.log_path})" if self.log_path else ""


def _spawn(
    name: str, command: list[str], url: str, log_path: Path | None, extra_env: dict[str, str]
) -> ServerProcess:
    from evolver.secrets import command_without_passwords

    command, password_env = command_without_passwords(command)
    output: IO[bytes] | int = subprocess.DEVNULL
    if log_path is not None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        output = log_path.open("ab")
    try:
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            env={**os.environ, **extra_env, **password_env},
            start_new_session=True,
        )
    finally:
        if not isinstance(output, int):
            output.close()
    return ServerProcess(name, url, process, log_path)


def start_mlflow_server(
    backend_store_uri: str,
    port: int,
    *,
    default_artifact_root: str | None = None,
    artifacts_destination: str | None = None,
    log_path: Path | None = None,
    timeout_s: float = 120.0,
) -> ServerProcess:
    """`mlflow server` on 127.0.0.1:port, one worker, job runner off; returns once it answers.

    With `artifacts_destination` it proxies artifact uploads (as a shared server would);
    with `default_artifact_root` new experiments store artifacts at that location directly.
    """
    command = [
        executable("mlflow"), "server",
        "--backend-store-uri", backend_store_uri,
        "--host", "127.0.0.1",
        "--port", str(port),
        "--workers", "1",
    ]  # fmt: skip
    if artifacts_destination:
        command += ["--serve-artifacts", "--artifacts-destination", artifacts_destination]
    elif default_artifact_root:
        command += ["--no-serve-artifacts", "--default-artifact-root", default_artifact_root]
    server = _spawn("mlflow server", command, f"http://127.0.0.1:{port}", log_path, SERVER_ENV)
    server.wait_until_ready("/health", timeout_s)
    return server


def start_optuna_dashboard(
    storage: str, port: int, *, log_path: Path | None = None, timeout_s: float = 60.0
) -> ServerProcess:
    command = [executable("optuna-dashboard"), storage, "--host", "127.0.0.1", "--port", str(port)]
    server = _spawn("optuna-dashboard", command, f"http://127.0.0.1:{port}", log_path, {})
    server.wait_until_ready("/api/meta", timeout_s)
    return server
