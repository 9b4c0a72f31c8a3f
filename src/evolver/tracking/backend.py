"""A thin layer over `MlflowClient`: experiments by name, batched logging within MLflow's limits."""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.validation import (
    MAX_METRICS_PER_BATCH,
    MAX_PARAM_VAL_LENGTH,
    MAX_PARAMS_TAGS_PER_BATCH,
    MAX_TAG_VAL_LENGTH,
)

from evolver.tracking.store import slug

log = logging.getLogger("evolver.tracking")

T = TypeVar("T")

PARENT_RUN_TAG = "mlflow.parentRunId"
RUN_NAME_TAG = "mlflow.runName"
NOTE_TAG = "mlflow.note.content"


def chunks(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def now_ms() -> int:
    return int(time.time() * 1000)


def flatten_params(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> `{"finetune.lr_head": "0.001", ...}`, values cut to MLflow's limit."""
    flat: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten_params(value, f"{name}."))
            continue
        text = value if isinstance(value, str) else json.dumps(value, default=str)
        flat[name] = text[:MAX_PARAM_VAL_LENGTH]
    return flat


class MlflowStore:
    """One tracking store (URI) and the operations evolver needs from it."""

    def __init__(self, uri: str, artifact_root: str | None) -> None:
        self.uri = uri
        self.artifact_root = artifact_root
        self.client = MlflowClient(tracking_uri=uri)

    def experiment_id(self, name: str, tags: Mapping[str, str] | None = None) -> str:
        """The id of experiment `name`, created (with its artifact folder) when missing."""
        experiment = self.client.get_experiment_by_name(name)
        if experiment is not None:
            if experiment.lifecycle_stage == "deleted":
                self.client.restore_experiment(experiment.experiment_id)
            return experiment.experiment_id
        location = f"{self.artifact_root.rstrip('/')}/{slug(name)}" if self.artifact_root else None
        try:
            return self.client.create_experiment(name, artifact_location=location, tags=tags)
        except MlflowException:
            # Another job created it between our look-up and create: use theirs.
            experiment = self.client.get_experiment_by_name(name)
            if experiment is None:
                raise
            return experiment.experiment_id

    def create_run(
        self,
        experiment_id: str,
        run_name: str | None,
        tags: Mapping[str, str],
        parent_run_id: str | None = None,
    ) -> str:
        all_tags = dict(tags)
        if parent_run_id:
            all_tags[PARENT_RUN_TAG] = parent_run_id
        run = self.client.create_run(experiment_id, tags=all_tags, run_name=run_name)
        return run.info.run_id

    def log(
        self,
        run_id: str,
        metrics: Iterable[Metric] = (),
        params: Mapping[str, str] | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> int:
        """Log everything in as few `log_batch` calls as MLflow's limits allow; return calls."""
        metric_list = [m for m in metrics if m.value is not None]
        param_list = [Param(k, str(v)[:MAX_PARAM_VAL_LENGTH]) for k, v in (params or {}).items()]
        tag_list = [RunTag(k, str(v)[:MAX_TAG_VAL_LENGTH]) for k, v in (tags or {}).items()]
        calls = 0
        metric_batches = list(chunks(metric_list, MAX_METRICS_PER_BATCH))
        param_batches = list(chunks(param_list, MAX_PARAMS_TAGS_PER_BATCH))
        tag_batches = list(chunks(tag_list, MAX_PARAMS_TAGS_PER_BATCH))
        for index in range(max(len(metric_batches), len(param_batches), len(tag_batches))):
            # Params and tags each count against the 100 limit; metrics and them against 1000.
            batch_metrics = metric_batches[index] if index < len(metric_batches) else []
            batch_params = param_batches[index] if index < len(param_batches) else []
            batch_tags = tag_batches[index] if index < len(tag_batches) else []
            if len(batch_metrics) + len(batch_params) + len(batch_tags) > MAX_METRICS_PER_BATCH:
                self.client.log_batch(run_id, metrics=batch_metrics)
                self.client.log_batch(run_id, params=batch_params, tags=batch_tags)
                calls += 2
            else:
                self.client.log_batch(
                    run_id, metrics=batch_metrics, params=batch_params, tags=batch_tags
                )
                calls += 1
        return calls

    def log_files(self, run_id: str, files: Iterable[Path], artifact_path: str | None) -> None:
        for path in files:
            self.client.log_artifact(run_id, str(path), artifact_path)

    def terminate(self, run_id: str, status: str) -> None:
        self.client.set_terminated(run_id, status=status, end_time=now_ms())

    def reopen(self, run_id: str) -> None:
        self.client.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))


def metric(key: str, value: float, step: int = 0, timestamp: int | None = None) -> Metric:
    number = float(value)
    if math.isinf(number):
        # MLflow's stores reject infinities; keep the sign at the float maximum instead.
        number = math.copysign(1.7976931348623157e308, number)
    return Metric(key, number, timestamp or now_ms(), int(step))
