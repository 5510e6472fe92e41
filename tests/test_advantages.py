"""Advantage estimators and packing helpers against hand-computed values."""

import math

import pytest
import torch

from miles.trainer.advantages import compute_advantages, group_normalize, masked_whiten
from miles.trainer.config import AlgoConfig
from miles.trainer.packing import balanced_partition, micro_batches, pack, plan_step, split_steps


def _t(xs):
    return torch.tensor(xs, dtype=torch.float32)


def test_grpo_with_and_without_std():
    masks = [_t([1, 1]), _t([1, 0, 1]), _t([1]), _t([1]), _t([1, 1]), _t([1])]
    rewards = [1.0, 0.0, 0.0, 1.0, 3.0, 1.0]
    groups = [0, 0, 0, 0, 1, 1]
    advs = compute_advantages(AlgoConfig(), rewards, groups, masks)
    a = 0.5 / (math.sqrt(1 / 3) + 1e-6)  # unbiased std of [1,0,0,1] = sqrt(1/3)
    b = 1.0 / (math.sqrt(2.0) + 1e-6)  # group [3,1]: mean 2, std sqrt(2)
    assert advs[0].tolist() == pytest.approx([a, a], abs=1e-6)
    assert advs[1].tolist() == pytest.approx([-a, 0.0, -a], abs=1e-6)  # masked token -> 0
    assert advs[4].tolist() == pytest.approx([b, b], abs=1e-6)
    assert advs[5].tolist() == pytest.approx([-b], abs=1e-6)
    dr = compute_advantages(AlgoConfig(grpo_std_normalization=False), rewards, groups, masks)
    assert dr[0].tolist() == pytest.approx([0.5, 0.5]) and dr[4].tolist() == pytest.approx([1.0, 1.0])
    # gspo uses the same advantages
    gspo = compute_advantages(AlgoConfig(advantage_estimator="gspo"), rewards, groups, masks)
    assert all(torch.equal(x, y) for x, y in zip(gspo, advs))


def test_group_of_one_is_centred_only():
    assert group_normalize(_t([5.0]), [0], std_normalization=True).tolist() == [0.0]


def test_reinforce_plus_plus_returns_by_hand():
    cfg = AlgoConfig(advantage_estimator="reinforce_plus_plus", kl_coef=0.5, gamma=0.9)
    kl = [_t([0.1, 0.2, 0.3]), _t([0.1, 0.2, 0.3])]
    advs = compute_advantages(cfg, [1.0, 1.0], [0, 1], [_t([1, 1, 1]), _t([1, 1, 0])], kl=kl)
    # token rewards [-0.05, -0.1, -0.15 + 1]; returns backwards with gamma 0.9
    assert advs[0].tolist() == pytest.approx([-0.05 + 0.9 * (-0.1 + 0.9 * 0.85), -0.1 + 0.9 * 0.85, 0.85], abs=1e-6)
    # last trainable token gets the reward; masked token neither rewards nor is rewarded
    assert advs[1].tolist() == pytest.approx([-0.05 + 0.9 * 0.9, 0.9, 0.0], abs=1e-6)


def test_reinforce_plus_plus_baseline():
    cfg = AlgoConfig(advantage_estimator="reinforce_plus_plus_baseline", kl_coef=0.1)
    advs = compute_advantages(cfg, [1.0, 0.0], [7, 7], [_t([1, 1]), _t([1])], kl=[_t([1.0, 2.0]), _t([0.5])])
    assert advs[0].tolist() == pytest.approx([0.5 - 0.1, 0.5 - 0.2])
    assert advs[1].tolist() == pytest.approx([-0.5 - 0.05])


def test_masked_whiten_and_all_reduce_hook():
    out = masked_whiten([_t([1, 2, 3]), _t([4.0])], [_t([1, 1, 1]), _t([0])])
    assert out[0].tolist() == pytest.approx([-1.0, 0.0, 1.0], abs=1e-6)  # mean 2, unbiased var 1
    assert out[1].tolist() == [0.0]
    # a "second rank" holding [3, 4]: all_reduce adds its stats -> mean 2.5 over [1,2,3,4] ...
    other = torch.tensor([7.0, 25.0, 2.0], dtype=torch.float64)
    split = masked_whiten([_t([1, 2])], [_t([1, 1])], all_reduce=lambda s: s.add_(other))
    full = masked_whiten([_t([1, 2, 3, 4])], [_t([1, 1, 1, 1])])
    torch.testing.assert_close(split[0], full[0][:2])
    cfg = AlgoConfig(normalize_advantages=True, grpo_std_normalization=False)
    advs = compute_advantages(cfg, [1.0, 0.0], [0, 0], [_t([1, 1]), _t([1, 1])])
    assert advs[0].tolist() == pytest.approx([math.sqrt(3) / 2] * 2, abs=1e-5)


def test_split_steps_and_errors():
    assert split_steps(6, 3) == [[0, 1, 2], [3, 4, 5]]
    with pytest.raises(ValueError, match="--global-batch-size"):
        split_steps(5, 2)


def test_balanced_partition():
    w = [10, 9, 8, 7, 6, 5, 1, 1]
    parts = balanced_partition(w, 2)
    sums = sorted(sum(w[i] for i in p) for p in parts)
    assert sums == [23, 24]
    assert sorted(i for p in parts for i in p) == list(range(8))
    eq = balanced_partition(w, 2, equal_size=True)
    assert [len(p) for p in eq] == [4, 4]
    assert abs(sum(w[i] for i in eq[0]) - sum(w[i] for i in eq[1])) <= 3
    assert balanced_partition([5], 3) == [[0], [], []]


def test_micro_batches_token_budget():
    lengths = [9, 7, 5, 4, 3, 2]
    mbs = micro_batches(lengths, 1, max_tokens=10)
    assert all(sum(lengths[i] for i in mb) <= 10 for mb in mbs)
    assert len(mbs) == 4 and sorted(i for mb in mbs for i in mb) == list(range(6))
    assert micro_batches(lengths, 4, None) == [[0, 1, 2, 3], [4, 5]]
    with pytest.raises(ValueError, match="--max-tokens-per-gpu 8"):
        micro_batches(lengths, 1, max_tokens=8)


def test_plan_step_same_microbatch_count_on_all_ranks():
    lengths = [10, 10, 10, 3, 3, 3]  # rank with the 3 long ones needs more micro-batches -> padding
    plans = [plan_step(list(range(6)), lengths, r, 2, 1, max_tokens=10) for r in range(2)]
    assert len(plans[0]) == len(plans[1]) == 2
    assert sorted(i for p in plans for mb in p for i in mb) == list(range(6))
    lengths = [5, 3, 3, 3, 3, 3]
    plans = [plan_step(list(range(6)), lengths, r, 2, 1, max_tokens=10) for r in range(2)]
    assert len(plans[0]) == len(plans[1])
    assert sorted(i for p in plans for mb in p for i in mb) == list(range(6))


def test_pack_layout():
    p = pack([[1, 2, 3, 4], [5, 6, 7]], [2, 1])
    assert p.input_ids.tolist() == [1, 2, 3, 4, 5, 6, 7]
    assert p.positions.tolist() == [0, 1, 2, 3, 0, 1, 2]
    assert p.cu_seqlens.tolist() == [0, 4, 7]
    assert p.pred_index.tolist() == [1, 2, 5]  # hidden at 1 predicts token 3, at 2 -> 4, at 5 -> 7
    assert p.targets.tolist() == [3, 4, 7]
    assert p.segments.tolist() == [0, 0, 1]
    assert p.max_seqlen == 4
