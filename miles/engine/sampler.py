"""Batched sampling with per-request temperature / top-p / top-k / seed.

Log-prob definition (the trainer computes the same quantity, see `miles.models.token_logprobs`):
    logprob(token) = log_softmax(logits / T)[token], computed in float32,
where T is the request's temperature, and T = 1 for greedy requests (temperature 0). The top-p / top-k
truncation and the min_new_tokens ban on stop tokens change which token is drawn, not the reported
log-prob: it is always taken from the full, untruncated temperature-scaled distribution.

Sampling is an exponential race, `argmax(log p_trunc - log E)` with E ~ Exp(1), which draws exactly from
p_trunc. The uniform behind E for (request, position p, vocab entry v) is a counter-based hash of
(seed, p, v), so a seeded request yields the same tokens whatever else is in the batch, after
preemption and recompute; no per-row generator loop is needed. On CUDA, rows without truncation or bans
go through one fused Triton kernel (`triton_sampler.py`) that uses the bit-identical noise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_C1 = 0x9E3779B97F4A7C15 - (1 << 64)
_C2 = 0xBF58476D1CE4E5B9 - (1 << 64)
_C3 = 0x94D049BB133111EB - (1 << 64)
_C4 = 0x2545F4914F6CDD1D


def _shr(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def hash_uniform(seeds: torch.Tensor, positions: torch.Tensor, vocab: int) -> torch.Tensor:
    """[B, vocab] float32 uniforms in (0, 1), a pure function of (seed, position, vocab index)."""
    base = (seeds * _C1) ^ (positions * _C4 + 0x632BE59BD9B4E019)
    z = base[:, None] + torch.arange(vocab, device=seeds.device, dtype=torch.int64)[None, :] * _C1
    z = (z ^ _shr(z, 30)) * _C2
    z = (z ^ _shr(z, 27)) * _C3
    z = z ^ _shr(z, 31)
    return (_shr(z, 40).to(torch.float32) + 0.5) * (1.0 / (1 << 24))


@dataclass
class SamplingBatch:
    """Per-row sampling parameters as tensors on the logits' device."""

    temperatures: torch.Tensor  # [B] float32, 0 = greedy
    top_ps: torch.Tensor  # [B] float32
    top_ks: torch.Tensor  # [B] int64, <= 0 = off
    seeds: torch.Tensor  # [B] int64
    positions: torch.Tensor  # [B] int64: index of the token being sampled in its sequence
    banned: list[list[int]]  # per row: token ids that may not be drawn (min_new_tokens)
    all_greedy: bool
    any_truncation: bool


def _truncate(logp: torch.Tensor, top_ps: torch.Tensor, top_ks: torch.Tensor) -> torch.Tensor:
    """Set log-probs outside each row's top-k / top-p nucleus to -inf (keeps at least the best token)."""
    sorted_lp, idx = logp.sort(dim=-1, descending=True)
    probs = sorted_lp.exp()
    cum_before = probs.cumsum(-1) - probs
    ranks = torch.arange(logp.shape[-1], device=logp.device)[None, :]
    k = torch.where(top_ks > 0, top_ks, logp.shape[-1])[:, None]
    drop = (cum_before >= top_ps[:, None]) | (ranks >= k)
    drop[:, 0] = False
    return logp.masked_fill(drop.scatter(-1, idx, drop), float("-inf"))


def sample(logits: torch.Tensor, sb: SamplingBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row. Returns (tokens [B] int64, logprobs [B] float32) per the module docstring."""
    if logits.is_cuda and not sb.any_truncation and not any(sb.banned):
        from miles.engine.triton_sampler import fused_sample

        return fused_sample(logits, sb.temperatures, sb.seeds, sb.positions)
    x = logits.float()
    greedy = sb.temperatures == 0
    temps = torch.where(greedy, torch.ones_like(sb.temperatures), sb.temperatures)
    logp = torch.log_softmax(x / temps[:, None], dim=-1)
    draw = logp
    if any(sb.banned):
        rows = [i for i, b in enumerate(sb.banned) for _ in b]
        cols = [t for b in sb.banned for t in b]
        draw = logp.index_put((torch.tensor(rows, device=x.device), torch.tensor(cols, device=x.device)),
                              torch.tensor(float("-inf"), device=x.device))
    if sb.all_greedy:
        tokens = draw.argmax(-1)
    else:
        if sb.any_truncation:
            draw = _truncate(draw, sb.top_ps, sb.top_ks)
        noise = hash_uniform(sb.seeds, sb.positions, x.shape[-1])
        raced = draw - torch.log(-torch.log(noise))  # Gumbel-max == exponential race
        tokens = torch.where(greedy, draw.argmax(-1), raced.argmax(-1))
    return tokens, logp.gather(-1, tokens[:, None]).squeeze(-1)
