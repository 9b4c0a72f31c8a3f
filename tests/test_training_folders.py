"""Train on generated image folders (both layouts) and a CSV listing."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from training_support import SMALL, compose_cfg, make_class_folders, make_kaggle_folder

from evolver.app import train_task
from evolver.data.sources import load_image_set

pytestmark = pytest.mark.slow


def train_on(data_overrides: list[str], run_dir: Path) -> dict:
    cfg = compose_cfg([*SMALL, *data_overrides, f"runs_dir={run_dir.parent}"])
    train_task(cfg, run_dir=run_dir)
    return json.loads((run_dir / "summary.json").read_text())


def test_kaggle_layout_reads_labels_from_file_names(tmp_path: Path) -> None:
    root = make_kaggle_folder(tmp_path / "dogs-vs-cats", per_class=6)
    images = load_image_set(compose_cfg([*SMALL, "data=image_folder", f"data.root={root}"]).data)
    assert images.class_names == ["cat", "dog"]
    assert len(images) == 12 and int(images.targets.sum()) == 6
    assert all(p.parent.name == "train" for p in images.samples)


def test_class_folder_layout_trains(tmp_path: Path) -> None:
    root = make_class_folders(tmp_path / "shapes", {"dark": 30, "mid": 120, "bright": 220})
    summary = train_on(["data=image_folder", f"data.root={root}"], tmp_path / "run")
    assert summary["status"] == "complete"
    assert [f["epochs_trained"] for f in summary["folds"]] == [2, 2]
    with (tmp_path / "run" / "oof.csv").open() as handle:
        header = next(csv.reader(handle))
    assert header == ["index", "fold", "target", "p_0", "p_1", "p_2"]


def test_csv_listing_trains(tmp_path: Path) -> None:
    root = make_class_folders(tmp_path / "imgs", {"a": 40, "b": 200}, per_class=6)
    listing = root / "labels.csv"
    lines = ["path,label"] + [
        f"{p.relative_to(root)},{p.parent.name}" for p in sorted(root.rglob("*.png"))
    ]
    listing.write_text("\n".join(lines) + "\n")
    summary = train_on(["data=csv", f"data.csv={listing}"], tmp_path / "run")
    assert summary["status"] == "complete"
    assert summary["cv"]["accuracy"] is not None
