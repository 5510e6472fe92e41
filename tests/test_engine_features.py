"""Engine request features on CPU: stops, abort, lengths, seeds, weight updates, pause, sleep/wake_up."""

from __future__ import annotations

import pytest
import torch

from miles.engine import EngineConfig, LLMEngine, SamplingParams
from miles.models import hf_items, load_model
from miles.testing import make_checkpoint

PROMPT = "Question: Natalia sold clips to 48 of her friends in April"


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("features")
    return {"a": make_checkpoint(root / "a", "qwen3", seed=0), "b": make_checkpoint(root / "b", "qwen3", seed=1)}


@pytest.fixture()
def engine(ckpts):
    return LLMEngine(EngineConfig(str(ckpts["a"]), block_size=4, kv_cache_tokens=1024))


def greedy(n=24, **kw):
    return SamplingParams(temperature=0, max_new_tokens=n, ignore_eos=True, **kw)


def test_stop_strings_trim_text(engine):
    base = engine.generate([PROMPT], greedy())[0]
    text = base.text
    assert text == engine.tokenizer.decode(base.output_ids, skip_special_tokens=True)
    mid = len(text) // 2
    while "\ufffd" in text[mid : mid + 3] or text.find(text[mid : mid + 3]) == 0:
        mid += 1
    stop = text[mid : mid + 3]
    cut = text.find(stop)
    assert len(stop) == 3 and cut > 0
    out = engine.generate([PROMPT], greedy(stop=[stop, "\x00never"]))[0]
    assert out.finish_reason == "stop" and out.matched_stop == stop
    assert out.text == text[:cut]
    assert out.output_ids == base.output_ids[: len(out.output_ids)] and len(out.output_ids) < len(base.output_ids)
    assert stop in engine.tokenizer.decode(out.output_ids)  # the completing token stays in output_ids
    kept = engine.generate([PROMPT], greedy(stop=stop, no_stop_trim=True))[0]
    assert kept.text == text[: cut + len(stop)]


def test_stop_token_ids_and_min_new_tokens(engine):
    base = engine.generate([PROMPT], greedy())[0].output_ids
    tok = base[3]
    first = base.index(tok)
    out = engine.generate([PROMPT], greedy(stop_token_ids=[tok]))[0]
    assert out.output_ids == base[: first + 1] and out.finish_reason == "stop" and out.matched_stop == tok
    late = engine.generate([PROMPT], greedy(stop_token_ids=[tok], min_new_tokens=first + 2))[0]
    assert tok not in late.output_ids[: first + 2]  # banned until min_new_tokens


def test_max_new_tokens_and_eos(engine):
    out = engine.generate([PROMPT], greedy(n=7))[0]
    assert len(out.output_ids) == 7 and len(out.logprobs) == 7 and out.finish_reason == "length"
    base = engine.generate([PROMPT], greedy(n=8))[0].output_ids
    assert engine.tokenizer.eos_token_id in engine.eos_ids
    engine.eos_ids = {base[2]}  # pretend the 3rd greedy token is EOS
    out = engine.generate([PROMPT], SamplingParams(temperature=0, max_new_tokens=8))[0]
    first = base.index(base[2])
    assert out.output_ids == base[: first + 1] and out.finish_reason == "stop" and out.matched_stop == base[2]
    assert engine.generate([PROMPT], greedy(n=8))[0].output_ids == base  # ignore_eos


