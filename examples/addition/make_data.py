"""Deterministic data and tokenizer for the addition example.

Writes, next to this file (or under ``--out``):
  data/train.jsonl  GRPO prompts   {"prompt": "12+345=", "label": "357"}
  data/eval.jsonl   held-out eval  (disjoint from train and from the SFT pairs)
  tokenizer/        character-level tokenizer (AutoTokenizer-loadable, with eos/pad and a chat template)

Operands have 2 or 3 digits (chosen uniformly), so sums have 2-4 digits; a response is the sum followed by eos.
The SFT pairs used by ``make_checkpoint.py`` come from ``sft_pairs`` with a different seed; every split is
disjoint from the others by construction.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
CHARS = list("0123456789+=")
SPECIAL = ["<pad>", "<eos>", "<unk>"]
# The chat template is the identity on user content (so prompts render the same with or without
# --apply-chat-template); an assistant turn is its content followed by eos.
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['content'] }}{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{% endfor %}"
)


def _operand(rng: random.Random) -> int:
    digits = rng.choice((2, 3))
    return rng.randint(10 ** (digits - 1), 10**digits - 1)


def _pairs(rng: random.Random, n: int, exclude: set[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    seen = set(exclude)
    while len(out) < n:
        p = (_operand(rng), _operand(rng))
        if p not in seen:
            seen.add(p)
            out.append(p)
    return out


def splits(n_train: int = 4096, n_eval: int = 500, n_sft: int = 0, n_dev: int = 200,
           seed: int = 0) -> dict[str, list[tuple[int, int]]]:
    """Disjoint (a, b) pairs for the eval (held out), train (GRPO prompts), dev (SFT early stopping) and sft
    splits, drawn in that order from one seeded generator."""
    rng = random.Random(seed)
    ev = _pairs(rng, n_eval, set())
    tr = _pairs(rng, n_train, set(ev))
    dev = _pairs(rng, n_dev, set(ev) | set(tr))
    sft = _pairs(rng, n_sft, set(ev) | set(tr) | set(dev))
    return {"eval": ev, "train": tr, "dev": dev, "sft": sft}


def row(a: int, b: int) -> dict[str, str]:
    return {"prompt": f"{a}+{b}=", "label": str(a + b)}


def write_jsonl(path: Path, pairs: list[tuple[int, int]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for a, b in pairs:
            f.write(json.dumps(row(a, b)) + "\n")


def build_tokenizer(out_dir: Path) -> None:
    """A WordLevel tokenizer over single characters, saved with save_pretrained (AutoTokenizer-loadable)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()  # no spaces between characters
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>",
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out_dir))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=HERE)
    ap.add_argument("--n-train", type=int, default=4096)
    ap.add_argument("--n-eval", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    s = splits(args.n_train, args.n_eval, seed=args.seed)
    write_jsonl(args.out / "data" / "train.jsonl", s["train"])
    write_jsonl(args.out / "data" / "eval.jsonl", s["eval"])
    build_tokenizer(args.out / "tokenizer")
    print(f"wrote {len(s['train'])} train / {len(s['eval'])} eval rows and the tokenizer under {args.out}")


if __name__ == "__main__":
    main()
