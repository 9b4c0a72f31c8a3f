"""Report writing, plots, the `evolver report` command and run comparison."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from diagnosis_fixtures import (
    SEED_SETTINGS,
    healthy_curves,
    history_frame,
    seed_history,
    seed_table_summary,
    summary_for,
    write_run,
)
from omegaconf import OmegaConf

from evolver.cli import main as evolver_main
from evolver.diagnosis import REPORT_JSON, REPORT_MD, write_report

REQUIRED_METRICS = {
    "n_folds",
    "mean_final_val_loss",
    "std_final_val_loss",
    "mean_best_val_loss",
    "std_best_val_loss",
    "mean_degradation",
    "max_degradation",
    "max_degradation_fold",
    "folds_degraded",
    "folds_early_stopped",
}


@pytest.fixture
def seed_run(tmp_path: Path) -> Path:
    history = seed_history()
    # Add the columns a real trainer writes, so the train/val and LR plots have data.
    history["train_loss"] = [0.2 * 0.9**e for e in history["epoch"]]
    history["lr_backbone"] = [0.0 if p == 1 else 1e-4 for p in history["phase"]]
    history["lr_head"] = 1e-3
    summary = {"status": "complete", "settings": SEED_SETTINGS, "objective_name": "cv.loss_final"}
    return write_run(tmp_path / "seed", history=history, summary=summary)


def test_write_report_writes_markdown_json_and_plots(seed_run: Path) -> None:
    report = write_report(seed_run)
    data = json.loads((seed_run / REPORT_JSON).read_text())
    assert data == json.loads(json.dumps(report))
    assert set(data["metrics"]) >= REQUIRED_METRICS
    assert data["metrics"]["max_degradation_fold"] == 4
    for finding in data["findings"]:
        assert {"id", "severity", "evidence", "explanation", "proposals"} <= set(finding)
        for proposal in finding["proposals"]:
            assert {"changes", "overrides", "reason", "expected_effect"} <= set(proposal)
    assert data["plots"] == ["val_loss.png", "train_vs_val.png", "lr_schedule.png"]
    for name in data["plots"]:
        content = (seed_run / name).read_bytes()
        assert content.startswith(b"\x89PNG") and len(content) > 5_000

    markdown = (seed_run / REPORT_MD).read_text()
    assert "| 4 | 0.0621 | 5 (p2 e2) | 0.0735 | **0.0114** | 8 (3+5) | yes |" in markdown
    assert "`backbone_lr_too_high` (high)" in markdown
    assert "`finetune.lr_backbone=2e-05`" in markdown
    assert "![val_loss.png](val_loss.png)" in markdown


def test_report_of_a_healthy_run_says_so(tmp_path: Path) -> None:
    curves = healthy_curves()
    run_dir = write_run(tmp_path / "ok", history_frame(curves), summary_for(curves))
    report = write_report(run_dir, plots=False)
    assert report["findings"] == [] and report["plots"] == []
    assert "No findings" in (run_dir / REPORT_MD).read_text()
    assert not (run_dir / "val_loss.png").exists()


def test_thresholds_and_scores_come_from_cfg_then_config_yaml(tmp_path: Path) -> None:
    config = {"diagnosis": {"baseline_score": 0.0736, "target_score": 0.03882, "plots": False}}
    run_dir = write_run(tmp_path / "seed", summary=seed_table_summary(), config=config)
    metrics = write_report(run_dir)["metrics"]
    assert round(metrics["relative_improvement"], 3) == 0.024
    assert round(metrics["improvement_needed"], 3) == 0.459

    cfg = OmegaConf.create({"diagnosis": {"degradation_tolerance": 0.5, "plots": False}})
    report = write_report(run_dir, cfg)
    assert report["metrics"]["folds_degraded"] == 0
    assert report["metrics"]["baseline_score"] is None


def test_cli_report_prints_a_summary(seed_run: Path, capsys: pytest.CaptureFixture) -> None:
    code = evolver_main(
        ["report", str(seed_run), "--baseline", "0.0736", "--target", "0.03882", "--no-plots"]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "3 folds" in out and "2/3 folds degraded" in out and "2/3 early stopped" in out
    assert "backbone_lr_too_high (high)" in out
    assert f"report: {seed_run / REPORT_MD}" in out
    assert "baseline 0.0736" in out and "target 0.03882" in out


def test_cli_errors_are_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert evolver_main(["report", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "not a run directory" in err
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "history.csv").write_text("fold,epoch\n1,1\n")
    assert evolver_main(["report", str(tmp_path / "bad")]) == 2
    assert "missing column 'val_loss'" in capsys.readouterr().err


def test_cli_compares_two_runs(seed_run: Path, tmp_path: Path, capsys) -> None:
    curves = {fold: [v * 0.07 for v in curve] for fold, curve in healthy_curves(3).items()}
    curves = {1: curves[1], 2: curves[2], 4: curves[3]}
    better = write_run(tmp_path / "better", history_frame(curves), summary_for(curves))
    assert evolver_main(["report", str(seed_run), str(better), "--no-plots"]) == 0
    out = capsys.readouterr().out
    assert f"comparison: {better / 'comparison.md'}" in out
    data = json.loads((better / "comparison.json").read_text())
    assert [row["fold"] for row in data["folds"]] == [1, 2, 4]
    fold4 = data["folds"][2]
    assert fold4["best_val_loss_a"] == pytest.approx(0.0621)
    assert fold4["best_val_loss_delta"] == pytest.approx(fold4["best_val_loss_b"] - 0.0621)
    assert data["cv"]["mean_degradation"]["delta"] < 0
    assert "backbone_lr_too_high" in data["findings_resolved"]
    assert data["findings_new"] == []
    assert "| 4 | 0.0621 |" in (better / "comparison.md").read_text()


def test_read_findings_returns_the_written_findings(seed_run: Path) -> None:
    from evolver.diagnosis import read_findings

    assert read_findings(seed_run) == []
    report = write_report(seed_run, plots=False)
    findings = read_findings(seed_run)
    assert [f.id for f in findings] == [f["id"] for f in report["findings"]]
    lr = next(f for f in findings if f.id == "backbone_lr_too_high")
    assert lr.proposals[0].overrides == ["finetune.lr_backbone=2e-05"]


def test_validate_options_names_the_field() -> None:
    from evolver.diagnosis import validate_options
    from evolver.errors import ConfigError

    validate_options(OmegaConf.create({"enabled": True, "plots": False, "spike_rise": 0.2}))
    with pytest.raises(ConfigError, match=r"^diagnosis\.target_score: expected a number"):
        validate_options({"target_score": "low"})
