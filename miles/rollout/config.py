"""Typed flag groups owned by `miles.rollout` (data, rollout, rewards, eval).

Field names are the snake_case of slime's flags (`rollout_batch_size` ↔ `--rollout-batch-size`); each
field's `metadata["help"]` is its help text. Hooks receive `args`, a flat `argparse.Namespace` composed
from all groups (see `default_args`), so slime code reading `args.<name>` ports unchanged.

Router address: generate functions POST to `args.router_url` when set, else
`http://{args.sglang_router_ip}:{args.sglang_router_port}` (slime's names; the loop fills them in).
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any


def _f(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class DataConfig:
    prompt_data: str | None = _f(None, "Prompt file: .jsonl (one JSON object per line) or .parquet.")
    input_key: str = _f("input", "Prompt field (a message list when --apply-chat-template).")
    label_key: str | None = _f(None, "Label field → Sample.label.")
    metadata_key: str = _f("metadata", "Metadata field → Sample.metadata.")
    tool_key: str = _f("tools", "Tools field passed to the chat template.")
    apply_chat_template: bool = _f(False, "Render prompts with the tokenizer's chat template.")
    apply_chat_template_kwargs: dict = _f({}, "Extra chat-template kwargs (JSON).")
    rollout_shuffle: bool = _f(False, "Shuffle prompts each epoch.")
    rollout_seed: int = _f(42, "Shuffle seed (epoch e uses rollout_seed + e).")
    num_epoch: int | None = _f(None, "Epochs; num_rollout = num_epoch × (len(dataset) // rollout_batch_size).")
    num_rollout: int | None = _f(None, "Number of rollout steps.")
    skip_bad_rows: bool = _f(False, "Skip (and count) malformed rows instead of failing.")
    rollout_max_prompt_len: int | None = _f(None, "Drop prompts longer than this many tokens at load time.")
    data_source_path: str = _f("miles.rollout.data.RolloutDataSourceWithBuffer", "Data source class (slime hook).")
    buffer_filter_path: str | None = _f(None, "Buffer dequeue policy `fn(args, rollout_id, buffer, num)`.")


@dataclass
class RolloutConfig:
    rollout_batch_size: int = _f(8, "Prompt groups per rollout step.")
    n_samples_per_prompt: int = _f(1, "Responses per prompt (group size).")
    over_sampling_batch_size: int | None = _f(None, "Groups fetched per sampling round (≥ rollout_batch_size).")
    rollout_max_response_len: int = _f(1024, "max_new_tokens per sample.")
    rollout_temperature: float = _f(1.0, "Sampling temperature.")
    rollout_top_p: float = _f(1.0, "Top-p.")
    rollout_top_k: int = _f(-1, "Top-k (-1 = off).")
    rollout_stop: list[str] | None = _f(None, "Stop strings.", nargs="+")
    rollout_stop_token_ids: list[int] | None = _f(None, "Stop token ids.", nargs="+")
    rollout_skip_special_tokens: bool = _f(False, "Passed to the server as skip_special_tokens.")
    rollout_deterministic_sampling: bool = _f(
        False, "Send sampling_seed = rollout_seed + sample.index with each request (slime's deterministic "
        "inference): a rerun or a resume samples the same tokens."
    )
    partial_rollout: bool = _f(False, "Return groups aborted mid-generation to the buffer; continue them later.")
    mask_offpolicy_in_partial_rollout: bool = _f(False, "Resumed samples: earlier tokens get loss mask 0.")
    dynamic_sampling_filter_path: str | None = _f(None, "Per-group filter `fn(args, samples) -> keep`.")
    rollout_sample_filter_path: str | None = _f(None, "`fn(args, groups) -> None`; sets sample.remove_sample.")
    rollout_all_samples_process_path: str | None = _f(
        None, "`fn(args, all_groups, get_samples) -> None` on every finished group (kept and filtered)."
    )
    custom_generate_function_path: str | None = _f(None, "`async def generate(args, sample, sampling_params)`.")
    rollout_function_path: str = _f("miles.rollout.rollout.generate_rollout", "Rollout function (slime hook).")
    eval_function_path: str | None = _f(None, "Eval rollout function (default: --rollout-function-path).")
    sglang_router_ip: str | None = _f(None, "Router host (filled by the loop).")
    sglang_router_port: int | None = _f(None, "Router port (filled by the loop).")
    router_url: str | None = _f(None, "Full router URL; overrides ip/port.")
    sglang_server_concurrency: int = _f(512, "Max in-flight generate calls per engine.")
    rollout_request_timeout: float = _f(3600.0, "Seconds before one /generate call times out.")
    rollout_request_retries: int = _f(3, "Retries of a /generate call on connection errors or 5xx.")


@dataclass
class RewardConfig:
    rm_type: str | None = _f(None, "Built-in reward: math, boxed, exact, f1, remote (also boxed_<type>).")
    rm_url: str | None = _f(None, "Endpoint for --rm-type remote (POST {prompt, response, label}).")
    custom_rm_path: str | None = _f(None, "`async def rm(args, sample) -> float | dict` (or group form).")
    group_rm: bool = _f(False, "Score whole groups: `async def rm(args, samples) -> list`.")
    reward_key: str | None = _f(None, "Key into dict rewards for training.")
    eval_reward_key: str | None = _f(None, "Key into dict rewards for eval (default: --reward-key).")
    rm_timeout: float = _f(60.0, "Per-sample (per-group with --group-rm) reward timeout in seconds.")
    rm_default_reward: float = _f(0.0, "Reward given when the reward function raises or times out.")
    rm_max_retries: int = _f(10, "Retries of the remote reward call.")
    rm_retry_backoff: float = _f(0.5, "First backoff (seconds, doubling, max 10) between remote reward retries.")


@dataclass
class EvalConfig:
    eval_interval: int | None = _f(None, "Evaluate before step 0 and every N steps.")
    eval_prompt_data: list[str] | None = _f(None, "NAME PATH [NAME PATH ...] eval datasets.", nargs="+")
    n_samples_per_eval_prompt: int = _f(1, "Responses per eval prompt (pass@k uses k ≤ this).")
    eval_max_response_len: int | None = _f(None, "Eval max_new_tokens (default: rollout's).")
    eval_temperature: float | None = _f(None, "Eval temperature (default: rollout's).")
    eval_top_p: float | None = _f(None, "Eval top-p (default: rollout's).")
    eval_top_k: int | None = _f(None, "Eval top-k (default: rollout's).")


GROUPS = (DataConfig, RolloutConfig, RewardConfig, EvalConfig)


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one group's fields to `parser` as `--kebab-case` flags."""
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        meta = dict(f.metadata)
        help_text = meta.pop("help", "")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        typ = str(f.type)
        if typ == "bool":
            parser.add_argument(flag, action="store_true", default=default, help=help_text)
        elif "dict" in typ:
            import json

            parser.add_argument(flag, type=json.loads, default=default, help=help_text)
        else:
            conv = int if "int" in typ and "float" not in typ else float if "float" in typ else str
            parser.add_argument(flag, type=conv, default=default, help=help_text, **meta)


