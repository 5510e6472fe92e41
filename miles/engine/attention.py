"""Paged-KV attention backend for the engine (implements `miles.models.attention.AttentionBackend`).

Per layer, the new k/v rows are written into the paged cache at `slot_mapping`, then every query attends
over its sequence's cached context through the block table (causal: the query at position p sees keys at
positions <= p). On CUDA the Triton kernels of `triton_attention.py` run; elsewhere one SDPA call per
sequence over the gathered context.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

try:  # CUDA kernels; absent (no triton) on CPU-only installs
    from miles.engine.triton_attention import paged_attention as triton_paged_attention
except ImportError:
    triton_paged_attention = None


class KVCache:
    """K and V for all layers: [layers, num_slots, n_kv, head_dim] each, slot = block_id * block_size + offset.

    One extra block at the end is scratch space for the padded rows of CUDA-graph batches.
    """

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, n_kv: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        self.num_blocks, self.block_size = num_blocks, block_size
        shape = (num_layers, (num_blocks + 1) * block_size, n_kv, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    @property
    def scratch_slot(self) -> int:
        return self.num_blocks * self.block_size

    @staticmethod
    def bytes_per_token(num_layers: int, n_kv: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * n_kv * head_dim * torch.empty((), dtype=dtype).element_size()


@dataclass
class AttnMetadata:
    """Where this step's tokens go and what each sequence attends to.

    Sequences are laid out back to back in the flat token dim: sequence i owns rows
    `query_start[i] : query_start[i] + query_len[i]`, which are its positions `context_len[i] - query_len[i]`
    up to `context_len[i] - 1`.
    """

    slot_mapping: torch.Tensor  # [T] int64
    block_tables: torch.Tensor  # [S, max_blocks] int32
    context_lens: torch.Tensor  # [S] int32
    query_start: torch.Tensor  # [S] int32
    query_lens: torch.Tensor  # [S] int32
    query_lens_cpu: list[int] | None  # SDPA path only
    context_lens_cpu: list[int] | None
    # Triton only: sequences with one query token go to the decode kernel (their flat row, block-table row and
    # context length), longer queries to the prefill kernel in tiles of (sequence index, first query offset).
    decode_rows: torch.Tensor | None = None  # [Sd] int32
    decode_seqs: torch.Tensor | None = None  # [Sd] int32/int64: row of block_tables
    decode_ctx: torch.Tensor | None = None  # [Sd] int32/int64
    prefill_tiles: torch.Tensor | None = None  # [n_tiles, 2] int32


class PagedAttention:
    """The backend passed to `CausalLM.forward` for one engine step."""

    def __init__(self, cache: KVCache, md: AttnMetadata, use_triton: bool, num_partitions: int = 1,
                 part_len: int = 0):
        self.cache, self.md, self.use_triton = cache, md, use_triton
        self.num_partitions, self.part_len = num_partitions, part_len
        self._gather: list[tuple[torch.Tensor, torch.Tensor | None]] | None = None

    def __call__(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.use_triton:
            return triton_paged_attention(layer_idx, q, k, v, self.cache, self.md, self.num_partitions, self.part_len)
        kc, vc = self.cache.k[layer_idx], self.cache.v[layer_idx]
        kc.index_copy_(0, self.md.slot_mapping, k.to(kc.dtype))
        vc.index_copy_(0, self.md.slot_mapping, v.to(vc.dtype))
        return self._sdpa(q, kc, vc)

    def _gather_plan(self, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """Per sequence: cache slots of its context, and the causal mask (None when query == context)."""
        if self._gather is None:
            bs, plan = self.cache.block_size, []
            tables = self.md.block_tables.cpu()
            for i, (ql, cl) in enumerate(zip(self.md.query_lens_cpu, self.md.context_lens_cpu)):
                pos = torch.arange(cl)
                slots = (tables[i, pos // bs].long() * bs + pos % bs).to(device)
                mask = None
                if ql != cl:
                    qpos = torch.arange(cl - ql, cl)
                    mask = (pos[None, :] <= qpos[:, None]).to(device)
                plan.append((slots, mask))
            self._gather = plan
        return self._gather

    def _sdpa(self, q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(q)
        gqa = kc.shape[1] != q.shape[1]
        start = 0
        for (slots, mask), ql in zip(self._gather_plan(q.device), self.md.query_lens_cpu):
            qs = q[start : start + ql].transpose(0, 1)[None]
            ks, vs = (c.index_select(0, slots).to(q.dtype).transpose(0, 1)[None] for c in (kc, vc))
            o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, is_causal=mask is None, enable_gqa=gqa)
            out[start : start + ql] = o[0].transpose(0, 1)
            start += ql
        return out
