"""One history per finding, built here, plus a healthy one that gets no findings."""

from __future__ import annotations

import math

import pytest
from diagnosis_fixtures import HEALTHY_PHASE1, HEALTHY_PHASE2, healthy_curves, records_for
from hydra.core.override_parser.overrides_parser import OverridesParser

from evolver.diagnosis import DEFAULT_RULES, SEVERITIES, Proposal, diagnose
from evolver.diagnosis.proposals import format_override_value
from evolver.diagnosis.report import render_markdown


def ids_of(records) -> list[str]:
    return diagnose(records).finding_ids


def test_healthy_run_has_no_findings() -> None:
    diagnosis = diagnose(records_for(healthy_curves(5)))
    assert diagnosis.findings == []
    assert diagnosis.metrics.folds_degraded == 0
    assert diagnosis.metrics.folds_early_stopped == 0


def test_healthy_history_without_summary_has_no_findings() -> None:
    from diagnosis_fixtures import history_frame

    from evolver.diagnosis import RunRecords

    assert diagnose(RunRecords.from_parts(history_frame(healthy_curves()))).findings == []


def test_overfitting_after_best() -> None:
    rising = [0.7, 0.55, 0.45, 0.42, 0.43, 0.45, 0.47, 0.5, 0.52, 0.55, 0.57, 0.6]
    curves = {fold: HEALTHY_PHASE1 + rising for fold in (1, 2, 3)}
    diagnosis = diagnose(records_for(curves))
    assert diagnosis.finding_ids == ["overfitting_after_best"]
    finding = diagnosis.findings[0]
    assert finding.severity == "high"
    assert finding.evidence["relative_rise_by_fold"][1] == pytest.approx((0.6 - 0.42) / 0.42, 1e-4)
    assert finding.evidence["folds_train_loss_still_falling"] == [1, 2, 3]
    names = [p.name for p in finding.proposals]
    # The run already keeps its best checkpoint: only regularization is proposed.
    assert names == ["more_regularization"]
    assert finding.proposals[0].changes["regularization.mixup"] == 0.2


# A near-perfect 2-class fine-tune: the best val loss sits just above smoothing 0.1's floor of
# -ln(0.95) = 0.0513.
CAPPED = [0.09, 0.075, 0.066, 0.061, 0.058, 0.0565, 0.056, 0.0555, 0.0556, 0.0557, 0.0556, 0.0558]


def test_smoothing_caps_confidence_when_its_floor_is_most_of_the_loss() -> None:
    curves = {fold: HEALTHY_PHASE1 + CAPPED for fold in (1, 2, 3)}
    diagnosis = diagnose(records_for(curves, label_smoothing=0.1, num_classes=2))
    assert diagnosis.finding_ids == ["smoothing_caps_confidence"]
    finding = diagnosis.findings[0]
    assert finding.severity == "high"
    assert finding.evidence["floor"] == pytest.approx(-math.log(0.95), 1e-5)
    assert finding.evidence["floor_share_by_fold"][1] == pytest.approx(0.0513 / 0.0555, 1e-3)
    assert finding.evidence["best_val_acc_by_fold"] == {1: 0.9, 2: 0.9, 3: 0.9}
    (proposal,) = finding.proposals
    assert proposal.name == "lower_label_smoothing"
    assert proposal.changes == {"regularization.label_smoothing": 0.01}
    assert "floor 0.0513 -> 0.005" in proposal.reason


@pytest.mark.parametrize(
    "settings",
    [
        {"label_smoothing": 0.1},  # how many classes is unknown: the floor is too
        {"label_smoothing": 0.0, "num_classes": 2},
        {"label_smoothing": 0.1, "num_classes": 2, "scale": 3.0},  # a loss far above the floor
        {"label_smoothing": 0.02, "num_classes": 2},  # floor 0.0101, a fifth of the loss
    ],
)
def test_smoothing_caps_confidence_needs_a_floor_that_is_most_of_the_loss(settings) -> None:
    scale = settings.pop("scale", 1.0)
    curves = {fold: HEALTHY_PHASE1 + [v * scale for v in CAPPED] for fold in (1, 2, 3)}
    assert ids_of(records_for(curves, **settings)) == []


