"""The overhead benchmark's per-epoch profile: the work apart from what evolver adds, each
second counted once, and a real profiled fit read through `trainer.profiler=simple`."""

from __future__ import annotations

import importlib.util
import tempfile
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "overhead.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("overhead", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_profile_rows_group_extras_and_count_nested_actions_once(bench) -> None:
    durations = {
        "run_training_epoch": [10.0, 10.0],
        "run_training_batch": [4.0, 4.0],
        "[LightningModule]FineTuneClassifier.optimizer_step": [3.9, 3.9],
        "[Strategy]SingleDeviceStrategy.backward": [2.0, 2.0],
        "[_TrainingEpochLoop].train_dataloader_next": [1.0, 1.0],
        "save_checkpoint": [0.2, 0.1],
        "[Callback]ModelCheckpoint{'monitor': 'val_loss'}.on_train_epoch_end": [0.2, 0.1],
        "[Callback]DynamicsRecorder{'fold': 1}.on_train_epoch_end": [0.01, 0.01],
        "[Callback]DynamicsRecorder{'fold': 1}.on_train_batch_end": [0.01, 0.01],
        "[LightningModule]FineTuneClassifier.on_validation_epoch_end": [0.05, 0.05],
        "[Callback]EpochClock.on_train_epoch_start": [0.0001],
    }
    rows = dict(bench.profile_rows(durations, epochs=2))
    assert rows["training step (forward, backward, optimizer)"] == pytest.approx(4.0)
    assert rows["data loading (train)"] == pytest.approx(1.0)
    assert "checkpoint writes" not in rows  # inside the callbacks that write them
    assert rows["callback ModelCheckpoint"] == pytest.approx(0.15)
    assert rows["callback DynamicsRecorder"] == pytest.approx(0.02)
    assert rows["module hooks (epoch start/end, setup)"] == pytest.approx(0.05)
    assert "callback EpochClock" not in rows  # under half a millisecond per epoch
    # The optimizer step and backward pass are inside the training step, counted there only.
    assert len(rows) == 5


@pytest.mark.slow
def test_a_profiled_fold_reports_its_callbacks_and_checkpoint_writes(bench) -> None:
    cfg = bench.compose_cfg("test_resnet", 2, 32, 120, profiler="simple")
    clock = bench.EpochClock()
    with tempfile.TemporaryDirectory() as tmp:
        epochs = bench.evolver_epochs(cfg, Path(tmp), clock)
    assert len(epochs) == 2
    labels = [label for label, _ in bench.profile_rows(clock.profile, len(epochs))]
    assert labels[0] == "training step (forward, backward, optimizer)"
    assert "callback ModelCheckpoint" in labels and "validation step" in labels


@pytest.mark.parametrize(("clock", "counts_waiting"), [("wall", True), ("cpu", False)])
def test_the_cpu_clock_leaves_out_time_the_process_waits(bench, monkeypatch, clock, counts_waiting):
    # What another tenant takes from a shared machine shows as waiting: wall seconds count it,
    # the process's CPU seconds do not.
    import time
    from types import SimpleNamespace

    monkeypatch.setattr(bench, "clock_now", bench.CLOCKS[clock])
    epoch_clock = bench.EpochClock()
    trainer = SimpleNamespace(profiler=None)
    epoch_clock.on_train_epoch_start(trainer, None)
    time.sleep(0.3)
    epoch_clock.on_fit_end(trainer, None)
    (seconds,) = epoch_clock.durations()
    assert (seconds >= 0.3) is counts_waiting


def test_ratios_pair_each_round_with_the_reference_of_the_same_round(bench) -> None:
    # A slow second round (the machine busy) slows both sides: paired, it leaves the ratio be.
    sides = {"evolver": [1.0, 2.1], "plain": [1.0, 2.0], "sync": [1.1, 2.0]}
    ratios = bench.paired_ratios(sides, "plain")
    assert ratios["evolver"] == pytest.approx([1.0, 1.05])
    assert ratios["sync"] == pytest.approx([1.1, 1.0])
    assert "plain" not in ratios


def test_lightning_cells_pair_each_side_with_its_own_reference(bench) -> None:
    sides = {"plain": [1.0, 2.0, 1.0], "lightning": [1.1, 2.0, 1.2], "evolver": [1.21, 2.2, 1.2]}
    seconds, over_plain, over_lightning = bench.lightning_cells(sides)
    assert seconds == "1.200"
    assert over_plain == "1.100 [1.000, 1.200]"
    # evolver against the bare Lightning fold of the same round, not against the plain loop
    assert over_lightning == "1.100 [1.000, 1.100]"


def test_epoch_phases_give_each_segment_its_median_without_the_first_epoch(bench) -> None:
    phases = bench.EpochPhases()
    for epoch, step in enumerate([5.0, 1.0, 2.0]):
        start = 100.0 * epoch
        phases.marks += [("epoch start", start), ("first step", start + step)]
    segments = phases.segments()
    assert segments["epoch start -> first step"] == pytest.approx(1.5)  # 1 and 2, not the 5
    assert segments["first step -> epoch start"] == pytest.approx(99.0)  # 100 - 1 (epoch 2 only)
