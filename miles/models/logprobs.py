"""Chunked, differentiable token log-probabilities and entropy.

**Definition used everywhere in Miles**: ``logp = log_softmax(logits / T)[target]`` computed in fp32, with
``logits = hidden @ weight.T`` and ``T`` the sampling temperature; no top-p / top-k truncation. Entropy is
that of the same distribution, ``-sum_v p_v log p_v``.

Only ``chunk_size x V`` fp32 logits exist at any time, in the forward *and* the backward (a custom autograd
Function recomputes each chunk's logits from the saved per-token logsumexp).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _chunk_stats(h: torch.Tensor, w: torch.Tensor, tgt: torch.Tensor, temperature: float, with_entropy: bool):
    z = F.linear(h, w).float()
    if temperature != 1.0:
        z = z / temperature
    lse = torch.logsumexp(z, dim=-1)
    logp = z.gather(1, tgt[:, None]).squeeze(1) - lse
    ent = None
    if with_entropy:
        logp_all = z - lse[:, None]
        ent = -(logp_all.exp() * logp_all).sum(-1)
    return z, lse, logp, ent


class _ChunkedLogprob(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, chunk_size, with_entropy):
        n = hidden.shape[0]
        logp = torch.empty(n, dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(logp)
        ent = torch.empty_like(logp) if with_entropy else None
        for s in range(0, n, chunk_size):
            e = min(s + chunk_size, n)
            _, lse[s:e], logp[s:e], ent_c = _chunk_stats(hidden[s:e], weight, targets[s:e], temperature, with_entropy)
            if with_entropy:
                ent[s:e] = ent_c
        ctx.save_for_backward(hidden, weight, targets, lse, ent if with_entropy else lse)
        ctx.temperature, ctx.chunk_size, ctx.with_entropy = temperature, chunk_size, with_entropy
        if with_entropy:
            return logp, ent
        ctx.mark_non_differentiable(lse)
        return logp, lse  # lse returned only to keep the output arity fixed; not differentiable

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        hidden, weight, targets, lse, ent = ctx.saved_tensors
        t, cs, with_ent = ctx.temperature, ctx.chunk_size, ctx.with_entropy
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        g_h = torch.empty_like(hidden) if need_h else None
        g_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        for s in range(0, hidden.shape[0], cs):
            e = min(s + cs, hidden.shape[0])
            h = hidden[s:e]
            z = F.linear(h, weight).float()
            if t != 1.0:
                z = z / t
            p = torch.exp(z - lse[s:e, None])
            if g_logp is None:
                gz = torch.zeros_like(p)
            else:
                gz = -p * g_logp[s:e, None].float()
                gz.scatter_add_(1, targets[s:e, None], g_logp[s:e, None].float())
            if with_ent and g_ent is not None:
                # dH/dz_j = -p_j (z_j - lse + H)
                gz -= g_ent[s:e, None].float() * p * (z - lse[s:e, None] + ent[s:e, None])
            if t != 1.0:
                gz = gz / t
            gz = gz.to(weight.dtype)  # like autograd through `F.linear(h, w).float()`: matmuls in the model dtype
            if need_h:
                g_h[s:e] = (gz @ weight).to(hidden.dtype)
            if need_w:
                g_w += (gz.t() @ h.to(weight.dtype)).float()
        return g_h, (g_w.to(weight.dtype) if need_w else None), None, None, None, None


def token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs of ``targets`` (and optionally the entropy) under ``log_softmax(hidden @ weight.T / T)``.

    hidden [N, H] (only the positions you need), weight [V, H] (``model.lm_head_weight``), targets [N] int.
    Returns ``(logp [N] fp32, entropy [N] fp32 or None)``; differentiable w.r.t. hidden and weight.
    """
    if hidden.dim() != 2 or targets.shape != hidden.shape[:1]:
        raise ValueError(f"token_logprobs: expected hidden [N, H] and targets [N], got {list(hidden.shape)}, "
                         f"{list(targets.shape)}")
    if temperature <= 0:
        raise ValueError(f"token_logprobs: temperature must be > 0, got {temperature}")
    targets = targets.long()
    logp, ent = _ChunkedLogprob.apply(hidden, weight, targets, float(temperature), int(chunk_size), with_entropy)
    return logp, (ent if with_entropy else None)