def test_overfitting_does_not_raise_a_smoothing_that_would_cap_the_loss() -> None:
    rising = [0.09, 0.075, 0.066, 0.06, 0.057, 0.058, 0.06, 0.062, 0.064, 0.066, 0.068, 0.07]
    curves = {fold: HEALTHY_PHASE1 + rising for fold in (1, 2, 3)}
    # Smoothing 0.05 leaves a floor of 0.0253, under half of the 0.057 best: no finding, but 0.1
    # would put the floor at 90% of it.
    diagnosis = diagnose(records_for(curves, label_smoothing=0.05, num_classes=2))
    assert diagnosis.finding_ids == ["overfitting_after_best"]
    (proposal,) = diagnosis.findings[0].proposals
    assert proposal.name == "more_regularization"
    assert "regularization.label_smoothing" not in proposal.changes
    # With 10 classes 0.05's own floor is 0.046, 80% of the best: smoothing is lowered first.
    diagnosis = diagnose(records_for(curves, label_smoothing=0.05, num_classes=10))
    names = [proposal.name for proposal in diagnosis.proposals]
    assert names == ["lower_label_smoothing", "more_regularization"]
    assert "regularization.label_smoothing" not in diagnosis.proposals[1].changes
    # Where the loss is far above the floor, it is raised as before.
    high = {fold: [v * 8 for v in values] for fold, values in curves.items()}
    diagnosis = diagnose(records_for(high, label_smoothing=0.05, num_classes=2))
    assert diagnosis.proposals[0].changes["regularization.label_smoothing"] == 0.1


def test_final_weights_not_best_when_the_score_uses_last_weights() -> None:
    rising = [0.7, 0.55, 0.45, 0.42, 0.43, 0.45, 0.47, 0.5, 0.52, 0.55, 0.57, 0.6]
    curves = {fold: HEALTHY_PHASE1 + rising for fold in (1, 2)}
    diagnosis = diagnose(records_for(curves, checkpoint="last"))
    by_id = {finding.id: finding for finding in diagnosis.findings}
    assert {"overfitting_after_best", "final_weights_not_best"} <= set(by_id)
    finding = by_id["final_weights_not_best"]
    assert finding.evidence["relative_gap"] == pytest.approx((0.6 - 0.42) / 0.42, 1e-4)
    assert finding.proposals[0].overrides == ["checkpoint.select=best"]


def test_a_jump_at_the_phase_switch_after_a_clean_head_phase_blames_the_backbone() -> None:
    phase1 = [1.0, 0.64, 0.6]  # a head that has levelled off
    phase2 = [0.75, 0.62, 0.52, 0.46, 0.43, 0.42, 0.418, 0.4175, 0.418, 0.4182, 0.4179, 0.4183]
    curves = {fold: phase1 + phase2 for fold in (1, 2)}
    diagnosis = diagnose(records_for(curves))
    assert diagnosis.finding_ids == ["backbone_lr_too_high"]
    finding = diagnosis.findings[0]
    assert "jump +25.0% at the phase switch" in finding.evidence["signs_by_fold"][1]
    lower, continued, cosine = finding.proposals
    assert lower.name == "lower_backbone_lr"
    assert lower.changes == {"finetune.lr_backbone": 2e-05}
    # The cheap variant: 5x lower rates from where each fold ended, patience (5) more phase-2
    # epochs at most; the loop runs it only as a continuation of this run.
    assert continued.name == "continue_at_lower_lr"
    assert continued.changes == {"checkpoint.continue_lr_scale": 0.2, "finetune.phase2_epochs": 17}
    assert cosine.overrides == ["schedule=cosine", "schedule.warmup_epochs=2"]
    # The report's command names the run to continue.
    report = render_markdown(diagnosis, [])
    assert (
        "`checkpoint.continue_lr_scale=0.2 finetune.phase2_epochs=17 "
        "checkpoint.continue_from=RUN_DIR`" in report
    )


