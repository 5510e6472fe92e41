"""Engine vs HF transformers `generate` on randomly initialised Qwen3-0.6B / Qwen3-30B-A3B-shaped models (bf16).

One run, one card: 256 requests, prompt and output lengths uniform in [100, 1024], ignore_eos, temperature 1,
fixed seed. Prints output tokens/s for both, the ratio, and the engine's decode HBM-roofline fraction:
(bytes of weights + KV read per decode step) / step wall time / card bandwidth. HF generate is timed on a
subset of the same requests (it is slow); its tokens/s counts every token it generates, padding included
(generous to HF), so the ratio is per output token.

    PYTHONPATH=. python bench/bench_engine.py --shape dense --shape moe --json out.json
"""

from __future__ import annotations

import argparse
import gc
import json
import time

import numpy as np
import torch

SHAPES = {
    "dense": dict(  # Qwen3-0.6B
        architectures=["Qwen3ForCausalLM"], model_type="qwen3", vocab_size=151936, hidden_size=1024,
        intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
        max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=True,
        hidden_act="silu", attention_bias=False,
    ),
    "moe": dict(  # Qwen3-30B-A3B layout, 8 of its 48 layers
        architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", vocab_size=151936, hidden_size=2048,
        intermediate_size=6144, num_hidden_layers=8, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
        max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=False,
        hidden_act="silu", attention_bias=False, num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768,
        norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
    ),
}
PEAK_BW = [("H200", 4.8e12), ("H100 NVL", 3.9e12), ("H100 PCIe", 2.0e12), ("H100", 3.35e12), ("A100", 2.0e12)]


def build_models(shape: str, num_layers: int | None):
    import transformers

    from miles.models import CausalLM, ModelConfig, load_hf_items

    cfg = dict(SHAPES[shape])
    if num_layers:
        cfg["num_hidden_layers"] = num_layers
    hf_cfg = transformers.AutoConfig.for_model(**{k: v for k, v in cfg.items() if k != "architectures"})
    torch.manual_seed(0)
    with torch.device("cuda"):
        hf = transformers.AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.bfloat16, attn_implementation="sdpa")
    hf.eval()
    with torch.device("meta"):
        model = CausalLM(ModelConfig.from_hf(cfg, source=f"<{shape}>"))
    model = model.to(torch.bfloat16).to_empty(device="cuda")
    model.reset_buffers()
    load_hf_items(model, hf.state_dict().items(), strict=True, source="hf model")
    return hf, model.eval()


def make_requests(n: int, vocab: int, seed: int, lo: int = 100, hi: int = 1024):
    rng = np.random.default_rng(seed)
    plens, olens = rng.integers(lo, hi + 1, n), rng.integers(lo, hi + 1, n)
    prompts = [rng.integers(0, vocab, int(p)).tolist() for p in plens]
    return prompts, [int(o) for o in olens]


def weight_bytes_per_decode_step(model, batch: int) -> float:
    """Bytes of weights one decode step reads (MoE: the expected number of distinct experts touched)."""
    c = model.config
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    if not c.tie_word_embeddings:
        total -= model.model.embed_tokens.weight.numel() * model.model.embed_tokens.weight.element_size()
    if c.is_moe:
        per_expert = 3 * c.hidden_size * c.moe_intermediate_size * 2
        touched = c.num_experts * (1 - (1 - c.num_experts_per_tok / c.num_experts) ** batch)
        n_moe = sum(c.is_moe_layer(i) for i in range(c.num_hidden_layers))
        total -= n_moe * (c.num_experts - touched) * per_expert
    return total


def bench_engine(model, prompts, olens, seed: int, max_num_seqs: int, max_tokens: int, compile: bool) -> dict:
    from miles.engine import EngineConfig, LLMEngine, SamplingParams

    max_len = max(len(p) + o for p, o in zip(prompts, olens)) + 16
    cfg = EngineConfig(model="<in-memory>", device="cuda", dtype="bfloat16", max_num_seqs=max_num_seqs,
                       max_num_batched_tokens=max_tokens, max_model_len=max_len, load_tokenizer=False,
                       cuda_graph_max_bs=max_num_seqs, seed=seed, compile=compile)
    t = time.perf_counter()
    engine = LLMEngine(cfg, model=model)
    engine.capture_cuda_graphs()
    capture_s = time.perf_counter() - t
    warm = [SamplingParams(temperature=1.0, max_new_tokens=8, ignore_eos=True, seed=i) for i in range(4)]
    engine.generate([p[:300] for p in prompts[:4]], warm)  # Triton prefill/decode compilation
    engine.stats.trace = []
    engine.runner.event_log = []
    params = [SamplingParams(temperature=1.0, max_new_tokens=o, ignore_eos=True, seed=seed + i)
              for i, o in enumerate(olens)]
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    outs = engine.generate(prompts, params)
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    gen = sum(len(o.output_ids) for o in outs)
    assert all(len(o.output_ids) == n for o, n in zip(outs, olens)), "engine did not honour max_new_tokens"
    c = model.config
    kv_per_token = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * 2
    dec = [(dt, b, kv) for dt, b, _, d, kv in engine.stats.trace if d]
    dec_time = sum(dt for dt, _, _ in dec)
    dec_bytes = sum(weight_bytes_per_decode_step(model, b) + kv * kv_per_token for _, b, kv in dec)
    name = torch.cuda.get_device_name()
    bw = next(v for k, v in PEAK_BW + [("", 3.35e12)] if k in name)
    stats = engine.stats.as_dict(engine)
    ev = [(a.elapsed_time(b) / 1e3, d) for a, b, d, _ in engine.runner.event_log]
    gpu_decode = sum(t for t, d in ev if d)
    res = dict(
        engine_tok_s=gen / wall, engine_wall_s=wall, engine_tokens=gen, graph_capture_s=capture_s,
        decode_steps=len(dec), decode_time_s=dec_time, decode_tok_s=sum(b for _, b, _ in dec) / max(dec_time, 1e-9),
        decode_roofline=dec_bytes / max(dec_time, 1e-9) / bw,
        decode_achieved_gb_s=dec_bytes / max(dec_time, 1e-9) / 1e9,
        peak_gb_s=bw / 1e9, decode_gpu_time_s=gpu_decode,
        decode_roofline_gpu_only=dec_bytes / max(gpu_decode, 1e-9) / bw,
        mean_decode_batch=float(np.mean([b for _, b, _ in dec])) if dec else 0.0,
        steps=stats["num_steps"], preemptions=stats["num_preemptions"], kv_blocks=stats["num_kv_blocks"],
        max_batch=stats["max_batch_size"], graph_replays=stats["num_graph_replays"],
    )
    engine.sleep()
    del engine
    gc.collect()
    torch.cuda.empty_cache()
    return res


