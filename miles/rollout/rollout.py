"""Default rollout function, slime's contract: `generate_rollout(args, rollout_id, data_source, evaluation=False)`.

Sync entry point running its own asyncio loop. Train: over-samples prompt groups in chunks of
`--over-sampling-batch-size`, generates + scores each sample, applies the dynamic filter per finished
group until `--rollout-batch-size` groups pass, aborts the rest (partial groups go back to the data
source's buffer with `--partial-rollout`). Eval: every prompt of each `--eval-prompt-data` dataset,
`--n-samples-per-eval-prompt` times; mean reward and pass@k.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import logging
import threading
import time
from collections import Counter
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

from miles.rollout.config import parse_eval_prompt_data
from miles.rollout.filters import as_filter_output
from miles.rollout.generate import abort_all, default_sampling_params
from miles.rollout.generate import generate as default_generate
from miles.rollout.hooks import accepts_kwarg, load_function
from miles.rollout.http import close_client
from miles.rollout.metrics import pass_at_k_metrics, sample_metrics
from miles.rollout.rewards import RewardStats, score_group, score_sample, score_samples
from miles.rollout.sample import Sample

logger = logging.getLogger(__name__)

MAX_OVERSAMPLING = 64  # give up after sampling this many times --rollout-batch-size groups


@dataclass
class RolloutFnTrainOutput:
    samples: list[list[Sample]]
    metrics: dict | None = None


@dataclass
class RolloutFnEvalOutput:
    data: dict[str, dict]
    metrics: dict | None = None


def wrap_output(out: Any, evaluation: bool) -> RolloutFnTrainOutput | RolloutFnEvalOutput:
    """slime's convention: a bare list is a train output, a bare dict an eval output."""
    if isinstance(out, (RolloutFnTrainOutput, RolloutFnEvalOutput)):
        return out
    if hasattr(out, "samples") and not evaluation:
        return RolloutFnTrainOutput(samples=out.samples, metrics=getattr(out, "metrics", None))
    if hasattr(out, "data") and evaluation:
        return RolloutFnEvalOutput(data=out.data, metrics=getattr(out, "metrics", None))
    if isinstance(out, list):
        return RolloutFnTrainOutput(samples=out)
    if isinstance(out, dict):
        return RolloutFnEvalOutput(data=out)
    raise TypeError(f"rollout function returned {type(out).__name__}; expected a list, dict or RolloutFn*Output")