@pytest.mark.parametrize(
    ("phase1", "phase1_epochs"),
    [
        ([1.0, 0.64, 0.8], 3),  # the head's own phase spiked (+25%): its rate is too high too
        ([], 0),  # no head-only phase: the two rates never trained apart
    ],
)
def test_lr_too_high_lowers_both_rates_when_the_head_is_implicated(
    phase1: list[float], phase1_epochs: int
) -> None:
    phase2 = [0.75, 0.62, 0.52, 0.46, 0.43, 0.42, 0.418, 0.4175, 0.418, 0.4182, 0.4179, 0.4183]
    if not phase1:  # no phase switch to jump at: best early in phase 2, then a rise
        phase2 = [0.7, 0.5, 0.56, 0.6, 0.62, 0.63]
    curves = {fold: phase1 + phase2 for fold in (1, 2)}
    diagnosis = diagnose(records_for(curves, phase1_epochs=phase1_epochs))
    assert "lr_too_high" in diagnosis.finding_ids
    assert "backbone_lr_too_high" not in diagnosis.finding_ids
    finding = next(f for f in diagnosis.findings if f.id == "lr_too_high")
    lower = finding.proposals[0]
    assert lower.name == "lower_learning_rates"
    assert lower.changes == {"finetune.lr_backbone": 2e-05, "finetune.lr_head": 0.0002}


def test_lr_too_high_keeps_cosine_out_when_the_run_used_it() -> None:
    phase2 = [0.5, 0.62, 0.55, 0.58, 0.6, 0.61]
    curves = {fold: HEALTHY_PHASE1 + phase2 for fold in (1, 2)}
    diagnosis = diagnose(records_for(curves, schedule="cosine", warmup_epochs=2))
    finding = next(f for f in diagnosis.findings if f.id == "backbone_lr_too_high")
    assert [p.name for p in finding.proposals] == ["lower_backbone_lr"]


def test_early_stopping_too_eager_on_noise() -> None:
    # 0.428 improves on 0.43 by less than min_delta: early stopping ignored a new best that came
    # inside its patience window, and the rise after it is within the noise.
    phase2 = [0.6, 0.5, 0.45, 0.43, 0.428, 0.432]
    curves = {fold: HEALTHY_PHASE1 + phase2 for fold in (1, 2)}
    diagnosis = diagnose(
        records_for(curves, early_stopped={1: True, 2: True}, patience=2, min_delta=0.005)
    )
    assert diagnosis.finding_ids == ["early_stopping_too_eager"]
    finding = diagnosis.findings[0]
    assert set(finding.evidence["folds_by_reason"]) == {1, 2}
    raise_patience, disable = finding.proposals
    assert raise_patience.overrides == ["early_stop.patience=4"]
    assert disable.changes == {"early_stop.enabled": False, "finetune.phase2_epochs": 18}


def test_early_stop_a_patience_window_after_the_best_is_not_eager() -> None:
    # The pretrained regime: the best epoch, then `patience` epochs without a new best and a rise
    # within the noise. Stopping was right; raising patience would only spend epochs.
    phase2 = [0.6, 0.5, 0.45, 0.43, 0.44, 0.435]
    curves = {fold: HEALTHY_PHASE1 + phase2 for fold in (1, 2)}
    diagnosis = diagnose(records_for(curves, early_stopped={1: True, 2: True}, patience=2))
    assert "early_stopping_too_eager" not in diagnosis.finding_ids
    # The same curves stopped after a shorter wait than the gap since the best would fire.
    shorter = diagnose(records_for(curves, early_stopped={1: True, 2: True}, patience=3))
    assert "early_stopping_too_eager" in shorter.finding_ids


def test_early_stopping_too_eager_when_still_improving() -> None:
    phase2 = [0.6, 0.5, 0.45, 0.44, 0.435, 0.432]
    curves = {1: HEALTHY_PHASE1 + phase2}
    diagnosis = diagnose(records_for(curves, early_stopped={1: True}, min_delta=0.02, patience=2))
    finding = next(f for f in diagnosis.findings if f.id == "early_stopping_too_eager")
    assert finding.evidence["folds_by_reason"] == {1: "still improving when stopped"}


