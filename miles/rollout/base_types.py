"""slime/Miles import path for the rollout output types."""

from miles.rollout.filters import DynamicFilterOutput
from miles.rollout.rollout import RolloutFnEvalOutput, RolloutFnTrainOutput

__all__ = ["DynamicFilterOutput", "RolloutFnEvalOutput", "RolloutFnTrainOutput"]
