"""GPU path of the engine (Triton paged attention, CUDA graphs). Needs CUDA; also runnable as a script."""

from __future__ import annotations

import math

import pytest
import torch

from miles.engine import EngineConfig, LLMEngine, SamplingParams
from miles.engine.attention import AttnMetadata, KVCache, PagedAttention
from miles.models import VarlenAttention, token_logprobs
from miles.testing import make_checkpoint

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU path: needs CUDA (run on the GPU machine)")


def _mixed_batch(dtype, D=128, H=16, nkv=8, bs=16, specs=((700, 700), (1000, 1), (33, 1), (900, 130), (5, 5))):
    from miles.engine.triton_attention import PREFILL_BLOCK_M

    dev = "cuda"
    g = torch.Generator(device="cpu").manual_seed(0)
    nb = sum(math.ceil(c / bs) for c, _ in specs) + 3
    cache = KVCache(1, nb, bs, nkv, D, dtype, dev)
    cache.k.copy_(torch.randn(cache.k.shape, generator=g).to(dtype))
    cache.v.copy_(torch.randn(cache.v.shape, generator=g).to(dtype))
    perm = torch.randperm(nb, generator=g).tolist()
    tables, p, slots, qs = [], 0, [], []
    for c, ql in specs:
        n = math.ceil(c / bs)
        tables.append(perm[p : p + n])
        p += n
        qs.append(len(slots))
        slots += [tables[-1][pos // bs] * bs + pos % bs for pos in range(c - ql, c)]
    width = max(map(len, tables))
    qlens, clens = [q for _, q in specs], [c for c, _ in specs]
    dec = [i for i, q in enumerate(qlens) if q == 1]
    tiles = [(i, m) for i, q in enumerate(qlens) if q > 1 for m in range(0, q, PREFILL_BLOCK_M)]
    i32 = dict(dtype=torch.int32, device=dev)
    bt = torch.tensor([t + [0] * (width - len(t)) for t in tables], **i32)
    md = AttnMetadata(torch.tensor(slots, device=dev), bt,
                      torch.tensor(clens, **i32), torch.tensor(qs, **i32), torch.tensor(qlens, **i32), qlens, clens,
                      torch.tensor([qs[i] for i in dec], **i32), torch.tensor(dec, **i32),
                      torch.tensor([clens[i] for i in dec], **i32), torch.tensor(tiles, **i32).reshape(-1, 2))
    T = len(slots)
    q, k, v = (torch.randn(T, h, D, generator=g).to(dev, dtype) for h in (H, nkv, nkv))
    return cache, md, q, k, v


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_paged_attention_matches_sdpa(dtype):
    cache, md, q, k, v = _mixed_batch(dtype)
    ref = PagedAttention(cache, md, False)(0, q.float(), k, v)
    for parts in (1, 4):
        from miles.engine.triton_attention import partition_len

        out = PagedAttention(cache, md, True, parts, partition_len(1000, parts))(0, q, k, v).float()
        err = (out - ref).abs().max().item()
        print(f"triton vs sdpa {dtype} partitions={parts}: max |diff| = {err:.2e}")
        assert err < (2e-5 if dtype == torch.float32 else 2e-2)


@pytest.mark.parametrize("arch", ["qwen3", "qwen3_moe"])
def test_gpu_engine_greedy_matches_transformers_fp32(tmp_path, arch):
    import transformers

    path = make_checkpoint(tmp_path / arch, arch)
    engine = LLMEngine(EngineConfig(str(path), device="cuda", dtype="float32", block_size=16, max_num_seqs=8,
                                    max_num_batched_tokens=32, num_kv_blocks=64))
    tok = engine.tokenizer
    prompts = [tok.encode(t) for t in ["The quick brown fox", "What is 2 + 3? The answer is", "Once upon a time " * 4]]
    outs = engine.generate(prompts, SamplingParams(temperature=0, max_new_tokens=40, ignore_eos=True))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).cuda().eval()
    for ids, out in zip(prompts, outs):
        ref = hf.generate(torch.tensor([ids], device="cuda"), max_new_tokens=40, do_sample=False, eos_token_id=None,
                          pad_token_id=0)[0, len(ids) :].tolist()
        assert out.output_ids == ref
    if arch == "qwen3":
        assert engine.runner.num_graph_replays > 0  # decode ran through CUDA graphs


@pytest.mark.parametrize("compile", [False, True])
def test_gpu_engine_bf16_logprobs_close_to_full_forward(tmp_path, compile):
    path = make_checkpoint(tmp_path / "m", "qwen3_moe", num_hidden_layers=2)
    engine = LLMEngine(EngineConfig(str(path), device="cuda", dtype="bfloat16", num_kv_blocks=256, max_num_seqs=16,
                                    compile=compile))
    tok = engine.tokenizer
    prompts = [tok.encode(f"What is {i} + {i * 7}? Let us think step by step.") for i in range(12)]
    params = SamplingParams(temperature=1.0, max_new_tokens=48, seed=0, ignore_eos=True)
    outs = engine.generate(prompts, params)
    assert engine.runner.num_graph_replays > 0
    worst = 0.0
    for ids, out in zip(prompts, outs):
        full = torch.tensor(ids + out.output_ids, device="cuda")
        with torch.no_grad():
            h = engine.model(full, torch.arange(len(full), device="cuda"), VarlenAttention.from_lengths([len(full)]))
            lp, _ = token_logprobs(h[len(ids) - 1 : -1], engine.model.lm_head_weight, full[len(ids) :])
        worst = max(worst, (lp.cpu() - torch.tensor(out.logprobs)).abs().max().item())
    print(f"bf16 MoE engine (compile={compile}) vs full-forward logprob max |diff| = {worst:.3e}")
    assert worst < 0.1


if __name__ == "__main__":
    import sys
    import tempfile
    from pathlib import Path

    sys.exit(pytest.main([__file__, "-q", "-s", f"--basetemp={Path(tempfile.mkdtemp())}"]))
