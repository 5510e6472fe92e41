"""Rewards: built-in rules (math, boxed, exact, f1), remote HTTP, custom/group hooks, a guarded executor."""

from miles.rollout.rewards.executor import RewardStats, resolve_rm, score_group, score_sample, score_samples
from miles.rollout.rewards.remote import remote_rm
from miles.rollout.rewards.rules import RULES, boxed_reward, exact_reward, f1_reward, get_rule, last_boxed, math_reward

__all__ = [
    "RULES",
    "RewardStats",
    "boxed_reward",
    "exact_reward",
    "f1_reward",
    "get_rule",
    "last_boxed",
    "math_reward",
    "remote_rm",
    "resolve_rm",
    "score_group",
    "score_sample",
    "score_samples",
]
