"""Triton paged-attention kernels (CUDA): split-K decode with GQA head grouping, and varlen causal prefill.

Both read K/V through the block table one row gather per key (any block size), accumulate in fp32 with an
online softmax (exp2 domain), and are CUDA-graph safe (no host syncs, shapes fixed per batch size).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634


@triton.jit
def _decode_kernel(Q, K, V, BT, CTX, QROW, SEQ, AccP, MP, LP,
                   stride_qt, stride_qh, stride_kt, stride_kh, stride_bt, qk_scale, part_len, H,
                   G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
                   PAGE: tl.constexpr, NUM_PARTS: tl.constexpr, PREC: tl.constexpr):
    i = tl.program_id(0)
    kvh = tl.program_id(1)
    part = tl.program_id(2)
    s = tl.load(SEQ + i).to(tl.int64)
    row = tl.load(QROW + i).to(tl.int64)
    ctx = tl.load(CTX + i).to(tl.int32)
    start = part * part_len
    end = tl.minimum(ctx, start + part_len)
    offs_g = tl.arange(0, G_PAD)
    mask_g = offs_g < G
    offs_d = tl.arange(0, D)
    heads = kvh * G + offs_g
    q = tl.load(Q + row * stride_qt + heads[:, None] * stride_qh + offs_d[None, :], mask=mask_g[:, None], other=0.0)
    m = tl.full([G_PAD], -1e30, tl.float32)
    l = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < end
        page = tl.load(BT + s * stride_bt + offs_n // PAGE, mask=mask_n, other=0).to(tl.int64)
        slot = page * PAGE + offs_n % PAGE
        kv_off = slot[:, None] * stride_kt + kvh * stride_kh + offs_d[None, :]
        k = tl.load(K + kv_off, mask=mask_n[:, None], other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
        qk = tl.where(mask_n[None, :], qk, float("-inf"))
        m_new = tl.maximum(m, tl.max(qk, 1))
        p = tl.exp2(qk - m_new[:, None])
        alpha = tl.exp2(m - m_new)
        l = l * alpha + tl.sum(p, 1)
        v = tl.load(V + kv_off, mask=mask_n[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m = m_new
    base = (i * H + heads) * NUM_PARTS + part
    tl.store(MP + base, m, mask=mask_g)
    tl.store(LP + base, l, mask=mask_g)
    tl.store(AccP + base[:, None] * D + offs_d[None, :], acc, mask=mask_g[:, None])


@triton.jit
def _reduce_kernel(AccP, MP, LP, Out, QROW, stride_ot, stride_oh, H,
                   NUM_PARTS: tl.constexpr, P_PAD: tl.constexpr, D: tl.constexpr):
    i = tl.program_id(0)
    h = tl.program_id(1)
    row = tl.load(QROW + i).to(tl.int64)
    offs_p = tl.arange(0, P_PAD)
    mask_p = offs_p < NUM_PARTS
    offs_d = tl.arange(0, D)
    base = (i * H + h) * NUM_PARTS
    m = tl.load(MP + base + offs_p, mask=mask_p, other=-1e30)
    l = tl.load(LP + base + offs_p, mask=mask_p, other=0.0)
    w = tl.exp2(m - tl.max(m, 0))
    denom = tl.sum(w * l, 0)
    denom = tl.where(denom == 0.0, 1.0, denom)
    acc = tl.load(AccP + (base + offs_p)[:, None] * D + offs_d[None, :], mask=mask_p[:, None], other=0.0)
    out = tl.sum(w[:, None] * acc, 0) / denom
    tl.store(Out + row * stride_ot + h * stride_oh + offs_d, out.to(Out.dtype.element_ty))


@triton.jit
def _prefill_kernel(Q, K, V, Out, BT, CL, QS, QL, TILES,
                    stride_qt, stride_qh, stride_kt, stride_kh, stride_bt, stride_ot, stride_oh, qk_scale,
                    G: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    PAGE: tl.constexpr, PREC: tl.constexpr):
    t = tl.program_id(0)
    h = tl.program_id(1)
    kvh = h // G
    s = tl.load(TILES + 2 * t).to(tl.int64)
    m0 = tl.load(TILES + 2 * t + 1)
    qs = tl.load(QS + s).to(tl.int64)
    ql = tl.load(QL + s)
    ctx = tl.load(CL + s)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    mask_m = offs_m < ql
    qpos = ctx - ql + offs_m
    offs_d = tl.arange(0, D)
    rows = qs + offs_m
    q = tl.load(Q + rows[:, None] * stride_qt + h * stride_qh + offs_d[None, :], mask=mask_m[:, None], other=0.0)
    end = tl.minimum(ctx, ctx - ql + m0 + BLOCK_M)
    m = tl.full([BLOCK_M], -1e30, tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    for n0 in range(0, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < end
        page = tl.load(BT + s * stride_bt + offs_n // PAGE, mask=mask_n, other=0).to(tl.int64)
        slot = page * PAGE + offs_n % PAGE
        kv_off = slot[:, None] * stride_kt + kvh * stride_kh + offs_d[None, :]
        k = tl.load(K + kv_off, mask=mask_n[:, None], other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
        qk = tl.where((offs_n[None, :] <= qpos[:, None]) & mask_n[None, :], qk, float("-inf"))
        m_new = tl.maximum(m, tl.max(qk, 1))
        p = tl.exp2(qk - m_new[:, None])
        alpha = tl.exp2(m - m_new)
        l = l * alpha + tl.sum(p, 1)
        v = tl.load(V + kv_off, mask=mask_n[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m = m_new
    l = tl.where(l == 0.0, 1.0, l)
    out = acc / l[:, None]
    tl.store(Out + rows[:, None] * stride_ot + h * stride_oh + offs_d[None, :], out.to(Out.dtype.element_ty),
             mask=mask_m[:, None])


PREFILL_BLOCK_M = 64
DECODE_BLOCK_N = 64


def partition_len(max_len: int, num_partitions: int) -> int:
    """Keys per decode partition: covers `max_len` in `num_partitions` pieces, a multiple of the key tile."""
    per = math.ceil(max_len / max(1, num_partitions))
    return max(DECODE_BLOCK_N, math.ceil(per / DECODE_BLOCK_N) * DECODE_BLOCK_N)


def _paged_attention(q, kc, vc, bt, decode_ctx, decode_rows, decode_seqs, context_lens, query_start, query_lens,
                     prefill_tiles, page: int, num_partitions: int, part_len: int) -> torch.Tensor:
    T, H, D = q.shape
    nkv = kc.shape[1]
    G = H // nkv
    out = torch.empty_like(q)
    qk_scale = _LOG2E / math.sqrt(D)
    prec = "ieee" if q.dtype == torch.float32 else "tf32"  # fp32 stays exact; bf16/fp16 ignore it
    if decode_rows is not None and decode_rows.numel() > 0:
        n = decode_rows.numel()
        P = num_partitions
        accp = torch.empty((n, H, P, D), dtype=torch.float32, device=q.device)
        mp = torch.empty((n, H, P), dtype=torch.float32, device=q.device)
        lp = torch.empty((n, H, P), dtype=torch.float32, device=q.device)
        _decode_kernel[(n, nkv, P)](
            q, kc, vc, bt, decode_ctx, decode_rows, decode_seqs, accp, mp, lp,
            q.stride(0), q.stride(1), kc.stride(0), kc.stride(1), bt.stride(0), qk_scale, part_len, H,
            G=G, G_PAD=max(16, triton.next_power_of_2(G)), D=D, BLOCK_N=DECODE_BLOCK_N, PAGE=page,
            NUM_PARTS=P, PREC=prec, num_warps=4, num_stages=2,
        )
        _reduce_kernel[(n, H)](
            accp, mp, lp, out, decode_rows, out.stride(0), out.stride(1), H,
            NUM_PARTS=P, P_PAD=max(2, triton.next_power_of_2(P)), D=D, num_warps=4,
        )
    if prefill_tiles is not None and prefill_tiles.shape[0] > 0:
        _prefill_kernel[(prefill_tiles.shape[0], H)](
            q, kc, vc, out, bt, context_lens, query_start, query_lens, prefill_tiles,
            q.stride(0), q.stride(1), kc.stride(0), kc.stride(1), bt.stride(0), out.stride(0), out.stride(1), qk_scale,
            G=G, D=D, BLOCK_M=PREFILL_BLOCK_M, BLOCK_N=64, PAGE=page, PREC=prec, num_warps=4, num_stages=2,
        )
    return out


_SCHEMA = (
    "(Tensor q, Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, int layer, Tensor slot_mapping, "
    "Tensor block_tables, Tensor? decode_ctx, Tensor? decode_rows, Tensor? decode_seqs, Tensor? context_lens, "
    "Tensor? query_start, Tensor? query_lens, Tensor? prefill_tiles, int page, int num_partitions, int part_len) "
    "-> Tensor"
)


@torch.library.custom_op("miles::paged_attention", mutates_args=("k_cache", "v_cache"), schema=_SCHEMA)
def paged_attention_op(q, k, v, k_cache, v_cache, layer, slot_mapping, block_tables, decode_ctx, decode_rows,
                       decode_seqs, context_lens, query_start, query_lens, prefill_tiles, page, num_partitions,
                       part_len):
    """Write this step's k/v into layer `layer` of the paged cache, then attend (an opaque op for torch.compile)."""
    return _write_and_attend(q, k, v, k_cache, v_cache, layer, slot_mapping, block_tables, decode_ctx, decode_rows,
                             decode_seqs, context_lens, query_start, query_lens, prefill_tiles, page, num_partitions,
                             part_len)


