"""`evolver sync RUN_DIR [...]`: send the tracking that runs buffered while MLflow was away.

Each folder is searched for `mlflow-buffer/` folders (a run directory, a loop folder, or a whole
runs folder); each buffer is replayed into the store it was written for (or `--tracking-uri`).
A trial's calls may wait for its iteration's run, which its loop's buffer creates: buffers are
replayed outer ones first, in passes until nothing moves.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from evolver.errors import ConfigError, DataError
from evolver.tracking.buffer import BUFFER_FOLDER, TrackingBuffer, find_buffers

if TYPE_CHECKING:
    from evolver.tracking.resilient import ResilientStore

DEFAULT_TIMEOUT_S = 10.0


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="evolver sync",
        description="Send the MLflow tracking that runs buffered while the store was away.",
    )
    parser.add_argument(
        "folders", nargs="+", type=Path, help="run directories, loop folders or a runs folder"
    )
    parser.add_argument(
        "--tracking-uri",
        help="the store to send to (default: the one each buffer was written for)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        help=f"seconds one MLflow call may take (default {DEFAULT_TIMEOUT_S:g})",
    )
    return parser.parse_args(list(argv))


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    for folder in args.folders:
        if not folder.is_dir():
            raise DataError(f"{folder}: no such directory")
    if args.timeout <= 0:
        raise ConfigError("--timeout", f"must be > 0, got {args.timeout:g}")
    buffers = [buffer for folder in args.folders for buffer in find_buffers(folder)]
    if not buffers:
        print(f"nothing to sync: no {BUFFER_FOLDER}/ in {', '.join(map(str, args.folders))}")
        return 0
    stores = [store_for(buffer, args.tracking_uri, args.timeout) for buffer in buffers]
    waiting = replay_all(stores)
    for store in stores:
        left = store.pending()
        folder = store.buffer.folder.parent
        if left:
            print(f"{folder}: {left} call(s) still wait", file=sys.stderr)
        else:
            print(f"{folder}: sent {store.replayed} call(s)")
    if waiting:
        down = next((s.outage for s in stores if s.outage.down), None)
        reason = f"{down.shown_uri} cannot be reached" if down else "runs they name do not exist"
        line = f"evolver sync: {waiting} buffer(s) not sent: {reason}; run it again later"
        print(line, file=sys.stderr)
        return 1
    return 0


def store_for(buffer: TrackingBuffer, tracking_uri: str | None, timeout_s: float) -> ResilientStore:
    """A store that replays `buffer` into the store it was written for (or `tracking_uri`)."""
    from evolver.database_url import normalize_database_url
    from evolver.tracking.resilient import ResilientStore
    from evolver.tracking.store import TrackingSettings, default_artifact_root, scheme_of

    with buffer.locked():
        header = buffer.read().header
    uri = tracking_uri or header.get("uri")
    if not uri:
        raise ConfigError("--tracking-uri", f"{buffer.folder} does not say its store; give it")
    uri = normalize_database_url(str(uri))
    artifact_root = header.get("artifact_root")
    if artifact_root is None and scheme_of(uri) == "sqlite" and ":///" in uri:
        # Written for a server that kept the artifacts: a SQLite file keeps them beside it.
        artifact_root = default_artifact_root(Path(uri.split(":///", 1)[1]).parent).as_uri()
    settings = TrackingSettings(
        enabled=True,
        uri=uri,
        artifact_root=artifact_root,
        experiment=str(header.get("experiment") or "evolver"),
        timeout_s=timeout_s,
        preflight_timeout_s=timeout_s,
    )
    return ResilientStore(settings, buffer.folder, settings.experiment)


def replay_all(stores: Sequence[ResilientStore]) -> int:
    """Replay every store's buffer, in passes while some progress; returns how many wait."""
    waiting = list(stores)
    for _ in range(len(stores)):
        sent_before = sum(store.replayed for store in stores)
        waiting = [store for store in waiting if not store.sync(force=True)]
        if not waiting or any(store.outage.down for store in waiting):
            break
        if sum(store.replayed for store in stores) == sent_before:
            break  # what is left names runs that no buffer here creates
    return len(waiting)
