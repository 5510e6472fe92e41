"""Native engine correctness on CPU with tiny checkpoints: HF parity, logprobs, prefix sharing, preemption."""

from __future__ import annotations

import pytest
import torch
import transformers

from miles.engine import EngineConfig, LLMEngine, SamplingParams
from miles.models import RoutingCapture, VarlenAttention, token_logprobs
from miles.testing import make_checkpoint

PROMPTS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is 2 + 3? The answer",
    "Hello world! How are you today? I am fine, thank you. Please write a short poem about the sea.",
    "Once upon a time",
]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine")
    return {arch: make_checkpoint(root / arch, arch) for arch in ("qwen3", "qwen3_moe")}


def make_engine(path, **kw) -> LLMEngine:
    kw.setdefault("block_size", 4)
    kw.setdefault("kv_cache_tokens", 2048)
    return LLMEngine(EngineConfig(str(path), device="cpu", dtype="float32", **kw))


def encode(engine, texts):
    return [engine.tokenizer.encode(t, add_special_tokens=False) for t in texts]


@pytest.mark.parametrize("arch", ["qwen3", "qwen3_moe"])
def test_greedy_matches_transformers_generate(ckpts, arch):
    engine = make_engine(ckpts[arch], max_num_batched_tokens=16)  # chunked prefill while others decode
    prompts = encode(engine, PROMPTS)
    outs = engine.generate(prompts, SamplingParams(temperature=0, max_new_tokens=24, ignore_eos=True))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(ckpts[arch]), dtype=torch.float32).eval()
    for ids, out in zip(prompts, outs):
        ref = hf.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0)
        assert out.output_ids == ref[0, len(ids) :].tolist()
        assert out.finish_reason == "length" and out.finished
    assert max(engine.stats.batch_sizes) > 1  # requests really were batched


@pytest.mark.parametrize("arch", ["qwen3", "qwen3_moe"])
def test_logprobs_match_full_forward(ckpts, arch):
    engine = make_engine(ckpts[arch])
    prompts = encode(engine, PROMPTS[:3])
    params = [SamplingParams(temperature=0.7, max_new_tokens=16, seed=1, ignore_eos=True),
              SamplingParams(temperature=0, max_new_tokens=16, ignore_eos=True),
              SamplingParams(temperature=1.3, top_p=0.9, top_k=20, max_new_tokens=16, seed=2, ignore_eos=True)]
    outs = engine.generate(prompts, params)
    worst = 0.0
    model = engine.model
    for ids, p, out in zip(prompts, params, outs):
        full = torch.tensor(ids + out.output_ids)
        with torch.no_grad():
            hidden = model(full, torch.arange(len(full)), VarlenAttention.from_lengths([len(full)]))
            logp, _ = token_logprobs(hidden[len(ids) - 1 : -1], model.lm_head_weight, full[len(ids) :],
                                     temperature=p.temperature or 1.0)
        worst = max(worst, (logp - torch.tensor(out.logprobs)).abs().max().item())
    print(f"\n[{arch}] engine vs full-forward logprob max |diff| = {worst:.3e}")
    assert worst < 1e-5


@pytest.mark.parametrize("budget", [8192, 8])  # 8: the first sample's prompt is prefilled in chunks
def test_prefix_sharing_allocates_prompt_once(ckpts, budget):
    prompt = list(range(10, 31))  # 21 tokens, block_size 4: 5 shareable full blocks
    params = [SamplingParams(temperature=1.0, max_new_tokens=12, seed=s, ignore_eos=True) for s in range(8)]
    results = {}
    for on in (True, False):
        engine = make_engine(ckpts["qwen3"], enable_prefix_caching=on, max_num_batched_tokens=budget)
        outs = engine.generate([prompt] * 8, params)
        results[on] = ([o.output_ids for o in outs], [o.logprobs for o in outs], engine.block_manager)
    (ids_on, lp_on, bm_on), (ids_off, lp_off, bm_off) = results[True], results[False]
    assert ids_on == ids_off
    assert torch.allclose(torch.tensor(lp_on), torch.tensor(lp_off), atol=1e-6)
    assert len({tuple(x) for x in ids_on}) > 1  # different seeds, different samples
    assert bm_on.num_prefix_hit_blocks == 7 * 5  # samples 2..8 reuse the 5 full prompt blocks
    assert bm_off.num_prefix_hit_blocks == 0
    assert bm_off.num_allocated_blocks - bm_on.num_allocated_blocks == 7 * 5


def test_prefix_cache_reused_across_requests(ckpts):
    engine = make_engine(ckpts["qwen3"])
    system = list(range(40, 72))  # 32 tokens = 8 blocks
    a = engine.generate([system + [5, 6, 7]], SamplingParams(temperature=0, max_new_tokens=4))[0]
    b = engine.generate([system + [8, 9]], SamplingParams(temperature=0, max_new_tokens=4))[0]
    assert a.cached_tokens == 0 and b.cached_tokens == 32
    fresh = make_engine(ckpts["qwen3"], enable_prefix_caching=False)
    again = fresh.generate([system + [8, 9]], SamplingParams(temperature=0, max_new_tokens=4))[0]
    assert again.output_ids == b.output_ids


