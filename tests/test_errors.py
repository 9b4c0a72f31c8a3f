"""Bad inputs and unwritable places are one line on stderr with exit code 2, never a traceback;
a train that fails before its first epoch leaves no run folder; checkpoints load weights-only."""

from __future__ import annotations

import http.server
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from diagnosis_fixtures import healthy_curves, history_frame, summary_for, write_run
from omegaconf import OmegaConf
from training_support import SMALL, compose_cfg, write_image
from ui_support import start_ui

from evolver.app import discard_run_without_records, precheck_composition
from evolver.errors import ConfigError, DataError

EVOLVER = str(Path(sys.executable).parent / "evolver")


def run_evolver(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [EVOLVER, *args], cwd=cwd, capture_output=True, text=True, timeout=300, check=False
    )


def one_line_error(result: subprocess.CompletedProcess[str], command: str) -> str:
    """The single stderr line of a user error (exit code 2), without the command prefix."""
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1, result.stderr
    prefix = f"evolver {command}: error: "
    assert lines[0].startswith(prefix), lines[0]
    return lines[0].removeprefix(prefix)


def _can_create_in(folder: Path) -> bool:
    probe = folder / ".probe"
    try:
        probe.write_text("")
    except OSError:
        return False
    probe.unlink()
    return True


@contextmanager
def read_only(folder: Path) -> Iterator[Path]:
    """`folder` and all it holds made unwritable for this user: the immutable attribute for root
    (whom chmod does not stop), the write bits otherwise. Skips where neither works."""
    paths = [folder, *folder.rglob("*")]
    if os.geteuid() == 0:
        subprocess.run(["chattr", "-R", "+i", str(folder)], capture_output=True, check=False)
    else:
        modes = {path: path.stat().st_mode for path in paths}
        for path in paths:
            path.chmod(modes[path] & ~0o222)
    try:
        if _can_create_in(folder):
            pytest.skip("cannot make a folder read-only on this machine")
        yield folder
    finally:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-R", "-i", str(folder)], capture_output=True, check=False)
        else:
            for path, mode in modes.items():
                path.chmod(mode)


@pytest.fixture
def run_without_weights(tmp_path: Path) -> Path:
    """A run folder whose config is real and whose fold checkpoints are corrupt."""
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(compose_cfg(SMALL), resolve=True))
    for fold in (1, 2):
        (run_dir / "checkpoints" / f"fold{fold}-best.ckpt").write_bytes(b"\x80not a checkpoint")
    write_image(tmp_path / "images" / "1.png", 100)
    return run_dir


def test_predict_corrupt_checkpoint_names_the_file(run_without_weights: Path) -> None:
    tmp_path = run_without_weights.parent
    result = run_evolver(["predict", str(run_without_weights), "images"], tmp_path)
    line = one_line_error(result, "predict")
    checkpoint = run_without_weights / "checkpoints" / "fold1-best.ckpt"
    assert (
        line
        == f"{checkpoint}: not a readable checkpoint (corrupt, truncated or not a PyTorch file)"
    )
    assert "weights_only" not in result.stdout + result.stderr
    assert not (run_without_weights / "submission.csv").exists()


def test_predict_into_a_read_only_folder_fails_before_inference(
    run_without_weights: Path,
) -> None:
    tmp_path = run_without_weights.parent
    (tmp_path / "locked").mkdir()
    output = tmp_path / "locked" / "submission.csv"
    with read_only(tmp_path / "locked"):
        result = run_evolver(
            ["predict", str(run_without_weights), "images", "-o", str(output)], tmp_path
        )
    line = one_line_error(result, "predict")
    # Named before the (corrupt) checkpoints are even read: nothing was computed for nothing.
    assert line.startswith(f"{output}: cannot write the submission: cannot create files in ")
    assert not output.exists()


