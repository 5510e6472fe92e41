"""Prompt data source: jsonl/parquet rows → groups of `Sample`s, epoch/offset cursor, partial-rollout buffer.

`RolloutDataSourceWithBuffer(args, tokenizer=None)` follows slime's class of the same name:
`get_samples(num) -> list[list[Sample]]` (buffer first, then fresh prompts), `add_samples(groups)`,
`save(rollout_id)` / `load(rollout_id)`, `__len__`; plus `state_dict()` / `load_state_dict()`.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import random
from pathlib import Path
from typing import Any

from miles.rollout.hooks import load_function
from miles.rollout.sample import Sample

logger = logging.getLogger(__name__)


class BadRowError(ValueError):
    """A malformed prompt row; the message names file and line."""


# ---------------------------------------------------------------------------------------------
# reading rows
# ---------------------------------------------------------------------------------------------
def iter_rows(path: str | os.PathLike) -> Any:
    """Yield `(line_or_row_number, row_or_exception)` from a .jsonl or .parquet file (1-based numbers)."""
    path = str(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"prompt data file not found: {path}")
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        for i, row in enumerate(pq.read_table(path).to_pylist(), start=1):
            yield i, row
        return
    with open(path, encoding="utf-8") as fh:
        for i, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                yield i, json.loads(line)
            except json.JSONDecodeError as e:
                yield i, BadRowError(f"invalid JSON ({e.msg} at column {e.colno})")


def _maybe_json(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def row_to_sample(row: Any, args: Any, tokenizer: Any = None) -> Sample:
    """Build a prompt `Sample` from one row; raise BadRowError saying which field is wrong."""
    if isinstance(row, Exception):
        raise row
    if not isinstance(row, dict):
        raise BadRowError(f"row is a {type(row).__name__}, expected a JSON object")
    if args.input_key not in row:
        raise BadRowError(f"missing --input-key field {args.input_key!r} (row keys: {sorted(row)})")
    prompt = row[args.input_key]
    if args.apply_chat_template:
        prompt = _maybe_json(prompt)
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        if not (isinstance(prompt, list) and all(isinstance(m, dict) and "role" in m for m in prompt)):
            raise BadRowError(f"field {args.input_key!r} must be a message list [{{'role', 'content'}}...]")
    elif not isinstance(prompt, str):
        raise BadRowError(f"field {args.input_key!r} must be a string (or use --apply-chat-template)")
    label = None
    if args.label_key:
        if args.label_key not in row:
            raise BadRowError(f"missing --label-key field {args.label_key!r}")
        label = row[args.label_key]
        if label is not None and not isinstance(label, str):
            label = json.dumps(label) if isinstance(label, (dict, list)) else str(label)
    metadata = _maybe_json(row.get(args.metadata_key)) if args.metadata_key else None
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict):
        raise BadRowError(f"field {args.metadata_key!r} must be an object, got {type(metadata).__name__}")
    sample = Sample(prompt=prompt, label=label, metadata=dict(metadata))
    if args.apply_chat_template:
        if tokenizer is None:
            raise ValueError("--apply-chat-template needs a tokenizer (set --hf-checkpoint)")
        tools = _maybe_json(row.get(args.tool_key)) if args.tool_key else None
        kwargs = dict(getattr(args, "apply_chat_template_kwargs", None) or {})
        try:
            sample.prompt = tokenizer.apply_chat_template(
                prompt, tools=tools, tokenize=False, add_generation_prompt=True, **kwargs
            )
        except Exception as e:  # jinja errors on odd messages
            raise BadRowError(f"chat template failed: {e}") from e
    if tokenizer is not None:
        sample.tokens = list(tokenizer(sample.prompt, add_special_tokens=False)["input_ids"])
    return sample


def load_prompts(path: str, args: Any, tokenizer: Any = None) -> tuple[list[Sample], dict[str, int]]:
    """Read all prompts of `path`; returns (samples, counts of skipped/filtered rows)."""
    samples: list[Sample] = []
    counts = {"bad_rows": 0, "too_long": 0}
    first_error = None
    max_len = getattr(args, "rollout_max_prompt_len", None)
    for line, row in iter_rows(path):
        try:
            sample = row_to_sample(row, args, tokenizer)
        except BadRowError as e:
            msg = f"{path}:{line}: bad prompt row: {e}"
            if not getattr(args, "skip_bad_rows", False):
                raise BadRowError(msg + " (use --skip-bad-rows to skip such rows)") from None
            counts["bad_rows"] += 1
            first_error = first_error or msg
            continue
        if max_len is not None and tokenizer is not None and len(sample.tokens) > max_len:
            counts["too_long"] += 1
            continue
        sample.metadata.setdefault("source_line", line)
        samples.append(sample)
    if counts["bad_rows"]:
        logger.warning("%s: skipped %d bad rows (first: %s)", path, counts["bad_rows"], first_error)
    if counts["too_long"]:
        logger.info("%s: dropped %d prompts longer than %d tokens", path, counts["too_long"], max_len)
    if not samples:
        raise ValueError(f"{path}: no usable prompts (bad rows: {counts['bad_rows']}, too long: {counts['too_long']})")
    return samples, counts


def load_tokenizer_from_args(args: Any) -> Any:
    path = getattr(args, "hf_checkpoint", None)
    if not path:
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


# ---------------------------------------------------------------------------------------------
# data sources
# ---------------------------------------------------------------------------------------------
def pop_first(args: Any, rollout_id: Any, buffer: list[list[Sample]], num_samples: int) -> list[list[Sample]]:
    """Default buffer filter: take the oldest `num_samples` groups out of `buffer` (in place)."""
    taken = buffer[:num_samples]
    del buffer[:num_samples]
    return taken


class RolloutDataSource:
    """Epoch/offset cursor over a prompt file; each prompt becomes a group of n deep-copied samples."""

    def __init__(self, args: Any, tokenizer: Any = None, prompt_data: str | None = None):
        self.args = args
        path = prompt_data or args.prompt_data
        if not path:
            raise ValueError("--prompt-data is required for the default data source")
        needs_tok = args.apply_chat_template or getattr(args, "rollout_max_prompt_len", None) is not None
        if tokenizer is None and (needs_tok or getattr(args, "hf_checkpoint", None)):
            tokenizer = load_tokenizer_from_args(args)
        self.tokenizer = tokenizer
        self.path = path
        self.prompts, self.counts = load_prompts(path, args, tokenizer)
        self.seed = args.rollout_seed
        self.epoch = 0
        self.offset = 0
        self.sample_index = 0
        self.group_index = 0
        self._order = self._epoch_order(0)

    def __len__(self) -> int:
        return len(self.prompts)

    def _epoch_order(self, epoch: int) -> list[int]:
        order = list(range(len(self.prompts)))
        if self.args.rollout_shuffle:
            random.Random(self.seed + epoch).shuffle(order)
        return order

    def _next_prompt(self) -> Sample:
        if self.offset >= len(self._order):
            self.epoch += 1
            self.offset = 0
            self._order = self._epoch_order(self.epoch)
        prompt = self.prompts[self._order[self.offset]]
        self.offset += 1
        return prompt

    def get_samples(self, num_samples: int) -> list[list[Sample]]:
        """`num_samples` fresh groups of `n_samples_per_prompt` samples with running indices."""
        groups = []
        for _ in range(num_samples):
            proto = self._next_prompt()
            group = []
            for _ in range(self.args.n_samples_per_prompt):
                s = copy.deepcopy(proto)
                s.group_index = self.group_index
                s.index = self.sample_index
                self.sample_index += 1
                group.append(s)
            self.group_index += 1
            groups.append(group)
        return groups

    def add_samples(self, samples: list[list[Sample]]) -> None:
        if samples:
            raise RuntimeError("RolloutDataSource has no buffer; use RolloutDataSourceWithBuffer")

    def get_buffer_length(self) -> int:
        return 0

    # ---- checkpointing --------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "offset": self.offset,
            "sample_index": self.sample_index,
            "group_index": self.group_index,
            "rollout_seed": self.seed,
            "rollout_shuffle": bool(self.args.rollout_shuffle),
            "num_prompts": len(self.prompts),
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("num_prompts", len(self.prompts)) != len(self.prompts):
            raise ValueError(
                f"data state was saved for {state['num_prompts']} prompts but {self.path} has {len(self.prompts)}"
            )
        saved_seed = state.get("rollout_seed", self.seed)
        if saved_seed != self.seed:
            logger.warning("data state was saved with --rollout-seed %s (now %s); resuming its order", saved_seed,
                           self.seed)
            self.seed = saved_seed
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])
        self.sample_index, self.group_index = int(state["sample_index"]), int(state["group_index"])
        self._order = self._epoch_order(self.epoch)

    def _state_path(self, base: str, rollout_id: int) -> Path:
        return Path(base) / "rollout" / f"global_dataset_state_dict_{rollout_id}.pt"

    def save(self, rollout_id: int) -> None:
        """slime hook: write the state under `<args.save>/rollout/`."""
        if not getattr(self.args, "save", None):
            return
        import torch

        path = self._state_path(self.args.save, rollout_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(self.state_dict(), path)

    def load(self, rollout_id: int | None = None) -> None:
        """slime hook: read the state saved at `rollout_id` (default: the newest) under `<args.load>/rollout/`."""
        base = getattr(self.args, "load", None)
        if not base:
            return
        if rollout_id is None:
            files = (Path(base) / "rollout").glob("global_dataset_state_dict_*.pt")
            ids = [int(p.stem.rsplit("_", 1)[1]) for p in files]
            if not ids:
                return
            rollout_id = max(ids)
        path = self._state_path(base, rollout_id)
        if not path.exists():
            return
        import torch

        self.load_state_dict(torch.load(path, weights_only=False))


class RolloutDataSourceWithBuffer(RolloutDataSource):
    """Adds slime's buffer: groups handed back by `add_samples` are served first by `get_samples`."""

    def __init__(self, args: Any, tokenizer: Any = None, prompt_data: str | None = None):
        super().__init__(args, tokenizer, prompt_data)
        self.buffer: list[list[Sample]] = []
        self.buffer_filter = load_function(getattr(args, "buffer_filter_path", None)) or pop_first

    def get_samples(self, num_samples: int) -> list[list[Sample]]:
        groups: list[list[Sample]] = []
        if self.buffer:
            groups = list(self.buffer_filter(self.args, None, self.buffer, num_samples))[:num_samples]
        if len(groups) < num_samples:
            groups += super().get_samples(num_samples - len(groups))
        return groups

    def add_samples(self, samples: list[list[Sample]]) -> None:
        n = self.args.n_samples_per_prompt
        for group in samples:
            if len(group) != n:
                raise ValueError(f"add_samples: a group has {len(group)} samples, expected --n-samples-per-prompt {n}")
        self.buffer.extend(samples)

    def get_buffer_length(self) -> int:
        return len(self.buffer)

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["buffer"] = [[s.to_dict() for s in group] for group in self.buffer]
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.buffer = [[Sample.from_dict(d) for d in group] for group in state.get("buffer", [])]
