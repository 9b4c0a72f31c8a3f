"""The `evolver` console script: one subcommand per capability, imported lazily.

`evolver train` and `evolver loop` hand their arguments to Hydra unchanged, so Hydra's own
conventions (`--cfg job`, `--help`, `-m`, overrides) keep working.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
from collections.abc import Sequence

from evolver import interrupts
from evolver.errors import EvolverError

COMMANDS: dict[str, tuple[str, str, str]] = {
    "train": ("evolver.app", "main_train", "train one K-fold experiment (Hydra overrides)"),
    "loop": ("evolver.app", "main_loop", "run or resume an evolver loop (Hydra overrides)"),
    "predict": ("evolver.predict", "main", "average a run's fold checkpoints on new images"),
    "report": ("evolver.diagnosis.cli", "main", "diagnose a run directory (or compare two)"),
    "status": ("evolver.loop.status", "main", "print a loop's iterations, trials and proposals"),
    "ui": ("evolver.tracking.ui", "main", "start the MLflow UI (and optuna-dashboard)"),
    "sync": ("evolver.tracking.sync", "main", "send tracking buffered while MLflow was away"),
}

# Commands that a first Ctrl-C or SIGTERM stops cleanly (records written, the Optuna trial failed
# as interrupted and re-run on resume), exiting 130 or 143; a second one exits at once.
INTERRUPTIBLE = frozenset({"train", "loop"})


def usage() -> str:
    lines = ["usage: evolver <command> [arguments]", "", "commands:"]
    lines += [f"  {name:<9}{help_}" for name, (_, _, help_) in COMMANDS.items()]
    lines += ["", "Run `evolver <command> --help` for a command's arguments."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in {"-h", "--help", "help"}:
        print(usage())
        return 0
    command, rest = args[0], args[1:]
    if command in {"-V", "--version"}:
        from evolver import __version__

        print(f"evolver {__version__}")
        return 0
    if command not in COMMANDS:
        print(f"evolver: error: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module_name, function_name, _ = COMMANDS[command]
    function = getattr(importlib.import_module(module_name), function_name)
    signals = interrupts.handled() if command in INTERRUPTIBLE else contextlib.nullcontext()
    try:
        with signals:
            code = int(function(rest) or 0)
            interrupts.raise_if_received()  # a signal held back while records were written
            return code
    except EvolverError as error:
        print(f"evolver {command}: error: {error}", file=sys.stderr)
        return error.exit_code
    except interrupts.Interrupted as interrupted:
        print(interrupted.line(f"evolver {command}"), file=sys.stderr)
        return interrupted.exit_code
    except KeyboardInterrupt:
        print(f"evolver {command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
