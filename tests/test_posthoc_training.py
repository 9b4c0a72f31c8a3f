"""A tiny training run stores every checkpoint x TTA candidate; report and predict use them."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from training_support import SMALL, compose_cfg, make_kaggle_folder

from evolver.app import train_task
from evolver.cli import main as cli_main
from evolver.config import validate_settings
from evolver.diagnosis import posthoc as ph
from evolver.errors import ConfigError

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, float]:
    base = tmp_path_factory.mktemp("posthoc")
    root = make_kaggle_folder(base / "data", per_class=8, test_images=4)
    run_dir = base / "run"
    overrides = [
        *SMALL,
        "data=image_folder",
        f"data.root={root}",
        "finetune.phase2_epochs=2",
        "diagnosis.enabled=true",
        "objective=cv.oof_log_loss_calibrated",
    ]
    objective = train_task(compose_cfg(overrides), run_dir=run_dir)
    return run_dir, root, objective


def test_candidates_summary_and_objective(run) -> None:
    run_dir, _, objective = run
    candidates = ph.OofCandidates.load(run_dir / "oof_candidates.npz")
    assert candidates.log_probs.shape == (3, 3, 16, 2)
    assert candidates.checkpoints == ph.CHECKPOINTS and candidates.views == ph.VIEWS
    # oof.csv keeps the configured choice (best checkpoint, identity + hflip) in its schema.
    with (run_dir / "oof.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["index", "fold", "target", "p_0", "p_1"]
    stored = np.array([[float(r["p_0"]), float(r["p_1"])] for r in rows])
    configured = np.exp(candidates.choice("best", ("identity", "hflip")))
    np.testing.assert_allclose(stored, configured, rtol=1e-4, atol=1e-6)

    summary = json.loads((run_dir / "summary.json").read_text())
    posthoc = summary["posthoc"]
    assert posthoc["configured"] == "best_hflip" and len(posthoc["candidates"]) == 9
    assert summary["cv"]["oof_log_loss_calibrated"] == posthoc["log_loss"]
    # The configured choice is a candidate: the study's pick is no worse (up to float32 rounding).
    assert posthoc["log_loss"] <= summary["cv"]["oof_log_loss"] * (1 + 1e-6)
    assert summary["objective_name"] == "cv.oof_log_loss_calibrated"
    assert math.isclose(objective, posthoc["log_loss"])
    assert posthoc["seconds"] > 0


def test_report_has_the_posthoc_section_and_diagram(run) -> None:
    run_dir, _, _ = run
    markdown = (run_dir / "report.md").read_text()
    assert "## Post-hoc choices (out-of-fold, no training)" in markdown
    assert "| best_hflip (configured" in markdown and "average_flips" in markdown
    report = json.loads((run_dir / "report.json").read_text())
    assert report["posthoc"]["configured"] == "best_hflip"
    assert "reliability.png" in report["plots"] and (run_dir / "reliability.png").is_file()


def test_predict_applies_the_posthoc_choice_and_flags(run, tmp_path: Path, capsys) -> None:
    run_dir, root, _ = run
    chosen = json.loads((run_dir / "summary.json").read_text())["posthoc"]["chosen"]
    assert cli_main(["predict", str(run_dir), str(root)]) == 0
    applied = json.loads((run_dir / "submission.json").read_text())
    assert applied["checkpoint"] == chosen["checkpoint"] and applied["views"] == chosen["views"]
    assert applied["temperature"] == chosen["temperature"]
    assert set(applied["sources"].values()) == {"posthoc"} and applied["folds"] == 2

    output = tmp_path / "sub.csv"
    flags = ["--checkpoint", "average", "--tta", "flips", "--temperature", "3", "--clip", "0.2"]
    assert cli_main(["predict", str(run_dir), str(root), "-o", str(output), *flags]) == 0
    applied = json.loads((tmp_path / "sub.json").read_text())
    assert applied["checkpoint"] == "average" and applied["tta"] == "flips"
    assert (applied["temperature"], applied["clip"]) == (3.0, 0.2)
    assert set(applied["sources"].values()) == {"flag"}
    with output.open() as handle:
        labels = [float(row["label"]) for row in csv.DictReader(handle)]
    assert len(labels) == 4 and all(0.2 - 1e-6 <= p <= 0.8 + 1e-6 for p in labels)

    capsys.readouterr()
    for flag, value, message in (
        ("--temperature", "0", "--temperature: must be positive, got 0"),
        ("--clip", "0.5", "--clip: must be in (0, 0.5), got 0.5"),
    ):
        out = tmp_path / f"bad{flag}.csv"
        assert cli_main(["predict", str(run_dir), str(root), "-o", str(out), flag, value]) == 2
        assert capsys.readouterr().err.strip() == f"evolver predict: error: {message}"
        assert not out.exists()


def test_config_errors_are_one_line() -> None:
    with pytest.raises(ConfigError) as error:
        validate_settings(compose_cfg([*SMALL, "objective=cv.calibrated"]))
    assert str(error.value) == (
        "objective: unknown value 'cv.calibrated' (choose from cv.loss_best, cv.loss_final, "
        "cv.oof_log_loss, cv.oof_log_loss_calibrated)"
    )
    with pytest.raises(ConfigError, match=r"^predict.temperature: must be positive, got -1"):
        validate_settings(compose_cfg([*SMALL, "predict.temperature=-1"]))
    with pytest.raises(ConfigError, match=r"^predict.clip: must be in \(0, 0.5\), got 0.7"):
        validate_settings(compose_cfg([*SMALL, "predict.clip=0.7"]))
    validate_settings(compose_cfg([*SMALL, "checkpoint=average", "predict.temperature=1.37"]))
