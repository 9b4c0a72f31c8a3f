"""Reading fold checkpoints weights-only: tensors and plain values, never pickled code.

A fold checkpoint (Lightning's `save_weights_only=True`) holds `state_dict`, `hyper_parameters`
(str, int, float, bool, list, tuple and dict values only), the loops' progress counters and a few
ints and strings: everything `torch.load(weights_only=True)` accepts without an allow-list. A
file holding anything else is refused, not executed.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from evolver.errors import DataError
from evolver.writable import os_error_text

if TYPE_CHECKING:
    from evolver.model import FineTuneClassifier


def read_checkpoint(path: Path) -> dict[str, Any]:
    """The checkpoint's content, loaded on the CPU with `weights_only=True`; a file that cannot
    be read that way is a DataError naming it."""
    try:
        with warnings.catch_warnings():
            # A damaged file also draws torch warnings (an unknown pickle protocol): the one
            # line below says it all.
            warnings.simplefilter("ignore")
            content = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as error:
        raise DataError(f"{path}: cannot read the checkpoint: {os_error_text(error)}") from None
    except Exception as error:  # torch raises UnpicklingError, RuntimeError, EOFError, ...
        raise DataError(f"{path}: {_load_failure(error)}") from None
    if not isinstance(content, dict) or not isinstance(content.get("state_dict"), dict):
        raise DataError(f"{path}: not a fold checkpoint (it has no state_dict)")
    return content


def load_weights_into(module: torch.nn.Module, path: Path, content: dict[str, Any]) -> None:
    try:
        module.load_state_dict(content["state_dict"])
    except RuntimeError as error:  # missing, unexpected or mis-shaped tensors
        first = str(error).strip().splitlines()[0]
        raise DataError(f"{path}: its weights do not fit the model ({first})") from None


def classifier_from_checkpoint(path: Path) -> FineTuneClassifier:
    """The fold model a checkpoint describes (its hyper_parameters), with its weights."""
    from evolver.model import FineTuneClassifier, current_hyper_parameters

    content = read_checkpoint(path)
    hyper_parameters = content.get("hyper_parameters")
    if not isinstance(hyper_parameters, dict):
        raise DataError(f"{path}: not a fold checkpoint (it has no hyper_parameters)")
    try:
        module = FineTuneClassifier(**current_hyper_parameters(hyper_parameters))
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        raise DataError(f"{path}: its hyper_parameters describe no model ({error})") from None
    load_weights_into(module, path, content)
    return module


def _load_failure(error: Exception) -> str:
    refused = re.search(r"GLOBAL ([\w.]+)", str(error))
    if refused:
        return (
            f"refused: the checkpoint holds a pickled {refused.group(1)} object, and only "
            "tensors and plain values are loaded from checkpoints"
        )
    return "not a readable checkpoint (corrupt, truncated or not a PyTorch file)"
