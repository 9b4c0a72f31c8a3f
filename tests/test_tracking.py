"""The run tracker: store resolution, preflight, batched logging of a run's records."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from evolver.callbacks.mlflow_metrics import EpochMetricsLogger
from mlflow.tracking import MlflowClient
from tracking_support import history_rows, tracking_cfg, write_run_dir

from evolver.database_url import redact
from evolver.errors import ConfigError
from evolver.loop.job import trial_params
from evolver.tracking import NullTracker, make_tracker
from evolver.tracking.run_tracker import MlflowRunTracker
from evolver.tracking.store import TrackingSettings, check_reachable


def test_default_store_is_sqlite_and_artifacts_under_runs_dir(tmp_path: Path) -> None:
    settings = TrackingSettings.from_cfg(tracking_cfg(tmp_path / "runs"))
    assert settings.enabled
    assert settings.uri == f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    assert settings.artifact_root == (tmp_path / "runs" / "mlartifacts").as_uri()
    assert settings.experiment == "evolver"


def test_server_uri_leaves_artifacts_to_the_server(tmp_path: Path) -> None:
    settings = TrackingSettings.from_cfg(tracking_cfg(tmp_path, uri="http://127.0.0.1:5000"))
    assert settings.artifact_root is None
    explicit = tracking_cfg(tmp_path, uri="http://h:1", artifact_location=str(tmp_path / "a"))
    assert TrackingSettings.from_cfg(explicit).artifact_root == (tmp_path / "a").as_uri()


def test_nested_tags_are_flattened_to_dotted_names(tmp_path: Path) -> None:
    cfg = tracking_cfg(tmp_path, tags={"optuna": {"study": "s"}, "iteration": 3})
    assert TrackingSettings.from_cfg(cfg).tags == {"optuna.study": "s", "iteration": "3"}


def test_unreachable_server_is_one_line_error_naming_the_field(free_port: int) -> None:
    with pytest.raises(ConfigError) as caught:
        check_reachable(f"http://127.0.0.1:{free_port}", timeout_s=2)
    message = str(caught.value)
    assert message.startswith("tracking.uri: cannot reach MLflow tracking server")
    assert "\n" not in message


def test_unreachable_database_is_one_line_error_without_password() -> None:
    with pytest.raises(ConfigError) as caught:
        check_reachable("postgresql://user:secret@127.0.0.1:1/db", timeout_s=2)
    message = str(caught.value)
    assert message.startswith("tracking.uri: cannot connect to database")
    assert "secret" not in message and "\n" not in message
    assert redact("postgresql://u:pw@h/db") == "postgresql://u:***@h/db"


def test_file_store_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^tracking\.uri: .*file store"):
        check_reachable(str(tmp_path / "mlruns"))


def test_preflight_fails_before_training_when_server_is_down(
    tmp_path: Path, free_port: int
) -> None:
    tracker = make_tracker(tracking_cfg(tmp_path, uri=f"http://127.0.0.1:{free_port}"), tmp_path)
    with pytest.raises(ConfigError, match=r"^tracking\.uri"):
        tracker.preflight()


def test_disabled_tracking_is_a_null_tracker(tmp_path: Path) -> None:
    tracker = make_tracker(tracking_cfg(tmp_path, enabled=False), tmp_path)
    assert isinstance(tracker, NullTracker)
    tracker.preflight()
    assert tracker.callbacks(1) == []
    tracker.finish(tmp_path, "complete")
    assert not (tmp_path / "mlflow.db").exists()


def test_tracking_imports_neither_torch_nor_mlflow() -> None:
    code = (
        "import sys, evolver.tracking, evolver.tracking.store, evolver.tracking.loop_runs\n"
        "loaded = {'torch', 'lightning', 'mlflow'} & set(sys.modules)\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def fake_trainer(epoch: int, **metrics: float) -> SimpleNamespace:
    values = {name: torch.tensor(value) for name, value in metrics.items()}
    return SimpleNamespace(sanity_checking=False, current_epoch=epoch - 1, callback_metrics=values)


def run_of(tracker: MlflowRunTracker) -> tuple[MlflowClient, object]:
    client = MlflowClient(tracking_uri=tracker.settings.uri)
    return client, client.get_run(tracker.run_id)


def history_of(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def test_tracker_logs_params_curves_metrics_tags_and_artifacts(tmp_path: Path) -> None:
    cfg = tracking_cfg(tmp_path / "runs", experiment="single")
    cfg.model.notes = "x" * 7000  # longer than MLflow's 6000-character param limit
    cfg.extra = {f"key{i}": i for i in range(120)}  # more than one 100-param batch
    run_dir = tmp_path / "runs" / "train" / "2026-01-01_00-00-00"
    tracker = make_tracker(cfg, run_dir)
    assert isinstance(tracker, MlflowRunTracker)
    tracker.preflight()

    # Fold 1 epochs 1-2 are logged live (epoch 1 at once, epoch 2 when training ends, within
    # tracking.live_interval_s); the rest comes from history.csv.
    rows = history_rows(folds=2, epochs=3)
    [logger] = tracker.callbacks(1)
    assert isinstance(logger, EpochMetricsLogger)
    for row in rows[:2]:
        trainer = fake_trainer(
            row["epoch"],
            train_loss_epoch=row["train_loss"],
            val_loss=row["val_loss"],
            val_acc=row["val_acc"],
        )
        logger.on_train_epoch_end(trainer, None)
    assert list(logger.pending) == [2]
    logger.on_train_end(trainer, None)
    calls_after_epochs = tracker.log_batch_calls
    write_run_dir(run_dir, folds=2, epochs=3)
    tracker.finish(run_dir, "complete")

    client, run = run_of(tracker)
    assert run.info.run_name == "2026-01-01_00-00-00"
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "single"
    params = run.data.params
    assert params["model.name"] == "tiny"
    assert params["finetune.lr_head"] == "0.001"
    assert params["model.notes"] == "x" * 6000
    assert params["extra.key119"] == "119"
    assert "tracking.parent_run_id" not in params and "loop.trial_number" not in params
    metrics = run.data.metrics
    assert metrics["cv.loss_best"] == pytest.approx((1.2 / 3 + 0.01 + 1.2 / 3 + 0.02) / 2)
    assert metrics["cv.oof_log_loss"] == pytest.approx(metrics["cv.loss_best"] + 0.001)
    assert metrics["cv.accuracy"] == pytest.approx(0.9)
    assert metrics["degradation.mean"] == pytest.approx(0.003)
    assert metrics["degradation.max"] == pytest.approx(0.004)
    assert metrics["folds.early_stopped"] == 1
    assert metrics["fold2/best_epoch"] == 3
    for fold in (1, 2):
        fold_rows = [r for r in rows if r["fold"] == fold]
        for name in ("train_loss", "val_loss", "val_acc", "lr_backbone", "lr_head"):
            expected = [(r["epoch"], pytest.approx(r[name])) for r in fold_rows]
            assert history_of(client, run.info.run_id, f"fold{fold}/{name}") == expected
    tags = run.data.tags
    assert tags["state"] == "complete" and "state_reason" not in tags
    assert tags["run_type"] == "train" and tags["model"] == "tiny"
    assert tags["run_dir"] == str(run_dir.resolve())
    assert tags["fold1.stop_reason"] == "val_loss did not improve in 2 epochs"
    root = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert root == {"config.yaml", "history.csv", "summary.json", "oof.csv", "report"}
    report = {a.path for a in client.list_artifacts(run.info.run_id, "report")}
    assert report == {"report/report.md", "report/report.json", "report/plots"}
    assert [a.path for a in client.list_artifacts(run.info.run_id, "report/plots")] == [
        "report/plots/curves.png"
    ]
    # Batched: params in 2 calls (>100), 2 live epochs, results in 1 call.
    assert calls_after_epochs == 2 + 2
    assert tracker.log_batch_calls == calls_after_epochs + 1


@pytest.mark.parametrize(("state", "mlflow_status"), [("pruned", "KILLED"), ("failed", "FAILED")])
def test_pruned_and_failed_runs_are_closed_with_their_reason(
    tmp_path: Path, state: str, mlflow_status: str
) -> None:
    run_dir = tmp_path / "run"
    tracker = make_tracker(tracking_cfg(tmp_path, log_checkpoints=True), run_dir)
    tracker.preflight()
    write_run_dir(run_dir, folds=1, epochs=2, status=state)
    (run_dir / "checkpoints").mkdir()
    (run_dir / "checkpoints" / "fold1-best.ckpt").write_bytes(b"weights")
    (run_dir / "checkpoints" / "fold1-last.ckpt").write_bytes(b"weights")
    tracker.finish(run_dir, state, "non-finite val_loss in fold 1" if state == "failed" else None)
    client, run = run_of(tracker)
    assert run.info.status == mlflow_status
    assert run.data.tags["state"] == state
    if state == "failed":
        assert run.data.tags["state_reason"] == "non-finite val_loss in fold 1"
    checkpoints = [a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")]
    assert checkpoints == ["checkpoints/fold1-best.ckpt"]


def test_tracking_errors_after_preflight_only_warn(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run_dir = write_run_dir(tmp_path / "run")
    tracker = make_tracker(tracking_cfg(tmp_path), run_dir)
    tracker.preflight()

    def broken(*args: object, **kwargs: object) -> None:
        raise ConnectionError("store went away")

    tracker.store.client.log_batch = broken
    tracker.store.client.log_artifact = broken
    with caplog.at_level(logging.WARNING, logger="evolver.tracking"):
        tracker.callbacks(1)[0].on_train_epoch_end(fake_trainer(1, val_loss=0.5), None)
        tracker.finish(run_dir, "complete")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("store went away" in w and "epoch 1" in w for w in warnings)
    assert any("store went away" in w and "results" in w for w in warnings)
    assert (run_dir / "summary.json").is_file()
    assert run_of(tracker)[1].info.status == "FINISHED"


def test_trial_params_include_the_values_optuna_sampled(tmp_path: Path) -> None:
    import optuna

    cfg = tracking_cfg(tmp_path)
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="demo", storage=storage)
    study.enqueue_trial({"finetune.lr_head": 0.003, "data.batch_size": 64})
    trial = study.ask()
    trial.suggest_float("finetune.lr_head", 1e-4, 1e-2, log=True)
    trial.suggest_categorical("data.batch_size", [32, 64])
    cfg.loop.trial_number = trial.number
    tracker = make_tracker(cfg, tmp_path / "run", sampled=lambda: trial_params(cfg))
    tracker.preflight()
    params = run_of(tracker)[1].data.params
    assert params["sampled.finetune.lr_head"] == "0.003"
    assert params["sampled.data.batch_size"] == "64"


@pytest.mark.postgres
def test_tracker_works_against_postgres(tmp_path: Path, postgres_url: str) -> None:
    run_dir = tmp_path / "run"
    tracker = make_tracker(tracking_cfg(tmp_path, uri=postgres_url), run_dir)
    tracker.preflight()
    write_run_dir(run_dir, folds=1, epochs=2)
    tracker.finish(run_dir, "complete")
    client, run = run_of(tracker)
    assert run.info.status == "FINISHED"
    assert history_of(client, run.info.run_id, "fold1/val_loss")[-1][0] == 2
    artifact_uri = run.info.artifact_uri
    assert artifact_uri.startswith((tmp_path / "mlartifacts").as_uri())


@pytest.mark.parametrize(("interval", "calls"), [(0, 3), (3600, 2)])
def test_epoch_logger_sends_epoch_batches_from_a_real_trainer(
    tmp_path: Path, interval: float, calls: int
) -> None:
    """Interval 0: one batch per epoch; a long interval: epoch 1 at once, 2-3 at the end."""
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, TensorDataset

    class Probe(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(4, 2)

        def training_step(self, batch: list[torch.Tensor], _: int) -> torch.Tensor:
            loss = torch.nn.functional.cross_entropy(self.layer(batch[0]), batch[1])
            self.log("train_loss", loss, on_step=True, on_epoch=True)
            return loss

        def validation_step(self, batch: list[torch.Tensor], _: int) -> None:
            logits = self.layer(batch[0])
            self.log("val_loss", torch.nn.functional.cross_entropy(logits, batch[1]))
            self.log("val_acc", (logits.argmax(1) == batch[1]).float().mean())

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    generator = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(32, 4, generator=generator), torch.arange(32) % 2)
    tracker = make_tracker(tracking_cfg(tmp_path, live_interval_s=interval), tmp_path / "run")
    tracker.preflight()
    calls_before = tracker.log_batch_calls
    trainer = pl.Trainer(
        max_epochs=3,
        callbacks=tracker.callbacks(2),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=2,
    )
    trainer.fit(Probe(), DataLoader(data, batch_size=8), DataLoader(data, batch_size=16))
    assert tracker.log_batch_calls - calls_before == calls  # none per step
    client = MlflowClient(tracking_uri=tracker.settings.uri)
    for name in ("train_loss", "val_loss", "val_acc"):
        steps = [m.step for m in client.get_metric_history(tracker.run_id, f"fold2/{name}")]
        assert sorted(steps) == [1, 2, 3], name
    last_val_loss = client.get_metric_history(tracker.run_id, "fold2/val_loss")
    assert max(last_val_loss, key=lambda m: m.step).value == pytest.approx(
        float(trainer.callback_metrics["val_loss"])
    )


class RecordingTracker:
    def __init__(self) -> None:
        self.calls: list[tuple[int, dict[int, dict[str, float]]]] = []

    def log_epochs(self, fold: int, epochs: dict[int, dict[str, float]]) -> None:
        self.calls.append((fold, dict(epochs)))


@pytest.mark.parametrize("ending", ["on_train_end", "on_exception"])
def test_epoch_values_go_out_at_most_once_per_interval_and_all_when_training_ends(
    ending: str,
) -> None:
    tracker = RecordingTracker()
    logger = EpochMetricsLogger(tracker, fold=2, interval_s=3600)  # type: ignore[arg-type]
    for epoch in (1, 2, 3):
        logger.on_train_epoch_end(fake_trainer(epoch, val_loss=1.0 / epoch), None)
    assert tracker.calls == [(2, {1: {"val_loss": 1.0}})]
    if ending == "on_exception":
        logger.on_exception(fake_trainer(3), None, RuntimeError("pruned"))
    else:
        logger.on_train_end(fake_trainer(3), None)
    assert tracker.calls[1] == (2, {2: {"val_loss": 0.5}, 3: {"val_loss": pytest.approx(1 / 3)}})
    logger.on_train_end(fake_trainer(3), None)
    assert len(tracker.calls) == 2  # nothing left to send


def test_a_zero_interval_sends_every_epoch() -> None:
    tracker = RecordingTracker()
    logger = EpochMetricsLogger(tracker, fold=1, interval_s=0)  # type: ignore[arg-type]
    for epoch in (1, 2, 3):
        logger.on_train_epoch_end(fake_trainer(epoch, val_loss=1.0), None)
    assert [list(epochs) for _, epochs in tracker.calls] == [[1], [2], [3]]
