"""Reading and checking config values: each check raises ConfigError naming the field, with a
one-line message. Pure Python: a config node is a dict, an OmegaConf node or None."""

from __future__ import annotations

import math
from typing import Any

from evolver.errors import ConfigError


def setting(node: Any, key: str, default: Any = None) -> Any:
    """`node[key]`, or `default` when the node or the key is missing."""
    if node is None:
        return default
    if isinstance(node, dict):
        return node.get(key, default)
    return getattr(node, key, default) if key in node else default


def is_number(value: Any) -> bool:
    """An int or a float; a bool is not a number (YAML's `true` is no 1)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_whole(value: Any) -> bool:
    """An int, or a float without a fractional part (3.0)."""
    return is_int(value) or (isinstance(value, float) and value.is_integer())


def number(field: str, value: Any, *, convert: bool = False, finite: bool = False) -> float:
    """`value` as a float. With `convert`, anything `float()` reads counts (a YAML string such as
    "1e-3"); with `finite`, inf and nan do not."""
    try:
        if isinstance(value, bool) or not (convert or is_number(value)):
            raise TypeError
        result = float(value)
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(field, f"must be a number, got {value!r}") from None
    if finite and not math.isfinite(result):
        raise ConfigError(field, f"must be a number, got {value!r}")
    return result


def positive(field: str, value: Any) -> float:
    result = number(field, value, convert=True)
    if not result > 0:
        raise ConfigError(field, f"must be positive, got {value}")
    return result


def non_negative(field: str, value: Any) -> float:
    result = number(field, value, convert=True)
    if result < 0:
        raise ConfigError(field, f"must not be negative, got {value}")
    return result


def integer(
    field: str, value: Any, *, minimum: int | None = None, whole_floats: bool = False
) -> int:
    """`value` as an int of at least `minimum`; with `whole_floats`, 3.0 counts as 3."""
    if not (is_whole(value) if whole_floats else is_int(value)):
        raise ConfigError(field, f"must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise ConfigError(field, f"must be >= {minimum}, got {value}")
    return int(value)


def integer_between(field: str, value: Any, low: int, high: int) -> int:
    if not (is_int(value) and low <= value <= high):
        raise ConfigError(field, f"must be an integer from {low} to {high}, got {value!r}")
    return value


def one_of(field: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ConfigError(field, f"must be one of {', '.join(choices)}, got {value!r}")
    return str(value)


def choice(field: str, value: Any, choices: tuple[str, ...]) -> str:
    """`value` as a string, which must be one of `choices`."""
    if str(value) not in choices:
        raise ConfigError(field, f"unknown value {value!r} (choose from {', '.join(choices)})")
    return str(value)
