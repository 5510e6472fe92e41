"""Batch splitting and packing: optimizer steps -> data-parallel ranks -> packed micro-batches.

Every rank receives the whole rollout batch and computes the same deterministic plan, so no
communication is needed to agree on it:
  1. `split_steps`: consecutive chunks of `global_batch_size` samples (slime's num_steps_per_rollout split).
  2. `balanced_partition`: a step's samples over DP ranks, balanced by token count (Karmarkar-Karp).
  3. `micro_batches`: a rank's samples into micro-batches (fixed --micro-batch-size, or packed under
     --max-tokens-per-gpu with --use-dynamic-batch-size); all ranks run the same number of micro-batches
     (FSDP collectives must match), padding with empty ones.
  4. `pack`: a micro-batch's token ids into one flat sequence with positions and cu_seqlens.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


def split_steps(n_samples: int, global_batch_size: int) -> list[list[int]]:
    """Indices of each optimizer step: consecutive chunks of global_batch_size."""
    if global_batch_size <= 0 or n_samples % global_batch_size:
        raise ValueError(f"{n_samples} samples cannot be split into global batches of {global_batch_size} "
                         "(--global-batch-size / --num-steps-per-rollout)")
    return [list(range(s, s + global_batch_size)) for s in range(0, n_samples, global_batch_size)]


def balanced_partition(weights: Sequence[int], k: int, equal_size: bool = False) -> list[list[int]]:
    """Karmarkar-Karp largest-differencing partition of item indices into k sets of near-equal weight sum.

    equal_size: the sets also get equal item counts (requires len(weights) % k == 0), as slime's
    --balance-data does. Output sets are sorted, and the set order is deterministic.
    """
    n = len(weights)
    if k <= 0:
        raise ValueError("k must be >= 1")
    if equal_size and n % k:
        raise ValueError(f"cannot split {n} items into {k} equal-size sets")
    # a heap entry: (-spread, tie, sets) where sets is a list of k (sum, [indices]) sorted by sum desc
    heap: list = []
    order = sorted(range(n), key=lambda i: (weights[i], i))
    if equal_size:
        for start in range(0, n, k):
            chunk = order[start:start + k]
            sets = [(weights[i], [i]) for i in chunk]
            sets.sort(key=lambda s: -s[0])
            heapq.heappush(heap, (-(sets[0][0] - sets[-1][0]), start, sets))
    else:
        for i in order:
            sets = [(weights[i], [i])] + [(0, []) for _ in range(k - 1)]
            heapq.heappush(heap, (-weights[i], i, sets))
    tie = n
    while len(heap) > 1:
        _, _, a = heapq.heappop(heap)
        _, _, b = heapq.heappop(heap)
        merged = [(a[j][0] + b[k - 1 - j][0], a[j][1] + b[k - 1 - j][1]) for j in range(k)]
        merged.sort(key=lambda s: -s[0])
        tie += 1
        heapq.heappush(heap, (-(merged[0][0] - merged[-1][0]), tie, merged))
    if not heap:
        return [[] for _ in range(k)]
    sets = [sorted(s[1]) for s in heap[0][2]]
    sets.sort(key=lambda s: (s[0] if s else n))
    return sets


def micro_batches(lengths: Sequence[int], micro_batch_size: int, max_tokens: int | None) -> list[list[int]]:
    """Split item indices into micro-batches: fixed size, or (max_tokens set) token-budgeted and balanced.

    Token mode: the fewest bins that first-fit-decreasing needs, then a balanced partition into that many
    bins (more if the balanced one overflows). Items keep their relative order inside a bin.
    """
    n = len(lengths)
    if n == 0:
        return []
    if max_tokens is None:
        return [list(range(s, min(s + micro_batch_size, n))) for s in range(0, n, micro_batch_size)]
    for length in lengths:
        if length > max_tokens:
            raise ValueError(f"sample of {length} tokens exceeds --max-tokens-per-gpu {max_tokens}")
    bins: list[int] = []
    for i in sorted(range(n), key=lambda i: -lengths[i]):
        for b, used in enumerate(bins):
            if used + lengths[i] <= max_tokens:
                bins[b] += lengths[i]
                break
        else:
            bins.append(lengths[i])
    k = len(bins)
    while True:
        parts = [p for p in balanced_partition(lengths, k) if p]
        if all(sum(lengths[i] for i in p) <= max_tokens for p in parts):
            return parts
        k += 1


def rank_partition(step_indices: Sequence[int], lengths: Sequence[int], world_size: int,
                   equal_count: bool) -> list[list[int]]:
    """A step's global sample indices split over DP ranks, balanced by token count (Karmarkar-Karp).

    equal_count: also give every rank the same number of samples (fixed --micro-batch-size mode).
    """
    step_lengths = [lengths[i] for i in step_indices]
    equal = equal_count and len(step_indices) % world_size == 0
    parts = balanced_partition(step_lengths, world_size, equal_size=equal)
    return [[step_indices[i] for i in part] for part in parts]


def rank_micro_batches(parts: list[list[int]], lengths: Sequence[int], micro_batch_size: int,
                       max_tokens: int | None) -> list[list[list[int]]]:
    """Every rank's micro-batches (global indices), padded with empty ones to the same count (>= 1)."""
    per_rank = []
    for part in parts:
        mbs = micro_batches([lengths[i] for i in part], micro_batch_size, max_tokens)
        per_rank.append([[part[i] for i in mb] for mb in mbs])
    n_mb = max(1, max(len(m) for m in per_rank))
    return [m + [[] for _ in range(n_mb - len(m))] for m in per_rank]


