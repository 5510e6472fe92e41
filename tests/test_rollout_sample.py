import argparse

import pytest

from miles.rollout.sample import Sample, status_from_finish_reason


def test_status_values_and_mapping():
    assert [s.value for s in Sample.Status] == ["pending", "completed", "truncated", "aborted", "failed"]
    assert status_from_finish_reason({"type": "stop", "matched": 0}) is Sample.Status.COMPLETED
    assert status_from_finish_reason({"type": "length", "length": 4}) is Sample.Status.TRUNCATED
    assert status_from_finish_reason({"type": "abort"}) is Sample.Status.ABORTED


def test_append_response_tokens_keeps_fields_aligned():
    s = Sample(prompt="p", tokens=[1, 2, 3])
    s.append_response_tokens([4, 5], [-0.5, -0.25], text="ab", meta_info={
        "finish_reason": {"type": "stop"}, "weight_version": "3"})
    s.append_response_tokens([6, 7, 8], trainable=False, text="<obs>")
    s.append_response_tokens([9], [-1.0], meta_info={"finish_reason": {"type": "length"}, "weight_version": "4"})
    assert s.tokens == [1, 2, 3, 4, 5, 6, 7, 8, 9]
    assert s.response_length == 6 and s.prompt_length == 3
    assert s.loss_mask == [1, 1, 0, 0, 0, 1]
    assert s.rollout_log_probs == [-0.5, -0.25, 0.0, 0.0, 0.0, -1.0]
    assert s.response == "ab<obs>"
    assert s.weight_versions == ["3", "4"]
    assert s.status is Sample.Status.TRUNCATED
    assert s.effective_response_length == 3
    with pytest.raises(ValueError, match="2 tokens but 1 log-probs"):
        s.append_response_tokens([1, 2], [0.0])


def test_to_dict_from_dict_roundtrip():
    s = Sample(index=3, group_index=1, prompt="q", tokens=[1, 2], response_length=1, reward={"score": 1.0},
               status=Sample.Status.ABORTED, metadata={"a": 1}, loss_mask=[1], rollout_log_probs=[-0.1])
    s.extra_field = "kept"
    d = s.to_dict()
    assert d["status"] == "aborted" and d["extra_field"] == "kept"
    back = Sample.from_dict(d)
    assert back.status is Sample.Status.ABORTED
    assert back.extra_field == "kept"
    assert back.to_dict() == d


def test_get_reward_value_with_reward_key():
    args = argparse.Namespace(reward_key="score")
    assert Sample(reward={"score": 0.5, "acc": True}).get_reward_value(args) == 0.5
    assert Sample(reward=2).get_reward_value(args) == 2.0
    assert Sample(reward={"acc": 1.0}).get_reward_value(args, key="acc") == 1.0
    with pytest.raises(KeyError, match="'score' not in reward keys"):
        Sample(reward={"acc": 1.0}).get_reward_value(args)
    with pytest.raises(ValueError, match="set --reward-key"):
        Sample(reward={"acc": 1.0}).get_reward_value(argparse.Namespace(reward_key=None))
