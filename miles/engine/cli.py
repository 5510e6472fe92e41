"""`miles generate`: offline generation from a jsonl of prompts with the native engine.

Input rows: {"prompt": str} | {"messages": [...]} (chat template applied) | {"input_ids": [int]}.
Output rows, in input order: {"index", "sample", "output_ids", "text", "logprobs", "finish_reason"}.
Every row is validated (JSON, fields, types, length against the context) before the model is loaded.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


class InputError(ValueError):
    pass


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="miles generate", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="HF checkpoint directory")
    p.add_argument("--prompts", required=True, help="input jsonl")
    p.add_argument("--output", required=True, help="output jsonl")
    p.add_argument("--n", type=int, default=1, help="samples per prompt")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--min-new-tokens", type=int, default=0)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=-1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--apply-chat-template", action="store_true", help="wrap 'prompt' rows as a user message")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--num-kv-blocks", type=int, default=None)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--no-progress", action="store_true")
    return p


def _ids_from_row(row, where: str, tokenizer, chat: bool, vocab: int, max_len: int) -> list[int]:
    if not isinstance(row, dict):
        raise InputError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if "input_ids" in row:
        ids = row["input_ids"]
        if not isinstance(ids, list) or not ids or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise InputError(f"{where}: 'input_ids' must be a non-empty list of integers")
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise InputError(f"{where}: 'input_ids' has token id {bad[0]} outside the vocabulary [0, {vocab})")
    elif "messages" in row:
        msgs = row["messages"]
        if not isinstance(msgs, list) or not msgs or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in msgs
        ):
            raise InputError(f"{where}: 'messages' must be a non-empty list of {{'role': str, 'content': str}}")
        try:
            ids = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False)
        except Exception as e:
            raise InputError(f"{where}: cannot apply the chat template ({e})") from e
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        ids = list(ids)
    elif "prompt" in row:
        text = row["prompt"]
        if not isinstance(text, str) or not text:
            raise InputError(f"{where}: 'prompt' must be a non-empty string")
        if chat:
            return _ids_from_row({"messages": [{"role": "user", "content": text}]}, where, tokenizer, chat, vocab,
                                 max_len)
        ids = tokenizer.encode(text, add_special_tokens=False)
    else:
        raise InputError(f"{where}: no usable field: expected 'prompt', 'messages' or 'input_ids' (got {sorted(row)})")
    if len(ids) >= max_len:
        raise InputError(f"{where}: prompt has {len(ids)} tokens, longer than the context ({max_len} tokens)")
    return ids


def read_prompts(path: str, tokenizer, chat: bool, vocab: int, max_len: int) -> list[list[int]]:
    """Parse and validate every row; raise InputError naming file:line on the first bad one."""
    prompts = []
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror})") from e
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from e
        prompts.append(_ids_from_row(row, where, tokenizer, chat, vocab, max_len))
    if not prompts:
        raise InputError(f"{path}: no prompts")
    return prompts


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from miles.engine import EngineConfig, LLMEngine, SamplingParams
    from miles.models import ModelConfig, load_tokenizer

    try:
        mc = ModelConfig.from_pretrained(args.model)
        tokenizer = load_tokenizer(args.model)
        max_len = min(args.max_model_len or mc.max_position_embeddings, mc.max_position_embeddings)
        prompts = read_prompts(args.prompts, tokenizer, args.apply_chat_template, mc.vocab_size, max_len)
        base = dict(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                    max_new_tokens=args.max_new_tokens, min_new_tokens=args.min_new_tokens, stop=args.stop,
                    ignore_eos=args.ignore_eos)
        SamplingParams(**base)  # validate before loading the model
        if args.n < 1:
            raise InputError(f"--n must be >= 1, got {args.n}")
    except ValueError as e:
        print(f"miles generate: error: {e}", file=sys.stderr)
        return 2
    engine = LLMEngine(EngineConfig(
        model=args.model, device=args.device, dtype=args.dtype, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=args.max_model_len,
        num_kv_blocks=args.num_kv_blocks, block_size=args.block_size, seed=args.seed,
    ), tokenizer=tokenizer)
    ids, keys = [], []
    for i, prompt in enumerate(prompts):
        for j in range(args.n):
            seed = (args.seed * 1_000_003 + i * args.n + j) % (1 << 62)
            ids.append(engine.add_request(prompt, SamplingParams(**base, seed=seed)))
            keys.append((i, j))
    outputs = engine.run_until_done(ids, progress=not args.no_progress)
    out_path = Path(args.output)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with out_path.open("w") as f:
        for (i, j), o in zip(keys, outputs):
            f.write(json.dumps({"index": i, "sample": j, "output_ids": o.output_ids, "text": o.text,
                                "logprobs": o.logprobs, "finish_reason": o.finish_reason}) + "\n")
    print(f"miles generate: wrote {len(outputs)} rows to {out_path}", file=sys.stderr)
    return 0
