"""Default generate + rollout function against a real scripted SGLang-shaped HTTP server on 127.0.0.1."""

import asyncio
import json
import re
import time
from collections import Counter

import pytest

from miles.rollout.config import default_args
from miles.rollout.data import RolloutDataSourceWithBuffer
from miles.rollout.generate import generate
from miles.rollout.http import HTTPRequestError, close_client
from miles.rollout.rollout import RolloutFnEvalOutput, RolloutFnTrainOutput, call_rollout_function, generate_rollout
from miles.rollout.sample import Sample
from miles.rollout.scripted_server import ScriptedReply, ScriptedServer, scripted_logprob
from miles.testing import make_tokenizer


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    make_tokenizer(path)
    return str(path)


@pytest.fixture(scope="module")
def tok(tok_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tok_dir)


def prompt_of(i):
    return f"What is {i} plus {i}?"


class Script:
    """Answers prompt i with "The answer is \\boxed{2i}" on its odd-numbered calls and 2i+1 on even ones;
    prompts with i % 3 == 0 are always right (a zero-std group). Prompts in `hold` wait for an abort
    and then return their first 2 tokens; a continuation gets the rest of the answer."""

    def __init__(self, tok, hold=(), slow=None):
        self.tok, self.hold, self.calls, self.slow = tok, set(hold), Counter(), dict(slow or {})

    def ids(self, text):
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def answer(self, i, correct):
        return self.ids(f"The answer is \\boxed{{{2 * i if correct else 2 * i + 1}}}")

    def __call__(self, input_ids, params):
        i = int(re.search(r"What is (\d+) plus", self.tok.decode(input_ids)).group(1))
        done = len(input_ids) - len(self.ids(prompt_of(i)))
        if i in self.hold and done == 0:
            return ScriptedReply(self.answer(i, True), hold=True, partial=2)
        self.calls[i] += 1
        correct = i % 3 == 0 or self.calls[i] % 2 == 1
        eos = self.tok.eos_token_id
        return ScriptedReply(self.answer(i, correct)[done:] + [eos], "stop", matched=eos, delay=self.slow.get(i, 0.0))


def server_for(tok, script):
    return ScriptedServer(script, decode=lambda ids: tok.decode(ids, skip_special_tokens=True))


def write_prompts(path, ids):
    path.write_text("".join(json.dumps({"input": prompt_of(i), "label": str(2 * i)}) + "\n" for i in ids))
    return str(path)


def test_default_generate_fills_sample(tok, tok_dir):
    script = Script(tok)
    with server_for(tok, script) as server:
        args = default_args(router_url=server.url, hf_checkpoint=tok_dir, rollout_max_response_len=64)
        params = {"max_new_tokens": 64, "temperature": 0.7, "no_stop_trim": True}

        async def main():
            s = await generate(args, Sample(prompt=prompt_of(4), index=0), dict(params))
            short = await generate(args, Sample(prompt=prompt_of(4), index=1), {**params, "max_new_tokens": 3})
            # partial-rollout continuation: 2 tokens generated earlier, budget reduced by 2
            prompt_ids = script.ids(prompt_of(7))
            part = Sample(prompt=prompt_of(7), tokens=list(prompt_ids), status=Sample.Status.ABORTED)
            part.append_response_tokens(script.answer(7, True)[:2], [-0.5, -0.5], text="The answer")
            part.status = Sample.Status.ABORTED
            cont = await generate(args, part, {**params, "max_new_tokens": 10})
            spent = Sample(prompt="x", tokens=[1, 2, 3], response_length=2, status=Sample.Status.ABORTED)
            n_before = len(server.requests)
            spent = await generate(args, spent, {**params, "max_new_tokens": 2})
            assert len(server.requests) == n_before  # no request when the budget is used up
            await close_client()
            return s, short, cont, spent

        s, short, cont, spent = asyncio.run(main())
        prompt_ids = script.ids(prompt_of(4))
        answer = script.answer(4, True) + [tok.eos_token_id]
        assert s.tokens == prompt_ids + answer
        assert s.response_length == len(answer) and s.loss_mask == [1] * len(answer)
        assert s.rollout_log_probs == [scripted_logprob(t, len(prompt_ids) + k) for k, t in enumerate(answer)]
        assert s.response == "The answer is \\boxed{8}"
        assert s.status is Sample.Status.COMPLETED and s.weight_versions == ["0"]
        req = server.requests[0]
        assert req["input_ids"] == prompt_ids and req["return_logprob"] is True
        assert req["sampling_params"] == params
        assert short.status is Sample.Status.TRUNCATED and short.response_length == 3
        assert server.requests[2]["sampling_params"]["max_new_tokens"] == 8
        assert server.requests[2]["input_ids"] == script.ids(prompt_of(7)) + script.answer(7, True)[:2]
        assert cont.response == "The answer is \\boxed{14}" and cont.status is Sample.Status.COMPLETED
        assert cont.rollout_log_probs[:2] == [-0.5, -0.5] and len(cont.rollout_log_probs) == cont.response_length
        assert spent.status is Sample.Status.TRUNCATED