def default_args(**overrides: Any) -> argparse.Namespace:
    """A flat Namespace with every rollout/data/reward/eval default, updated by `overrides`."""
    values: dict[str, Any] = {}
    for cls in GROUPS:
        values.update(dataclasses.asdict(cls()))
    values.update(overrides)
    return argparse.Namespace(**values)


def parse_eval_prompt_data(items: list[str] | None) -> list[tuple[str, str]]:
    """`NAME PATH [NAME PATH ...]` → [(name, path)]; a single PATH is named after its file stem."""
    if not items:
        return []
    if len(items) == 1:
        from pathlib import Path

        return [(Path(items[0]).stem, items[0])]
    if len(items) % 2:
        raise ValueError(f"--eval-prompt-data expects NAME PATH pairs, got {len(items)} values: {items}")
    return [(items[i], items[i + 1]) for i in range(0, len(items), 2)]


def validate(args: Any) -> None:
    """Check the rollout-side flags for consistency; raise ValueError naming the flags."""
    if args.over_sampling_batch_size is not None and args.over_sampling_batch_size < args.rollout_batch_size:
        raise ValueError(
            f"--over-sampling-batch-size ({args.over_sampling_batch_size}) must be >= "
            f"--rollout-batch-size ({args.rollout_batch_size})"
        )
    if args.rollout_batch_size < 1 or args.n_samples_per_prompt < 1:
        raise ValueError("--rollout-batch-size and --n-samples-per-prompt must be >= 1")
    if args.rm_type in ("remote", "remote_rm") and not args.rm_url:
        raise ValueError("--rm-type remote needs --rm-url")
    if args.rm_timeout <= 0:
        raise ValueError(f"--rm-timeout must be > 0, got {args.rm_timeout}")
    parse_eval_prompt_data(args.eval_prompt_data)
