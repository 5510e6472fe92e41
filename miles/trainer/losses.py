"""Per-token loss terms and their aggregation over a global batch.

All tensors are flat over the response tokens of one micro-batch (samples concatenated). Aggregation
is by precomputed per-token weights that already carry the global normaliser (see `loss_weights`), so
summing a micro-batch's `(x * weight).sum()` over all micro-batches and ranks gives the global-batch
value exactly, whatever the packing.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from miles.trainer.config import AlgoConfig


def load_function(path: str) -> Callable:
    """Resolve a slime-style dotted path `package.module.attr` (split on the last dot)."""
    module_name, _, attr = path.rpartition(".")
    if not module_name:
        raise ValueError(f"function path {path!r} must be a dotted path 'package.module.function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"cannot import module {module_name!r} of function path {path!r}: {e}") from e
    if not hasattr(module, attr):
        raise ValueError(f"module {module_name!r} has no attribute {attr!r} (function path {path!r})")
    return getattr(module, attr)


# ---------------------------------------------------------------- aggregation weights

def loss_weights(masks: list[Tensor], reduction: str, n_samples: int, n_tokens: int,
                 constant: int | None = None) -> list[Tensor]:
    """Per-token weights for one micro-batch's samples, normalised over the *global* batch.

    sequence_mean: mask / (tokens_of_sample * n_samples)  (slime default: mean over samples of token means)
    token_mean:    mask / n_tokens                         (--calculate-per-token-loss)
    constant:      mask / (constant * n_samples)           (Dr.GRPO)
    """
    out = []
    for m in masks:
        m = m.to(torch.float32)
        if reduction == "sequence_mean":
            out.append(m / (m.sum().clamp_min(1.0) * n_samples))
        elif reduction == "token_mean":
            out.append(m / max(n_tokens, 1))
        elif reduction == "constant":
            out.append(m / (float(constant) * n_samples))
        else:
            raise ValueError(f"unknown --loss-reduction {reduction!r}")
    return out


# ---------------------------------------------------------------- per-token terms

def kl_estimate(logp: Tensor, ref_logp: Tensor, kl_type: str) -> Tensor:
    """Per-token KL(pi || ref) estimators with log_ratio = logp - ref_logp (Schulman's k1/k2/k3)."""
    log_ratio = logp.float() - ref_logp.float()
    if kl_type == "k1":
        return log_ratio
    if kl_type == "k2":
        return log_ratio.pow(2) / 2.0
    if kl_type in ("k3", "low_var_kl"):
        neg = -log_ratio
        if kl_type == "low_var_kl":
            neg = neg.clamp(-20.0, 20.0)
        kl = neg.exp() - 1.0 - neg
        return kl.clamp(-10.0, 10.0) if kl_type == "low_var_kl" else kl
    raise ValueError(f"unknown --kl-loss-type {kl_type!r}")


@dataclass
class PolicyLossOut:
    loss: Tensor  # per-token policy loss
    clipfrac: Tensor  # 1 where the clipped branch is taken (ratio outside the trust region against A)
    dual_clipfrac: Tensor  # 1 where the dual clip bound c*|A| is active
    ratio: Tensor


def ppo_policy_loss(log_ratio: Tensor, advantages: Tensor, eps_clip: float, eps_clip_high: float,
                    eps_clip_c: float | None = None) -> PolicyLossOut:
    """PPO clipped surrogate with asymmetric clip and optional dual clip (per token).

    loss = max(-A*r, -A*clip(r, 1-eps, 1+eps_high)); for A < 0 additionally min(., -c*A).
    """
    ratio = log_ratio.exp()
    loss1 = -advantages * ratio
    loss2 = -advantages * ratio.clamp(1.0 - eps_clip, 1.0 + eps_clip_high)
    clipped = torch.maximum(loss1, loss2)
    clipfrac = (loss2 > loss1).float()
    dual = torch.zeros_like(clipfrac)
    if eps_clip_c is not None:
        loss3 = -advantages * eps_clip_c
        dual = ((advantages < 0) & (loss3 < clipped)).float()
        clipped = torch.where(advantages < 0, torch.minimum(clipped, loss3), clipped)
    return PolicyLossOut(clipped, clipfrac, dual, ratio)


def sequence_log_ratio(logp: Tensor, old_logp: Tensor, mask: Tensor, segments: Tensor, n_seq: int) -> Tensor:
    """GSPO: per-token copy of its sequence's masked mean of (logp - old_logp)."""
    diff = (logp - old_logp) * mask
    num = torch.zeros(n_seq, dtype=diff.dtype, device=diff.device).index_add(0, segments, diff)
    den = torch.zeros(n_seq, dtype=diff.dtype, device=diff.device).index_add(0, segments, mask.to(diff.dtype))
    return (num / den.clamp_min(1.0))[segments]


def tis_weights(old_logp: Tensor, rollout_logp: Tensor, clip: float, clip_low: float) -> tuple[Tensor, Tensor]:
    """Truncated importance weights pi_old / pi_rollout clamped to [clip_low, clip]; returns (weights, raw)."""
    raw = (old_logp.float() - rollout_logp.float()).exp()
    return raw.clamp(min=clip_low, max=clip), raw


# ---------------------------------------------------------------- full loss of one micro-batch

@dataclass
class LossInputs:
    """Flat per-response-token tensors of one micro-batch (N tokens over n_seq samples)."""

    logp: Tensor  # current policy log-probs (with grad)
    old_logp: Tensor  # pi_old (pre-update trainer log-probs, or rollout ones with --use-rollout-logprobs)
    advantages: Tensor
    mask: Tensor  # loss mask (float 0/1)
    weight: Tensor  # aggregation weights from `loss_weights` (mask already folded in)
    segments: Tensor  # sample index within the micro-batch of every token (long)
    n_seq: int
    rollout_logp: Tensor | None = None
    ref_logp: Tensor | None = None
    entropy: Tensor | None = None  # with grad when entropy_coef != 0
    pg_reducer: Callable[[Tensor], Tensor] | None = None  # custom pg-loss reducer (already normalised)


def compute_loss(cfg: AlgoConfig, x: LossInputs) -> tuple[Tensor, dict[str, Tensor], dict[str, Tensor]]:
    """Loss of one micro-batch (to be summed over micro-batches and ranks) and its metrics.

    Returns (loss, reduced, token_sums): `reduced` are weighted like the loss (sum them over micro-batches
    and ranks); `token_sums` are masked sums to divide by the global number of loss tokens.
    """
    reduce = _weighted(x.weight)
    m = x.mask
    reduced: dict[str, Tensor] = {}
    sums: dict[str, Tensor] = {}
    if cfg.loss_type == "sft_loss":
        loss = reduce(-x.logp)
        reduced["sft_loss"] = loss.detach()
    elif cfg.loss_type == "policy_loss":
        if cfg.advantage_estimator == "gspo":
            log_ratio = sequence_log_ratio(x.logp, x.old_logp, m, x.segments, x.n_seq)
        else:
            log_ratio = x.logp - x.old_logp
        pl = ppo_policy_loss(log_ratio, x.advantages, cfg.eps_clip, cfg.eps_clip_high, cfg.eps_clip_c)
        pg = pl.loss
        if cfg.use_tis:
            if x.rollout_logp is None:
                raise ValueError("--use-tis needs rollout_log_probs on every sample")
            w, raw = tis_weights(x.old_logp, x.rollout_logp, cfg.tis_clip, cfg.tis_clip_low)
            pg = pg * w.detach()
            sums["tis"] = (raw * m).sum().detach()
            sums["tis_clipfrac"] = ((w != raw).float() * m).sum()
            sums["tis_abs"] = ((raw - 1).abs() * m).sum().detach()
        pg_loss = x.pg_reducer(pg) if x.pg_reducer is not None else reduce(pg)
        loss = pg_loss
        reduced["pg_loss"] = pg_loss.detach()
        sums["pg_clipfrac"] = (pl.clipfrac * m).sum()
        sums["pg_clipfrac_dual"] = (pl.dual_clipfrac * m).sum()
        sums["ppo_kl"] = ((x.old_logp - x.logp).detach() * m).sum()
    else:
        raise ValueError(f"compute_loss handles policy_loss/sft_loss, not {cfg.loss_type!r}")

    if cfg.use_kl_loss and x.ref_logp is not None:
        kl = kl_estimate(x.logp, x.ref_logp, cfg.kl_loss_type)
        kl_loss = reduce(kl)
        reduced["kl_loss"] = kl_loss.detach()
        if cfg.kl_loss_coef != 0:
            loss = loss + cfg.kl_loss_coef * kl_loss
    if x.entropy is not None:
        ent = reduce(x.entropy)
        reduced["entropy_loss"] = ent.detach()
        if cfg.entropy_coef != 0:
            loss = loss - cfg.entropy_coef * ent
    if x.rollout_logp is not None:
        sums["train_rollout_logprob_abs_diff"] = ((x.old_logp - x.rollout_logp).abs() * m).sum().detach()
    reduced["loss"] = loss.detach()
    return loss, reduced, sums


def _weighted(weight: Tensor) -> Callable[[Tensor], Tensor]:
    return lambda t: (t.float() * weight).sum()
