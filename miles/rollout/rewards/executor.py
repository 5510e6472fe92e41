"""Run reward functions concurrently with a timeout; failures give `--rm-default-reward` and are counted.

Precedence for one sample (as slime): `sample.custom_rm_path` > `--custom-rm-path` > `metadata["rm_type"]`
> `--rm-type`. With `--group-rm`, `--custom-rm-path` is called once per group: `async def rm(args, samples)`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from miles.rollout.hooks import call_maybe_async, load_function
from miles.rollout.rewards.remote import remote_rm
from miles.rollout.rewards.rules import get_rule
from miles.rollout.sample import Sample


@dataclass
class RewardStats:
    """Counts of reward calls, errors and timeouts (+ the first error message) for the metrics."""

    calls: int = 0
    errors: int = 0
    timeouts: int = 0
    first_error: str | None = None
    seconds: float = 0.0  # wall-clock time with at least one reward call in flight (not the sum over calls)
    _in_flight: int = 0
    _busy_since: float = 0.0

    def begin(self) -> None:
        """A reward call starts; opens a busy interval if none is open."""
        if self._in_flight == 0:
            self._busy_since = time.perf_counter()
        self._in_flight += 1

    def end(self) -> None:
        """A reward call ends; closes the busy interval when it was the last one in flight."""
        self._in_flight -= 1
        if self._in_flight == 0:
            self.seconds += time.perf_counter() - self._busy_since

    def fail(self, kind: str, message: str, n: int = 1) -> None:
        """Count `n` samples that got the default reward because of an error or a timeout."""
        if kind == "timeout":
            self.timeouts += n
        else:
            self.errors += n
        if self.first_error is None:
            self.first_error = message

    def metrics(self, prefix: str = "rollout/") -> dict:
        out = {f"{prefix}reward_errors": self.errors, f"{prefix}reward_timeouts": self.timeouts}
        if self.first_error is not None:
            out[f"{prefix}reward_first_error"] = self.first_error
        return out


def _rule_rm(rm_type: str) -> Callable:
    if rm_type in ("remote", "remote_rm"):
        return remote_rm
    rule = get_rule(rm_type)

    def rm(args: Any, sample: Sample) -> float:
        return rule(sample.response, sample.label)

    rm.__name__ = f"rm_{rm_type}"
    return rm


def resolve_rm(args: Any, sample: Sample) -> Callable:
    """The single-sample reward function for `sample` (raises ValueError if none is configured)."""
    path = sample.custom_rm_path or getattr(args, "custom_rm_path", None)
    if path:
        return load_function(path)
    rm_type = (sample.metadata or {}).get("rm_type") or getattr(args, "rm_type", None)
    if not rm_type:
        raise ValueError("no reward function: set --rm-type or --custom-rm-path (or metadata['rm_type'])")
    return _rule_rm(rm_type)


def _describe(fn: Callable, e: BaseException | None, timeout: float) -> str:
    name = getattr(fn, "__qualname__", repr(fn))
    if e is None:
        return f"{name}: timed out after {timeout}s"
    return f"{name}: {type(e).__name__}: {e}"


async def _guarded(fn: Callable, call_args: tuple, args: Any, stats: RewardStats, n: int = 1) -> tuple[bool, Any]:
    timeout = float(getattr(args, "rm_timeout", 60.0))
    stats.calls += 1
    stats.begin()
    try:
        return True, await asyncio.wait_for(call_maybe_async(fn, *call_args), timeout=timeout)
    except asyncio.TimeoutError:
        stats.fail("timeout", _describe(fn, None, timeout), n)
    except Exception as e:  # a reward bug must not stop the job
        stats.fail("error", _describe(fn, e, timeout), n)
    finally:
        stats.end()
    return False, None


def _valid(value: Any) -> bool:
    return isinstance(value, (int, float, dict))


async def score_sample(args: Any, sample: Sample, stats: RewardStats) -> None:
    """Set `sample.reward` (skipped for ABORTED samples or when already set)."""
    if sample.status == Sample.Status.ABORTED or sample.reward is not None:
        return
    fn = resolve_rm(args, sample)
    ok, value = await _guarded(fn, (args, sample), args, stats)
    if ok and not _valid(value):
        stats.fail("error", f"{getattr(fn, '__qualname__', fn)}: returned {type(value).__name__}, not float|dict")
        ok = False
    sample.reward = value if ok else float(args.rm_default_reward)


async def score_group(args: Any, samples: list[Sample], stats: RewardStats) -> RewardStats:
    """`--group-rm`: one call `rm(args, samples) -> list` for the samples still without reward."""
    todo = [s for s in samples if s.reward is None and s.status != Sample.Status.ABORTED]
    if not todo:
        return stats
    fn = load_function(getattr(args, "custom_rm_path", None))
    if fn is None:  # no batched rm: the single-sample rm on each sample, concurrently
        await asyncio.gather(*(score_sample(args, s, stats) for s in todo))
        return stats
    ok, values = await _guarded(fn, (args, todo), args, stats, n=len(todo))
    if ok and (not isinstance(values, (list, tuple)) or len(values) != len(todo) or not all(map(_valid, values))):
        got = f"{len(values)} values" if isinstance(values, (list, tuple)) else type(values).__name__
        msg = f"{getattr(fn, '__qualname__', fn)}: returned {got} for {len(todo)} samples (need floats/dicts)"
        stats.fail("error", msg, len(todo))
        ok = False
    for i, s in enumerate(todo):
        s.reward = values[i] if ok else float(args.rm_default_reward)
    return stats


async def score_samples(args: Any, samples: list[Sample], stats: RewardStats | None = None) -> RewardStats:
    """Score independent samples concurrently; returns the stats."""
    stats = stats or RewardStats()
    await asyncio.gather(*(score_sample(args, s, stats) for s in samples))
    return stats
