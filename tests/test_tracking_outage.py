"""Tracking never blocks training: bounded calls, a buffer in the run directory, replay.

The unit tests buffer a trial's tracking against a dead port and replay it (`evolver sync`) into
a SQLite store, crash included. The slow test kills a real `mlflow server` in the middle of a
loop of `tests/loop_tracked_app.py` (the fake app with the real tracker), restarts it, and
compares the runs with those of the same loop tracked without an outage.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import optuna
import pytest
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf
from process_support import OutputLines
from tracking_support import REPO_ROOT, tracking_cfg, write_run_dir

from evolver import cli
from evolver.errors import ConfigError
from evolver.loop.job import trial_params
from evolver.tracking import make_tracker
from evolver.tracking.backend import MlflowStore
from evolver.tracking.buffer import BATCHES_FILE, BUFFER_FOLDER, TrackingBuffer
from evolver.tracking.resilient import TrackingError, is_placeholder
from evolver.tracking.run_tracker import MlflowRunTracker
from evolver.tracking.server import ServerProcess, start_mlflow_server
from evolver.tracking.store import TrackingSettings
from evolver.tracking.sync import store_for

pytestmark = pytest.mark.serial

TRACKED_APP = Path(__file__).parent / "loop_tracked_app.py"
FOLDS, EPOCHS = 2, 3


def trial_cfg(tmp_path: Path, uri: str, **tracking: Any) -> DictConfig:
    """A loop trial's config (trial 0 of study `demo`), tracking at `uri`."""
    runs_dir = tmp_path / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    study = optuna.create_study(study_name="demo", storage=f"sqlite:///{runs_dir / 'optuna.db'}")
    trial = study.ask()
    trial.suggest_float("finetune.lr_head", 1e-4, 1e-2, log=True)
    cfg = tracking_cfg(runs_dir, uri=uri, **tracking)
    loop_group = OmegaConf.load(REPO_ROOT / "conf" / "loop" / "default.yaml")
    cfg.loop = OmegaConf.merge(loop_group, {"name": "demo", "trial_number": trial.number})
    return cfg


def buffered_trial(tmp_path: Path, dead_url: str, epoch_seconds: list[float] | None = None) -> Path:
    """A trial tracked while its store was away: everything in its run directory's buffer.
    The seconds each epoch's `log_epoch` took go to `epoch_seconds`."""
    run_dir = tmp_path / "runs" / "trial_0"
    cfg = trial_cfg(tmp_path, dead_url)
    tracker = make_tracker(cfg, run_dir, sampled=lambda: trial_params(cfg))
    assert isinstance(tracker, MlflowRunTracker)
    tracker.preflight()
    assert is_placeholder(tracker.run_id)
    for fold in range(1, FOLDS + 1):
        for epoch in range(1, EPOCHS + 1):
            start = time.perf_counter()
            tracker.log_epoch(fold, epoch, {"val_loss": 1.2 / epoch + 0.01 * fold})
            if epoch_seconds is not None:
                epoch_seconds.append(time.perf_counter() - start)
    write_run_dir(run_dir, folds=FOLDS, epochs=EPOCHS)
    tracker.finish(run_dir, "complete")
    return run_dir


def assert_synced_once(store_uri: str, run_dir: Path) -> None:
    """The store holds the trial's run once, with every record exactly once."""
    client = MlflowClient(tracking_uri=store_uri)
    experiment = client.get_experiment_by_name("evolver")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1, [r.info.run_id for r in runs]
    run = runs[0]
    assert run.info.run_name == "trial_0" and run.info.status == "FINISHED"
    assert run.data.tags["state"] == "complete"
    assert run.data.tags["run_dir"] == str(run_dir.resolve())
    assert run.data.params["sampled.finetune.lr_head"]
    assert run.data.params["model.name"] == "tiny"
    for fold in range(1, FOLDS + 1):
        points = client.get_metric_history(run.info.run_id, f"fold{fold}/val_loss")
        steps = sorted(point.step for point in points)
        assert steps == list(range(1, EPOCHS + 1)), (fold, steps)  # each epoch once
        lr_steps = [
            p.step for p in client.get_metric_history(run.info.run_id, f"fold{fold}/lr_head")
        ]
        assert sorted(lr_steps) == list(range(1, EPOCHS + 1))  # filled from history.csv
    assert run.data.metrics["cv.accuracy"] == pytest.approx(0.9)
    files = {artifact.path for artifact in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "history.csv", "summary.json", "report"} <= files
    assert not (run_dir / BUFFER_FOLDER).exists()