def test_early_stop_that_caught_real_overfitting_is_not_eager() -> None:
    phase2 = [0.6, 0.5, 0.45, 0.43, 0.47, 0.52, 0.58]
    curves = {fold: HEALTHY_PHASE1 + phase2 for fold in (1, 2)}
    ids = ids_of(records_for(curves, early_stopped={1: True, 2: True}, patience=3))
    assert "early_stopping_too_eager" not in ids
    assert "overfitting_after_best" in ids


def test_training_too_short() -> None:
    phase2 = [0.7, 0.6, 0.53, 0.48, 0.45, 0.43, 0.415, 0.405, 0.397, 0.39, 0.384, 0.379]
    curves = {fold: HEALTHY_PHASE1 + phase2 for fold in (1, 2, 3)}
    diagnosis = diagnose(records_for(curves))
    assert diagnosis.finding_ids == ["training_too_short"]
    (proposal,) = diagnosis.findings[0].proposals
    assert proposal.overrides == ["finetune.phase2_epochs=18"]


def test_training_too_long() -> None:
    phase2 = [0.45] + [0.452, 0.453, 0.454] + [0.455] * 15
    curves = {fold: [0.5, *phase2] for fold in (1, 2)}
    diagnosis = diagnose(
        records_for(curves, phase1_epochs=1, max_phase1_epochs=1, max_phase2_epochs=19)
    )
    assert diagnosis.finding_ids == ["training_too_long"]
    (proposal,) = diagnosis.findings[0].proposals
    assert proposal.changes == {"finetune.phase2_epochs": 2}


def test_unstable_validation_from_epoch_noise() -> None:
    phase2 = [0.6, 0.5, 0.45, 0.48, 0.44, 0.47, 0.43, 0.46, 0.44, 0.47, 0.44, 0.438]
    curves = {fold: HEALTHY_PHASE1 + phase2 for fold in (1, 2)}
    diagnosis = diagnose(records_for(curves, batch_size=32))
    assert diagnosis.finding_ids == ["unstable_validation"]
    finding = diagnosis.findings[0]
    assert finding.evidence["mean_volatility"] > 0.05
    batch, cosine = finding.proposals
    assert batch.changes["data.batch_size"] == 64
    assert cosine.name == "cosine_with_warmup"


def test_unstable_validation_from_fold_spread() -> None:
    curve = HEALTHY_PHASE1 + HEALTHY_PHASE2
    curves = {1: curve, 2: [v * 1.3 for v in curve], 3: [v * 0.8 for v in curve]}
    finding = diagnose(records_for(curves)).findings[0]
    assert finding.id == "unstable_validation"
    assert finding.evidence["fold_spread"] > 0.1


def test_head_phase_ineffective() -> None:
    curves = {fold: [1.0, 1.0, 0.995, *HEALTHY_PHASE2] for fold in (1, 2)}
    diagnosis = diagnose(records_for(curves))
    assert diagnosis.finding_ids == ["head_phase_ineffective"]
    raise_lr, more_epochs = diagnosis.findings[0].proposals
    assert raise_lr.changes == {"finetune.lr_head": 0.0025}
    assert more_epochs.changes == {"finetune.phase1_epochs": 5}


def test_head_still_learning_when_phase1_ends_on_a_steep_fall() -> None:
    # The head's last epoch lowers val loss 25% below its earlier best in 2 of 3 folds; phase 2
    # is healthy, so this is the only finding.
    steep = [1.2, 1.0, 0.75]
    curves = {
        1: steep + HEALTHY_PHASE2,
        2: steep + HEALTHY_PHASE2,
        3: HEALTHY_PHASE1 + HEALTHY_PHASE2,
    }
    diagnosis = diagnose(records_for(curves))
    assert diagnosis.finding_ids == ["head_still_learning"]
    finding = diagnosis.findings[0]
    assert finding.evidence["phase1_end_gain_by_fold"] == {
        1: pytest.approx(0.25),
        2: pytest.approx(0.25),
    }
    raise_lr, more_epochs = finding.proposals
    assert raise_lr.changes == {"finetune.lr_head": 0.0025}
    assert more_epochs.changes == {"finetune.phase1_epochs": 5}