def test_malicious_checkpoint_is_refused_without_running_it(tmp_path: Path) -> None:
    import torch

    from evolver.checkpoints import read_checkpoint

    marker = tmp_path / "code-ran"

    class Payload:
        def __reduce__(self) -> tuple[object, tuple[str, str]]:
            return (open, (str(marker), "w"))

    checkpoint = tmp_path / "fold1-best.ckpt"
    torch.save({"state_dict": {}, "payload": Payload()}, checkpoint)
    with pytest.raises(DataError) as raised:
        read_checkpoint(checkpoint)
    assert str(raised.value).startswith(f"{checkpoint}: refused: the checkpoint holds a pickled ")
    assert f"{open.__module__}.open object" in str(raised.value)
    assert not marker.exists()


@pytest.mark.slow
def test_fold_checkpoints_hold_only_what_weights_only_loading_accepts(tmp_path: Path) -> None:
    import torch

    from evolver.app import train_task
    from evolver.checkpoints import classifier_from_checkpoint

    run_dir = tmp_path / "run"
    train_task(compose_cfg([*SMALL, "finetune.phase2_epochs=0", "data.limit=120"]), run_dir=run_dir)
    checkpoints = sorted((run_dir / "checkpoints").glob("*.ckpt"))
    assert [path.name for path in checkpoints] == [
        "fold1-best.ckpt",
        "fold1-end.ckpt",
        "fold1-last.ckpt",
        "fold2-best.ckpt",
        "fold2-end.ckpt",
        "fold2-last.ckpt",
    ]
    # The end states (kept for continuation) hold the optimizer too, and still load weights-only.
    for path in checkpoints[1::3]:
        content = torch.load(path, map_location="cpu", weights_only=True)  # no allow-list
        assert content["optimizer_states"] and "lr_schedulers" in content
    weights = [path for path in checkpoints if not path.name.endswith("-end.ckpt")]
    for path in weights:
        content = torch.load(path, map_location="cpu", weights_only=True)  # no allow-list
        assert "optimizer_states" not in content
        module = classifier_from_checkpoint(path)
        restored = module.state_dict()
        assert all(
            torch.equal(restored[key], value) for key, value in content["state_dict"].items()
        )
        assert module.hparams.class_names == [str(digit) for digit in range(10)]


def test_report_on_a_read_only_run_prints_the_diagnosis_and_one_line(tmp_path: Path) -> None:
    curves = healthy_curves(2)
    run_dir = write_run(tmp_path / "run", history_frame(curves), summary_for(curves))
    with read_only(run_dir):
        result = run_evolver(["report", str(run_dir), "--no-plots"], tmp_path)
    line = one_line_error(result, "report")
    assert line.startswith(f"{run_dir}: cannot write the report: cannot create files in {run_dir}")
    assert line.endswith("(--output-dir writes it elsewhere)")
    assert result.stdout.startswith(f"{run_dir}: 2 folds")
    assert "findings:" in result.stdout
    assert not (run_dir / "report.md").exists()


def test_report_output_dir_takes_the_report_of_a_read_only_run(tmp_path: Path, capsys) -> None:
    from evolver.diagnosis.cli import main as report_main

    curves = healthy_curves(2)
    run_dir = write_run(tmp_path / "run", history_frame(curves), summary_for(curves))
    elsewhere = tmp_path / "reports" / "run"
    with read_only(run_dir):
        assert report_main([str(run_dir), "--no-plots", "--output-dir", str(elsewhere)]) == 0
    assert (elsewhere / "report.md").is_file() and (elsewhere / "report.json").is_file()
    assert f"report: {elsewhere / 'report.md'}" in capsys.readouterr().out
    assert sorted(path.name for path in run_dir.iterdir()) == ["history.csv", "summary.json"]


def test_train_with_a_read_only_runs_dir_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "locked").mkdir()
    runs_dir = tmp_path / "locked" / "runs"
    with read_only(tmp_path / "locked"):
        result = run_evolver(["train", f"runs_dir={runs_dir}"], tmp_path)
    line = one_line_error(result, "train")
    assert line.startswith(f"runs_dir: cannot create files in {tmp_path / 'locked'} (to create ")


