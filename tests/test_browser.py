"""The MLflow UI started by `evolver ui`, rendered by headless Chromium, shows the loop's runs."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
from tracking_support import assert_loop_structure, run_tiny_loop
from ui_support import DevToolsPage, chromium_path, run_in_chromium, start_ui

pytestmark = pytest.mark.slow

# Expand every parent run of the runs table (the "+" button of the run-name cell).
EXPAND_PARENTS = """
(() => {
  const buttons = document.querySelectorAll(
    '.ag-row [col-id="attributes.`Run Name`"] button[data-component-id*="runnamecellrenderer"]');
  buttons.forEach(button => button.click());
  return buttons.length;
})()
"""


@pytest.fixture
def chromium() -> str:
    path = chromium_path()
    if path is None:
        if os.environ.get("EVOLVER_REQUIRE_BROWSER") == "1":
            pytest.fail("chromium is required (EVOLVER_REQUIRE_BROWSER=1) but not installed")
        pytest.skip("chromium is not installed")
    return path


@pytest.fixture(scope="module")
def finished_loop(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The runs folder of a tiny `evolver loop` (1 iteration, 2 trials) on the default store."""
    runs_dir = tmp_path_factory.mktemp("loop") / "runs"
    runs_dir.mkdir()
    run_tiny_loop(runs_dir)
    return runs_dir


def test_loop_store_holds_iterations_trials_and_their_records(finished_loop: Path) -> None:
    assert_loop_structure(f"sqlite:///{finished_loop / 'mlflow.db'}", "demo", {1: 2})


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.browser
def test_runs_table_shows_iteration_and_trial_runs(
    chromium: str, finished_loop: Path, tmp_path: Path, artifacts_dir: Path
) -> None:
    ui = start_ui(
        ["--runs-dir", str(finished_loop), "--loop", "demo", "--port", str(free_port())],
        cwd=tmp_path,
    )
    try:
        url = ui.wait_for_line("MLflow runs table: ").split(": ", 1)[1]

        async def look(page: DevToolsPage) -> tuple[str, int, bool]:
            await page.send("Page.navigate", url=url)
            assert await page.wait_for_text(["iteration-1"], timeout_s=60), "no iteration run"
            expanded = await page.evaluate(EXPAND_PARENTS)
            shown = await page.wait_for_text(["trial-0", "trial-1"], timeout_s=30)
            await page.screenshot(artifacts_dir / "mlflow-runs-table.png")
            return await page.evaluate("document.documentElement.outerHTML"), expanded, shown

        dom, expanded, shown = run_in_chromium(tmp_path / "chromium", free_port(), look)
    finally:
        assert ui.interrupt() == 0
    (artifacts_dir / "mlflow-runs-table.html").write_text(dom)
    assert expanded == 1
    assert shown, "trial runs did not appear under the expanded iteration"
    for name in ("iteration-1", "trial-0", "trial-1"):
        assert f">{name}<" in dom, name