def test_generate_reports_server_errors(tok, tok_dir):
    with server_for(tok, Script(tok)) as server:
        args = default_args(router_url=server.url, hf_checkpoint=tok_dir)
        with pytest.raises(HTTPRequestError, match="HTTP 400.*input_ids must be a non-empty int list"):
            sample = Sample(prompt="", tokens=[])
            sample.tokens = []  # tokenizes "" to [] → server answers 400
            asyncio.run(generate(args, sample, {"max_new_tokens": 4}))
    # nobody listening: retried, then a clear error naming the URL
    args = default_args(router_url="http://127.0.0.1:9", rollout_request_retries=1, hf_checkpoint=tok_dir)
    with pytest.raises(HTTPRequestError, match="127.0.0.1:9/generate failed after 2 attempts"):
        asyncio.run(generate(args, Sample(prompt="hi", tokens=[5]), {"max_new_tokens": 4}))


def rollout_args(path, server, tok_dir, **kw):
    base = dict(
        prompt_data=path, label_key="label", hf_checkpoint=tok_dir, router_url=server.url, rm_type="boxed",
        rollout_batch_size=3, n_samples_per_prompt=2, over_sampling_batch_size=3, rollout_max_response_len=64,
        dynamic_sampling_filter_path="miles.rollout.filters.check_reward_nonzero_std",
    )
    base.update(kw)
    return default_args(**base)


def group_prompts(groups):
    return [int(re.search(r"What is (\d+)", g[0].prompt).group(1)) for g in groups]


def test_over_sampling_filter_abort_and_partial_rollout(tmp_path, tok, tok_dir):
    script = Script(tok, hold={5})
    with server_for(tok, script) as server:
        args = rollout_args(write_prompts(tmp_path / "p.jsonl", range(10)), server, tok_dir, partial_rollout=True)
        src = RolloutDataSourceWithBuffer(args)
        out = generate_rollout(args, 0, src)
        assert isinstance(out, RolloutFnTrainOutput)
        # chunk 1: prompts 0,1,2 (0 has zero reward std → dropped); chunk 2: 3 (dropped), 4, 5 (held → aborted)
        assert group_prompts(out.samples) == [1, 2, 4]
        assert all(len(g) == 2 for g in out.samples)
        assert [s.index for g in out.samples for s in g] == sorted(s.index for g in out.samples for s in g)
        assert [sorted(s.reward for s in g) for g in out.samples] == [[0.0, 1.0]] * 3
        m = out.metrics
        assert m["rollout/dynamic_filter/drop_zero_std_1.0"] == 2 and m["rollout/dynamic_filter/drop_total"] == 2
        assert m["rollout/groups_generated"] == 6 and m["rollout/groups_aborted"] == 1
        assert m["rollout/groups_to_buffer"] == 1 and m["rollout/buffer_length"] == 1
        assert m["rollout/reward_mean"] == 0.5 and m["rollout/reward_errors"] == 0
        assert server.aborts == 1
        (held,) = src.buffer
        assert [s.status for s in held] == [Sample.Status.ABORTED] * 2
        assert all(s.response_length == 2 and s.reward is None for s in held)
        assert all(s.metadata["start_rollout_id"] == 0 for s in held)

        # step 2 continues the held group first (from its 2 tokens), then fresh prompts 6, 7, 8, 9, 0
        server.reset_abort()
        server.weight_version = "1"
        out2 = generate_rollout(args, 1, src)
        assert group_prompts(out2.samples) == [5, 7, 8]
        resumed = out2.samples[0]
        assert sorted(s.response for s in resumed) == ["The answer is \\boxed{10}", "The answer is \\boxed{11}"]
        for s in resumed:
            assert s.weight_versions == ["0", "1"] and s.status is Sample.Status.COMPLETED
            assert len(s.loss_mask) == len(s.rollout_log_probs) == s.response_length
            assert s.tokens[: len(s.tokens) - s.response_length] == script.ids(prompt_of(5))
        p5 = script.ids(prompt_of(5))
        continuations = [r for r in server.requests if r["input_ids"][: len(p5)] == p5 and r["input_ids"] != p5]
        assert len(continuations) == 2 and all(r["sampling_params"]["max_new_tokens"] == 62 for r in continuations)
        assert out2.metrics["rollout/dynamic_filter/drop_zero_std_1.0"] >= 1


