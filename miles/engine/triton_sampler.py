"""Fused CUDA sampler for rows without top-p / top-k / banned tokens: one pass over the logits computes the
log-sum-exp of logits / T, the Gumbel-max draw with the counter-based noise of `sampler.hash_uniform`
(bit-identical uniforms), and the chosen token's log-prob. Greedy rows (T = 0) take the argmax, T = 1."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _sample_kernel(Logits, stride, Temps, Seeds, Pos, OutTok, OutLp, V, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    t = tl.load(Temps + row)
    greedy = t == 0.0
    inv_t = tl.where(greedy, 1.0, 1.0 / tl.where(greedy, 1.0, t))
    c1 = tl.full([], 0x9E3779B97F4A7C15, tl.uint64)
    c2 = tl.full([], 0xBF58476D1CE4E5B9, tl.uint64)
    c3 = tl.full([], 0x94D049BB133111EB, tl.uint64)
    c4 = tl.full([], 0x2545F4914F6CDD1D, tl.uint64)
    k = tl.full([], 0x632BE59BD9B4E019, tl.uint64)
    seed = tl.load(Seeds + row).to(tl.uint64)
    pos = tl.load(Pos + row).to(tl.uint64)
    base = (seed * c1) ^ (pos * c4 + k)
    m = -float("inf")
    s = 0.0
    best = -float("inf")
    best_idx = 0
    for v0 in range(0, V, BLOCK):
        offs = v0 + tl.arange(0, BLOCK)
        mask = offs < V
        x = tl.load(Logits + row * stride + offs, mask=mask, other=-float("inf")).to(tl.float32) * inv_t
        m_new = tl.maximum(m, tl.max(x, 0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), 0)
        m = m_new
        z = base + offs.to(tl.uint64) * c1
        z = (z ^ (z >> 30)) * c2
        z = (z ^ (z >> 27)) * c3
        z = z ^ (z >> 31)
        u = ((z >> 40).to(tl.float32) + 0.5) * (1.0 / 16777216.0)
        score = tl.where(greedy, x, x - tl.log(-tl.log(u)))
        score = tl.where(mask, score, -float("inf"))
        blk = tl.max(score, 0)
        idx = tl.argmax(score, 0) + v0
        take = blk > best
        best_idx = tl.where(take, idx, best_idx)
        best = tl.where(take, blk, best)
    x_tok = tl.load(Logits + row * stride + best_idx).to(tl.float32) * inv_t
    tl.store(OutTok + row, best_idx.to(tl.int64))
    tl.store(OutLp + row, x_tok - (m + tl.log(s)))


def fused_sample(logits: torch.Tensor, temps: torch.Tensor, seeds: torch.Tensor,
                 positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [B, V] (any float dtype, unit stride in V) -> (tokens [B] int64, logprobs [B] float32)."""
    B, V = logits.shape
    tokens = torch.empty(B, dtype=torch.long, device=logits.device)
    logprobs = torch.empty(B, dtype=torch.float32, device=logits.device)
    _sample_kernel[(B,)](logits, logits.stride(0), temps, seeds, positions, tokens, logprobs, V,
                         BLOCK=4096, num_warps=8)
    return tokens, logprobs
