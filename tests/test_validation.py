"""The shared config checks and the one default Optuna storage URL."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from evolver import validation
from evolver.errors import ConfigError
from evolver.loop.study import LoopSettings
from evolver.storage_url import default_storage_url, optuna_storage_url


@pytest.mark.parametrize(
    ("check", "value", "message"),
    [
        (lambda v: validation.number("x", v), True, "x: must be a number, got True"),
        (lambda v: validation.number("x", v), "1e-3", "x: must be a number, got '1e-3'"),
        (lambda v: validation.number("x", v, finite=True), float("inf"), "x: must be a number"),
        (lambda v: validation.positive("x", v), 0, "x: must be positive, got 0"),
        (lambda v: validation.non_negative("x", v), -1, "x: must not be negative, got -1"),
        (lambda v: validation.integer("x", v), 2.0, "x: must be an integer, got 2.0"),
        (lambda v: validation.integer("x", v, whole_floats=True), 2.5, "x: must be an integer"),
        (lambda v: validation.integer("x", v, minimum=2), 1, "x: must be >= 2, got 1"),
        (lambda v: validation.integer_between("x", v, 0, 10), 11, "x: must be an integer from"),
        (lambda v: validation.one_of("x", v, ("a", "b")), "c", "x: must be one of a, b, got 'c'"),
    ],
)
def test_checks_name_the_field_in_one_line(
    check: Callable[[object], object], value: object, message: str
) -> None:
    with pytest.raises(ConfigError) as error:
        check(value)
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


def test_checks_return_the_value() -> None:
    assert validation.number("x", "1e-3", convert=True) == pytest.approx(1e-3)
    assert validation.integer("x", 3.0, minimum=1, whole_floats=True) == 3
    assert validation.setting({"a": 1}, "a") == 1
    assert validation.setting(OmegaConf.create({"a": 1}), "b", 2) == 2
    assert validation.setting(None, "a", 3) == 3


def test_loop_and_tracking_agree_on_the_default_storage(tmp_path: Path) -> None:
    loop = {"name": "demo", "iterations": 1, "trials_per_iteration": 1}
    cfg = OmegaConf.create({"runs_dir": str(tmp_path / "runs"), "loop": loop})
    expected = f"sqlite:///{(tmp_path / 'runs' / 'optuna.db').resolve()}"
    assert default_storage_url(tmp_path / "runs") == expected
    assert optuna_storage_url(cfg) == expected
    assert LoopSettings.from_cfg(cfg).storage == expected
    cfg.loop.storage = "sqlite:////elsewhere/optuna.db"
    assert optuna_storage_url(cfg) == LoopSettings.from_cfg(cfg).storage == cfg.loop.storage