def test_runs_dir_below_a_file_is_named_before_anything_runs(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("a file, not a folder")
    with pytest.raises(ConfigError) as raised:
        precheck_composition([f"runs_dir={tmp_path / 'notes.txt' / 'runs'}"])
    assert str(raised.value) == (
        f"runs_dir: cannot create {tmp_path / 'notes.txt' / 'runs'}: "
        f"{tmp_path / 'notes.txt'} is not a folder"
    )


def test_loop_with_a_read_only_runs_dir_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "locked").mkdir()
    storage = tmp_path / "elsewhere" / "optuna.db"
    storage.parent.mkdir()
    with read_only(tmp_path / "locked"):
        result = run_evolver(
            [
                "loop",
                f"runs_dir={tmp_path / 'locked' / 'runs'}",
                f"loop.storage=sqlite:///{storage}",
            ],
            tmp_path,
        )
    line = one_line_error(result, "loop")
    assert line.startswith(f"runs_dir: cannot create files in {tmp_path / 'locked'} (to create ")
    assert list(storage.parent.iterdir()) == []  # no study was created either


def test_train_failing_before_its_first_epoch_leaves_no_run_folder(tmp_path: Path) -> None:
    runs_dir = tmp_path / "runs"
    missing = tmp_path / "no-such-data"
    result = run_evolver(
        ["train", f"runs_dir={runs_dir}", "data=image_folder", f"data.root={missing}"], tmp_path
    )
    assert one_line_error(result, "train") == f"data.root: folder {missing} does not exist"
    assert list((runs_dir / "train").iterdir()) == []


def started_run_folder(tmp_path: Path, history_rows: list[str]) -> Path:
    """What a run wrote when it failed: Hydra's files, its log, its config and records."""
    run_dir = tmp_path / "train" / "2026-01-01_00-00-00"
    (run_dir / ".hydra").mkdir(parents=True)
    for name in ("config.yaml", "hydra.yaml", "overrides.yaml"):
        (run_dir / ".hydra" / name).write_text("{}\n")
    (run_dir / "app.log").write_text("")
    (run_dir / "config.yaml").write_text("seed: 1\n")
    (run_dir / "history.csv").write_text("\n".join(["fold,epoch,val_loss", *history_rows]) + "\n")
    (run_dir / "summary.json").write_text('{"status": "failed"}')
    return run_dir


def test_a_run_folder_without_epochs_is_removed_one_with_records_is_kept(tmp_path: Path) -> None:
    empty = started_run_folder(tmp_path / "a", [])
    discard_run_without_records(empty, "app.log")
    assert not empty.exists()

    recorded = started_run_folder(tmp_path / "b", ["1,1,0.5"])
    discard_run_without_records(recorded, "app.log")
    assert (recorded / "history.csv").is_file() and (recorded / ".hydra").is_dir()

    # `hydra.run.dir` pointed at a folder that holds more than this run wrote: left alone.
    shared = started_run_folder(tmp_path / "c", [])
    (shared / "notes.md").write_text("mine")
    discard_run_without_records(shared, "app.log")
    assert (shared / "notes.md").is_file() and (shared / "config.yaml").is_file()


class _AnyPathAnswers(http.server.BaseHTTPRequestHandler):
    """A stand-in tracking server: every request gets `{}`."""

    def _answer(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b"{}")

    do_GET = do_POST = _answer

    def log_message(self, *args: object) -> None:
        pass


@pytest.mark.slow
def test_ui_started_with_sigint_ignored_still_stops_on_ctrl_c(tmp_path: Path) -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _AnyPathAnswers)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    uri = f"http://127.0.0.1:{server.server_address[1]}"
    # As under `pytest &` from a script: the suite, and by default its children, ignore SIGINT.
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        ui = start_ui(["--runs-dir", str(tmp_path / "runs"), f"tracking.uri={uri}"], tmp_path)
    finally:
        signal.signal(signal.SIGINT, previous)
    try:
        ui.wait_for_line("Press Ctrl-C to stop.", timeout_s=120)
    finally:
        exit_code = ui.interrupt()
        server.shutdown()
    assert exit_code == 0
