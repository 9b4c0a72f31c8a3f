"""Bad input is one line naming the field or file, exit code 2, before any training."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from training_support import TINY, compose_cfg, make_class_folders, make_kaggle_folder

from evolver.config import validate
from evolver.errors import ConfigError, DataError

REPO = Path(__file__).resolve().parents[1]
EVOLVER = [sys.executable, "-m", "evolver.cli"]


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("model.name=not_a_timm_model", "model.name"),
        ("finetune.lr_backbone=0", "finetune.lr_backbone"),
        ("finetune.lr_head=-1e-3", "finetune.lr_head"),
        ("cv.folds=1", "cv.folds"),
        ("data.batch_size=0", "data.batch_size"),
        ("schedule.name=sawtooth", "schedule.name"),
        ("optim._target_=torch.optim.Lion", "optim._target_"),
        ("optim._target_=torch.nn.Linear", "optim._target_"),
        ("+optim.gamma=0.5", "optim.gamma"),
        ("trainer.profiler=fast", "trainer.profiler"),
        ("trainer.checkpoint_writes=sometimes", "trainer.checkpoint_writes"),
        ("checkpoint.select=middle", "checkpoint.select"),
        ("tta.views=[identity,rotate]", "tta.views"),
        ("early_stop.patience=0", "early_stop.patience"),
        ("regularization.label_smoothing=1.5", "regularization.label_smoothing"),
        ("trainer.precision=fp8", "trainer.precision"),
        ("data.image_size=4", "data.image_size"),
    ],
)
def test_bad_setting_names_its_field(override: str, field: str) -> None:
    with pytest.raises(ConfigError) as caught:
        validate(compose_cfg([*TINY, override]))
    assert caught.value.field == field
    assert "\n" not in str(caught.value)


def test_defaults_are_valid() -> None:
    validate(compose_cfg([]))


def test_missing_data_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        validate(compose_cfg([*TINY, "data=image_folder", f"data.root={tmp_path / 'nowhere'}"]))


def test_empty_data_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no images"):
        validate(compose_cfg([*TINY, "data=image_folder", f"data.root={tmp_path}"]))


def test_folder_source_without_root() -> None:
    with pytest.raises(ConfigError) as caught:
        validate(compose_cfg([*TINY, "data=image_folder"]))
    assert caught.value.field == "data.root"


def test_class_without_images(tmp_path: Path) -> None:
    make_class_folders(tmp_path, {"a": 40, "b": 200}, per_class=3)
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(DataError, match="empty_class"):
        validate(compose_cfg([*TINY, "data=image_folder", f"data.root={tmp_path}"]))


def test_unreadable_image_is_named(tmp_path: Path) -> None:
    make_kaggle_folder(tmp_path, per_class=3)
    broken = tmp_path / "train" / "dog.99.png"
    broken.write_bytes(b"not an image at all")
    with pytest.raises(DataError, match=r"dog\.99\.png: unreadable image"):
        validate(compose_cfg([*TINY, "data=image_folder", f"data.root={tmp_path}"]))


def test_csv_with_missing_file(tmp_path: Path) -> None:
    listing = tmp_path / "labels.csv"
    listing.write_text("path,label\nmissing.png,a\n")
    with pytest.raises(DataError, match=r"missing\.png"):
        validate(compose_cfg([*TINY, "data=csv", f"data.csv={listing}"]))


def test_class_smaller_than_folds(tmp_path: Path) -> None:
    make_class_folders(tmp_path, {"a": 40, "b": 200}, per_class=2)
    with pytest.raises(DataError, match=r"fewer than cv\.folds"):
        validate(compose_cfg([*TINY, "cv.folds=3", "data=image_folder", f"data.root={tmp_path}"]))


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*EVOLVER, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_cli_bad_value_is_one_line_exit_2(tmp_path: Path) -> None:
    result = run_cli("train", *TINY, "cv.folds=1", f"runs_dir={tmp_path}", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert errors == ["evolver train: error: cv.folds: must be >= 2, got 1"]
    assert "Traceback" not in result.stderr
    assert not list(tmp_path.rglob("history.csv"))


def test_cli_unknown_group_option_is_one_line_exit_2(tmp_path: Path) -> None:
    result = run_cli("train", "schedule=sawtooth", f"runs_dir={tmp_path}", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("evolver train: error: schedule:")
    assert len(result.stderr.strip().splitlines()) == 1


def test_unreachable_pretrained_weights_are_one_line_before_training(tmp_path: Path) -> None:
    offline = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    result = subprocess.run(
        [*EVOLVER, "train", *TINY, "model.pretrained=true", f"runs_dir={tmp_path}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env=offline,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0].startswith("evolver train: error: model.pretrained:")
    assert "model.pretrained_path" in errors[0] and "Traceback" not in result.stderr
    assert not list(tmp_path.rglob("history.csv"))


def test_cli_missing_folder_names_it(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-data"
    result = run_cli("train", *TINY, "data=image_folder", f"data.root={missing}", cwd=tmp_path)
    assert result.returncode == 2
    assert str(missing) in result.stderr and "Traceback" not in result.stderr


def test_hydra_cfg_job_prints_the_config(tmp_path: Path) -> None:
    result = run_cli("train", "--cfg", "job", "optim=sgd", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "_target_: torch.optim.SGD" in result.stdout and "phase1_epochs: 3" in result.stdout


def test_hydra_help_lists_the_groups(tmp_path: Path) -> None:
    result = run_cli("train", "--help", cwd=tmp_path)
    assert result.returncode == 0
    assert "schedule: constant, cosine, onecycle, plateau" in result.stdout