@pytest.mark.parametrize(
    "phase1",
    [
        [1.0, 0.9, 0.85],  # levelling off: 5.6% below the earlier best
        [1.0, 0.6, 0.7],  # the head's best came before the last epoch
        [0.7, 1.0, 0.75],  # a fall back from a spike that stays above the earlier best
    ],
)
def test_head_still_learning_needs_a_last_epoch_well_below_the_earlier_best(phase1) -> None:
    curves = {fold: phase1 + HEALTHY_PHASE2 for fold in (1, 2)}
    assert "head_still_learning" not in ids_of(records_for(curves))


def test_head_still_learning_needs_two_head_epochs() -> None:
    curves = {fold: [0.9, *HEALTHY_PHASE2] for fold in (1, 2)}
    diagnosis = diagnose(records_for(curves, phase1_epochs=1))
    assert "head_still_learning" not in diagnosis.finding_ids
    assert all(fold.phase1_end_gain is None for fold in diagnosis.folds)


def test_head_still_learning_comes_before_phase2_findings_of_equal_severity() -> None:
    # A still-learning head and a late best (training_too_short, also medium): the head's remedy
    # is listed first, so an iteration with few slots tries it first.
    late = [0.7, 0.65, 0.6, 0.56, 0.53, 0.5, 0.48, 0.46, 0.44, 0.43, 0.42, 0.41]
    curves = {fold: [1.2, 1.0, 0.75, *late] for fold in (1, 2)}
    ids = ids_of(records_for(curves))
    assert ids.index("head_still_learning") < ids.index("training_too_short")


def test_underfitting() -> None:
    curves = healthy_curves(2)
    flat_train = {fold: [1.2 - 0.01 * i for i in range(15)] for fold in curves}
    diagnosis = diagnose(records_for(curves, train=flat_train))
    assert diagnosis.finding_ids == ["underfitting"]
    proposals = diagnosis.findings[0].proposals
    # A flat training curve asks for larger steps first; more epochs come last.
    assert proposals[0].name == "raise_learning_rates"
    assert proposals[0].changes == {"finetune.lr_backbone": 0.0003, "finetune.lr_head": 0.003}
    assert proposals[-1].name == "train_longer"
    assert diagnosis.findings[0].evidence["lr_backbone"] == 1e-4


def test_diverged_from_exploding_loss() -> None:
    phase2 = [0.7, 0.9, 1.6, 3.5, 4.0, 3.8]
    curves = {1: HEALTHY_PHASE1 + phase2, 2: HEALTHY_PHASE1 + HEALTHY_PHASE2}
    diagnosis = diagnose(records_for(curves))
    assert diagnosis.finding_ids[0] == "diverged"
    finding = diagnosis.findings[0]
    assert finding.severity == "critical"
    assert finding.evidence["loss_growth_by_fold"] == {1: 4.0}
    assert finding.proposals[0].changes == {
        "finetune.lr_backbone": 1e-05,
        "finetune.lr_head": 0.0001,
    }


def test_findings_are_sorted_by_severity_and_rules_are_composable() -> None:
    rising = [0.7, 0.55, 0.45, 0.42, 0.43, 0.45, 0.47, 0.5, 0.52, 0.55, 0.57, 0.6]
    records = records_for(
        {1: HEALTHY_PHASE1 + rising, 2: HEALTHY_PHASE1 + rising}, checkpoint="last"
    )
    diagnosis = diagnose(records)
    ranks = [SEVERITIES.index(f.severity) for f in diagnosis.findings]
    assert ranks == sorted(ranks, reverse=True)
    only = [rule for rule in DEFAULT_RULES if rule.id == "final_weights_not_best"]
    assert diagnose(records, rules=only).finding_ids == ["final_weights_not_best"]
    assert len({rule.id for rule in DEFAULT_RULES}) == len(DEFAULT_RULES) == 14


