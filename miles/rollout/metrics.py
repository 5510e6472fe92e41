"""Rollout statistics: reward / response-length summaries and unbiased pass@k."""

from __future__ import annotations

import math
import statistics
from typing import Any

from miles.rollout.sample import Sample


def summarize(prefix: str, values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    return {
        f"{prefix}_mean": statistics.fmean(values),
        f"{prefix}_std": statistics.pstdev(values) if len(values) > 1 else 0.0,
        f"{prefix}_min": min(values),
        f"{prefix}_max": max(values),
    }


def sample_metrics(args: Any, samples: list[Sample], prefix: str = "rollout/", reward_key: str | None = None) -> dict:
    """Reward, response-length and truncation statistics of a flat sample list."""
    if not samples:
        return {}
    rewards = [s.get_reward_value(args, reward_key) for s in samples if s.reward is not None]
    out = summarize(f"{prefix}reward", rewards)
    out.update(summarize(f"{prefix}response_len", [float(s.response_length) for s in samples]))
    out[f"{prefix}truncated_ratio"] = sum(s.status == Sample.Status.TRUNCATED for s in samples) / len(samples)
    return out


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for n samples with c correct (Chen et al. 2021)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def pass_at_k_metrics(prefix: str, group_rewards: list[list[float]], threshold: float = 0.0) -> dict[str, float]:
    """`<prefix>pass@k` for k = 1, 2, 4, ... ≤ group size; a sample is correct if reward > threshold."""
    if not group_rewards:
        return {}
    n = min(len(g) for g in group_rewards)
    out = {}
    k = 1
    while k <= n:
        vals = [pass_at_k(len(g), sum(r > threshold for r in g), k) for g in group_rewards]
        out[f"{prefix}pass@{k}"] = statistics.fmean(vals)
        k *= 2
    return out