def _write_and_attend(q, k, v, k_cache, v_cache, layer, slot_mapping, block_tables, decode_ctx, decode_rows,
                      decode_seqs, context_lens, query_start, query_lens, prefill_tiles, page, num_partitions,
                      part_len):
    kc, vc = k_cache[layer], v_cache[layer]
    kc.index_copy_(0, slot_mapping, k.to(kc.dtype))
    vc.index_copy_(0, slot_mapping, v.to(vc.dtype))
    return _paged_attention(q, kc, vc, block_tables, decode_ctx, decode_rows, decode_seqs, context_lens, query_start,
                            query_lens, prefill_tiles, page, num_partitions, part_len)


@paged_attention_op.register_fake
def _(q, k, v, k_cache, v_cache, layer, slot_mapping, block_tables, decode_ctx, decode_rows, decode_seqs,
      context_lens, query_start, query_lens, prefill_tiles, page, num_partitions, part_len):
    return torch.empty_like(q)


def paged_attention(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache, md, num_partitions: int,
                    part_len: int) -> torch.Tensor:
    """q [T, H, D], k/v [T, n_kv, D] of layer `layer`: cache write + decode / prefill kernels."""
    fn = paged_attention_op if torch.compiler.is_compiling() else _write_and_attend  # skip op dispatch when eager
    return fn(q, k, v, cache.k, cache.v, layer, md.slot_mapping, md.block_tables, md.decode_ctx,
                              md.decode_rows, md.decode_seqs, md.context_lens, md.query_start, md.query_lens,
                              md.prefill_tiles, cache.block_size, num_partitions, part_len)