def test_without_partial_rollout_aborted_groups_are_dropped(tmp_path, tok, tok_dir):
    with server_for(tok, Script(tok, hold={2})) as server:
        args = rollout_args(write_prompts(tmp_path / "p.jsonl", [1, 2, 4, 5]), server, tok_dir,
                            rollout_batch_size=2, over_sampling_batch_size=3, dynamic_sampling_filter_path=None)
        src = RolloutDataSourceWithBuffer(args)
        out = generate_rollout(args, 0, src)
        assert group_prompts(out.samples) == [1, 4]
        assert src.get_buffer_length() == 0 and out.metrics["rollout/groups_aborted"] == 1


# ---- hooks written exactly as for slime -------------------------------------------------------
async def hanging_or_raising_rm(args, sample, **kwargs):
    if "2 plus" in sample.prompt:
        await asyncio.sleep(3600)
    if "4 plus" in sample.prompt:
        raise ValueError("cannot score 4")
    return 1.0 if sample.response.endswith(f"{{{sample.label}}}") else 0.0


async def length_group_rm(args, samples, **kwargs):
    return [{"score": float(i), "n": len(samples)} for i, _ in enumerate(samples)]


def keep_all_but_prompt_one(args, samples, **kwargs):
    return "1 plus" not in samples[0].prompt  # a plain bool is accepted


def test_bad_rewards_do_not_stop_the_step(tmp_path, tok, tok_dir):
    with server_for(tok, Script(tok)) as server:
        args = rollout_args(write_prompts(tmp_path / "p.jsonl", [1, 2, 4]), server, tok_dir, rm_timeout=0.5,
                            rm_default_reward=-1.0, custom_rm_path=f"{__name__}.hanging_or_raising_rm",
                            dynamic_sampling_filter_path=None)
        t0 = time.perf_counter()
        out = generate_rollout(args, 0, RolloutDataSourceWithBuffer(args))
        assert time.perf_counter() - t0 < 5.0
        rewards = [sorted(s.reward for s in g) for g in out.samples]
        assert rewards == [[0.0, 1.0], [-1.0, -1.0], [-1.0, -1.0]]
        m = out.metrics
        assert m["rollout/reward_timeouts"] == 2 and m["rollout/reward_errors"] == 2
        assert "hanging_or_raising_rm" in m["rollout/reward_first_error"]


def test_group_rm_and_bool_filter_hooks(tmp_path, tok, tok_dir):
    with server_for(tok, Script(tok, slow={5: 0.5})) as server:
        args = rollout_args(write_prompts(tmp_path / "p.jsonl", [1, 2, 4, 5]), server, tok_dir, group_rm=True,
                            custom_rm_path=f"{__name__}.length_group_rm", reward_key="score",
                            rollout_batch_size=2, over_sampling_batch_size=2,
                            dynamic_sampling_filter_path=f"{__name__}.keep_all_but_prompt_one")
        out = call_rollout_function(None, args, 0, RolloutDataSourceWithBuffer(args))
        assert group_prompts(out.samples) == [2, 4]
        for g in out.samples:
            assert [s.reward for s in g] == [{"score": 0.0, "n": 2}, {"score": 1.0, "n": 2}]
        assert out.metrics["rollout/dynamic_filter/drop_filtered"] == 1
        assert out.metrics["rollout/reward_mean"] == 0.5


def test_eval_mean_reward_and_pass_at_k(tmp_path, tok, tok_dir):
    with server_for(tok, Script(tok)) as server:
        evalp = write_prompts(tmp_path / "eval.jsonl", [1, 2, 3])
        args = rollout_args(write_prompts(tmp_path / "p.jsonl", [1]), server, tok_dir, n_samples_per_eval_prompt=4,
                            eval_prompt_data=["tiny", evalp], eval_temperature=0.25, eval_max_response_len=32)
        out = generate_rollout(args, 0, None, evaluation=True)
        assert isinstance(out, RolloutFnEvalOutput)
        d = out.data["tiny"]
        assert len(d["rewards"]) == 12 and len(d["samples"]) == 12 and not any(d["truncated"])
        # prompts 1, 2: right on 2 of 4 calls; prompt 3: always right → mean (0.5 + 0.5 + 1) / 3
        m = out.metrics
        assert m["eval/tiny"] == pytest.approx(2 / 3)
        assert m["eval/tiny/pass@1"] == pytest.approx(2 / 3)
        assert m["eval/tiny/pass@2"] == pytest.approx((2 * (1 - 1 / 6) + 1) / 3)
        assert m["eval/tiny/pass@4"] == 1.0 and m["eval/tiny-truncated_ratio"] == 0.0
        assert {r["sampling_params"]["temperature"] for r in server.requests} == {0.25}
        assert {r["sampling_params"]["max_new_tokens"] for r in server.requests} == {32}


