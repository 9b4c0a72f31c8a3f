"""MLflow logging cost of one K-fold run: a call per value vs evolver's batched tracker.

    python benchmarks/tracking_logging.py [--folds 5] [--epochs 20] [--server]

For each store (SQLite file; with --server also a local `mlflow server` over HTTP) it logs the
same per-epoch curves (5 values per fold and epoch) twice: one `log_metric` call per value, and
through `MlflowRunTracker` (one `log_batch` per epoch, results and records at the end).
"""

from __future__ import annotations

import argparse
import socket
import sys
import tempfile
import time
from pathlib import Path

from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from tracking_support import history_rows, tracking_cfg, write_run_dir

from evolver.tracking.records import HISTORY_METRICS
from evolver.tracking.run_tracker import MlflowRunTracker
from evolver.tracking.server import start_mlflow_server


def per_value(uri: str, rows: list[dict], experiment: str) -> tuple[float, int]:
    client = MlflowClient(tracking_uri=uri)
    experiment_id = client.create_experiment(experiment)
    run_id = client.create_run(experiment_id).info.run_id
    calls = 0
    start = time.perf_counter()
    for row in rows:
        for name in HISTORY_METRICS:
            client.log_metric(run_id, f"fold{row['fold']}/{name}", row[name], step=row["epoch"])
            calls += 1
    return time.perf_counter() - start, calls


def batched(cfg: object, rows: list[dict], run_dir: Path) -> tuple[float, float, int]:
    """Seconds spent in the per-epoch hook, seconds for the whole run's tracking, calls."""
    start = time.perf_counter()
    tracker = MlflowRunTracker(cfg, run_dir)
    tracker.preflight()
    epochs_start = time.perf_counter()
    for row in rows:
        values = {name: row[name] for name in HISTORY_METRICS}
        tracker.log_epoch(row["fold"], row["epoch"], values)
    epochs_s = time.perf_counter() - epochs_start
    folds = max(row["fold"] for row in rows)
    epochs = max(row["epoch"] for row in rows)
    write_run_dir(run_dir, folds=folds, epochs=epochs)
    tracker.finish(run_dir, "complete")
    return epochs_s, time.perf_counter() - start, tracker.log_batch_calls


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--server", action="store_true", help="also measure over HTTP")
    args = parser.parse_args()
    rows = history_rows(args.folds, args.epochs)
    values = len(rows) * len(HISTORY_METRICS)
    table = []
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        stores = [("sqlite", f"sqlite:///{root / 'mlflow.db'}", None)]
        server = None
        if args.server:
            server = start_mlflow_server(
                f"sqlite:///{root / 'server.db'}",
                free_port(),
                artifacts_destination=str(root / "server-artifacts"),
            )
            stores.append(("http", server.url, server))
        try:
            for label, uri, _ in stores:
                MlflowClient(tracking_uri=uri).search_experiments()  # create tables first
                naive_s, naive_calls = per_value(uri, rows, f"naive-{label}")
                cfg = tracking_cfg(root / f"runs-{label}", uri=uri, experiment=f"batched-{label}")
                OmegaConf.set_struct(cfg, False)
                hook_s, total_s, calls = batched(cfg, rows, root / f"run-{label}")
                table.append((label, naive_s, naive_calls, hook_s, total_s, calls))
        finally:
            if server is not None:
                server.stop()
    print(f"{args.folds} folds x {args.epochs} epochs, {values} curve values per run\n")
    header = ("store", "per-value s", "calls", "per-epoch hook s", "tracker total s", "calls",
              "per-epoch ms", "speed-up (curves)")  # fmt: skip
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for label, naive_s, naive_calls, hook_s, total_s, calls in table:
        per_epoch_ms = 1000 * hook_s / len(rows)
        print(
            f"| {label} | {naive_s:.2f} | {naive_calls} | {hook_s:.3f} | {total_s:.2f} | {calls} "
            f"| {per_epoch_ms:.1f} | {naive_s / hook_s:.0f}x |"
        )


if __name__ == "__main__":
    main()