def test_every_proposal_override_parses_as_hydra_override() -> None:
    parser = OverridesParser.create()
    cases = [
        records_for({1: [*HEALTHY_PHASE1, 0.5, 0.62, 0.55, 0.7, 0.6, 0.65]}, checkpoint="last"),
        records_for({1: [1.0, 1.0, 0.995, *HEALTHY_PHASE2]}),
        records_for(
            {1: [*HEALTHY_PHASE1, 0.6, 0.5, 0.45, 0.43, 0.44, 0.435]}, early_stopped={1: True}
        ),
    ]
    proposals = [p for records in cases for p in diagnose(records).proposals]
    assert len(proposals) >= 6
    for proposal in proposals:
        parsed = parser.parse_overrides(proposal.overrides)
        values = {override.key_or_group: override.value() for override in parsed}
        assert values == proposal.changes
        # Group selections come before the keys of their group.
        keys = [override.key_or_group for override in parsed]
        for group in (key for key in keys if "." not in key):
            assert all(
                keys.index(group) < i for i, k in enumerate(keys) if k.startswith(group + ".")
            )


def test_proposal_round_trips_through_a_dict() -> None:
    proposal = Proposal(
        "cosine_with_warmup",
        "lr_too_high",
        {"schedule.warmup_epochs": 2, "schedule": "cosine"},
        "r",
        {"metric": "mean_volatility", "direction": "down"},
    )
    assert proposal.overrides == ["schedule=cosine", "schedule.warmup_epochs=2"]
    assert Proposal.from_dict(proposal.to_dict()) == proposal
    assert [format_override_value(v) for v in (False, None, 2e-05, 64)] == [
        "false",
        "null",
        "2e-05",
        "64",
    ]


def test_every_proposal_composes_with_the_train_config() -> None:
    from diagnosis_fixtures import SEED_SETTINGS, seed_history
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    from evolver.diagnosis import RunRecords

    seed = RunRecords.from_parts(seed_history(), {"settings": SEED_SETTINGS})
    smoothed = {**SEED_SETTINGS, "label_smoothing": 0.1, "num_classes": 2}
    cases = [
        seed,
        RunRecords.from_parts(seed_history(), {"settings": smoothed}),
        records_for({1: [1.0, 1.0, 0.995, *HEALTHY_PHASE2]}, label_smoothing=0.0),
        records_for(
            {fold: [0.5, 0.45, 0.452, 0.453, 0.454] + [0.455] * 15 for fold in (1, 2)},
            phase1_epochs=1,
            max_phase1_epochs=1,
            max_phase2_epochs=19,
        ),
        records_for(healthy_curves(2), train={1: [1.2] * 15, 2: [1.2] * 15}),
        records_for(
            {fold: [*HEALTHY_PHASE1, 0.6, 0.5, 0.45, 0.43, 0.428, 0.432] for fold in (1, 2)},
            early_stopped={1: True, 2: True},
            patience=2,
            min_delta=0.005,
        ),
        records_for({fold: [0.7, 0.5, 0.56, 0.6, 0.62, 0.63] for fold in (1, 2)}, phase1_epochs=0),
    ]
    proposals = [p for records in cases for p in diagnose(records).proposals]
    names = {p.name for p in proposals}
    assert {"lower_learning_rates", "lower_backbone_lr", "cosine_with_warmup"} <= names
    assert "raise_patience" in names
    assert {"disable_early_stopping", "larger_batch", "train_shorter", "raise_head_lr"} <= names
    assert "lower_label_smoothing" in names
    with initialize_config_module("evolver.conf", version_base="1.3"):
        for proposal in proposals:
            cfg = compose("train", overrides=proposal.overrides)
            for key, value in proposal.changes.items():
                selected = OmegaConf.select(cfg, key if "." in key else f"{key}.name")
                assert selected == value, (proposal.name, key)
