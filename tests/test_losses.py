"""Loss terms and aggregation against hand-computed values on small explicit tensors."""

import math

import pytest
import torch

from miles.trainer.config import AlgoConfig, ConfigError, TrainerConfig
from miles.trainer.losses import (
    LossInputs,
    compute_loss,
    kl_estimate,
    load_function,
    loss_weights,
    ppo_policy_loss,
    sequence_log_ratio,
    tis_weights,
)


def _t(xs):
    return torch.tensor(xs, dtype=torch.float32)


def test_ppo_asymmetric_and_dual_clip_by_hand():
    # eps_low 0.2 (r >= 0.8), eps_high 0.3 (r <= 1.3), dual clip c = 3
    ratio = _t([1.5, 0.5, 0.5, 1.5, 5.0, 1.25, 0.75, 0.75])
    adv = _t([1.0, 1.0, -1.0, -1.0, -1.0, 2.0, 2.0, -2.0])
    want = _t([-1.3, -0.5, 0.8, 1.5, 3.0, -2.5, -1.5, 1.6])
    want_clip = _t([1, 0, 1, 0, 0, 0, 0, 1])
    want_dual = _t([0, 0, 0, 0, 1, 0, 0, 0])
    out = ppo_policy_loss(ratio.log(), adv, 0.2, 0.3, eps_clip_c=3.0)
    torch.testing.assert_close(out.loss, want, atol=1e-6, rtol=0)
    assert out.clipfrac.tolist() == want_clip.tolist()
    assert out.dual_clipfrac.tolist() == want_dual.tolist()
    # without dual clip the r=5, A=-1 token is unbounded: loss = 5
    plain = ppo_policy_loss(ratio.log(), adv, 0.2, 0.3)
    assert plain.loss[4].item() == pytest.approx(5.0, abs=1e-6)
    assert plain.dual_clipfrac.sum().item() == 0


def test_ppo_gradient_zero_when_clipped():
    log_ratio = torch.log(_t([1.5, 1.1])).requires_grad_()
    out = ppo_policy_loss(log_ratio, _t([1.0, 1.0]), 0.2, 0.2)
    out.loss.sum().backward()
    assert log_ratio.grad[0].item() == 0.0  # clipped: no gradient
    assert log_ratio.grad[1].item() == pytest.approx(-1.1, abs=1e-6)  # d(-A r)/dlog r = -A r


def test_kl_estimators_by_hand():
    logp, ref = _t([math.log(0.5)]), _t([math.log(0.25)])
    lr = math.log(2.0)
    assert kl_estimate(logp, ref, "k1").item() == pytest.approx(lr, abs=1e-6)
    assert kl_estimate(logp, ref, "k2").item() == pytest.approx(lr * lr / 2, abs=1e-6)
    assert kl_estimate(logp, ref, "k3").item() == pytest.approx(0.5 - 1 + lr, abs=1e-6)
    assert kl_estimate(logp, ref, "low_var_kl").item() == pytest.approx(0.5 - 1 + lr, abs=1e-6)
    # low_var_kl clamps to 10; k3 does not
    big = kl_estimate(_t([-30.0]), _t([0.0]), "low_var_kl").item()
    assert big == 10.0
    assert kl_estimate(_t([-30.0]), _t([0.0]), "k3").item() > 1e10
    assert kl_estimate(_t([0.3]), _t([0.3]), "k3").item() == 0.0
    with pytest.raises(ValueError, match="kl-loss-type"):
        kl_estimate(logp, ref, "k9")


def test_loss_weights_reductions():
    masks = [_t([1, 1, 0]), _t([1])]
    seq = loss_weights(masks, "sequence_mean", n_samples=2, n_tokens=3)
    assert [w.tolist() for w in seq] == [[0.25, 0.25, 0.0], [0.5]]
    tok = loss_weights(masks, "token_mean", n_samples=2, n_tokens=3)
    assert [w.tolist() for w in tok] == [pytest.approx([1 / 3, 1 / 3, 0.0]), pytest.approx([1 / 3])]
    const = loss_weights(masks, "constant", n_samples=2, n_tokens=3, constant=4)
    assert [w.tolist() for w in const] == [[0.125, 0.125, 0.0], [0.125]]


def test_gspo_sequence_ratio():
    logp = _t([-1.0, -2.0, -3.0, -1.0, -1.0])
    old = _t([-1.5, -2.5, -1.0, -2.0, -1.0])
    mask = _t([1, 1, 0, 1, 1])
    seg = torch.tensor([0, 0, 0, 1, 1])
    lr = sequence_log_ratio(logp, old, mask, seg, 2)
    torch.testing.assert_close(lr, _t([0.5, 0.5, 0.5, 0.5, 0.5]))


def test_tis_weights_and_metrics():
    w, raw = tis_weights(_t([math.log(3.0), 0.0, 0.0]), _t([0.0, 0.0, math.log(10.0)]), clip=2.0, clip_low=0.5)
    torch.testing.assert_close(w, _t([2.0, 1.0, 0.5]))
    torch.testing.assert_close(raw, _t([3.0, 1.0, 0.1]))


def _inputs(logp, old, adv, mask, **kw):
    masks = [mask]
    weight = loss_weights(masks, "token_mean", 1, int(mask.sum()))[0]
    return LossInputs(logp=logp, old_logp=old, advantages=adv, mask=mask, weight=weight,
                      segments=torch.zeros(len(mask), dtype=torch.long), n_seq=1, **kw)


