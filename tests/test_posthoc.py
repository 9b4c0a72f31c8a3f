"""Post-hoc choices on synthetic out-of-fold sets: temperature, clip, checkpoint, TTA, finding."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from scipy.special import log_softmax
from sklearn.metrics import log_loss as sklearn_log_loss

from evolver.diagnosis import RunRecords, diagnose
from evolver.diagnosis import posthoc as ph
from evolver.diagnosis.findings import MiscalibratedRule
from evolver.diagnosis.plots import write_reliability_plot
from evolver.tracking.records import summary_metrics

FOLDS = 5


def synthetic(samples: int = 4000, classes: int = 5, seed: int = 0) -> tuple[np.ndarray, ...]:
    """True log-probabilities, labels drawn from them, and fold numbers 1..FOLDS."""
    rng = np.random.default_rng(seed)
    truth = log_softmax(rng.normal(0.0, 2.0, (samples, classes)), axis=1)
    cumulative = np.exp(truth).cumsum(axis=1)
    targets = (rng.random((samples, 1)) > cumulative).sum(axis=1)
    folds = rng.permutation(np.arange(samples) % FOLDS + 1)
    return truth, targets, folds


def records_with_history() -> RunRecords:
    import pandas as pd

    rows = [
        {"fold": f, "epoch": e, "phase": 2, "train_loss": 1.0 / e, "val_loss": 1.0 / e + 0.5}
        for f in range(1, FOLDS + 1)
        for e in range(1, 6)
    ]
    return RunRecords.from_parts(pd.DataFrame(rows))


def test_log_loss_and_ece_match_their_definitions() -> None:
    truth, targets, _ = synthetic(500, 4)
    probabilities = np.exp(truth)
    assert ph.log_loss(probabilities, targets) == pytest.approx(
        sklearn_log_loss(targets, probabilities, labels=range(4))
    )
    # Two samples at confidence 0.9, one right and one wrong: |0.5 - 0.9| in one bin.
    pair = np.array([[0.9, 0.1], [0.9, 0.1]])
    assert ph.expected_calibration_error(pair, np.array([0, 1])) == pytest.approx(0.4)


def test_over_confident_set_is_improved() -> None:
    truth, targets, folds = synthetic()
    sharpened = log_softmax(3.0 * truth, axis=1)  # logits three times too large
    study = ph.study_oof(np.exp(sharpened), targets, folds, "best", ("identity",))
    assert study.chosen.temperature == pytest.approx(3.0, rel=0.1)
    assert all(t == pytest.approx(3.0, rel=0.15) for t in study.fold_temperatures.values())
    raw = study.configured_score.log_loss
    # Cross-fitted, calibration recovers (nearly) the true probabilities' log loss.
    assert study.log_loss < 0.8 * raw
    assert study.log_loss == pytest.approx(ph.log_loss(np.exp(truth), targets), rel=0.01)
    assert study.ece_after < study.ece_before / 5

    diagnosis = diagnose(records_with_history(), posthoc=study)
    finding = next(f for f in diagnosis.findings if f.id == "miscalibrated")
    assert finding.evidence["relative_gain"] > 0.2
    assert finding.evidence["ece_before"] == pytest.approx(study.ece_before, rel=1e-4)
    (proposal,) = finding.proposals
    assert proposal.needs_training is False
    temperature = proposal.changes["predict.temperature"]
    assert temperature == pytest.approx(3.0, rel=0.1)
    assert f"predict.temperature={temperature!r}" in proposal.overrides
    assert diagnosis.to_dict()["posthoc"]["chosen"]["temperature"] == study.chosen.temperature


def test_calibrated_set_is_left_alone() -> None:
    truth, targets, folds = synthetic(seed=1)
    study = ph.study_oof(np.exp(truth), targets, folds, "best", ("identity",))
    assert study.chosen.temperature == pytest.approx(1.0, rel=0.05)
    assert abs(study.gain) < 0.005 * study.configured_score.log_loss
    assert MiscalibratedRule().check(context_for(study)) is None
    assert "miscalibrated" not in diagnose(records_with_history(), posthoc=study).finding_ids


def context_for(study: ph.PosthocStudy):
    from evolver.diagnosis.analysis import diagnose as run_diagnose
    from evolver.diagnosis.findings import RuleContext
    from evolver.diagnosis.thresholds import Thresholds

    base = run_diagnose(records_with_history())
    settings = records_with_history().settings
    return RuleContext(base.folds, base.metrics, settings, Thresholds(), study)


def test_cross_fitting_never_scores_a_fold_with_its_own_fit() -> None:
    truth, targets, folds = synthetic(2000, 3, seed=2)
    # Fold 1 alone is badly over-confident: its own fit would differ from the others'.
    scaled = np.where((folds == 1)[:, None], 4.0 * truth, truth)
    log_probs = log_softmax(scaled, axis=1)
    crossed = ph.cross_fit(log_probs, targets, folds)
    others = folds != 1
    expected = ph.fit_calibration(log_probs[others], targets[others])
    assert crossed.by_fold[1] == expected
    assert ph.fit_temperature(log_probs[~others], targets[~others]) > 2 * expected.temperature
    np.testing.assert_allclose(crossed.probabilities[~others], expected.apply(log_probs[~others]))


def test_clip_bound_caps_confident_mistakes() -> None:
    rng = np.random.default_rng(3)
    targets = rng.integers(0, 2, 1000)
    confident = np.where(targets[:, None] == np.arange(2), 0.999, 0.001)
    wrong = rng.random(1000) < 0.03  # 3% confidently wrong: worth clipping
    probabilities = np.where(wrong[:, None], confident[:, ::-1], confident)
    clip = ph.fit_clip(probabilities, targets)
    assert clip is not None and 0 < clip < 0.5
    clipped = ph.clip_probabilities(probabilities, clip)
    assert clipped.min() >= clip - 1e-12
    assert ph.log_loss(clipped, targets) < ph.log_loss(probabilities, targets)
    assert ph.fit_clip(np.exp(synthetic(1000, 2)[0]), synthetic(1000, 2)[1]) is None


def candidate_set(tmp_path: Path) -> ph.OofCandidates:
    """best/last noisy, their average less so; hflip and vflip views add independent noise."""
    truth, targets, folds = synthetic(3000, 4, seed=4)
    rng = np.random.default_rng(5)
    noise = {name: rng.normal(0, 1.5, truth.shape) for name in ("best", "last")}
    noise["average"] = (noise["best"] + noise["last"]) / 2
    log_probs = np.stack(
        [
            [
                log_softmax(truth + noise[c] + rng.normal(0, 1.0, truth.shape), axis=1)
                for _ in ph.VIEWS
            ]
            for c in ph.CHECKPOINTS
        ]
    ).astype(np.float32)
    candidates = ph.OofCandidates(np.arange(len(targets)), folds, targets, log_probs)
    path = candidates.save(tmp_path / "oof_candidates.npz")
    return ph.OofCandidates.load(path)


def test_checkpoint_and_tta_candidates_are_compared(tmp_path: Path) -> None:
    candidates = candidate_set(tmp_path)
    assert candidates.log_probs.shape == (3, 3, 3000, 4)
    flips = candidates.choice("best", ("identity", "hflip", "vflip"))
    mean = np.exp(candidates.log_probs[0].astype(np.float64)).mean(axis=0)
    np.testing.assert_allclose(np.exp(flips), mean, rtol=1e-6)

    study = ph.study_candidates(candidates, "best", ("identity", "hflip"))
    names = [c.name for c in study.candidates]
    assert names[0] == study.configured == "best_hflip"
    assert len(names) == 9 and "average_flips" in names and "last_none" in names
    # The averaged weights carry half the noise and three views average out the most.
    assert study.chosen.checkpoint == "average" and study.chosen.tta == "flips"
    assert study.log_loss < study.configured_score.log_loss

    record = {"posthoc": study.summary()}
    metrics = summary_metrics(record)
    assert metrics["posthoc.best_hflip.log_loss"] == study.configured_score.log_loss
    assert metrics["posthoc.average_flips.accuracy"] == pytest.approx(
        next(c.accuracy for c in study.candidates if c.name == "average_flips")
    )
    assert metrics["posthoc.log_loss"] == study.log_loss

    finding = MiscalibratedRule().check(context_for(study))
    assert finding is not None
    overrides = finding.proposals[0].overrides
    assert overrides[:2] == ["tta=flips", "checkpoint.select=average"]
    assert overrides[2].startswith("predict.temperature=")


def test_reliability_diagram_is_written(tmp_path: Path) -> None:
    truth, targets, folds = synthetic(1000, 3, seed=6)
    study = ph.study_oof(np.exp(log_softmax(2 * truth, axis=1)), targets, folds)
    path = write_reliability_plot(study, tmp_path)
    assert path.name == "reliability.png" and path.stat().st_size > 10_000
    bins = study.reliability_before
    assert sum(b.count for b in bins) == 1000 and len(bins) == ph.ECE_BINS
    assert math.isclose(bins[-1].high, 1.0)