def profile_decode(model, compile: bool, batch: int = 128, ctx: int = 900) -> None:
    """Kernel-time table of eager decode steps (batch x ctx), then graph-replayed step times."""
    from torch.profiler import ProfilerActivity, profile

    from miles.engine import EngineConfig, LLMEngine, SamplingParams

    cfg = EngineConfig(model="<in-memory>", device="cuda", dtype="bfloat16", max_num_seqs=batch, max_model_len=2064,
                       load_tokenizer=False, cuda_graph_max_bs=batch, compile=compile, num_kv_blocks=batch * 70)
    engine = LLMEngine(cfg, model=model)
    engine.capture_cuda_graphs()
    rng = np.random.default_rng(1)
    for i in range(batch):
        engine.add_request(rng.integers(0, model.config.vocab_size, ctx).tolist(),
                           SamplingParams(max_new_tokens=64, ignore_eos=True, seed=i))
    while engine.scheduler.waiting or any(s.num_output == 0 for s in engine.scheduler.running):
        engine.step()
    engine.runner.use_cuda_graphs = False
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            engine.step()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=22), flush=True)
    engine.runner.use_cuda_graphs = True
    engine.runner.event_log = []
    t0 = time.perf_counter()
    for _ in range(20):
        engine.step()
    wall = (time.perf_counter() - t0) / 20
    gpu = np.mean([a.elapsed_time(b) for a, b, _, _ in engine.runner.event_log])
    print(f"graph decode step batch={batch} ctx~{ctx}: wall {wall * 1e3:.2f} ms, gpu {gpu:.2f} ms", flush=True)
    engine.runner.free_cache()


@torch.inference_mode()
def bench_hf(hf, prompts, olens, batch: int) -> dict:
    t_total, generated, useful = 0.0, 0, 0
    for i in range(0, len(prompts), batch):
        ps, os_ = prompts[i : i + batch], olens[i : i + batch]
        width, new = max(map(len, ps)), max(os_)
        ids = torch.zeros(len(ps), width, dtype=torch.long)
        mask = torch.zeros(len(ps), width, dtype=torch.long)
        for j, p in enumerate(ps):  # left padding
            ids[j, width - len(p) :] = torch.tensor(p)
            mask[j, width - len(p) :] = 1
        ids, mask = ids.cuda(), mask.cuda()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = hf.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                          max_new_tokens=new, min_new_tokens=new, pad_token_id=0, eos_token_id=None)
        torch.cuda.synchronize()
        t_total += time.perf_counter() - t0
        generated += (out.shape[1] - width) * len(ps)
        useful += sum(os_)
    return dict(hf_tok_s=generated / t_total, hf_useful_tok_s=useful / t_total, hf_wall_s=t_total,
                hf_requests=len(prompts), hf_batch=batch, hf_generated_tokens=generated)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", action="append", choices=sorted(SHAPES), help="repeatable; default: dense and moe")
    ap.add_argument("--num-requests", type=int, default=256)
    ap.add_argument("--hf-requests", type=int, default=32, help="HF generate is timed on the first N requests")
    ap.add_argument("--hf-batch", type=int, default=32)
    ap.add_argument("--num-layers", type=int, default=None, help="override the layer count (quick runs)")
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--min-len", type=int, default=100)
    ap.add_argument("--max-len", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                    help="torch.compile the CUDA-graph decode forward")
    ap.add_argument("--profile", action="store_true", help="print a kernel profile of one eager decode step")
    ap.add_argument("--json", default=None, help="write results here")
    args = ap.parse_args(argv)
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    for shape in args.shape or ["dense", "moe"]:
        hf, model = build_models(shape, args.num_layers)
        if args.profile:
            profile_decode(model, args.compile)
        prompts, olens = make_requests(args.num_requests, model.config.vocab_size, args.seed, args.min_len,
                                       args.max_len)
        r = dict(compile=args.compile, shape=shape, layers=model.config.num_hidden_layers, requests=args.num_requests,
                 output_tokens=sum(olens), params_b=sum(p.numel() for p in model.parameters()) / 1e9)
        r.update(bench_engine(model, prompts, olens, args.seed, args.max_num_seqs, args.max_num_batched_tokens,
                              args.compile))
        del model
        gc.collect()
        torch.cuda.empty_cache()
        if args.hf_requests > 0:
            r.update(bench_hf(hf, prompts[: args.hf_requests], olens[: args.hf_requests], args.hf_batch))
            r["speedup_vs_hf"] = r["engine_tok_s"] / r["hf_tok_s"]
        del hf
        gc.collect()
        torch.cuda.empty_cache()
        results[shape] = r
        print(json.dumps({shape: r}, indent=1), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
