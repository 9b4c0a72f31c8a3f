"""Hydra sweeper plugin `hydra/sweeper=evolver` (the sweeper lives in `evolver_sweeper.py`).

Hydra finds plugins by listing the `hydra_plugins` namespace package. An editable install made
by setuptools >= 64 serves this package through an import hook that such a listing cannot see, so
`register_plugin_path` adds this package's parent folder to the namespace's path; `import evolver`
calls it. A regular install needs none of this and the call changes nothing.
"""

from __future__ import annotations

from pathlib import Path


def register_plugin_path() -> None:
    import hydra_plugins

    folder = str(Path(__file__).resolve().parent.parent)
    paths = list(hydra_plugins.__path__)
    if folder not in paths:
        hydra_plugins.__path__ = [*paths, folder]


register_plugin_path()
