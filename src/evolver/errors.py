"""User-facing errors: reported as one line with exit code 2, never as a traceback."""

from __future__ import annotations


class EvolverError(Exception):
    """A mistake in the user's input (config, files, arguments) or environment."""

    exit_code = 2


class ConfigError(EvolverError):
    """A config value is invalid. The message names the field."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(f"{field}: {message}")


class DataError(EvolverError):
    """A data file or folder is missing, empty or unreadable. The message names the path."""
