"""The loop's search space: parameters read from `conf/search/`, turned into Optuna distributions
and Hydra overrides (`evolver.loop.adaptation` adapts it between iterations).

A parameter's name is the config key it sets (`finetune.lr_backbone`), or a config group for a
group choice (`schedule`). A categorical choice may stand for other overrides than `key=value`
(`early_stop.patience: off` -> `early_stop.enabled=false`), declared under `choice_overrides`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from evolver.diagnosis.proposals import format_override_value as format_value
from evolver.errors import ConfigError

PARAM_TYPES = ("float", "int", "categorical")


@dataclass(frozen=True)
class ParamSpec:
    """One searched parameter: a `float`/`int` range (optionally log scale) or choices."""

    name: str
    type: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: tuple[Any, ...] = ()
    choice_overrides: dict[str, list[str]] = field(default_factory=dict)

    @property
    def is_group(self) -> bool:
        return "." not in self.name

    def distribution(self) -> Any:
        from optuna.distributions import (
            CategoricalDistribution,
            FloatDistribution,
            IntDistribution,
        )

        if self.type == "float":
            return FloatDistribution(float(self.low), float(self.high), log=self.log)
        if self.type == "int":
            return IntDistribution(int(self.low), int(self.high), log=self.log)
        return CategoricalDistribution(list(self.choices))

    def contains(self, value: Any) -> bool:
        if self.type == "categorical":
            return value in self.choices
        if isinstance(value, bool) or not isinstance(value, int | float):
            return False
        if self.type == "int" and int(value) != value:
            return False
        return float(self.low) <= float(value) <= float(self.high)

    def overrides(self, value: Any) -> list[str]:
        """Hydra overrides that apply `value`."""
        mapped = self.choice_overrides.get(str(value))
        if mapped is not None:
            return list(mapped)
        return [f"{self.name}={format_value(value)}"]

    def value_for_changes(self, changes: Mapping[str, Any]) -> tuple[bool, Any, set[str]]:
        """(found, value, consumed keys): the value of this parameter that a proposal's
        `changes` ask for, directly or through a choice's overrides."""
        if self.name in changes:
            return True, changes[self.name], {self.name}
        rendered = {f"{key}={format_value(value)}" for key, value in changes.items()}
        for choice, overrides in self.choice_overrides.items():
            if overrides and set(overrides) <= rendered:
                keys = {line.split("=", 1)[0] for line in overrides}
                return True, self._choice(choice), keys
        return False, None, set()

    def value_in_config(self, cfg: Mapping[str, Any], group_choices: Mapping[str, Any]) -> Any:
        """This parameter's value in a composed config (None when the config does not say)."""
        if self.is_group:
            return group_choices.get(self.name)
        for choice, overrides in self.choice_overrides.items():
            if overrides and all(
                format_value(select(cfg, line.split("=", 1)[0])) == line.split("=", 1)[1]
                for line in overrides
            ):
                return self._choice(choice)
        return select(cfg, self.name)

    def _choice(self, text: str) -> Any:
        for choice in self.choices:
            if str(choice) == text:
                return choice
        return text

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"type": self.type}
        if self.type == "categorical":
            data["choices"] = list(self.choices)
            if self.choice_overrides:
                data["choice_overrides"] = {k: list(v) for k, v in self.choice_overrides.items()}
        else:
            data.update(low=self.low, high=self.high, log=self.log)
        return data

    @classmethod
    def from_dict(cls, name: str, values: Mapping[str, Any]) -> ParamSpec:
        field_name = f"search.params.{name}"
        kind = values.get("type")
        if kind not in PARAM_TYPES:
            raise ConfigError(f"{field_name}.type", f"must be one of {PARAM_TYPES}, got {kind!r}")
        if kind == "categorical":
            choices = tuple(values.get("choices") or ())
            if not choices:
                raise ConfigError(f"{field_name}.choices", "needs at least one choice")
            overrides = {
                str(choice): [str(line) for line in lines]
                for choice, lines in (values.get("choice_overrides") or {}).items()
            }
            return cls(name, kind, choices=choices, choice_overrides=overrides)
        low, high = values.get("low"), values.get("high")
        if not isinstance(low, int | float) or not isinstance(high, int | float) or low >= high:
            raise ConfigError(field_name, f"needs numbers low < high, got low={low} high={high}")
        log = bool(values.get("log", False))
        if log and low <= 0:
            raise ConfigError(f"{field_name}.low", "must be > 0 on a log scale")
        if kind == "int":
            low, high = int(low), int(high)
        return cls(name, kind, low=low, high=high, log=log)


class SearchSpace:
    """An ordered set of `ParamSpec`s."""

    def __init__(self, params: Iterable[ParamSpec]) -> None:
        self.params: dict[str, ParamSpec] = {spec.name: spec for spec in params}

    def __contains__(self, name: object) -> bool:
        return name in self.params

    def __getitem__(self, name: str) -> ParamSpec:
        return self.params[name]

    def __iter__(self):
        return iter(self.params.values())

    def __len__(self) -> int:
        return len(self.params)

    def with_param(self, spec: ParamSpec) -> SearchSpace:
        return SearchSpace([spec if s.name == spec.name else s for s in self])

    def to_dict(self) -> dict[str, Any]:
        return {name: spec.to_dict() for name, spec in self.params.items()}

    @classmethod
    def from_dict(cls, params: Mapping[str, Any] | None) -> SearchSpace:
        return cls(ParamSpec.from_dict(str(name), spec) for name, spec in (params or {}).items())

    @classmethod
    def from_cfg(cls, search_cfg: Any) -> SearchSpace:
        """From `search.params`: nested like the config (`finetune: {lr_backbone: {type: ...}}`)
        or flat (`finetune.lr_backbone: {type: ...}`); a node with a `type` is a parameter."""
        params = _get(search_cfg, "params")
        if params is None:
            return cls([])
        if hasattr(params, "items") and not isinstance(params, Mapping):
            from omegaconf import OmegaConf

            params = OmegaConf.to_container(params, resolve=True)
        if not isinstance(params, Mapping):
            raise ConfigError("search.params", "must map config keys to parameter specs")
        return cls.from_dict(flatten_specs(params))

    def overrides(self, params: Mapping[str, Any]) -> list[str]:
        """Overrides for a trial's values, group choices first (Hydra applies them first)."""
        ordered = sorted(params, key=lambda name: (not self.params[name].is_group, name))
        return [line for name in ordered for line in self.params[name].overrides(params[name])]


def flatten_specs(node: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in node.items():
        name = f"{prefix}{key}"
        if not isinstance(value, Mapping):
            raise ConfigError(f"search.params.{name}", "must be a parameter spec with a `type`")
        if "type" in value:
            flat[name] = value
        else:
            flat.update(flatten_specs(value, f"{name}."))
    return flat


def select(cfg: Any, dotted: str) -> Any:
    node = cfg
    for part in dotted.split("."):
        node = _get(node, part)
        if node is None:
            return None
    return node


def _get(node: Any, key: str) -> Any:
    if node is None:
        return None
    if isinstance(node, Mapping):
        return node.get(key)
    try:
        return node.get(key)
    except AttributeError:
        return getattr(node, key, None)
