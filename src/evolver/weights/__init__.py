"""Pretrained weights that ship with the package, for offline fine-tuning tasks.

`model.pretrained_path: bundled:<name>` names one of them (see conf/model/tiny_pretrained.yaml):
`resolve_pretrained_path` turns that into the file's path, from any working directory, after
checking its sha256. The files hold a backbone only; a fine-tune always starts a new head.

test_resnet_shapes: timm's `test_resnet` pretrained on the six generated shapes of
`evolver.data.shapes.SHAPES` (6,000 images, 32 px) by benchmarks/pretrain_backbone.py.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from evolver.errors import ConfigError

PREFIX = "bundled:"

# name -> (file in this folder, sha256 of the file)
PRETRAINED: dict[str, tuple[str, str]] = {
    "test_resnet_shapes": (
        "test_resnet_shapes.safetensors",
        "d02885c34965e2252f196bb7455390916fb6074f9ff90ecd073e15930c8d71ae",
    ),
}

_verified: set[Path] = set()


def weights_path(name: str) -> Path:
    """The bundled weights file `name`, after checking that it exists and matches its sha256."""
    if name not in PRETRAINED:
        raise ConfigError(
            "model.pretrained_path",
            f"no bundled weights {name!r} (bundled: {', '.join(sorted(PRETRAINED))})",
        )
    filename, expected = PRETRAINED[name]
    path = Path(__file__).resolve().parent / filename
    if path in _verified:
        return path
    if not path.is_file():
        raise ConfigError("model.pretrained_path", f"bundled weights file {path} is missing")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != expected:
        raise ConfigError(
            "model.pretrained_path",
            f"bundled weights {path.name} have sha256 {digest[:12]}..., expected "
            f"{expected[:12]}... (a changed or damaged file)",
        )
    _verified.add(path)
    return path


def is_bundled(path: object) -> bool:
    return isinstance(path, str) and path.startswith(PREFIX)


def resolve_pretrained_path(path: object) -> str | None:
    """`model.pretrained_path` as a file path: `bundled:<name>` becomes the verified bundled
    file; anything else is returned as given (a user's file, `~` expanded)."""
    if path is None or str(path) == "":
        return None
    text = str(path)
    if is_bundled(text):
        return str(weights_path(text[len(PREFIX) :]))
    return str(Path(text).expanduser())
