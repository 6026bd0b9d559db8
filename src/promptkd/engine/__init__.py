"""The training engine: data feeding, the loop, precision, checkpoints and resume, distribution, selection."""

from promptkd.engine.config import TrainConfig
from promptkd.engine.trainer import Trainer, TrainingDivergedError, TrainResult, learning_rate, predict_logits

__all__ = ["TrainConfig", "TrainResult", "Trainer", "TrainingDivergedError", "learning_rate", "predict_logits"]