def test_preemption_under_tiny_cache_matches_large_cache(ckpts):
    prompts = [list(range(3 + i, 12 + 2 * i)) for i in range(6)]
    params = [SamplingParams(temperature=0.8, max_new_tokens=20, seed=i, ignore_eos=True) for i in range(6)]
    big = make_engine(ckpts["qwen3_moe"]).generate(prompts, params)
    tiny = make_engine(ckpts["qwen3_moe"], num_kv_blocks=10, max_num_batched_tokens=7)
    small = tiny.generate(prompts, params)
    assert tiny.scheduler.num_preemptions > 0
    assert any(o.num_preemptions > 0 for o in small)
    assert [o.output_ids for o in small] == [o.output_ids for o in big]
    diff = (torch.tensor([o.logprobs for o in small]) - torch.tensor([o.logprobs for o in big])).abs().max().item()
    assert diff < 1e-5
    assert tiny.block_manager.num_free_blocks == 10  # everything released


def test_request_that_can_never_fit_fails_clearly(ckpts):
    engine = make_engine(ckpts["qwen3"], num_kv_blocks=4)
    with pytest.raises(ValueError, match="needs 5 KV blocks but the cache has only 4"):
        engine.add_request(list(range(10)), SamplingParams(max_new_tokens=8))
    with pytest.raises(ValueError, match="context"):
        make_engine(ckpts["qwen3"], max_model_len=16).add_request(list(range(20)))
    engine.add_request(list(range(10)), SamplingParams(max_new_tokens=6, temperature=0))  # 16 tokens fit exactly
    while engine.has_unfinished():
        engine.step()


def test_routed_experts_match_full_forward(ckpts):
    engine = make_engine(ckpts["qwen3_moe"], num_kv_blocks=12)
    prompt = encode(engine, PROMPTS[:1])[0]
    p = SamplingParams(temperature=0, max_new_tokens=10, return_routed_experts=True, ignore_eos=True)
    out = engine.generate([prompt], p)[0]
    full = torch.tensor(prompt + out.output_ids)[:-1]  # the last sampled token is never forwarded
    cap = RoutingCapture()
    with torch.no_grad():
        engine.model(full, torch.arange(len(full)), VarlenAttention.from_lengths([len(full)]), cap)
    assert torch.equal(torch.tensor(out.routed_experts), cap.stacked())


def test_abort_waiting_request_and_unknown_ids(ckpts):
    engine = make_engine(ckpts["qwen3"], max_num_seqs=1)
    a = engine.add_request([5, 6, 7], SamplingParams(temperature=0, max_new_tokens=5))
    b = engine.add_request([8, 9], SamplingParams(temperature=0, max_new_tokens=5))
    engine.step()  # a runs, b waits (max_num_seqs=1)
    assert engine.abort(b)
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request([1, 2], request_id=a)
    outs = {}
    while engine.has_unfinished():
        for o in engine.step():
            outs[o.request_id] = o
    assert outs[b].finish_reason == "abort" and outs[b].output_ids == []
    assert outs[a].finish_reason == "length" and len(outs[a].output_ids) == 5


def test_random_interleaving_keeps_invariants(ckpts):
    """Random adds / aborts / steps under a tiny cache with prefix sharing and chunked prefill: no crash, no hang,
    no leaked block, and every request that was not aborted matches an uncontended run."""
    import random

    rng = random.Random(0)
    shared = list(range(50, 62))
    reqs = []
    for i in range(24):
        prompt = (shared if i % 2 else []) + [rng.randrange(3, 400) for _ in range(rng.randint(1, 9))]
        reqs.append((prompt, SamplingParams(temperature=rng.choice([0, 0.9]), seed=i, ignore_eos=True,
                                            max_new_tokens=rng.randint(1, 10))))
    ref = make_engine(ckpts["qwen3"]).generate([p for p, _ in reqs], [s for _, s in reqs])
    engine = make_engine(ckpts["qwen3"], num_kv_blocks=9, max_num_batched_tokens=6, max_num_seqs=6)
    pending, done, aborted = list(range(len(reqs))), {}, set()
    for _ in range(2000):
        if pending and rng.random() < 0.7:
            i = pending.pop(0)
            engine.add_request(reqs[i][0], reqs[i][1], request_id=str(i))
        if rng.random() < 0.05 and engine.scheduler.running:
            victim = rng.choice(engine.scheduler.running).request_id
            engine.abort(victim)
            aborted.add(int(victim))
        for o in engine.step():
            if o.finished:
                done[int(o.request_id)] = o
        if not pending and not engine.has_unfinished():
            break
    assert len(done) == len(reqs)
    for i, o in done.items():
        if i in aborted:
            assert o.finish_reason == "abort"
        else:
            assert o.output_ids == ref[i].output_ids and o.finish_reason == "length"
    bm = engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks and all(b.ref_count == 0 for b in bm.blocks)
    assert engine.scheduler.num_preemptions > 0 and bm.num_prefix_hit_blocks > 0
