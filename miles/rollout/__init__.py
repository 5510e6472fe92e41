"""Rollout side of Miles: `Sample`, prompt data source, HTTP generate functions, rewards, filters, hooks.

Hook signatures and flag names follow slime (see docs and `miles.rollout.config`)."""

from miles.rollout.filters import DynamicFilterOutput, check_reward_nonzero_std
from miles.rollout.hooks import load_function
from miles.rollout.sample import Sample

__all__ = ["DynamicFilterOutput", "Sample", "check_reward_nonzero_std", "load_function"]