def bare_list_rollout(args, rollout_id, data_source, evaluation=False):
    if evaluation:
        return {"x": {"rewards": [1.0], "truncated": [False], "samples": []}}
    return data_source.get_samples(1)


def test_rollout_function_return_wrapping(tmp_path, tok_dir):
    args = default_args(prompt_data=write_prompts(tmp_path / "p.jsonl", [1]), n_samples_per_prompt=2)
    src = RolloutDataSourceWithBuffer(args)
    out = call_rollout_function(f"{__name__}.bare_list_rollout", args, 0, src)
    assert isinstance(out, RolloutFnTrainOutput) and len(out.samples[0]) == 2
    ev = call_rollout_function(f"{__name__}.bare_list_rollout", args, 0, src, evaluation=True)
    assert isinstance(ev, RolloutFnEvalOutput) and ev.data["x"]["rewards"] == [1.0]


def drop_everything(args, samples, **kwargs):
    from miles.rollout.filters import DynamicFilterOutput

    return DynamicFilterOutput(keep=False, reason="nope")


def test_filter_that_drops_everything_fails_clearly(tmp_path, tok, tok_dir, monkeypatch):
    import miles.rollout.rollout as rollout_mod

    monkeypatch.setattr(rollout_mod, "MAX_OVERSAMPLING", 3)
    with server_for(tok, Script(tok)) as server:
        args = rollout_args(write_prompts(tmp_path / "p.jsonl", [1, 2]), server, tok_dir, rollout_batch_size=1,
                            over_sampling_batch_size=1, dynamic_sampling_filter_path=f"{__name__}.drop_everything")
        with pytest.raises(RuntimeError, match=r"sampled 3 groups but only 0 of 1 passed.*'nope': 3"):
            generate_rollout(args, 0, RolloutDataSourceWithBuffer(args))


def test_mask_offpolicy_in_partial_rollout(tok, tok_dir):
    script = Script(tok)
    with server_for(tok, script) as server:
        args = default_args(router_url=server.url, hf_checkpoint=tok_dir, mask_offpolicy_in_partial_rollout=True)
        part = Sample(prompt=prompt_of(7), tokens=script.ids(prompt_of(7)))
        part.append_response_tokens(script.answer(7, True)[:2], [-0.5, -0.5])
        part.status = Sample.Status.ABORTED

        async def main():
            try:
                return await generate(args, part, {"max_new_tokens": 20})
            finally:
                await close_client()

        s = asyncio.run(main())
        assert s.loss_mask[:2] == [0, 0] and set(s.loss_mask[2:]) == {1}
        assert len(s.loss_mask) == s.response_length


def test_routed_experts_for_r3(tok, tok_dir):
    import numpy as np

    with server_for(tok, Script(tok)) as server:
        args = default_args(router_url=server.url, hf_checkpoint=tok_dir, use_rollout_routing_replay=True)

        async def main():
            try:
                return await generate(args, Sample(prompt=prompt_of(2)), {"max_new_tokens": 20})
            finally:
                await close_client()

        s = asyncio.run(main())
        assert server.requests[0]["return_routed_experts"] is True
        rows = len(s.tokens) - 1
        assert s.rollout_routed_experts.shape == (rows, 4)
        assert np.array_equal(s.rollout_routed_experts.reshape(-1), np.arange(rows * 4) % 8)


async def eval_aware_generate(args, sample, sampling_params, evaluation=False):
    sample = await generate(args, sample, sampling_params)
    sample.metadata["evaluation"] = evaluation
    return sample


async def two_segment_generate(args, sample, sampling_params):
    """Returns two training samples from one execution (slime's list form): prompt+answer and a copy."""
    sample = await generate(args, sample, sampling_params)
    second = Sample.from_dict(sample.to_dict())
    second.index = sample.index  # siblings of one execution
    return [sample, second]


