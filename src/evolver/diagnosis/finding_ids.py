"""The ids of the diagnosis findings: `report.json`'s `findings[].id`, and the loop's trial
attributes `findings` and `proposed_by`. Stable: studies and reports of earlier runs hold them."""

DIVERGED = "diverged"
OVERFITTING_AFTER_BEST = "overfitting_after_best"
LR_TOO_HIGH = "lr_too_high"
EARLY_STOPPING_TOO_EAGER = "early_stopping_too_eager"
TRAINING_TOO_SHORT = "training_too_short"
TRAINING_TOO_LONG = "training_too_long"
UNSTABLE_VALIDATION = "unstable_validation"
FINAL_WEIGHTS_NOT_BEST = "final_weights_not_best"
HEAD_PHASE_INEFFECTIVE = "head_phase_ineffective"
UNDERFITTING = "underfitting"
MISCALIBRATED = "miscalibrated"
