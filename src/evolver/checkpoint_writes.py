"""When a fold's checkpoints reach the disk (`trainer.checkpoint_writes`).

- `immediate`: on the training thread, when Lightning saves them (its default `TorchCheckpointIO`).
- `background`: copied on the training thread, written by a background thread (Lightning's
  `AsyncCheckpointIO`); the fit waits for the writes when it ends.
- `fit_end`: copied into host memory when saved and written when the fit ends, only those still
  current: a fold's best checkpoint is replaced in memory each time validation improves, so the
  disk sees one write per file and fold instead of one per improving epoch. Nothing reads a fold's
  checkpoints before its fit has ended (a fold that stops half-way is trained again), so no
  reader ever misses a file.
- `auto`: `background` on a GPU, where the CPU is free while the GPU trains; `immediate` on a CPU,
  whose cores all train, so a writing thread would take its time from the training step.
  `fit_end` cuts a resnet18 fold's save calls from 80-180 ms per improving epoch to 4-6 ms, but
  its epochs did not read faster than `immediate`'s in benchmarks/overhead.py (README).
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.fabric.plugins import CheckpointIO, TorchCheckpointIO
from lightning.pytorch.plugins.io import AsyncCheckpointIO
from lightning_utilities.core.apply_func import apply_to_collection, apply_to_collections
from typing_extensions import override


def resolved_writes(setting: str, gpu: bool) -> str:
    """The write mode `setting` means on this machine (`auto` resolved)."""
    if setting == "auto":
        return "background" if gpu else "immediate"
    return setting


def checkpoint_io(writes: str) -> CheckpointIO | None:
    """The plugin for a resolved write mode; None is Lightning's default (`immediate`)."""
    if writes == "background":
        return BackgroundCheckpointIO()
    if writes == "fit_end":
        return FitEndCheckpointIO()
    return None


class FitEndCheckpointIO(TorchCheckpointIO):
    """Keeps each checkpoint saved during a fit in host memory and writes the ones still current
    when Lightning tears the fit down (at the end of every fit, also one that raised).

    A save copies the checkpoint's tensors on the caller's thread (the weights go on changing);
    saving the same path again copies into the tensors of the copy it replaces (allocating a
    resnet18's weights anew costs about as much as writing them; copying into them, 1/20 of
    that), `remove_checkpoint` drops it, and reading a path that waits writes it first. Saves
    after the teardown are written at once: Lightning 2.6 tears the strategy (and its
    `checkpoint_io`) down after `on_train_end` but before `on_fit_end`, where `FitEndState`
    saves. One instance serves one fit (evolver builds a Trainer per fold).
    """

    def __init__(self) -> None:
        super().__init__()
        self._pending: dict[str, dict[str, Any]] = {}
        self._torn_down = False

    @property
    def pending_paths(self) -> list[str]:
        """The files saved but not written yet, in the order they were first saved."""
        return list(self._pending)

    @override
    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        if self._torn_down:
            super().save_checkpoint(checkpoint, path)
            return
        key, previous = str(path), self._pending.get(str(path))
        if previous is not None:
            try:
                self._pending[key] = apply_to_collections(
                    checkpoint, previous, torch.Tensor, _copy_into
                )
                return
            except (KeyError, ValueError):  # laid out unlike the copy it replaces: copy anew
                pass
        self._pending[key] = apply_to_collection(checkpoint, torch.Tensor, _host_copy)

    @override
    def load_checkpoint(self, path: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        self._write(str(path))
        return super().load_checkpoint(path, *args, **kwargs)

    @override
    def remove_checkpoint(self, path: Any) -> None:
        self._pending.pop(str(path), None)
        super().remove_checkpoint(path)

    @override
    def teardown(self) -> None:
        self._torn_down = True
        for path in list(self._pending):
            self._write(path)

    def _write(self, path: str) -> None:
        checkpoint = self._pending.pop(path, None)
        if checkpoint is not None:
            super().save_checkpoint(checkpoint, path)


class BackgroundCheckpointIO(AsyncCheckpointIO):
    """Lightning's `AsyncCheckpointIO`, except that saves after the teardown (`on_fit_end`, where
    `FitEndState` saves) are written at once: the parent would hand them to a new thread that
    nothing waits for, so a reader right after the fit could find no file or half of one."""

    def __init__(self) -> None:
        super().__init__(TorchCheckpointIO())
        self._torn_down = False

    @override
    def save_checkpoint(self, *args: Any, **kwargs: Any) -> None:
        if self._torn_down and self.checkpoint_io is not None:
            self.checkpoint_io.save_checkpoint(*args, **kwargs)
            return
        super().save_checkpoint(*args, **kwargs)

    @override
    def teardown(self) -> None:
        super().teardown()
        self._torn_down = True


def _host_copy(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().to("cpu", copy=True)


def _copy_into(tensor: torch.Tensor, earlier: Any) -> torch.Tensor:
    """A host copy of `tensor`, written into `earlier` (the same place in the copy it replaces)
    where shape and dtype match."""
    if (
        isinstance(earlier, torch.Tensor)
        and earlier.shape == tensor.shape
        and earlier.dtype == tensor.dtype
        and earlier.layout == tensor.layout == torch.strided
        and earlier.is_contiguous()
    ):
        return earlier.copy_(tensor.detach())
    return _host_copy(tensor)
