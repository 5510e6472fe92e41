"""Attention backend interface and the packed variable-length (training / prefill) backend.

A backend is any callable ``(layer_idx, q[T, n_heads, d], k[T, n_kv, d], v[T, n_kv, d]) -> [T, n_heads, d]``
receiving RoPE-rotated q/k; it applies softmax scale ``1/sqrt(d)``. The model never owns a KV cache: the
engine plugs its paged-KV backend in through this interface (it sees ``layer_idx`` to pick the cache).
"""

from __future__ import annotations

import inspect
import warnings
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F


@runtime_checkable
class AttentionBackend(Protocol):
    def __call__(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor: ...


def _varlen_fn():
    """torch's flash-attention varlen kernel when it supports GQA + causal windows, else None."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    return varlen_attn if "enable_gqa" in params and "window_size" in params else None


_VARLEN = _varlen_fn()


class VarlenAttention:
    """Causal attention inside each packed sequence, none across sequences.

    ``cu_seqlens`` [N+1] are cumulative sequence lengths over the flat token dim (``cu[0] = 0``,
    ``cu[-1] = T``). On CUDA with fp16/bf16 it uses torch's varlen flash-attention kernel when
    available; otherwise one SDPA call per sequence (CPU, fp32).
    """

    def __init__(self, cu_seqlens: torch.Tensor | list[int], use_varlen_kernel: bool | None = None):
        cu = torch.as_tensor(cu_seqlens, dtype=torch.int32)
        self.bounds = [int(x) for x in cu.tolist()]
        if self.bounds[0] != 0 or any(b > a for a, b in zip(self.bounds[1:], self.bounds)):
            raise ValueError(f"VarlenAttention: cu_seqlens must start at 0 and be non-decreasing, got {self.bounds}")
        self.cu_seqlens = cu
        self.max_seqlen = max((b - a for a, b in zip(self.bounds, self.bounds[1:])), default=0)
        self.use_varlen_kernel = use_varlen_kernel

    @classmethod
    def from_lengths(cls, lengths: list[int]) -> VarlenAttention:
        cu = [0]
        for n in lengths:
            cu.append(cu[-1] + int(n))
        return cls(cu)

    def __call__(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if q.shape[0] != self.bounds[-1]:
            raise ValueError(f"VarlenAttention: got {q.shape[0]} tokens but cu_seqlens covers {self.bounds[-1]}")
        use = self.use_varlen_kernel
        if use is None:
            use = _VARLEN is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
        if use and _VARLEN is not None:
            cu = self.cu_seqlens.to(q.device, non_blocking=True)
            gqa = k.shape[1] != q.shape[1]
            try:
                return _VARLEN(q, k, v, cu, cu, self.max_seqlen, self.max_seqlen, window_size=(-1, 0), enable_gqa=gqa)
            except RuntimeError as e:  # e.g. unsupported head_dim / GPU: fall back for the rest of the run
                _disable_varlen(e)
        return _sdpa_per_sequence(q, k, v, self.bounds)


def _disable_varlen(err: Exception) -> None:
    global _VARLEN
    warnings.warn(f"varlen flash attention unavailable ({err}); using per-sequence SDPA", stacklevel=3)
    _VARLEN = None


def _sdpa_per_sequence(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bounds: list[int]) -> torch.Tensor:
    gqa = k.shape[1] != q.shape[1]
    outs = []
    for a, b in zip(bounds, bounds[1:]):
        if b == a:
            continue
        qs, ks, vs = (t[a:b].transpose(0, 1)[None] for t in (q, k, v))  # [1, heads, L, d]
        o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=gqa)
        outs.append(o[0].transpose(0, 1))
    return torch.cat(outs, dim=0) if outs else q.new_empty(q.shape)