@pytest.fixture
def dead_url(free_port: int) -> str:
    return f"http://127.0.0.1:{free_port}"


@pytest.mark.parametrize(
    ("key", "value"),
    [("timeout_s", 0), ("retries", -1), ("retries", 11), ("on_error", "ignore"),
     ("retry_interval_s", "soon"), ("live_interval_s", -1)],
)  # fmt: skip
def test_new_settings_are_checked_naming_the_field(tmp_path: Path, key: str, value: Any) -> None:
    with pytest.raises(ConfigError, match=rf"^tracking\.{key}: "):
        TrackingSettings.from_cfg(tracking_cfg(tmp_path, **{key: value}))


def test_a_trial_trains_on_while_the_store_is_away_and_sync_sends_it_once(
    tmp_path: Path, dead_url: str, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture
) -> None:
    sent: list[str] = []
    real_send = MlflowStore.send

    def counting_send(store: MlflowStore, run_id: str, batch: Any) -> None:
        sent.append(run_id)
        real_send(store, run_id, batch)

    epoch_seconds: list[float] = []
    with caplog.at_level(logging.WARNING, logger="evolver.tracking"):
        run_dir = buffered_trial(tmp_path, dead_url, epoch_seconds)
    print(f"log_epoch against a dead server: at most {max(epoch_seconds) * 1000:.1f} ms")
    assert max(epoch_seconds) < 1.0  # buffered without touching the network
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert sum("goes to a buffer" in w for w in warnings) == 1, warnings  # once per outage
    assert any(f"evolver sync {run_dir}" in w for w in warnings), warnings
    with TrackingBuffer.of(run_dir).locked():
        entries = TrackingBuffer.of(run_dir).read().entries
    batches = [e for e in entries if e["op"] == "log_batch"]
    assert entries[0]["op"] == "create_run"
    assert entries[-1]["op"] == "terminate"

    store_uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(MlflowStore, "send", counting_send)
        assert cli.main(["sync", str(run_dir), "--tracking-uri", store_uri]) == 0
    assert len(sent) == len(batches)  # each buffered batch sent once
    assert f"sent {len(entries)} call(s)" in capsys.readouterr().out
    assert_synced_once(store_uri, run_dir)
    assert cli.main(["sync", str(tmp_path / "runs"), "--tracking-uri", store_uri]) == 0
    assert "nothing to sync" in capsys.readouterr().out
    assert_synced_once(store_uri, run_dir)


class SimulatedCrash(BaseException):
    """The process dies between sending a call and removing it from the buffer."""


@pytest.mark.parametrize("crash_at", [1, 4])
def test_a_replay_cut_short_by_a_crash_loses_and_duplicates_nothing(
    tmp_path: Path, dead_url: str, crash_at: int
) -> None:
    run_dir = buffered_trial(tmp_path, dead_url)
    store_uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    real_remove = TrackingBuffer.remove
    removals: list[int] = []

    def crashing_remove(buffer: TrackingBuffer, seq: int, ids: dict[str, str]) -> None:
        removals.append(seq)
        if len(removals) == crash_at:
            raise SimulatedCrash  # call `seq` was sent, its removal never happens
        real_remove(buffer, seq, ids)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(TrackingBuffer, "remove", crashing_remove)
        store = store_for(TrackingBuffer.of(run_dir), store_uri, 5.0)
        with pytest.raises(SimulatedCrash):
            store.sync(force=True)
    assert (run_dir / BUFFER_FOLDER / BATCHES_FILE).is_file()
    # The next replay (a new process) sends the cut call again and the rest once.
    assert cli.main(["sync", str(run_dir), "--tracking-uri", store_uri]) == 0
    assert_synced_once(store_uri, run_dir)


