"""Trainer throughput on one GPU: Miles FSDP2 trainer vs a plain HF transformers + torch AdamW step.

For each model shape (Qwen3-0.6B / 1.7B, random weights, bf16 compute, fp32 master weights + AdamW):
  * hf:          AutoModelForCausalLM (sdpa attention, torch.autocast bf16), [B, S] batches, CE over all tokens,
                 fused torch AdamW, clip-grad -- the plain baseline;
  * miles_step:  Trainer.train() end to end with one optimizer step per rollout (pi_old taken from the
                 training forward: forward + backward + AdamW, the same work as hf, plus GRPO advantages);
  * miles_rl:    Trainer.train() with a separate pi_old forward first (what each step of a multi-step rollout
                 pays), whose first call also checks that the ratio is exactly 1 on the GPU.
Each micro-batch packs `seqs_per_mb` sequences of `seq_len` tokens (~16k tokens); `mbs` micro-batches per
optimizer step. MFU = model FLOPs (6 N_matmul + causal attention per token; 2 N + attention for the extra
no-grad forward of miles_rl; recomputation not counted) / time / peak dense bf16 of the card.

    torchrun --nproc-per-node 1 bench/bench_trainer.py   (or plain `python bench/bench_trainer.py`)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import tempfile
import time

import torch
import torch.distributed as dist

SHAPES = {  # Qwen3 dense shapes (tied embeddings, vocab 151936)
    "qwen3-0.6b": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, tie_word_embeddings=True),
    "qwen3-1.7b": dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, tie_word_embeddings=True),
}
VOCAB = 151936


def peak_flops(name: str) -> float:
    """Dense bf16 peak of the card (no sparsity)."""
    if "H100" in name and "PCIe" in name:
        return 756e12
    if "H100" in name or "H200" in name or "H800" in name:
        return 989e12
    if "A100" in name:
        return 312e12
    return float("nan")


def hf_config(shape: dict):
    from transformers import Qwen3Config

    return Qwen3Config(vocab_size=VOCAB, max_position_embeddings=40960, rope_theta=1e6, rms_norm_eps=1e-6,
                       **shape)


def flops_per_token(shape: dict, seq_len: int, train: bool) -> float:
    """Matmul FLOPs per token (fwd+bwd when train) incl. lm_head and causal attention scores."""
    h, i, L = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    q, kv = shape["num_attention_heads"] * shape["head_dim"], shape["num_key_value_heads"] * shape["head_dim"]
    n = L * (h * q + 2 * h * kv + q * h + 3 * h * i) + VOCAB * h
    attn = L * 2 * q * seq_len  # QK^T and PV, causal (half of 2*2*q*s)
    mult = 3 if train else 1
    return mult * (2 * n + attn)


def timed(fn, iters: int) -> float:
    fn()  # warmup (compilation of kernels, allocator)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / iters


def bench_hf(cfg, args, gc_on: bool) -> dict:
    from transformers import AutoModelForCausalLM

    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation="sdpa")
    if gc_on:
        model.gradient_checkpointing_enable()
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=True)
    g = torch.Generator(device="cuda").manual_seed(0)
    data = [torch.randint(0, VOCAB, (args.seqs_per_mb, args.seq_len), device="cuda", generator=g)
            for _ in range(args.mbs)]

    def step():
        for ids in data:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids).loss / len(data)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    sec = timed(step, args.iters)
    return {"sec_per_step": sec, "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30}


def make_miles_checkpoint(cfg, path: str) -> None:
    from transformers import AutoModelForCausalLM

    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(path)
    del model
    torch.cuda.empty_cache()


def check_cpu_offload(path: str, args) -> dict:
    """One train() with --optimizer-cpu-offload (FSDP2 CPUOffloadPolicy): it runs, and how fast."""
    from miles.trainer.config import AlgoConfig, TrainerConfig
    from miles.trainer.trainer import Trainer

    try:
        cfg = TrainerConfig(lr=1e-6, device="cuda", use_dynamic_batch_size=True, optimizer_cpu_offload=True,
                            max_tokens_per_gpu=args.seqs_per_mb * args.seq_len, n_samples_per_prompt=args.seqs_per_mb)
        tr = Trainer(path, AlgoConfig(), cfg)
        g = torch.Generator().manual_seed(0)
        batch = [dict(tokens=torch.randint(0, VOCAB, (args.seq_len,), generator=g).tolist(),
                      response_length=args.seq_len - 1, reward=float(i % 2)) for i in range(args.seqs_per_mb)]
        tr.train(batch)
        torch.cuda.synchronize()
        t = time.perf_counter()
        m = tr.train(batch)
        torch.cuda.synchronize()
        return {"sec_per_step": time.perf_counter() - t, "tokens": args.seqs_per_mb * args.seq_len,
                "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30, "loss": m["loss"], "step": m["step"]}
    except Exception as e:  # report, keep benchmarking
        return {"error": repr(e)[:500]}


def bench_miles(path: str, args, compile_on: bool, gc_on: bool) -> dict:
    from miles.trainer.config import AlgoConfig, TrainerConfig
    from miles.trainer.trainer import Trainer

    tokens_per_mb = args.seqs_per_mb * args.seq_len
    cfg = TrainerConfig(lr=1e-6, device="cuda", use_dynamic_batch_size=True, max_tokens_per_gpu=tokens_per_mb,
                        gradient_checkpointing=gc_on, compile=compile_on, n_samples_per_prompt=args.seqs_per_mb,
                        log_probs_chunk_size=args.chunk)
    tr = Trainer(path, AlgoConfig(), cfg)
    g = torch.Generator().manual_seed(0)
    batch = [dict(tokens=torch.randint(0, VOCAB, (args.seq_len,), generator=g).tolist(),
                  response_length=args.seq_len - 1, reward=float(i % 2), group_index=i // args.seqs_per_mb)
             for i in range(args.mbs * args.seqs_per_mb * dist.get_world_size())]
    out = {}
    # one optimizer step per rollout: pi_old comes from the training forward (on-policy fast path)
    metrics: dict = {}
    out["sec_per_step"] = timed(lambda: metrics.update(tr.train(batch)), args.iters)
    # with a separate pi_old forward (what every step of a multi-step rollout pays); its first call is step 0
    tr.fast_on_policy = False
    first: dict = {}
    out["rl_sec_per_step"] = timed(lambda: first.setdefault("m", tr.train(batch)), args.iters)
    tr.fast_on_policy = True
    # pi_old forward == training forward on the GPU too (bf16; compiled or not): ratio exactly 1
    out["step0"] = {k: first["m"][k] for k in ("ppo_kl", "ratio_max", "ratio_min", "pg_clipfrac", "entropy")}
    out["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            tr.train(batch)
            torch.cuda.synchronize()
        rows = sorted(prof.key_averages(), key=lambda e: -e.self_device_time_total)[:args.profile]
        for e in rows:
            print(f"{e.self_device_time_total / 1e3:9.2f} ms {e.count:6d}  {e.key[:90]}", flush=True)
    out["last_metrics"] = {k: metrics[k] for k in ("loss", "grad_norm", "entropy", "step") if k in metrics}
    if args.check_offload:
        args.check_offload = False
        try:
            before = torch.cuda.memory_allocated()
            tr.offload()
            low = torch.cuda.memory_allocated()
            tr.onload()
            m = tr.train(batch)
            out["offload"] = {"alloc_gib_before": before / 2**30, "alloc_gib_offloaded": low / 2**30,
                              "loss_after_onload": m["loss"], "step_after_onload": m["step"]}
        except Exception as e:  # report, keep benchmarking
            out["offload"] = {"error": repr(e)[:500]}
    return out


def _release() -> None:
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


def run_with_fallback(fn, *a) -> tuple[dict, bool]:
    """Run without activation checkpointing; on OOM retry with it."""
    try:
        out = fn(*a, False), False
    except torch.OutOfMemoryError:
        _release()
        out = fn(*a, True), True
    _release()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="qwen3-0.6b,qwen3-1.7b")
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--seqs-per-mb", type=int, default=4, help="sequences packed per micro-batch")
    p.add_argument("--mbs", type=int, default=2, help="micro-batches per optimizer step")
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--chunk", type=int, default=4096, help="log-prob chunk size (tokens)")
    p.add_argument("--check-offload", action="store_true", help="offload()/onload() round trip (first model)")
    p.add_argument("--check-cpu-offload", action="store_true", help="one step with --optimizer-cpu-offload")
    p.add_argument("--profile", type=int, default=0, help="print the top-N CUDA ops of one Miles step")
    p.add_argument("--compile", action="store_true", help="also run the Miles trainer with --compile-model")
    p.add_argument("--skip-hf", action="store_true", help="only the Miles trainer")
    p.add_argument("--out", default=None, help="write results JSON here")
    args = p.parse_args()

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29512")
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    dist.init_process_group("nccl", rank=rank, world_size=world)
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dev = torch.cuda.get_device_name()
    peak = peak_flops(dev)
    tokens = args.seq_len * args.seqs_per_mb * args.mbs * world  # global tokens per optimizer step
    peak *= world
    if world > 1:
        args.skip_hf = True  # the HF baseline is single-GPU
    results = {"device": dev, "gpus": world, "torch": torch.__version__, "tokens_per_step": tokens,
               "tokens_per_micro_batch": args.seq_len * args.seqs_per_mb, "models": {}}
    for name in args.models.split(","):
        shape = SHAPES[name]
        cfg = hf_config(shape)
        f_train = flops_per_token(shape, args.seq_len, True)
        f_fwd = flops_per_token(shape, args.seq_len, False)
        r = {}
        if not args.skip_hf:
            hf, hf_gc = run_with_fallback(bench_hf, cfg, args)
            r["hf"] = {**hf, "grad_ckpt": hf_gc}
        with tempfile.TemporaryDirectory() as d:
            make_miles_checkpoint(cfg, d)
            for compile_on in ([False, True] if args.compile else [False]):
                mi, mi_gc = run_with_fallback(bench_miles, d, args, compile_on)
                tag = "+compile" if compile_on else ""
                r["miles_step" + tag] = {"sec_per_step": mi["sec_per_step"], "peak_mem_gib": mi["peak_mem_gib"],
                                         "grad_ckpt": mi_gc, "last_metrics": mi.get("last_metrics")}
                r["miles_rl" + tag] = {"sec_per_step": mi["rl_sec_per_step"], "grad_ckpt": mi_gc, "step0": mi["step0"]}
                if "offload" in mi:
                    r["offload_check"] = mi["offload"]
            if args.check_cpu_offload:
                args.check_cpu_offload = False
                r["optimizer_cpu_offload_check"] = check_cpu_offload(d, args)
                _release()
        for k, v in r.items():
            if "sec_per_step" not in v or "grad_ckpt" not in v:
                continue
            flops = tokens * (f_train + (f_fwd if k.startswith("miles_rl") else 0))
            v["tokens_per_s"] = tokens / v["sec_per_step"]
            v["mfu"] = flops / v["sec_per_step"] / peak
        results["models"][name] = r
        if rank == 0:
            print(json.dumps({name: r}, indent=1), flush=True)
    if rank == 0:
        print(f"\n{dev}: {tokens} tokens/step ({world} GPU x {args.mbs} x {args.seqs_per_mb} x {args.seq_len})")
        print(f"{'model':<12} {'impl':<19} {'tok/s':>9} {'MFU':>6} {'s/step':>7} {'GiB':>6} gc")
        for name, r in results["models"].items():
            for k, v in r.items():
                if "tokens_per_s" in v:
                    print(f"{name:<12} {k:<19} {v['tokens_per_s']:>9.0f} {v['mfu']:>6.1%} {v['sec_per_step']:>7.3f} "
                          f"{v.get('peak_mem_gib', float('nan')):>6.1f} {v['grad_ckpt']}")
            for k, v in r.items():
                if "step0" in v:
                    print(f"{name} {k} step 0: {v['step0']}")
                if k.endswith("check"):
                    print(f"{name} {k}: {v}")
        if args.out:
            with open(args.out, "w") as f:
                json.dump(results, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
