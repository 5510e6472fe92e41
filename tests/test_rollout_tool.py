"""The multi-turn calculator example (examples/multi_turn_tool) against a real scripted HTTP server."""

import json
from pathlib import Path

import pytest

from miles.rollout.config import default_args
from miles.rollout.data import RolloutDataSourceWithBuffer
from miles.rollout.rollout import generate_rollout
from miles.rollout.sample import Sample
from miles.rollout.scripted_server import ScriptedReply, ScriptedServer, scripted_logprob
from miles.testing import make_tokenizer

REPO = Path(__file__).resolve().parents[1]
TURNS = ["<tool>12*7</tool>", "<tool>(84 - 4) / 2</tool>", "The answer is \\boxed{40}"]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    make_tokenizer(path)
    return str(path)


@pytest.fixture(autouse=True)
def repo_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO))


def test_calculator_is_safe():
    from examples.multi_turn_tool.calculator import calculate

    assert calculate("12*7") == "84"
    assert calculate("(84 - 4) / 2") == "40"
    assert calculate("2 ** 10 % 1000") == "24"
    assert calculate("7 / 2") == "3.5"
    assert calculate("-3 + +2") == "-1"
    assert calculate("1/0").startswith("error")
    assert calculate("9 ** 999").startswith("error: exponent too large")
    assert calculate("__import__('os').system('true')").startswith("error: unsupported syntax")
    assert calculate("x + 1").startswith("error: unsupported syntax: Name")
    assert calculate("1 +").startswith("error")


def test_multi_turn_tool_generate_masks_tool_output(tmp_path, tok_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)

    def ids(text):
        return tok(text, add_special_tokens=False)["input_ids"]

    def respond(input_ids, params):
        assert "</tool>" in params["stop"]
        turn = tok.decode(input_ids).count("<result>")
        if turn < 2:
            return ScriptedReply(ids(TURNS[turn]), "stop", matched="</tool>")
        return ScriptedReply(ids(TURNS[2]) + [tok.eos_token_id], "stop", matched=tok.eos_token_id)

    data = tmp_path / "p.jsonl"
    data.write_text(json.dumps({"input": "Compute (12*7 - 4) / 2.", "label": "40"}) + "\n")
    with ScriptedServer(respond, decode=lambda x: tok.decode(x, skip_special_tokens=True)) as server:
        args = default_args(
            prompt_data=str(data), label_key="label", hf_checkpoint=tok_dir, router_url=server.url, rm_type="boxed",
            rollout_batch_size=1, n_samples_per_prompt=2, rollout_max_response_len=128,
            custom_generate_function_path="examples.multi_turn_tool.calculator.generate",
        )
        out = generate_rollout(args, 0, RolloutDataSourceWithBuffer(args))
        assert len(server.requests) == 6  # 3 turns × 2 samples

    prompt_ids = ids("Compute (12*7 - 4) / 2.")
    call1, obs1, call2, obs2 = ids(TURNS[0]), ids("<result>84</result>"), ids(TURNS[1]), ids("<result>40</result>")
    answer = ids(TURNS[2]) + [tok.eos_token_id]
    for s in out.samples[0]:
        assert s.tokens == prompt_ids + call1 + obs1 + call2 + obs2 + answer
        assert s.response == TURNS[0] + "<result>84</result>" + TURNS[1] + "<result>40</result>" + TURNS[2]
        assert s.loss_mask == [1] * len(call1) + [0] * len(obs1) + [1] * len(call2) + [0] * len(obs2) + [1] * len(
            answer)
        assert s.response_length == len(s.loss_mask) == len(s.rollout_log_probs)
        # model tokens carry the server's log-probs, tool tokens 0.0
        start = len(prompt_ids)
        expected = [scripted_logprob(t, start + k) for k, t in enumerate(call1)] + [0.0] * len(obs1)
        assert s.rollout_log_probs[: len(expected)] == expected
        assert s.rollout_log_probs[len(call1) + len(obs1) + len(call2):][: len(obs2)] == [0.0] * len(obs2)
        assert s.status is Sample.Status.COMPLETED and s.metadata["tool_calls"] == 2
        assert s.reward == 1.0
        assert s.weight_versions == ["0", "0", "0"]
    assert out.metrics["rollout/reward_mean"] == 1.0


def test_multi_turn_tool_respects_token_budget(tmp_path, tok_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)

    def respond(input_ids, params):
        return ScriptedReply(tok("<tool>1+1</tool>", add_special_tokens=False)["input_ids"], "stop", matched="</tool>")

    data = tmp_path / "p.jsonl"
    data.write_text(json.dumps({"input": "loop forever", "label": "2"}) + "\n")
    with ScriptedServer(respond, decode=lambda x: tok.decode(x)) as server:
        args = default_args(
            prompt_data=str(data), label_key="label", hf_checkpoint=tok_dir, router_url=server.url, rm_type="boxed",
            rollout_batch_size=1, n_samples_per_prompt=1, rollout_max_response_len=30,
            custom_generate_function_path="examples.multi_turn_tool.calculator.generate",
        )
        out = generate_rollout(args, 0, RolloutDataSourceWithBuffer(args))
        budgets = [r["sampling_params"]["max_new_tokens"] for r in server.requests]
    (s,) = out.samples[0]
    assert s.status is Sample.Status.TRUNCATED and s.reward == 0.0
    assert s.response_length <= 30 + 10  # the last tool output may overshoot the model's budget
    assert budgets[0] == 30 and all(b2 < b1 for b1, b2 in zip(budgets, budgets[1:]))
