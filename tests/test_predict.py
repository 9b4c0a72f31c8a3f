"""`evolver predict` averages the fold checkpoints with TTA into a Kaggle submission."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest
from training_support import SMALL, compose_cfg, make_class_folders, make_kaggle_folder

from evolver.app import train_task
from evolver.predict import main as predict_main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def kaggle_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("kaggle")
    root = make_kaggle_folder(base / "data", per_class=6, test_images=5)
    run_dir = base / "run"
    train_task(compose_cfg([*SMALL, "data=image_folder", f"data.root={root}"]), run_dir=run_dir)
    return run_dir, root


def read_rows(path: Path) -> list[list[str]]:
    with path.open() as handle:
        return list(csv.reader(handle))


def test_binary_submission_is_id_and_positive_probability(kaggle_run) -> None:
    run_dir, root = kaggle_run
    assert predict_main([str(run_dir), str(root)]) == 0
    rows = read_rows(run_dir / "submission.csv")
    assert rows[0] == ["id", "label"]
    assert [r[0] for r in rows[1:]] == ["1", "2", "3", "4", "5"]
    assert all(0.0 <= float(r[1]) <= 1.0 for r in rows[1:])


def test_last_checkpoints_and_output_path(kaggle_run, tmp_path: Path) -> None:
    run_dir, root = kaggle_run
    output = tmp_path / "out" / "sub.csv"
    assert (
        predict_main([str(run_dir), str(root / "test"), "-o", str(output), "--checkpoint", "last"])
        == 0
    )
    assert len(read_rows(output)) == 6


def test_multiclass_submission_has_one_column_per_class(tmp_path: Path) -> None:
    root = make_class_folders(tmp_path / "data", {"dark": 30, "mid": 120, "bright": 220}, 4)
    run_dir = tmp_path / "run"
    train_task(compose_cfg([*SMALL, "data=image_folder", f"data.root={root}"]), run_dir=run_dir)
    predict_main([str(run_dir), str(root / "mid" / "img_0.png")])
    rows = read_rows(run_dir / "submission.csv")
    assert rows[0] == ["id", "bright", "dark", "mid"]
    assert len(rows) == 2 and rows[1][0] == "img_0"
    assert sum(float(v) for v in rows[1][1:]) == pytest.approx(1.0, abs=1e-4)


def test_predict_errors_are_one_line(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "evolver.cli", "predict", str(tmp_path), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        == f"evolver predict: error: {tmp_path}/config.yaml: not a run directory (no config.yaml)"
    )
