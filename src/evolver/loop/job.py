"""The job side of a loop trial: what a training run does when a sweeper launched it.

The sweeper passes `loop.trial_number=<n>` (and `loop.storage`, `loop.name`); the job loads that
trial from the shared storage and reports its validation loss per epoch, so the study's pruner
can stop it. No heartbeat here: the sweeper beats for its jobs (see `study.HeartbeatThread`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from evolver.loop.racing import RACE_ATTR, incumbent_race


def trial_callbacks(cfg: Any, fold: int) -> list[Any]:
    """Lightning callbacks that report to this job's Optuna trial (empty outside a loop)."""
    loop = cfg.get("loop") if hasattr(cfg, "get") else None
    if loop is None or loop.get("trial_number") is None:
        return []
    trial = load_trial(cfg)
    monitor = str((cfg.get("early_stop") or {}).get("monitor") or "val_loss")
    return [make_pruning_callback(trial, monitor, fold, may_prune(cfg, trial))]


def fold_race(cfg: Any) -> Callable[[Any], None]:
    """A `CrossValidation.after_fold` hook that races this job's trial against the incumbent's
    same folds and stops it (optuna.TrialPruned) when it cannot plausibly win; a no-op outside a
    loop, with `loop.race_sigmas=null`, for an objective without per-fold scores, or while the
    study has no complete trial with every fold scored."""
    loop = cfg.get("loop") if hasattr(cfg, "get") else None
    if loop is None or loop.get("trial_number") is None:
        return _no_race
    from evolver.loop.study import LoopSettings
    from evolver.records import FOLD_SCORE_KEYS

    settings = LoopSettings.from_cfg(cfg)
    if settings.race_sigmas is None or settings.objective not in FOLD_SCORE_KEYS:
        return _no_race
    trial = load_trial(cfg)
    race = incumbent_race(
        trial.study.get_trials(deepcopy=False),
        int(cfg.cv.folds),
        settings.race_sigmas,
        exclude=trial.number,
    )
    if race is None:
        return _no_race
    scores: dict[int, float] = {}

    def after_fold(outcome: Any) -> None:
        import optuna

        from evolver.records import fold_scores

        scores.update(fold_scores([asdict(outcome.summary)], settings.objective))
        verdict = race.verdict(scores)
        if verdict is not None:
            trial.set_user_attr(RACE_ATTR, verdict.to_dict())
            raise optuna.TrialPruned(verdict.reason)

    return after_fold


def _no_race(outcome: Any) -> None:
    return None


def may_prune(cfg: Any, trial: Any) -> bool:
    """Whether the trial may be pruned mid-fold. Sampled trials are judged by the loop's pruner.
    A proposal is judged against its base trial's curve at the same fold and epoch
    (`BaseCurvePruner`, installed as the trial's pruner here), not against unrelated trials,
    unless `loop.prune_proposals` sends it to the loop's pruner too or
    `loop.proposal_prune_tolerance=null` exempts it. The baseline runs to the end."""
    from evolver.loop.pruners import BaseCurvePruner, base_number
    from evolver.loop.study import LoopSettings

    if not trial.user_attrs.get("proposed_by"):
        return True
    if cfg.loop.get("prune_proposals", False):
        return True
    settings = LoopSettings.from_cfg(cfg)
    base = base_number(trial.user_attrs)
    if base is None or settings.proposal_prune_tolerance is None:
        return False
    # Not judged before phase 2 has run its warmup epochs: a proposal that changes the head's
    # rate or the regularisation looks different in phase 1 by design.
    phase1 = int((cfg.get("finetune") or {}).get("phase1_epochs") or 0)
    trial.study.pruner = BaseCurvePruner(
        base, settings.proposal_prune_tolerance, phase1 + settings.pruner_warmup_epochs
    )
    return True


def trial_params(cfg: Any) -> dict[str, Any]:
    """The values Optuna fixed for this job's trial, under the search space's names (empty
    outside a loop)."""
    loop = cfg.get("loop") if hasattr(cfg, "get") else None
    if loop is None or loop.get("trial_number") is None:
        return {}
    from evolver.loop.resilient_storage import DEFAULT_RETRY_S
    from evolver.storage_url import optuna_storage_url

    retry_s = float(loop.get("storage_retry_s", DEFAULT_RETRY_S) or DEFAULT_RETRY_S)
    storage = job_storage(optuna_storage_url(cfg), retry_s)
    study_id = storage.get_study_id_from_name(str(loop.get("name")))
    trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, int(loop.trial_number))
    return dict(storage.get_trial(trial_id).params)


def load_trial(cfg: Any) -> Any:
    """Trial `cfg.loop.trial_number` of study `cfg.loop.name`, with the loop's pruner."""
    import optuna

    from evolver.errors import ConfigError
    from evolver.loop.study import LoopSettings, make_pruner

    settings = LoopSettings.from_cfg(cfg)
    number = int(cfg.loop.trial_number)
    study = optuna.load_study(
        study_name=settings.name,
        storage=job_storage(settings.storage, settings.storage_retry_s),
        pruner=make_pruner(settings),
    )
    matches = [t for t in study.get_trials(deepcopy=False) if t.number == number]
    if not matches:
        raise ConfigError("loop.trial_number", f"study {settings.name!r} has no trial {number}")
    return optuna.trial.Trial(study, matches[0]._trial_id)


def job_storage(url: str, retry_s: float) -> Any:
    """The job side's one storage per database: the worker's own when the job runs in its
    process, else one opened once per process. Each fold and the tracker reuse it, so a job
    holds no engine of its own per use (16 workers would otherwise exhaust PostgreSQL's default
    100 connections)."""
    from evolver.loop.study import worker_storage

    return worker_storage(url) or _own_storage(url, retry_s)


@functools.cache
def _own_storage(url: str, retry_s: float) -> Any:
    # The worker that launched this job reached the database: wait for it through an outage.
    from evolver.loop.study import make_storage

    return make_storage(url, retry_s=retry_s, wait_for_database=True)


def make_pruning_callback(trial: Any, monitor: str, fold: int, prune: bool = True) -> Any:
    from evolver.callbacks.pruning import FoldPruningCallback

    return FoldPruningCallback(trial, monitor, fold, prune)
