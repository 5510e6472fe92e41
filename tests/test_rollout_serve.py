"""The default rollout against the real stack: `miles serve` (tiny engine) behind `miles router`, on 127.0.0.1."""

import json

import pytest

from miles.engine import EngineConfig, LLMEngine, SamplingParams
from miles.rollout.config import default_args
from miles.rollout.data import RolloutDataSourceWithBuffer
from miles.rollout.generate import generate
from miles.rollout.rollout import generate_rollout
from miles.rollout.sample import Sample
from miles.serve.launch import ServerThread, serve_engine
from miles.serve.router import RouterConfig, build_router_app
from miles.testing import make_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return str(make_checkpoint(tmp_path_factory.mktemp("ckpt"), "qwen3", seed=0))


def _engine(path):
    return LLMEngine(EngineConfig(model=path, max_num_seqs=64, kv_cache_tokens=8192, max_model_len=256))


@pytest.fixture(scope="module")
def stack(ckpt):
    worker = serve_engine(_engine(ckpt))
    router = ServerThread(build_router_app(RouterConfig([worker.url], health_interval=0.2))).start()
    yield router.url
    router.stop()
    worker.stop()


def write_prompts(path, n):
    rows = [{"input": f"What is {i} plus {i}?", "label": str(2 * i)} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_rollout_through_router_matches_offline_engine(tmp_path, ckpt, stack):
    args = default_args(
        prompt_data=write_prompts(tmp_path / "p.jsonl", 4), label_key="label", hf_checkpoint=ckpt, router_url=stack,
        rm_type="exact", rollout_batch_size=2, n_samples_per_prompt=2, rollout_max_response_len=8,
        rollout_temperature=1e-8,  # greedy on the server
    )
    out = generate_rollout(args, 0, RolloutDataSourceWithBuffer(args))
    assert len(out.samples) == 2 and all(len(g) == 2 for g in out.samples)
    offline = _engine(ckpt)
    for group in out.samples:
        s = group[0]
        prompt_ids = s.tokens[: s.prompt_length]
        (ref,) = offline.generate([prompt_ids], SamplingParams(temperature=0.0, max_new_tokens=8))
        for s in group:
            assert s.tokens[s.prompt_length:] == list(ref.output_ids)
            assert s.response_length == len(ref.output_ids) <= 8
            assert len(s.rollout_log_probs) == len(s.loss_mask) == s.response_length
            assert all(lp <= 0.0 for lp in s.rollout_log_probs)
            assert s.status in (Sample.Status.COMPLETED, Sample.Status.TRUNCATED)
            assert s.reward in (0.0, 1.0) and len(s.weight_versions) == 1
    assert out.metrics["rollout/reward_errors"] == 0


async def quick_first_prompt(args, sample, sampling_params):
    """A custom generate hook (slime signature) wrapping the default one: prompt 0 gets a 4-token budget."""
    if sample.prompt.startswith("What is 0 plus"):
        sampling_params = {**sampling_params, "max_new_tokens": 4}
    return await generate(args, sample, sampling_params)


def test_partial_rollout_abort_and_continue_on_real_server(tmp_path, ckpt, stack):
    args = default_args(
        prompt_data=write_prompts(tmp_path / "p.jsonl", 8), label_key="label", hf_checkpoint=ckpt, router_url=stack,
        rm_type="exact", rollout_batch_size=1, n_samples_per_prompt=2, over_sampling_batch_size=6,
        rollout_max_response_len=200, partial_rollout=True,
        custom_generate_function_path=f"{__name__}.quick_first_prompt",
    )
    src = RolloutDataSourceWithBuffer(args)
    out = generate_rollout(args, 0, src)
    m = out.metrics
    assert len(out.samples) == 1 and m["rollout/groups_generated"] == 6
    assert out.samples[0][0].prompt.startswith("What is 0 plus") and out.samples[0][0].response_length <= 4
    assert m["rollout/groups_to_buffer"] == src.get_buffer_length() == 5
    kept_ids = {s.index for g in out.samples for s in g}
    buffered = [s for g in src.buffer for s in g]
    assert not kept_ids & {s.index for s in buffered}
    for s in buffered:
        assert s.status in (Sample.Status.ABORTED, Sample.Status.PENDING, Sample.Status.COMPLETED,
                            Sample.Status.TRUNCATED)
        assert len(s.loss_mask or []) == len(s.rollout_log_probs or []) == s.response_length
        assert s.metadata["start_rollout_id"] == 0
    partial = {s.index: list(s.tokens) for s in buffered if s.status is Sample.Status.ABORTED}
    assert len(partial) >= 6 and all(len(t) > 0 for t in partial.values())  # most were cut mid-generation
    # the next step serves the buffered groups first and continues the aborted samples from their tokens
    args.rollout_batch_size, args.over_sampling_batch_size = 5, 5
    out2 = generate_rollout(args, 1, src)
    got = {s.index: s for g in out2.samples for s in g}
    assert set(got) == {s.index for s in buffered}
    for idx, toks in partial.items():
        s = got[idx]
        assert s.tokens[: len(toks)] == toks and s.status is not Sample.Status.ABORTED
        assert s.response_length <= 200 and len(s.rollout_log_probs) == s.response_length