def test_custom_generate_evaluation_kwarg_and_list_return(tmp_path, tok, tok_dir):
    with server_for(tok, Script(tok)) as server:
        path = write_prompts(tmp_path / "p.jsonl", [1, 2])
        args = rollout_args(path, server, tok_dir, custom_generate_function_path=f"{__name__}.eval_aware_generate",
                            eval_prompt_data=["e", path], rollout_batch_size=1, dynamic_sampling_filter_path=None)
        src = RolloutDataSourceWithBuffer(args)
        train = generate_rollout(args, 0, src)
        ev = generate_rollout(args, 0, src, evaluation=True)
        assert [s.metadata["evaluation"] for g in train.samples for s in g] == [False, False]
        assert {s.metadata["evaluation"] for s in ev.data["e"]["samples"]} == {True}

        args.custom_generate_function_path = f"{__name__}.two_segment_generate"
        out = generate_rollout(args, 1, src)
        (group,) = out.samples
        assert len(group) == 2 and all(isinstance(x, list) and len(x) == 2 for x in group)
        for pair in group:
            assert pair[0].rollout_id == pair[1].rollout_id == pair[0].index
            assert pair[0].reward == pair[1].reward and pair[0].reward in (0.0, 1.0)


def test_groups_aborted_by_the_server_are_not_trained_on(tmp_path, tok, tok_dir):
    class ServerAborts(Script):
        def __call__(self, input_ids, params):
            if "What is 2 plus" in self.tok.decode(input_ids):
                return ScriptedReply(self.answer(2, True)[:3], "abort")
            return super().__call__(input_ids, params)

    with server_for(tok, ServerAborts(tok, slow={5: 0.5})) as server:
        path = write_prompts(tmp_path / "p.jsonl", [1, 2, 4, 5])
        for partial in (False, True):
            args = rollout_args(path, server, tok_dir, rollout_batch_size=2, over_sampling_batch_size=2,
                                dynamic_sampling_filter_path=None, partial_rollout=partial)
            src = RolloutDataSourceWithBuffer(args)
            out = generate_rollout(args, 0, src)
            assert group_prompts(out.samples) == [1, 4]
            assert all(s.reward is not None for g in out.samples for s in g)
            if partial:
                assert group_prompts(src.buffer) == [2, 5]  # the server-aborted group and the over-sampled one
                assert [s.status for s in src.buffer[0]] == [Sample.Status.ABORTED] * 2
                assert src.buffer[0][0].response_length == 3
            else:
                assert out.metrics["rollout/dynamic_filter/drop_aborted"] == 1 and src.get_buffer_length() == 0


SEEN = {}


def remove_wrong_answers(args, data):  # slime's --rollout-sample-filter-path form: groups in, None out
    for group in data:
        for s in group:
            s.remove_sample = s.reward == 0.0


def record_all_groups(args, all_samples, get_samples):
    SEEN["groups"] = [g[0].prompt for g in all_samples]
    SEEN["get_samples"] = get_samples


def test_sample_filter_and_all_samples_process_hooks(tmp_path, tok, tok_dir):
    with server_for(tok, Script(tok)) as server:
        args = rollout_args(write_prompts(tmp_path / "p.jsonl", [3, 1, 2]), server, tok_dir,
                            rollout_sample_filter_path=f"{__name__}.remove_wrong_answers",
                            rollout_all_samples_process_path=f"{__name__}.record_all_groups")
        src = RolloutDataSourceWithBuffer(args)
        args.rollout_batch_size = args.over_sampling_batch_size = 2
        out = generate_rollout(args, 0, src)
        assert group_prompts(out.samples) == [1, 2]
        assert all(s.remove_sample == (s.reward == 0.0) for g in out.samples for s in g)
        assert out.metrics["rollout/removed_samples"] == 2
        assert set(SEEN["groups"]) == {prompt_of(1), prompt_of(2), prompt_of(3)}  # includes the dropped group 3
        assert SEEN["get_samples"] == src.get_samples


def test_deterministic_sampling_sends_a_seed_per_sample(tmp_path, tok, tok_dir):
    with server_for(tok, Script(tok)) as server:
        path = write_prompts(tmp_path / "p.jsonl", range(1, 4))
        args = rollout_args(path, server, tok_dir, rollout_deterministic_sampling=True, rollout_seed=100,
                            dynamic_sampling_filter_path=None)
        out = generate_rollout(args, 0, RolloutDataSourceWithBuffer(args))
        seeds = sorted(r["sampling_params"]["sampling_seed"] for r in server.requests)
        indices = sorted(s.index for g in out.samples for s in g)
        assert seeds == [100 + i for i in indices] and len(set(seeds)) == 6
    with server_for(tok, Script(tok)) as server:  # off by default: the engine draws its own randomness
        args = rollout_args(path, server, tok_dir, dynamic_sampling_filter_path=None)
        generate_rollout(args, 0, RolloutDataSourceWithBuffer(args))
        assert all("sampling_seed" not in r["sampling_params"] for r in server.requests)
