import argparse

import pytest

from miles.rollout.filters import DynamicFilterOutput, as_filter_output, check_no_aborted, check_reward_nonzero_std
from miles.rollout.sample import Sample

ARGS = argparse.Namespace(reward_key="score")


def group(*rewards):
    return [Sample(reward={"score": r}) for r in rewards]


def test_check_reward_nonzero_std():
    assert check_reward_nonzero_std(ARGS, group(1.0, 0.0, 1.0)) == DynamicFilterOutput(keep=True)
    out = check_reward_nonzero_std(ARGS, group(1.0, 1.0, 1.0))
    assert out.keep is False and out.reason == "zero_std_1.0"
    assert check_reward_nonzero_std(ARGS, group(0.0, 0.0)).reason == "zero_std_0.0"
    assert check_reward_nonzero_std(ARGS, [group(1.0), group(0.0)]).keep  # nested (list-returning generate)
    assert not check_reward_nonzero_std(ARGS, group(0.5, 0.5 + 1e-9)).keep


def test_check_no_aborted_and_output_coercion():
    g = group(1.0, 0.0)
    assert check_no_aborted(ARGS, g).keep
    g[1].status = Sample.Status.ABORTED
    assert check_no_aborted(ARGS, g) == DynamicFilterOutput(keep=False, reason="aborted")
    assert as_filter_output(True) == DynamicFilterOutput(keep=True)
    assert as_filter_output(False).keep is False

    class SlimeOutput:  # a slime DynamicFilterOutput instance from another package
        keep, reason = False, "custom"

    assert as_filter_output(SlimeOutput()) == DynamicFilterOutput(keep=False, reason="custom")
    with pytest.raises(TypeError, match="expected bool or DynamicFilterOutput"):
        as_filter_output(None)
