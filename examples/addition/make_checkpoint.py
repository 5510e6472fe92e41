"""Regenerate the committed starting checkpoint of the addition example, deterministically, through Miles.

1. a seeded random Qwen3-style model (2 layers, hidden 128, 16-token character vocab) in HF format;
2. SFT with the Miles trainer (`loss_type="sft_loss"`, one gloo rank on CPU, 2000 steps of 128 pairs) on
   prompt -> answer pairs disjoint from the GRPO prompts and the held-out eval set. Half of the demonstrations
   zero-pad the answer to 4 digits ("0357" for 357), a style the exact-match reward rejects, so the SFT model
   often knows the sum but writes it in the rejected style, and its arithmetic is not perfect either;
3. `Trainer.export_hf` (safetensors + config) plus the tokenizer into ``--out``; prints held-out accuracy.

    python examples/addition/make_checkpoint.py            # -> examples/addition/checkpoint/  (~6 min on 2 cores)
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from evaluate import accuracy, load_rows  # noqa: E402
from make_data import build_tokenizer, row, splits  # noqa: E402

MODEL = dict(
    vocab_size=16, hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=32, max_position_embeddings=64, rms_norm_eps=1e-6, tie_word_embeddings=True,
    rope_parameters=dict(rope_type="default", rope_theta=10000.0), bos_token_id=None, eos_token_id=1, pad_token_id=0,
)


def init_checkpoint(path: Path, seed: int) -> None:
    """Seeded random Qwen3 weights (normal std 0.02, norms 1) + the character tokenizer, in HF format."""
    import transformers

    model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**MODEL))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            p.copy_(torch.ones_like(p) if "norm" in name else 0.02 * torch.randn(p.shape, generator=g))
    model.save_pretrained(str(path))
    build_tokenizer(path)


def sft_batches(max_steps: int, batch_size: int, seed: int, pad_frac: float, tok):
    """Deterministic SFT batches: prompt tokens + answer tokens + eos, loss on the answer only.

    A ``pad_frac`` share of the demonstrations writes the answer zero-padded to 4 digits ("0357").
    """
    pairs = splits(n_sft=max_steps * batch_size)["sft"]
    rng = random.Random(seed)
    rng.shuffle(pairs)
    for s in range(max_steps):
        batch = []
        for a, b in pairs[s * batch_size:(s + 1) * batch_size]:
            r = row(a, b)
            answer = r["label"].zfill(4) if rng.random() < pad_frac else r["label"]
            p = tok.encode(r["prompt"], add_special_tokens=False)
            ans = tok.encode(answer, add_special_tokens=False) + [tok.eos_token_id]
            batch.append({"tokens": p + ans, "response_length": len(ans)})
        yield batch


def report(path: Path, rows: list[dict]) -> str:
    """Greedy / T=1 exact match and greedy value match (zero padding allowed) on ``rows``."""
    exact0, value0 = accuracy(path, rows, 0.0, with_value=True)
    return f"greedy exact {exact0:.3f} (value {value0:.3f}) | T=1 exact {accuracy(path, rows, 1.0):.3f}"


def _init_dist() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=0, world_size=1)


def _export(trainer, path: Path) -> Path:
    if path.exists():
        shutil.rmtree(path)
    trainer.export_hf(path)
    build_tokenizer(path)
    return path


def make_checkpoint(out: Path, *, steps: int = 2000, batch_size: int = 128, lr: float = 1e-3, seed: int = 0,
                    pad_frac: float = 0.5, check_every: int = 250, snapshot_dir: Path | None = None) -> None:
    """Init + SFT + export to ``out``; every `check_every` steps prints greedy exact / value match on the dev split."""
    from transformers import AutoTokenizer

    from miles.trainer import AlgoConfig, Trainer, TrainerConfig

    torch.manual_seed(seed)
    _init_dist()
    dev = [row(a, b) for a, b in splits()["dev"]]
    with tempfile.TemporaryDirectory() as tmp:
        init = Path(tmp) / "init"
        init_checkpoint(init, seed)
        tok = AutoTokenizer.from_pretrained(str(init))
        cfg = TrainerConfig(lr=lr, lr_warmup_iters=100, weight_decay=0.0, clip_grad=1.0,
                            micro_batch_size=batch_size, device="cpu", seed=seed)
        trainer = Trainer(init, AlgoConfig(loss_type="sft_loss"), cfg)
        t0 = time.time()
        for step, batch in enumerate(sft_batches(steps, batch_size, seed, pad_frac, tok), start=1):
            loss = trainer.train(batch)["sft_loss"]
            if step % check_every == 0 or step == steps:
                snap = _export(trainer, (snapshot_dir or Path(tmp)) / f"step{step}")
                exact, value = accuracy(snap, dev, 0.0, with_value=True)
                print(f"sft step {step}/{steps}  loss {loss:.4f}  dev greedy exact {exact:.3f} (value {value:.3f})  "
                      f"{time.time() - t0:.0f}s", flush=True)
        _export(trainer, out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=HERE / "checkpoint")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pad-frac", type=float, default=0.5)
    ap.add_argument("--check-every", type=int, default=250)
    ap.add_argument("--snapshot-dir", type=Path, default=None, help="keep the exports of every check here")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # bitwise-reproducible across machines with different core counts
    make_checkpoint(args.out, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                    pad_frac=args.pad_frac, check_every=args.check_every, snapshot_dir=args.snapshot_dir)
    print(f"held-out (500 prompts): {report(args.out, load_rows(HERE / 'data' / 'eval.jsonl'))}")
    size = sum(f.stat().st_size for f in args.out.iterdir())
    print(f"wrote {args.out} ({size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