def test_fail_policy_refuses_to_start_a_trial_without_its_store(
    tmp_path: Path, dead_url: str
) -> None:
    tracker = make_tracker(trial_cfg(tmp_path, dead_url, on_error="fail"), tmp_path / "run")
    with pytest.raises(ConfigError, match=r"^tracking\.uri: cannot reach"):
        tracker.preflight()
    assert not (tmp_path / "run" / BUFFER_FOLDER).exists()


# -- a real server killed and restarted in the middle of a loop ---------------------------------
LOOP_OVERRIDES = [
    "loop.name=outage", "loop.iterations=2", "loop.trials_per_iteration=2",
    "loop.poll_interval=0.5", "fake.epoch_seconds=0.4", "finetune.phase2_epochs=4",
    "tracking.enabled=true", "tracking.retry_interval_s=1",
]  # fmt: skip
# What tracking may add to one epoch while the server is away: the first failed call (bounded:
# 2 quick retries) and a probe, then nothing. Before, every call blocked ~247 s.
MAX_EPOCH_TRACKING_S = 8.0


def start_server(server_dir: Path, port: int) -> ServerProcess:
    return start_mlflow_server(
        f"sqlite:///{server_dir / 'mlflow.db'}",
        port,
        artifacts_destination=str(server_dir / "artifacts"),
        log_path=server_dir / "server.log",
        timeout_s=400,
    )


def kill(server: ServerProcess) -> None:
    os.killpg(server.process.pid, signal.SIGKILL)
    server.process.wait(timeout=30)


