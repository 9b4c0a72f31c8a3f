"""Lightning callbacks that run and record a fold's training (installed as evolver.callbacks).

`progress`, `mlflow_metrics` (MLflow curves) and `pruning` (Optuna pruning, fold by fold)
are imported from their own modules where they are used, so importing this package stays cheap.
"""

from evolver.callbacks.dynamics import DynamicsRecorder, EpochRecord, NonFiniteLossError
from evolver.callbacks.early_stop import PhaseTwoEarlyStopping
from evolver.callbacks.finetune import TwoPhaseFinetuning

__all__ = [
    "DynamicsRecorder",
    "EpochRecord",
    "NonFiniteLossError",
    "PhaseTwoEarlyStopping",
    "TwoPhaseFinetuning",
]