def run_coro(coro: Coroutine) -> Any:
    """Run `coro` to completion on a fresh loop (in a helper thread if this thread already runs one)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = asyncio.run(coro)
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            box["error"] = e

    t = threading.Thread(target=target, name="miles-rollout")
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


def flatten(groups: list) -> list[Sample]:
    out: list[Sample] = []
    for g in groups:
        out.extend(flatten(g) if isinstance(g, list) else [g])
    return out


def _num_engines(args: Any) -> int:
    n = getattr(args, "rollout_num_engines", None)
    if n:
        return int(n)
    gpus, per = getattr(args, "rollout_num_gpus", None), getattr(args, "rollout_num_gpus_per_engine", None)
    return max(1, int(gpus) // int(per)) if gpus and per else 1


@dataclass
class _State:
    """What one rollout call shares between its tasks."""

    args: Any
    evaluation: bool
    sampling_params: dict
    semaphore: asyncio.Semaphore
    rewards: RewardStats = field(default_factory=RewardStats)
    aborted: bool = False
    generate_seconds: float = 0.0


async def generate_one(state: _State, sample: Sample) -> Sample | list[Sample]:
    """Generate one sample (custom hook or default) and score it unless it is ABORTED or already scored."""
    args = state.args
    if sample.status not in (Sample.Status.PENDING, Sample.Status.ABORTED):
        return sample  # finished in an earlier (partial) rollout
    async with state.semaphore:
        if state.aborted:
            sample.status = Sample.Status.ABORTED
            return sample
        path = sample.generate_function_path or getattr(args, "custom_generate_function_path", None)
        fn = load_function(path) if path else default_generate
        params = copy.deepcopy(state.sampling_params)
        if getattr(args, "rollout_deterministic_sampling", False):
            params["sampling_seed"] = int(getattr(args, "rollout_seed", 0)) + sample.index
        t0 = time.perf_counter()
        if state.evaluation and accepts_kwarg(fn, "evaluation"):
            out = await fn(args, sample, params, evaluation=True)
        else:
            out = await fn(args, sample, params)
        state.generate_seconds += time.perf_counter() - t0
    if out is None:
        raise TypeError(f"generate function {path} returned None; it must return the Sample (or a list)")
    if isinstance(out, list):
        for s in out:
            if s.rollout_id is None:
                s.rollout_id = sample.rollout_id if sample.rollout_id is not None else sample.index
        if getattr(args, "group_rm", False):
            await score_group(args, out, state.rewards)
        else:
            await score_samples(args, out, state.rewards)
        return out
    if not getattr(args, "group_rm", False):
        await score_sample(args, out, state.rewards)  # skips ABORTED samples
    return out


async def generate_group(state: _State, group: list[Sample]) -> list:
    """Generate a whole group concurrently; with `--group-rm` score it once all samples are done.

    The group list is updated in place so an aborted or cancelled task still leaves its samples.
    """
    results = await asyncio.gather(*(generate_one(state, s) for s in group))
    group[:] = results
    if getattr(state.args, "group_rm", False):
        samples = flatten(group)
        if not any(s.status == Sample.Status.ABORTED for s in samples):
            await score_group(state.args, samples, state.rewards)
    return group


def _first_index(group: list) -> int:
    first = flatten(group)[0]
    return first.index if first.index is not None else 0


def _reset_unfinished(group: list, rollout_id: int) -> None:
    for s in flatten(group):
        if s.status in (Sample.Status.PENDING, Sample.Status.ABORTED):
            s.status = Sample.Status.ABORTED if s.response_length else Sample.Status.PENDING
            s.reward = None
        s.metadata.setdefault("start_rollout_id", rollout_id)


async def train_rollout(args: Any, rollout_id: int, data_source: Any) -> RolloutFnTrainOutput:
    t_start = time.perf_counter()
    target = args.rollout_batch_size
    chunk = getattr(args, "over_sampling_batch_size", None) or target
    filter_fn = load_function(getattr(args, "dynamic_sampling_filter_path", None))
    state = _State(
        args=args,
        evaluation=False,
        sampling_params=default_sampling_params(args),
        semaphore=asyncio.Semaphore(getattr(args, "sglang_server_concurrency", 512) * _num_engines(args)),
    )
    kept: list[list] = []
    finished: list[list] = []  # every group that finished generating (kept or dropped by the filter)
    extra: list[list] = []  # groups that finished after the batch was full
    drops: Counter = Counter()
    groups_of: dict[asyncio.Task, list] = {}
    pending: set[asyncio.Task] = set()
    num_groups = 0
    try:
        while len(kept) < target:
            if len(kept) + len(pending) < target:
                if num_groups >= MAX_OVERSAMPLING * target:
                    raise RuntimeError(
                        f"rollout {rollout_id}: sampled {num_groups} groups but only {len(kept)} of {target} passed "
                        f"--dynamic-sampling-filter-path ({dict(drops)}); is the filter dropping everything?"
                    )
                new_groups = data_source.get_samples(chunk)
                if not new_groups and not pending:
                    raise RuntimeError(f"rollout {rollout_id}: the data source returned no samples")
                for group in new_groups:
                    task = asyncio.create_task(generate_group(state, group))
                    groups_of[task] = group
                    pending.add(task)
                    num_groups += 1
                if new_groups:
                    continue
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in sorted(done, key=lambda t: _first_index(groups_of[t])):
                group = task.result()
                if len(kept) >= target:
                    extra.append(group)
                    continue
                if any(s.status == Sample.Status.ABORTED for s in flatten(group)):  # aborted by the server
                    if getattr(args, "partial_rollout", False):
                        extra.append(group)  # continued in a later step
                    else:
                        drops["aborted"] += 1
                    continue
                finished.append(group)
                verdict = as_filter_output(filter_fn(args, group)) if filter_fn else None
                if verdict is not None and not verdict.keep:
                    drops[verdict.reason or "filtered"] += 1
                    continue
                kept.append(group)
        leftovers = await _abort_pending(state, pending, groups_of) if pending else []
    except BaseException:
        for task in pending:
            task.cancel()
        raise
    to_buffer = []
    if getattr(args, "partial_rollout", False):
        for group in extra + leftovers:
            _reset_unfinished(group, rollout_id)
            to_buffer.append(group)
        if to_buffer:
            data_source.add_samples(to_buffer)
    kept.sort(key=_first_index)
    sample_filter = load_function(getattr(args, "rollout_sample_filter_path", None))
    if sample_filter is not None:
        sample_filter(args, kept)
    process_all = load_function(getattr(args, "rollout_all_samples_process_path", None))
    if process_all is not None:
        process_all(args, sorted(finished, key=_first_index), data_source.get_samples)
    samples = flatten(kept)
    metrics = sample_metrics(args, samples)
    metrics.update(state.rewards.metrics())
    metrics.update({f"rollout/dynamic_filter/drop_{reason}": n for reason, n in drops.items()})
    metrics.update(
        {
            "rollout/dynamic_filter/drop_total": sum(drops.values()),
            "rollout/groups_generated": num_groups,
            "rollout/groups_aborted": len(leftovers),
            "rollout/groups_to_buffer": len(to_buffer),
            "rollout/buffer_length": getattr(data_source, "get_buffer_length", lambda: 0)(),
            "rollout/reward_seconds": state.rewards.seconds,
            "rollout/seconds": time.perf_counter() - t_start,
        }
    )
    metrics["rollout/removed_samples"] = sum(s.remove_sample for s in samples)
    logger.info(
        "rollout %d: kept %d/%d groups of %d sampled (%d filtered, %d aborted) in %.1fs",
        rollout_id, len(kept), target, num_groups, sum(drops.values()), len(leftovers), metrics["rollout/seconds"],
    )
    return RolloutFnTrainOutput(samples=kept, metrics=metrics)


async def _abort_pending(state: _State, pending: set[asyncio.Task], groups_of: dict, timeout: float = 300.0) -> list:
    """Abort in-flight requests, wait for the tasks (bounded), return their (partial) groups."""
    state.aborted = True
    await abort_all(state.args)
    done, still = await asyncio.wait(pending, timeout=timeout)
    for task in still:
        logger.warning("rollout: a group did not return %.0fs after abort; cancelling it", timeout)
        task.cancel()
    groups = []
    for task in pending:
        if task in done and task.exception() is not None:
            logger.warning("rollout: an aborted group failed: %r", task.exception())
        groups.append(groups_of[task])
    return sorted(groups, key=_first_index)


# ---------------------------------------------------------------------------------------------
# eval
# ---------------------------------------------------------------------------------------------
_EVAL_SOURCES: dict[tuple, Any] = {}


def _eval_source(args: Any, path: str, tokenizer: Any) -> Any:
    from miles.rollout.data import RolloutDataSource

    n = getattr(args, "n_samples_per_eval_prompt", 1)
    key = (path, n, getattr(args, "apply_chat_template", False), getattr(args, "input_key", None))
    if key not in _EVAL_SOURCES:
        eval_args = argparse.Namespace(**vars(args)) if isinstance(args, argparse.Namespace) else copy.copy(args)
        eval_args.n_samples_per_prompt = n
        eval_args.rollout_shuffle = False
        eval_args.skip_bad_rows = getattr(args, "skip_bad_rows", False)
        _EVAL_SOURCES[key] = RolloutDataSource(eval_args, tokenizer=tokenizer, prompt_data=path)
    src = _EVAL_SOURCES[key]
    src.epoch = src.offset = src.sample_index = src.group_index = 0
    return src


async def eval_rollout(args: Any, rollout_id: int, data_source: Any = None) -> RolloutFnEvalOutput:
    datasets = parse_eval_prompt_data(getattr(args, "eval_prompt_data", None))
    if not datasets:
        raise ValueError("eval needs --eval-prompt-data NAME PATH [NAME PATH ...]")
    reward_key = getattr(args, "eval_reward_key", None) or getattr(args, "reward_key", None)
    state = _State(
        args=args,
        evaluation=True,
        sampling_params=default_sampling_params(args, evaluation=True),
        semaphore=asyncio.Semaphore(getattr(args, "sglang_server_concurrency", 512) * _num_engines(args)),
    )
    data, metrics = {}, {}
    for name, path in datasets:
        src = _eval_source(args, path, getattr(data_source, "tokenizer", None))
        groups = src.get_samples(len(src))
        groups = await asyncio.gather(*(generate_group(state, g) for g in groups))
        samples = flatten(groups)
        rewards = [s.get_reward_value(args, reward_key) for s in samples]
        truncated = [s.status == Sample.Status.TRUNCATED for s in samples]
        data[name] = {"rewards": rewards, "truncated": truncated, "samples": samples}
        metrics[f"eval/{name}"] = sum(rewards) / len(rewards)
        metrics[f"eval/{name}-truncated_ratio"] = sum(truncated) / len(truncated)
        group_rewards = [[s.get_reward_value(args, reward_key) for s in flatten(g)] for g in groups]
        metrics.update(pass_at_k_metrics(f"eval/{name}/", group_rewards))
        metrics.update(sample_metrics(args, samples, prefix=f"eval/{name}/", reward_key=reward_key))
    metrics.update(state.rewards.metrics(prefix="eval/"))
    return RolloutFnEvalOutput(data=data, metrics=metrics)


# ---------------------------------------------------------------------------------------------
# entry point
# ---------------------------------------------------------------------------------------------
async def _run(args: Any, rollout_id: int, data_source: Any, evaluation: bool) -> Any:
    try:
        if evaluation:
            return await eval_rollout(args, rollout_id, data_source)
        return await train_rollout(args, rollout_id, data_source)
    finally:
        await close_client()


def generate_rollout(
    args: Any, rollout_id: int, data_source: Any, evaluation: bool = False
) -> RolloutFnTrainOutput | RolloutFnEvalOutput:
    """slime's default rollout function (sync; runs its own asyncio loop)."""
    return run_coro(_run(args, rollout_id, data_source, evaluation))


def call_rollout_function(path: str | None, args: Any, rollout_id: int, data_source: Any, evaluation: bool = False):
    """Load `--rollout-function-path` (default: ours), call it slime-style and wrap its return value."""
    fn = load_function(path) or generate_rollout
    out = fn(args, rollout_id, data_source, evaluation=evaluation)
    if asyncio.iscoroutine(out):
        out = run_coro(out)
    return wrap_output(out, evaluation)