def test_abort_mid_generation(engine):
    ids = engine.tokenizer.encode(PROMPT)
    a = engine.add_request(ids, greedy(n=30))
    b = engine.add_request(ids, greedy(n=30))
    for _ in range(5):
        engine.step()
    assert engine.abort(a) and not engine.abort("nope")
    outs = engine.step()
    aborted = [o for o in outs if o.request_id == a]
    assert len(aborted) == 1 and aborted[0].finish_reason == "abort" and aborted[0].finished
    assert 0 < len(aborted[0].output_ids) < 30
    final = {}
    while engine.has_unfinished():
        for o in engine.step():
            assert o.request_id == b
            final[o.request_id] = o
    assert final[b].finish_reason == "length" and len(final[b].output_ids) == 30
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_seed_reproducible_independent_of_batch(engine):
    ids = engine.tokenizer.encode(PROMPT)
    p = SamplingParams(temperature=1.0, max_new_tokens=16, seed=123, ignore_eos=True)
    alone = engine.generate([ids], p)[0]
    others = [SamplingParams(temperature=0.9, top_p=0.8, max_new_tokens=9, seed=s, ignore_eos=True) for s in range(5)]
    crowd = engine.generate([ids[:5], ids, ids[2:], ids[:9], ids[1:], ids[3:]], [others[0], p, *others[1:]])
    assert crowd[1].output_ids == alone.output_ids
    other_seed = engine.generate([ids], SamplingParams(temperature=1.0, max_new_tokens=16, seed=124, ignore_eos=True))
    assert other_seed[0].output_ids != alone.output_ids
    top1 = engine.generate([ids], SamplingParams(temperature=1.5, top_k=1, max_new_tokens=16, seed=5, ignore_eos=True))
    assert top1[0].output_ids == engine.generate([ids], greedy(n=16))[0].output_ids


def test_weight_update_in_memory_and_from_disk(ckpts, engine):
    ids = engine.tokenizer.encode(PROMPT)
    other = LLMEngine(EngineConfig(str(ckpts["b"]), block_size=4, kv_cache_tokens=1024))
    want_b = other.generate([ids], greedy())[0].output_ids
    want_a = engine.generate([ids], greedy())[0].output_ids
    assert want_a != want_b
    items = list(hf_items(load_model(ckpts["b"])))
    engine.pause()
    for i in range(0, len(items), 5):  # buckets
        engine.update_weights(items[i : i + 5], version=7)
    engine.resume()
    out = engine.generate([ids], greedy())[0]
    assert out.output_ids == want_b and out.weight_version == 7
    assert engine.update_weights_from_disk(ckpts["a"]) == 8
    out = engine.generate([ids], greedy())[0]
    assert out.output_ids == want_a and out.weight_version == 8
    with pytest.raises(KeyError, match="not in the model"):
        engine.update_weights([("model.layers.99.foo.weight", torch.zeros(3))])


def test_pause_resume(engine):
    rid = engine.add_request(engine.tokenizer.encode(PROMPT), greedy(n=4))
    engine.pause()
    assert engine.step() == [] and engine.has_unfinished()
    engine.resume()
    outs = []
    while engine.has_unfinished():
        outs += engine.step()
    assert outs[-1].request_id == rid and outs[-1].finished and sum(o.new_token_count for o in outs) == 4


def test_sleep_wake_up(engine):
    ids = engine.tokenizer.encode(PROMPT)
    want = engine.generate([ids], greedy())[0].output_ids
    rid = engine.add_request(ids, greedy())
    for _ in range(4):
        engine.step()
    engine.sleep()
    assert engine.runner.cache is None and engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    assert all(p.device.type == "cpu" for p in engine.model.parameters())
    assert engine.step() == []
    engine.wake_up()
    assert engine.runner.cache is not None
    final = [o for o in engine.run_until_done([rid])]
    assert final[0].output_ids == want and final[0].num_preemptions == 1
    assert engine.generate([ids], greedy())[0].output_ids == want


def test_flush_cache_and_stats(engine):
    ids = engine.tokenizer.encode(PROMPT)
    rid = engine.add_request(ids, greedy(n=3))
    engine.step()
    assert engine.flush_cache() is False  # requests in flight: nothing flushed (SGLang semantics)
    engine.run_until_done([rid])
    engine.generate([ids] * 3, greedy(n=3))  # the shared prefix is cached
    assert engine.block_manager.num_prefix_hit_blocks > 0
    assert engine.flush_cache() is True and not engine.block_manager.hash_to_block
    stats = engine.stats.as_dict(engine)
    assert stats["max_batch_size"] == 3 and stats["num_finished"] == 4 and stats["num_running"] == 0
    assert stats["num_generated_tokens"] == 12 and stats["weight_version"] == 0
