"""Held-out exact-match accuracy of a checkpoint on the addition eval set, with the Miles engine (in-process).

    python examples/addition/evaluate.py CHECKPOINT [--temperature 0] [--data examples/addition/data/eval.jsonl]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def load_rows(path: str | Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def accuracy(checkpoint: str | Path, rows: list[dict], temperature: float = 0.0, seed: int = 0,
             max_new_tokens: int = 6, with_value: bool = False) -> float | tuple[float, float]:
    """Fraction of rows whose generated answer (up to eos) equals the label exactly; with ``with_value`` also
    the fraction whose answer has the right value (leading zeros allowed, e.g. "0357" for "357")."""
    from miles.engine import EngineConfig, LLMEngine, SamplingParams

    engine = LLMEngine(EngineConfig(model=str(checkpoint), device="cpu", kv_cache_tokens=16384, seed=seed))
    params = [SamplingParams(temperature=temperature, max_new_tokens=max_new_tokens, seed=seed * 100003 + i)
              for i in range(len(rows))]
    outs = engine.generate([r["prompt"] for r in rows], params)
    tok = engine.tokenizer
    texts = [tok.decode(o.output_ids, skip_special_tokens=True) if o.finish_reason == "stop" else "" for o in outs]
    exact = sum(t == r["label"] for t, r in zip(texts, rows)) / len(rows)
    value = sum(t.isdigit() and int(t) == int(r["label"]) for t, r in zip(texts, rows)) / len(rows)
    return (exact, value) if with_value else exact


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("--data", default=str(HERE / "data" / "eval.jsonl"))
    ap.add_argument("--temperature", type=float, nargs="+", default=[0.0, 1.0])
    args = ap.parse_args(argv)
    rows = load_rows(args.data)
    for t in args.temperature:
        print(f"{args.checkpoint}: exact match at T={t:g} on {len(rows)} held-out prompts: "
              f"{accuracy(args.checkpoint, rows, t):.3f}")


if __name__ == "__main__":
    main()
