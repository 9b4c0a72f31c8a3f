"""A rerun after a fix: failed trials whose job config has changed since they failed run again.

Each trial records `config_digest`, a digest of the job config the loop's command composes (the
primary config with the command's overrides, minus the loop's own groups and the searched keys,
which each trial sets itself). When a rerun composes a different one (an override changed, a
config file was fixed), a failed trial would now run differently: the loop enqueues a retry with
the same parameters in the same iteration, linked to the failed trial like Optuna's heartbeat
retries (system attributes `failed_trial`, `retry_history`), so the retry replaces it in the
iteration and in the failure rate.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from typing import Any

from evolver.loop.proposals import PROPOSAL_ATTRS
from evolver.loop.state import LoopState, is_skipped

# Config keys that do not reach a trial's job as such: the loop, its search space, Hydra.
LOOP_KEYS = ("hydra", "loop", "search")
# User attributes of a failed trial that describe its plan (the rest describe its run).
PLAN_ATTRS = ("iteration", *PROPOSAL_ATTRS, "fixed_overrides", "excluded_params")


def config_digest(cfg: Any, searched: Iterable[str]) -> str:
    """A short digest of the job config `cfg` gives every trial, searched keys left out."""
    from omegaconf import OmegaConf

    if OmegaConf.is_config(cfg):
        data = OmegaConf.to_container(cfg, resolve=False)
    else:
        data = json.loads(json.dumps(dict(cfg), default=str))
    assert isinstance(data, dict)
    for key in LOOP_KEYS:
        data.pop(key, None)
    for name in searched:
        _pop_path(data, name.split("."))
    text = json.dumps(data, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def failed_trials(state: LoopState) -> list[Any]:
    """Failed trials that no retry replaces yet (skipped trials never ran: not failures)."""
    return [t for t in state.trials if t.state.name == "FAIL" and not is_skipped(t)]


def config_changed(trial: Any, digest: str) -> bool:
    recorded = trial.user_attrs.get("config_digest")
    return recorded is not None and recorded != digest


def enqueue_retry(storage: Any, study_id: int, trial: Any, reason: str) -> int:
    """A WAITING trial with `trial`'s parameters and plan; returns its number."""
    import optuna

    history = [*(trial.system_attrs.get("retry_history") or []), trial.number]
    user_attrs = {key: trial.user_attrs[key] for key in PLAN_ATTRS if key in trial.user_attrs}
    user_attrs.update(retry_of=trial.number, retry_reason=reason)
    template = optuna.trial.create_trial(
        state=optuna.trial.TrialState.WAITING,
        params=dict(trial.params),
        distributions=dict(trial.distributions),
        user_attrs=user_attrs,
        system_attrs={
            "failed_trial": trial.system_attrs.get("failed_trial", trial.number),
            "retry_history": history,
            "fixed_params": dict(trial.params),
        },
    )
    trial_id = storage.create_new_trial(study_id, template_trial=template)
    return int(storage.get_trial_number_from_id(trial_id))


def _pop_path(data: dict[str, Any], parts: list[str]) -> None:
    node: Any = data
    for part in parts[:-1]:
        node = node.get(part) if isinstance(node, dict) else None
    if isinstance(node, dict):
        node.pop(parts[-1], None)
