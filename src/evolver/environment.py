"""Environment variables set for a block of code and put back as they were afterwards."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator


@contextlib.contextmanager
def restored_environment(names: Iterable[str]) -> Iterator[None]:
    """On exit, each of `names` holds its value from entry again, or is unset if it was unset.

    Unlike `unittest.mock.patch.dict(os.environ)`, which puts back the whole environment, other
    variables keep what the block (or another thread) set."""
    saved = {name: os.environ.get(name) for name in names}
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
