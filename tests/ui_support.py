"""Drive `evolver ui` as a user does, and headless Chromium through the DevTools protocol."""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from process_support import OutputLines

REPO_ROOT = Path(__file__).resolve().parents[1]
EVOLVER = str(Path(sys.executable).parent / "evolver")
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--window-size=1400,900",
]  # fmt: skip


class UiProcess(OutputLines):
    """A running `evolver ui`; a thread collects its stdout lines as they come."""

    def wait_for_line(self, prefix: str, timeout_s: float = 180.0) -> str:
        """The first stdout line starting with prefix (fails with the output if it never comes)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if line.startswith(prefix):
                    return line
            if self.process.poll() is not None and not self.reader_alive():
                break
            time.sleep(0.2)
        stderr = self.process.stderr.read() if self.process.poll() is not None else ""
        raise AssertionError(f"no line {prefix!r} from evolver ui: {self.lines} {stderr}")

    def interrupt(self, timeout_s: float = 30.0) -> int:
        """Ctrl-C: SIGINT to the command, as a terminal sends it. One that ignores it is stopped
        with SIGTERM (its servers with it) and fails the test."""
        self.process.send_signal(signal.SIGINT)
        try:
            return self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.terminate()
            self.process.wait(timeout=timeout_s)
            raise AssertionError(f"evolver ui ignored SIGINT for {timeout_s:.0f} s") from None


def start_ui(args: list[str], cwd: Path) -> UiProcess:
    process = subprocess.Popen(
        [EVOLVER, "ui", *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        # A suite started in the background (`pytest &`) ignores SIGINT, and children inherit
        # that: give the command the terminal's default back, as a user's shell would.
        preexec_fn=default_sigint,
    )
    return UiProcess(process)


def default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def chromium_path() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


class DevToolsPage:
    """Just enough of the Chrome DevTools protocol: navigate, evaluate, click, screenshot."""

    def __init__(self, socket: Any) -> None:
        self.socket = socket
        self.ids = itertools.count(1)

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        message_id = next(self.ids)
        await self.socket.send_json({"id": message_id, "method": method, "params": params})
        while True:
            message = await self.socket.receive_json()
            if message.get("id") == message_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]

    async def evaluate(self, expression: str) -> Any:
        result = await self.send(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        return result["result"].get("value")

    async def wait_for_text(self, texts: list[str], timeout_s: float) -> bool:
        check = " && ".join(f"document.body.innerText.includes({json.dumps(t)})" for t in texts)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if await self.evaluate(f"!!document.body && {check}"):
                return True
            await asyncio.sleep(0.25)
        return False

    async def screenshot(self, path: Path) -> None:
        shot = await self.send("Page.captureScreenshot", format="png")
        path.write_bytes(base64.b64decode(shot["data"]))


async def _with_page(port: int, action: Any) -> Any:
    import aiohttp

    deadline = time.monotonic() + 30
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=2) as reply:
                targets = json.load(reply)
            page = next(t for t in targets if t["type"] == "page")
            break
        except (OSError, StopIteration):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0) as socket,
    ):
        devtools = DevToolsPage(socket)
        await devtools.send("Page.enable")
        return await action(devtools)


def run_in_chromium(user_data_dir: Path, debug_port: int, action: Any) -> Any:
    """Start headless Chromium, run `await action(page)` against its page, stop Chromium."""
    command = [
        chromium_path() or "chromium",
        *CHROMIUM_FLAGS,
        f"--user-data-dir={user_data_dir}",
        f"--remote-debugging-port={debug_port}",
        "about:blank",
    ]
    browser = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        return asyncio.run(_with_page(debug_port, action))
    finally:
        browser.terminate()
        try:
            browser.wait(timeout=10)
        except subprocess.TimeoutExpired:
            browser.kill()
            browser.wait()
