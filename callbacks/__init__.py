"""Lightning callbacks that run and record a fold's training (installed as evolver.callbacks)."""

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
