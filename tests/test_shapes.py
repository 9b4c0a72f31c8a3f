"""The generated shapes task trains end to end (determinism, balance and validation:
test_generated_tasks.py, for both generated tasks)."""

from __future__ import annotations

import numpy as np
from training_support import SMALL, compose_cfg


def test_shapes_train_end_to_end(tmp_path) -> None:
    import json

    from evolver.app import train_task

    cfg = compose_cfg([*SMALL, "data=shapes", "data.shapes.per_class=6", "data.limit=null"])
    objective = train_task(cfg, run_dir=tmp_path / "run")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "complete" and np.isfinite(objective)
    assert len(summary["folds"]) == 2
