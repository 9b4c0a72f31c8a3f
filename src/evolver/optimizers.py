"""The `optim` config node: its optimizer class checked before training and instantiated 1:1.

Imports torch but not Lightning, so `evolver.config.validate` can check the node in seconds.
"""

from __future__ import annotations

from typing import Any

import torch

from evolver.errors import ConfigError
from evolver.settings import OptimizerSettings


def make_optimizer(
    settings: OptimizerSettings, groups: list[dict[str, Any]], lr: float
) -> torch.optim.Optimizer:
    """The `optim` node instantiated 1:1: `settings.target(groups, lr=lr, weight_decay=...,
    **settings.options)`; each group's own `lr` overrides `lr`."""
    from hydra.utils import instantiate

    node = {"_target_": settings.target, "_partial_": True, "_convert_": "all"}
    partial = instantiate({**node, "weight_decay": settings.weight_decay, **settings.options})
    return partial(groups, lr=lr)


def optimizer_class(target: str) -> type:
    """The optimizer class `optim._target_` names; ConfigError when it is not one."""
    from hydra.utils import get_class

    try:
        found = get_class(target)
    except Exception as error:
        cause = (str(error).strip().splitlines() or [type(error).__name__])[0][:160]
        raise ConfigError("optim._target_", f"cannot import {target!r} ({cause})") from None
    if not issubclass(found, torch.optim.Optimizer):
        raise ConfigError("optim._target_", f"{target!r} is not a torch.optim.Optimizer")
    return found


def check_optimizer(settings: OptimizerSettings) -> None:
    """The class exists and takes every configured keyword argument."""
    import inspect

    accepted = inspect.signature(optimizer_class(settings.target)).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())
    for key in ("weight_decay", *settings.options):
        if key not in accepted and not takes_any:
            raise ConfigError(f"optim.{key}", f"{settings.target} takes no argument {key!r}")
