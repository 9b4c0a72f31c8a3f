"""`trainer.checkpoint_writes=fit_end`: checkpoints kept in memory, written when the fit ends."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import AsyncCheckpointIO
from torch.utils.data import DataLoader, TensorDataset

from evolver.checkpoint_writes import FitEndCheckpointIO, checkpoint_io, resolved_writes


def test_a_path_saved_twice_is_written_once_with_the_later_content(tmp_path: Path) -> None:
    io = FitEndCheckpointIO()
    weights = torch.zeros(3)
    path = tmp_path / "fold1-best.ckpt"
    io.save_checkpoint({"state_dict": {"w": weights}, "epoch": 0}, path)
    weights += 1  # training goes on changing the live tensor
    io.save_checkpoint({"state_dict": {"w": weights}, "epoch": 1}, path)
    weights += 1
    assert not path.exists()
    assert io.pending_paths == [str(path)]
    io.teardown()
    saved = torch.load(path, weights_only=True)
    assert saved["epoch"] == 1
    assert torch.equal(saved["state_dict"]["w"], torch.ones(3))
    assert io.pending_paths == []


def test_a_path_saved_again_reuses_the_copy_it_replaces(tmp_path: Path) -> None:
    io = FitEndCheckpointIO()
    path = tmp_path / "fold1-best.ckpt"
    model = torch.nn.Linear(3, 2)
    io.save_checkpoint({"state_dict": model.state_dict(), "shapes": [torch.zeros(2)]}, path)
    (first,) = [checkpoint for checkpoint in io._pending.values()]
    first_weight = first["state_dict"]["weight"]
    assert first_weight.data_ptr() != model.weight.data_ptr()  # a copy, not the live tensor
    with torch.no_grad():
        model.weight += 1
    io.save_checkpoint({"state_dict": model.state_dict(), "shapes": [torch.zeros(4)]}, path)
    second = io._pending[str(path)]
    assert second["state_dict"]["weight"] is first_weight  # copied into, not allocated
    assert torch.equal(first_weight, model.weight.detach())
    assert second["shapes"][0].shape == (4,)  # a tensor whose shape changed is copied anew
    io.teardown()
    saved = torch.load(path, weights_only=True)
    assert torch.equal(saved["state_dict"]["weight"], model.weight.detach())
    # A checkpoint laid out differently from the one it replaces is copied anew.
    io = FitEndCheckpointIO()
    io.save_checkpoint({"loops": [1]}, path)
    io.save_checkpoint({"loops": [1, 2], "w": model.weight}, path)
    assert io._pending[str(path)]["loops"] == [1, 2]


def test_removed_paths_are_never_written_and_read_paths_are_written_first(tmp_path: Path) -> None:
    io = FitEndCheckpointIO()
    dropped, read = tmp_path / "old.ckpt", tmp_path / "read.ckpt"
    io.save_checkpoint({"epoch": 0}, dropped)
    io.remove_checkpoint(dropped)
    io.save_checkpoint({"epoch": 4}, read)
    assert io.load_checkpoint(read)["epoch"] == 4
    io.teardown()
    assert not dropped.exists()
    assert torch.load(read, weights_only=True)["epoch"] == 4


def test_saves_after_the_teardown_are_written_at_once(tmp_path: Path) -> None:
    for io in (FitEndCheckpointIO(), checkpoint_io("background")):
        io.teardown()
        path = tmp_path / f"{type(io).__name__}-end.ckpt"
        io.save_checkpoint({"epoch": 3}, path)
        assert torch.load(path, weights_only=True)["epoch"] == 3


def test_storage_options_are_refused() -> None:
    with pytest.raises(TypeError, match="storage_options"):
        FitEndCheckpointIO().save_checkpoint({}, "x.ckpt", storage_options={"a": 1})


def test_auto_resolves_by_device_and_each_mode_has_its_plugin() -> None:
    assert resolved_writes("auto", gpu=False) == "immediate"
    assert resolved_writes("auto", gpu=True) == "background"
    assert resolved_writes("immediate", gpu=True) == "immediate"
    assert checkpoint_io("immediate") is None
    assert isinstance(checkpoint_io("background"), AsyncCheckpointIO)
    assert isinstance(checkpoint_io("fit_end"), FitEndCheckpointIO)


class Regression(pl.LightningModule):
    def __init__(self, fail_at_epoch: int | None = None) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)
        self.fail_at_epoch = fail_at_epoch
        self.files_seen: list[bool] = []

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        features, target = batch
        return torch.nn.functional.mse_loss(self.layer(features), target)

    def validation_step(self, batch: list[torch.Tensor], batch_idx: int) -> None:
        features, target = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self.layer(features), target))

    def on_train_epoch_start(self) -> None:
        checkpoints = Path(self.trainer.default_root_dir) / "checkpoints"
        self.files_seen.append(any(checkpoints.glob("*.ckpt")))
        if self.current_epoch == self.fail_at_epoch:
            raise RuntimeError("stopped")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


def fit(root: Path, module: Regression, epochs: int) -> ModelCheckpoint:
    torch.manual_seed(0)
    features = torch.randn(64, 4)
    data = DataLoader(TensorDataset(features, features.sum(1, keepdim=True)), batch_size=16)
    best = ModelCheckpoint(
        dirpath=root / "checkpoints", filename="best", monitor="val_loss", save_weights_only=True
    )
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        callbacks=[best],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        plugins=[FitEndCheckpointIO()],
    )
    trainer.fit(module, data, data)
    return best


def test_a_fit_writes_its_best_checkpoint_only_when_it_ends(tmp_path: Path) -> None:
    module = Regression()
    best = fit(tmp_path, module, epochs=3)
    assert module.files_seen == [False, False, False]
    saved = torch.load(best.best_model_path, weights_only=True)
    assert saved["epoch"] == 2  # a learning curve that still falls: the last epoch is the best
    assert torch.equal(saved["state_dict"]["layer.weight"], module.layer.weight.detach())


def test_a_fit_that_raises_still_writes_what_it_saved(tmp_path: Path) -> None:
    module = Regression(fail_at_epoch=2)
    with pytest.raises(RuntimeError, match="stopped"):
        fit(tmp_path, module, epochs=4)
    assert list((tmp_path / "checkpoints").glob("*.ckpt"))