def start_loop(runs_dir: Path, tracking_uri: str) -> OutputLines:
    runs_dir.mkdir(parents=True)
    command = [sys.executable, str(TRACKED_APP), "-m", "hydra/sweeper=evolver",
               f"runs_dir={runs_dir}", *LOOP_OVERRIDES, f"tracking.uri={tracking_uri}"]  # fmt: skip
    process = subprocess.Popen(
        command,
        cwd=runs_dir,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    return OutputLines(process)


def wait_for(condition: Any, loop: OutputLines, what: str, timeout_s: float = 400) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert loop.process.poll() is None, f"the loop ended before {what}:\n" + "\n".join(
            loop.lines[-40:]
        )
        assert time.monotonic() < deadline, f"no {what} in {timeout_s:.0f} s"
        time.sleep(0.2)


def has_run(uri: str, name: str) -> bool:
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("outage")
    if experiment is None:
        return False
    runs = client.search_runs([experiment.experiment_id], f"attributes.run_name = '{name}'")
    return bool(runs)


def finished(loop: OutputLines) -> None:
    returncode = loop.process.wait(timeout=600)
    loop.join_reader()
    assert returncode == 0, "\n".join(loop.lines[-60:])


def snapshot(uri: str, runs_dir: Path) -> dict[str, Any]:
    """The loop's runs by name: status, parent, params, tags, metric histories, artifacts, with
    the runs folder and the store's own address written the same way for every loop."""
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("outage")
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    names = {run.info.run_id: run.info.run_name for run in runs}

    def same(text: str) -> str:
        return text.replace(str(runs_dir.resolve()), "<runs>").replace(str(runs_dir), "<runs>")

    def artifacts(run_id: str, path: str | None = None) -> list[str]:
        found = []
        for item in client.list_artifacts(run_id, path):
            found += artifacts(run_id, item.path) if item.is_dir else [item.path]
        return found

    result: dict[str, Any] = {}
    for run in runs:
        run_id = run.info.run_id
        tags = {k: same(v) for k, v in run.data.tags.items() if not k.startswith("mlflow.")}
        params = {k: same(v) for k, v in run.data.params.items() if k != "tracking.uri"}
        metrics = {
            key: sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
            for key in run.data.metrics
        }
        result[run.info.run_name] = {
            "status": run.info.status,
            "parent": names.get(run.data.tags.get("mlflow.parentRunId", "")),
            "tags": tags,
            "params": params,
            "metrics": metrics,
            "artifacts": sorted(artifacts(run_id)),
        }
    return result


@pytest.mark.slow
def test_a_loop_trains_through_a_server_outage_and_ends_as_an_undisturbed_loop(
    tmp_path: Path, free_port: int
) -> None:
    server_dir = tmp_path / "server"
    server = start_server(server_dir, free_port)
    # Two trackers of this process, started while the server answers: `fail` and `buffer`.
    failing = make_tracker(
        trial_cfg(tmp_path / "fail", server.url, on_error="fail"), tmp_path / "fail" / "run"
    )
    buffering = make_tracker(
        trial_cfg(tmp_path / "buffer", server.url, retry_interval_s=1), tmp_path / "buffer" / "run"
    )
    failing.preflight()
    buffering.preflight()
    reference_dir, disturbed_dir = tmp_path / "reference", tmp_path / "disturbed"
    reference_uri = f"sqlite:///{reference_dir / 'mlflow.db'}"
    reference = start_loop(reference_dir, reference_uri)
    disturbed = start_loop(disturbed_dir, server.url)
    try:
        # Killed once trial 0 trains, restarted once iteration 2 runs: trial 0 goes on
        # buffered, trial 1 and iteration 2's run start while the server is away.
        wait_for(lambda: has_run(server.url, "trial-0"), disturbed, "run trial-0")
        kill(server)
        started = time.perf_counter()
        with pytest.raises(TrackingError, match=r"^tracking\.uri: .*tracking\.on_error=fail"):
            failing.log_epoch(1, 1, {"val_loss": 0.5})
        fail_seconds = time.perf_counter() - started
        print(f"on_error=fail: the epoch's call raised after {fail_seconds:.1f} s")
        buffering_seconds = []
        for epoch in (1, 2):
            started = time.perf_counter()
            buffering.log_epoch(1, epoch, {"val_loss": 1.0 / epoch})
            buffering_seconds.append(time.perf_counter() - started)
        assert TrackingBuffer.of(tmp_path / "buffer" / "run").pending()
        wait_for(
            lambda: any("trial 2 (" in line and "started" in line for line in disturbed.lines),
            disturbed,
            "start of trial 2",
        )
        os.kill(disturbed.process.pid, signal.SIGSTOP)
        try:
            server = start_server(server_dir, free_port)
        finally:
            os.kill(disturbed.process.pid, signal.SIGCONT)
        time.sleep(1.5)  # tracking.retry_interval_s
        buffering.log_epoch(1, 3, {"val_loss": 1.0 / 3})  # the next epoch sends the buffer
        assert not TrackingBuffer.of(tmp_path / "buffer" / "run").pending()
        finished(disturbed)
        finished(reference)
        # After the loops: what the server holds now is final.
        print(f"buffering tracker, epochs while the server was away: {buffering_seconds}")
        assert max(buffering_seconds) < MAX_EPOCH_TRACKING_S
        epoch_seconds = [
            (trial.parent.name, seconds)
            for trial in sorted(disturbed_dir.glob("loops/outage/trial_*/tracking_seconds.json"))
            for seconds in json.loads(trial.read_text())
        ]
        slowest = max(epoch_seconds, key=lambda item: item[1])
        total = sum(seconds for _, seconds in epoch_seconds)
        print(
            f"disturbed loop: {len(epoch_seconds)} epochs, tracking {total:.2f} s in all, "
            f"slowest epoch {slowest[1]:.2f} s ({slowest[0]})"
        )
        assert slowest[1] < MAX_EPOCH_TRACKING_S
        # One warning for the outage (not one per call), one when the server answered again.
        logged = "\n".join(disturbed.lines)
        assert logged.count("goes to a buffer") == 1 and logged.count("answers again") >= 1
        # The loop sent everything itself (no `evolver sync` needed), the same runs as without
        # an outage: names, parents, states, params, tags, metric histories, artifacts.
        assert not list(disturbed_dir.rglob(f"{BUFFER_FOLDER}/{BATCHES_FILE}"))
        expected = snapshot(reference_uri, reference_dir)
        assert sorted(expected) == ["iteration-1", "iteration-2", "trial-0", "trial-1",
                                    "trial-2", "trial-3"]  # fmt: skip
        assert snapshot(server.url, disturbed_dir) == expected
    finally:
        for loop in (disturbed, reference):
            if loop.process.poll() is None:
                loop.process.kill()
        server.stop()
