"""Checks that a folder can take new files, made before any work whose output would be lost."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def unwritable_reason(folder: str | Path) -> str | None:
    """Why no file can be created in `folder` (or, while it does not exist yet, in the nearest
    existing folder above it, where it would be created), else None. Creates nothing."""
    target = Path(folder).absolute()
    existing = target
    while not _exists(existing) and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"cannot create {target}: {existing} is not a folder"
    try:
        # Unnamed (O_TMPFILE) where the OS supports it: it disappears when closed.
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        where = "" if existing == target else f" (to create {target})"
        return f"cannot create files in {existing}{where}: {os_error_text(error)}"
    return None


def unwritable_file_reason(path: str | Path) -> str | None:
    """Why `path` cannot be written as a file, else None. Creates nothing."""
    target = Path(path)
    if target.is_dir():
        return f"{target} is a folder"
    if target.exists() and not os.access(target, os.W_OK):
        return f"{target} is read-only"
    return unwritable_reason(target.parent)


def os_error_text(error: OSError) -> str:
    """The OS's own words for an error ('Read-only file system'), without a file name."""
    if error.strerror:
        return error.strerror
    return os.strerror(error.errno) if error.errno else type(error).__name__


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:  # EACCES on a parent: treat it as there, so the probe reports the error
        return True
