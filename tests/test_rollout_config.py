import argparse

import pytest

from miles.rollout.config import GROUPS, add_arguments, default_args, parse_eval_prompt_data, validate


def test_flags_parse_with_slime_names():
    parser = argparse.ArgumentParser()
    for cls in GROUPS:
        add_arguments(parser.add_argument_group(cls.__name__), cls)
    a = parser.parse_args(
        "--prompt-data x.jsonl --rollout-batch-size 4 --n-samples-per-prompt 8 --rollout-stop a b "
        "--rollout-stop-token-ids 1 2 --eval-prompt-data aime a.jsonl gsm g.jsonl --partial-rollout "
        "--rm-timeout 3 --rollout-temperature 0.7 --label-key label".split()
        + ["--apply-chat-template-kwargs", '{"enable_thinking": false}']
    )
    assert (a.prompt_data, a.rollout_batch_size, a.n_samples_per_prompt) == ("x.jsonl", 4, 8)
    assert a.rollout_stop == ["a", "b"] and a.rollout_stop_token_ids == [1, 2]
    assert a.partial_rollout is True and a.rm_timeout == 3.0 and a.rollout_temperature == 0.7
    assert a.apply_chat_template_kwargs == {"enable_thinking": False}
    assert parse_eval_prompt_data(a.eval_prompt_data) == [("aime", "a.jsonl"), ("gsm", "g.jsonl")]
    assert vars(parser.parse_args([])) == vars(default_args())


def test_validate_names_flags():
    validate(default_args())
    with pytest.raises(ValueError, match=r"--over-sampling-batch-size \(2\) must be >= --rollout-batch-size \(4\)"):
        validate(default_args(rollout_batch_size=4, over_sampling_batch_size=2))
    with pytest.raises(ValueError, match="--rm-type remote needs --rm-url"):
        validate(default_args(rm_type="remote"))
    with pytest.raises(ValueError, match="NAME PATH pairs"):
        validate(default_args(eval_prompt_data=["a", "b", "c"]))
    assert parse_eval_prompt_data(["/d/math500.jsonl"]) == [("math500", "/d/math500.jsonl")]
