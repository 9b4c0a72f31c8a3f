"""`evolver ui`: the MLflow UI (and optionally optuna-dashboard) over a project's stores.

    evolver ui [runs_dir=DIR | --runs-dir DIR] [loop.name=NAME | --loop NAME] [--port N]
               [--dashboard [--dashboard-port N]] [other config overrides, e.g. tracking.uri=...]

Starts `mlflow server` on 127.0.0.1 against the configured tracking store (unless `tracking.uri`
already names a server), waits until it answers and prints the address of the loop's runs table.
Ctrl-C stops everything it started.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from evolver.errors import ConfigError
from evolver.storage_url import optuna_storage_url, runs_dir_of
from evolver.tracking.server import (
    ServerProcess,
    port_is_free,
    start_mlflow_server,
    start_optuna_dashboard,
)
from evolver.tracking.store import TrackingSettings, check_reachable, is_http

RUNS_TABLE = "{base}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        prog="evolver ui",
        description="Start the MLflow UI (and optuna-dashboard) on 127.0.0.1.",
        epilog="Other arguments are config overrides (key=value), as for `evolver train`.",
    )
    parser.add_argument("--runs-dir", help="folder of the runs (config key runs_dir)")
    parser.add_argument("--loop", help="loop whose runs table to open (config key loop.name)")
    parser.add_argument("--experiment", help="open this MLflow experiment instead")
    parser.add_argument("--port", type=int, default=5000, help="MLflow UI port (default 5000)")
    parser.add_argument("--dashboard", action="store_true", help="also start optuna-dashboard")
    parser.add_argument("--dashboard-port", type=int, default=8080, help="(default 8080)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for start")
    args, rest = parser.parse_known_args(argv)
    unknown = [item for item in rest if "=" not in item or item.startswith("-")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    overrides = list(rest)
    if args.runs_dir:
        overrides.append(f"runs_dir={args.runs_dir}")
    if args.loop:
        overrides.append(f"loop.name={args.loop}")
    return args, overrides


def compose_config(overrides: list[str]) -> Any:
    """The project config with the given overrides, composed as `evolver train` would."""
    from hydra import compose, initialize_config_module
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_module(config_module="evolver.conf", version_base="1.3"):
            return compose(config_name="train", overrides=overrides)
    except (HydraException, OmegaConfBaseException) as error:
        first = str(error).strip().splitlines()[0]
        raise ConfigError("overrides", first) from None


def _explicit_loop(overrides: list[str]) -> bool:
    return any(item.lstrip("+").startswith("loop.name=") for item in overrides)


def experiment_id(base_url: str, name: str) -> str | None:
    query = urllib.parse.urlencode({"experiment_name": name})
    url = f"{base_url}/api/2.0/mlflow/experiments/get-by-name?{query}"
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return str(json.load(response)["experiment"]["experiment_id"])
    except (OSError, KeyError, ValueError):
        return None


def runs_table_url(base_url: str, cfg: Any, args: argparse.Namespace, loop_chosen: bool) -> str:
    """The runs table of the chosen loop (or experiment); without a choice, that of the default
    loop, else of single runs, else of the most recently updated experiment."""
    if args.experiment:
        candidates = [args.experiment]
    elif loop_chosen:
        candidates = [str(cfg.loop.name)]
    else:
        candidates = [str(cfg.loop.name), str(cfg.tracking.experiment)]
    for name in candidates:
        found = experiment_id(base_url, name)
        if found is not None:
            return RUNS_TABLE.format(base=base_url, experiment_id=found)
    latest = None if loop_chosen or args.experiment else latest_experiment_id(base_url)
    if latest is not None:
        return RUNS_TABLE.format(base=base_url, experiment_id=latest)
    print(f"evolver ui: no MLflow experiment named {candidates[0]!r} yet", file=sys.stderr)
    return f"{base_url}/#/experiments"


def latest_experiment_id(base_url: str) -> str | None:
    """The most recently updated experiment other than MLflow's built-in `Default`."""
    body = json.dumps(
        {"max_results": 2, "order_by": ["last_update_time DESC"], "view_type": "ACTIVE_ONLY"}
    ).encode()
    request = urllib.request.Request(
        f"{base_url}/api/2.0/mlflow/experiments/search",
        data=body,
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            experiments = json.load(response).get("experiments", [])
    except (OSError, ValueError):
        return None
    named = [e for e in experiments if e.get("name") != "Default"]
    return str(named[0]["experiment_id"]) if named else None


def _check_port(port: int, field: str) -> None:
    if not 0 < port < 65536:
        raise ConfigError(field, f"{port} is not a port number")
    if not port_is_free(port):
        raise ConfigError(field, f"127.0.0.1:{port} is already in use")


def start_servers(cfg: Any, args: argparse.Namespace) -> tuple[str, list[ServerProcess]]:
    settings = TrackingSettings.from_cfg(cfg)
    runs_dir = runs_dir_of(cfg)
    started: list[ServerProcess] = []
    if is_http(settings.uri):
        check_reachable(settings.uri, settings.preflight_timeout_s)
        base_url = settings.uri.rstrip("/")
    else:
        _check_port(args.port, "--port")
        check_reachable(settings.uri, settings.preflight_timeout_s)
        print(f"Starting the MLflow UI on {settings.uri} ...", file=sys.stderr, flush=True)
        server = start_mlflow_server(
            settings.uri,
            args.port,
            default_artifact_root=settings.artifact_root,
            log_path=runs_dir / "logs" / "mlflow-ui.log",
            timeout_s=args.timeout,
        )
        started.append(server)
        base_url = server.url
    if args.dashboard:
        try:
            _check_port(args.dashboard_port, "--dashboard-port")
            dashboard = start_optuna_dashboard(
                optuna_storage_url(cfg),
                args.dashboard_port,
                log_path=runs_dir / "logs" / "optuna-dashboard.log",
                timeout_s=args.timeout,
            )
        except BaseException:
            stop_all(started)
            raise
        started.append(dashboard)
    return base_url, started


def stop_all(servers: list[ServerProcess]) -> None:
    for server in reversed(servers):
        server.stop()


def _raise_keyboard_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str]) -> int:
    args, overrides = parse_args(argv)
    cfg = compose_config(overrides)
    Path(runs_dir_of(cfg)).mkdir(parents=True, exist_ok=True)
    # `kill <pid>` stops the servers as cleanly as Ctrl-C does.
    previous = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    servers: list[ServerProcess] = []
    try:
        base_url, servers = start_servers(cfg, args)
        table = runs_table_url(base_url, cfg, args, _explicit_loop(overrides))
        print(f"MLflow runs table: {table}")
        if args.dashboard:
            print(f"optuna-dashboard:  {servers[-1].url}/dashboard/")
        print("Press Ctrl-C to stop.", flush=True)
        while True:
            for server in servers:
                if not server.running():
                    print(
                        f"evolver ui: {server.name} stopped (exit code "
                        f"{server.process.returncode}); see {server.log_path}",
                        file=sys.stderr,
                    )
                    return 1
            time.sleep(0.5)
    except KeyboardInterrupt:
        print("Stopping.", file=sys.stderr, flush=True)
        return 0
    finally:
        stop_all(servers)
        signal.signal(signal.SIGTERM, previous)