def test_compute_loss_policy_kl_entropy_tis():
    cfg = AlgoConfig(eps_clip=0.2, use_kl_loss=True, kl_loss_coef=0.5, kl_loss_type="k1", entropy_coef=0.1,
                     use_tis=True, tis_clip=2.0)
    logp = _t([math.log(0.6), math.log(0.5), math.log(0.1)])
    old = _t([math.log(0.5), math.log(0.5), math.log(0.1)])  # token0 ratio 1.2 (at the clip edge)
    ref = _t([math.log(0.5), math.log(0.25), 0.0])
    rollout = _t([math.log(0.5), math.log(0.5) - math.log(3.0), 0.0])  # token1 TIS weight 3 -> 2
    adv = _t([1.0, 1.0, 1.0])
    mask = _t([1, 1, 0])
    ent = _t([1.0, 3.0, 100.0])
    loss, red, sums = compute_loss(cfg, _inputs(logp, old, adv, mask, rollout_logp=rollout, ref_logp=ref,
                                                entropy=ent))
    pg = (-1.2 * 1.0 + -1.0 * 2.0) / 2
    kl = (math.log(1.2) + math.log(2.0)) / 2
    entropy = (1.0 + 3.0) / 2
    assert red["pg_loss"].item() == pytest.approx(pg, abs=1e-5)
    assert red["kl_loss"].item() == pytest.approx(kl, abs=1e-5)
    assert red["entropy_loss"].item() == pytest.approx(entropy, abs=1e-6)
    assert loss.item() == pytest.approx(pg + 0.5 * kl - 0.1 * entropy, abs=1e-5)
    assert sums["tis_clipfrac"].item() == 1.0
    assert sums["tis"].item() == pytest.approx(1.0 + 3.0, abs=1e-5)
    assert sums["train_rollout_logprob_abs_diff"].item() == pytest.approx(math.log(3.0), abs=1e-6)
    assert sums["ppo_kl"].item() == pytest.approx(-math.log(1.2), abs=1e-6)
    assert sums["pg_clipfrac"].item() == 0.0


def test_compute_loss_step0_ratio_one():
    cfg = AlgoConfig()
    logp = torch.tensor([-0.7, -1.3, -2.0], requires_grad=True)
    loss, red, sums = compute_loss(cfg, _inputs(logp, logp.detach().clone(), _t([1.0, -1.0, 0.5]), _t([1, 1, 1])))
    assert sums["ppo_kl"].item() == 0.0 and sums["pg_clipfrac"].item() == 0.0
    assert red["pg_loss"].item() == pytest.approx(-(1.0 - 1.0 + 0.5) / 3, abs=1e-7)
    loss.backward()
    torch.testing.assert_close(logp.grad, _t([-1.0, 1.0, -0.5]) / 3)


def test_sft_loss():
    cfg = AlgoConfig(loss_type="sft_loss")
    logp = _t([-1.0, -3.0, -5.0])
    loss, red, _ = compute_loss(cfg, _inputs(logp, logp, _t([0, 0, 0]), _t([1, 1, 0])))
    assert loss.item() == pytest.approx(2.0)


def test_load_function_errors():
    assert load_function("math.sqrt") is math.sqrt
    with pytest.raises(ValueError, match="dotted path"):
        load_function("sqrt")
    with pytest.raises(ValueError, match="cannot import module 'no_such_mod'"):
        load_function("no_such_mod.f")
    with pytest.raises(ValueError, match="no attribute 'nope'"):
        load_function("math.nope")


def test_config_validation_names_flags():
    with pytest.raises(ConfigError, match="--num-steps-per-rollout"):
        TrainerConfig(rollout_batch_size=3, n_samples_per_prompt=3, num_steps_per_rollout=2).validate()
    with pytest.raises(ConfigError, match="--global-batch-size 4"):
        TrainerConfig(rollout_batch_size=3, n_samples_per_prompt=2, global_batch_size=4).validate()
    with pytest.raises(ConfigError, match="--max-tokens-per-gpu"):
        TrainerConfig(use_dynamic_batch_size=True).validate()
    with pytest.raises(ConfigError, match="--custom-loss-function-path"):
        AlgoConfig(loss_type="custom_loss").validate()
    with pytest.raises(ConfigError, match="--eps-clip-c"):
        AlgoConfig(eps_clip_c=0.5).validate()
    with pytest.raises(ConfigError, match="--advantage-estimator 'ppo'"):
        AlgoConfig(advantage_estimator="ppo").validate()
    with pytest.raises(ConfigError, match="--loss-reduction-constant"):
        AlgoConfig(loss_reduction="constant").validate()
    assert AlgoConfig(calculate_per_token_loss=True).loss_reduction == "token_mean"
    assert AlgoConfig(eps_clip=0.3).eps_clip_high == 0.3
    cfg = TrainerConfig(rollout_batch_size=4, n_samples_per_prompt=2, num_steps_per_rollout=2)
    cfg.validate()
    assert cfg.step_batch_size(8) == 4
    # every field carries a help string for the CLI
    from dataclasses import fields
    for cls in (AlgoConfig, TrainerConfig):
        assert all(f.metadata.get("help") for f in fields(cls))
