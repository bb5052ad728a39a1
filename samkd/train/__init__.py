"""`samkd train`: distil the student from stored or online teacher features."""

from samkd.train.loop import TrainResult, run_train

__all__ = ["TrainResult", "run_train"]