def plan_step(step_indices: Sequence[int], lengths: Sequence[int], rank: int, world_size: int,
              micro_batch_size: int, max_tokens: int | None) -> list[list[int]]:
    """This rank's micro-batches of one optimizer step (same number of micro-batches on every rank)."""
    parts = rank_partition(step_indices, lengths, world_size, equal_count=max_tokens is None)
    return rank_micro_batches(parts, lengths, micro_batch_size, max_tokens)[rank]


@dataclass
class Packed:
    """A packed micro-batch: flat token ids, per-sequence positions and cumulative sequence lengths.

    `pred_index` / `targets` select the positions whose next-token log-prob is trained (response tokens):
    hidden[pred_index] predicts targets. `segments` gives each response token's sequence within the batch.
    """

    input_ids: Tensor  # [T] long
    positions: Tensor  # [T] long
    cu_seqlens: Tensor  # [B+1] int32
    pred_index: Tensor  # [N] long
    targets: Tensor  # [N] long
    segments: Tensor  # [N] long
    max_seqlen: int

    def to(self, device: torch.device | str) -> Packed:
        """Move the token tensors; cu_seqlens stays on CPU (attention reads it as Python ints)."""
        mv = {f: getattr(self, f).to(device, non_blocking=True)
              for f in ("input_ids", "positions", "pred_index", "targets", "segments")}
        return Packed(cu_seqlens=self.cu_seqlens, max_seqlen=self.max_seqlen, **mv)


def pack(tokens: Sequence[Sequence[int]], response_lengths: Sequence[int]) -> Packed:
    """Pack sequences into one flat layout; the last response_length tokens of each are the trained targets."""
    ids, pos, cu, pred, tgt, seg = [], [], [0], [], [], []
    offset = 0
    for s, (toks, r) in enumerate(zip(tokens, response_lengths)):
        t = torch.as_tensor(toks, dtype=torch.long)
        n = t.numel()
        ids.append(t)
        pos.append(torch.arange(n, dtype=torch.long))
        cu.append(cu[-1] + n)
        pred.append(torch.arange(offset + n - r - 1, offset + n - 1, dtype=torch.long))
        tgt.append(t[n - r:])
        seg.append(torch.full((r,), s, dtype=torch.long))
        offset += n
    cat = (lambda xs: torch.cat(xs)) if ids else (lambda xs: torch.zeros(0, dtype=torch.long))
    return Packed(cat(ids), cat(pos), torch.tensor(cu, dtype=torch.int32), cat(pred), cat(tgt), cat(seg),
                  max((len(t) for t in tokens), default=0))
