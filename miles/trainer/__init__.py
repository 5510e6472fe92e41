"""FSDP2 policy trainer: packing, losses, advantages, optimizer/schedule, DCP checkpoints, HF export,
bucketed HF-named weight iterator. See `Trainer` (trainer.py) and `TrainSample` (batch.py)."""

from miles.trainer.batch import BatchError, TrainBatch, TrainSample
from miles.trainer.config import AlgoConfig, ConfigError, TrainerConfig
from miles.trainer.trainer import Trainer

__all__ = ["AlgoConfig", "BatchError", "ConfigError", "TrainBatch", "TrainSample", "Trainer", "TrainerConfig"]
