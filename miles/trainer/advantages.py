"""Advantage estimators (slime semantics): rewards per sample -> advantages per response token.

- grpo / gspo: reward minus its group mean, divided by the group std (unbiased, + 1e-6) unless
  --disable-grpo-std-normalization (Dr.GRPO); broadcast to every response token.
- reinforce_plus_plus: token rewards -kl_coef * KL(old || ref) plus the reward on the last trainable token,
  discounted returns with gamma (masked tokens carry no reward).
- reinforce_plus_plus_baseline: reward minus its group mean, broadcast, minus kl_coef * KL per token.
- --normalize-advantages: masked whitening over the whole rollout batch (all ranks via `all_reduce`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from miles.trainer.config import AlgoConfig


def group_normalize(rewards: Tensor, groups: Sequence[int], std_normalization: bool, eps: float = 1e-6) -> Tensor:
    """Centre each reward on its group's mean; optionally divide by the group's (unbiased) std + eps.

    Groups of one sample have no std: they are only centred (to 0), as slime does with n=1.
    """
    rewards = rewards.to(torch.float32)
    out = torch.empty_like(rewards)
    group_ids = torch.as_tensor(list(groups))
    for g in torch.unique(group_ids).tolist():
        idx = (group_ids == g).nonzero(as_tuple=True)[0]
        r = rewards[idx]
        centred = r - r.mean()
        if std_normalization and len(idx) > 1:
            centred = centred / (r.std() + eps)
        out[idx] = centred
    return out


def discounted_returns(token_rewards: Tensor, mask: Tensor, gamma: float) -> Tensor:
    """returns[t] = sum_{s>=t} gamma^(s-t) * r[s] * mask[s] (computed backwards)."""
    r = token_rewards.to(torch.float32) * mask
    out = torch.empty_like(r)
    running = torch.zeros((), dtype=torch.float32)
    for t in range(r.numel() - 1, -1, -1):
        running = r[t] + gamma * running
        out[t] = running
    return out


def reinforce_plus_plus_returns(reward: float, kl: Tensor | None, mask: Tensor, kl_coef: float,
                                gamma: float) -> Tensor:
    """REINFORCE++ token returns of one sample: -kl_coef*KL per token, reward on the last trainable token."""
    token_rewards = torch.zeros(mask.numel(), dtype=torch.float32)
    if kl is not None and kl_coef != 0:
        token_rewards -= kl_coef * kl.to(torch.float32)
    trainable = mask.nonzero()
    if trainable.numel():  # a removed sample (all-zero mask) gets no reward token
        token_rewards[int(trainable[-1])] += reward
    return discounted_returns(token_rewards, mask.to(torch.float32), gamma)


def masked_whiten(values: list[Tensor], masks: list[Tensor], all_reduce: Callable[[Tensor], None] | None = None,
                  eps: float = 1e-8) -> list[Tensor]:
    """(x - mean) / sqrt(var + eps) with mean/var over masked tokens of all samples (and all ranks).

    `all_reduce` sums a stats tensor in place across ranks (None = single process). var is unbiased.
    """
    stats = torch.zeros(3, dtype=torch.float64)
    for v, m in zip(values, masks):
        m = m.to(torch.float64)
        v = v.to(torch.float64)
        stats += torch.stack([(v * m).sum(), (v * v * m).sum(), m.sum()])
    if all_reduce is not None:
        all_reduce(stats)
    total, total_sq, count = stats.tolist()
    if count < 2:
        return [v.clone() for v in values]
    mean = total / count
    var = (total_sq / count - mean * mean) * count / (count - 1)
    scale = 1.0 / (max(var, 0.0) + eps) ** 0.5
    return [((v.to(torch.float64) - mean) * scale).to(torch.float32) * (m > 0) for v, m in zip(values, masks)]


def scalar_rewards(cfg: AlgoConfig, rewards: Sequence[float], groups: Sequence[int]) -> Tensor:
    """Per-sample rewards after the estimator's group normalisation (needs every sample of each group)."""
    r = torch.tensor([float(x) for x in rewards], dtype=torch.float32)
    if not cfg.rewards_normalization or cfg.advantage_estimator == "reinforce_plus_plus":
        return r
    std = cfg.grpo_std_normalization and cfg.advantage_estimator in ("grpo", "gspo")
    return group_normalize(r, groups, std)


def token_advantages(cfg: AlgoConfig, rewards: Tensor, masks: list[Tensor], kl: list[Tensor] | None = None,
                     all_reduce: Callable[[Tensor], None] | None = None) -> list[Tensor]:
    """Per-token advantages from `scalar_rewards` output for any subset of samples (e.g. one rank's).

    `kl` (per-token log pi_old - log pi_ref) enters the REINFORCE++ estimators when cfg.kl_coef != 0;
    whitening statistics are summed over ranks with `all_reduce`.
    """
    est = cfg.advantage_estimator
    use_kl = kl is not None and cfg.kl_coef != 0
    advs = []
    for i, (ri, m) in enumerate(zip(rewards.tolist(), masks)):
        if est in ("grpo", "gspo"):
            a = torch.full((m.numel(),), ri) * m
        elif est == "reinforce_plus_plus_baseline":
            a = torch.full((m.numel(),), ri)
            if use_kl:
                a = a - cfg.kl_coef * kl[i].to(torch.float32)
            a = a * m
        elif est == "reinforce_plus_plus":
            a = reinforce_plus_plus_returns(ri, kl[i] if use_kl else None, m, cfg.kl_coef, cfg.gamma)
        else:
            raise ValueError(f"--advantage-estimator {est!r} is not supported")
        advs.append(a)
    if cfg.normalize_advantages:
        advs = masked_whiten(advs, masks, all_reduce)
    return advs


def compute_advantages(cfg: AlgoConfig, rewards: Sequence[float], groups: Sequence[int], masks: list[Tensor],
                       kl: list[Tensor] | None = None,
                       all_reduce: Callable[[Tensor], None] | None = None) -> list[Tensor]:
    """Per-token advantages (fp32, one tensor per sample, length = response length) for all given samples."""
    return token_advantages(cfg, scalar_rewards(cfg, rewards, groups), masks, kl, all_reduce)
