"""Dynamic-sampling filters (`--dynamic-sampling-filter-path`), slime-compatible."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any

from miles.rollout.sample import Sample


@dataclass
class DynamicFilterOutput:
    keep: bool
    reason: str | None = None
    keep_when_insufficient: bool = False


def as_filter_output(result: Any) -> DynamicFilterOutput:
    """Accept a `DynamicFilterOutput`-like object or a plain bool (= keep)."""
    if isinstance(result, bool):
        return DynamicFilterOutput(keep=result)
    if hasattr(result, "keep"):
        return DynamicFilterOutput(
            keep=bool(result.keep),
            reason=getattr(result, "reason", None),
            keep_when_insufficient=bool(getattr(result, "keep_when_insufficient", False)),
        )
    raise TypeError(f"dynamic filter returned {type(result).__name__}; expected bool or DynamicFilterOutput")


def _flatten(samples: list) -> list[Sample]:
    out: list[Sample] = []
    for s in samples:
        out.extend(_flatten(s) if isinstance(s, list) else [s])
    return out


def check_reward_nonzero_std(args: Any, samples: list[Sample], **kwargs: Any) -> DynamicFilterOutput:
    """DAPO: keep a group only if its rewards are not all equal (std > 1e-6)."""
    rewards = [s.get_reward_value(args) for s in _flatten(samples)]
    keep = len(rewards) > 1 and statistics.pstdev(rewards) > 1e-6
    return DynamicFilterOutput(keep=keep, reason=None if keep else f"zero_std_{round(rewards[0], 1)}")


def check_no_aborted(args: Any, samples: list[Sample], **kwargs: Any) -> DynamicFilterOutput:
    """Drop groups that contain an ABORTED sample."""
    keep = all(s.status != Sample.Status.ABORTED for s in _flatten(samples))
    return DynamicFilterOutput(keep=keep, reason=None if keep else "aborted")
