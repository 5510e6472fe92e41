"""Runs the unified model for one scheduled batch: builds paged-attention metadata, replays a CUDA graph for
pure-decode batches (one graph per padded batch-size bucket) or runs eagerly, then samples."""

from __future__ import annotations

import math

import torch

from miles.engine.attention import AttnMetadata, KVCache, PagedAttention
from miles.engine.sampler import SamplingBatch, sample
from miles.engine.sequence import Sequence
from miles.models import CausalLM, RoutingCapture

ScheduledBatch = list[tuple[Sequence, int]]  # (sequence, number of its tokens computed this step)


def _triton_ok(device: torch.device, head_dim: int) -> bool:
    if device.type != "cuda" or head_dim < 16 or head_dim & (head_dim - 1):
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def graph_buckets(max_bs: int) -> list[int]:
    """Padded decode batch sizes that get a CUDA graph."""
    sizes = [b for b in (1, 2, 4, 8) if b < max_bs] + list(range(16, max_bs, 16)) + [max_bs]
    return sorted(set(sizes))


class ModelRunner:
    """Owns the KV cache and (on CUDA) the decode graphs for one model."""

    def __init__(self, model: CausalLM, num_blocks: int, block_size: int, max_model_len: int,
                 max_num_seqs: int, use_cuda_graphs: bool, graph_max_bs: int = 256, compile: bool = False):
        self.model, self.config = model, model.config
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.num_blocks, self.block_size, self.max_model_len = num_blocks, block_size, max_model_len
        self.max_blocks_per_seq = math.ceil(max_model_len / block_size)
        self.use_triton = _triton_ok(self.device, self.config.head_dim)
        # MoE experts are graph-safe only on the grouped-matmul path (bf16); other dtypes sync on expert counts
        graph_safe = not self.config.is_moe or self.dtype == torch.bfloat16
        self.use_cuda_graphs = use_cuda_graphs and self.use_triton and graph_safe
        self.graph_max_bs = min(graph_max_bs, max_num_seqs)
        self.max_num_seqs = max_num_seqs
        # torch.compile the graph-captured decode forward (fuses the model's elementwise ops); its graphs do not
        # record MoE routing, so batches that want routed experts then run eagerly
        self.compile = compile and self.use_cuda_graphs
        self.decode_parts = self._decode_partitions() if self.use_triton else (1, 0)
        self.is_moe = self.config.is_moe
        self.cache: KVCache | None = None
        self._static: dict[str, torch.Tensor] | None = None
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, RoutingCapture | None]] = {}
        self.num_graph_replays = 0
        self.event_log: list | None = None  # CUDA only: set to [] to record (start, end, decode_only, n) per step
        self.allocate_cache()

    # ---- memory --------------------------------------------------------------------------------------------
    def allocate_cache(self) -> None:
        c = self.config
        self.cache = KVCache(c.num_hidden_layers, self.num_blocks, self.block_size, c.num_key_value_heads,
                             c.head_dim, self.dtype, self.device)

    def free_cache(self) -> None:
        self.cache = None
        self.graphs.clear()  # graphs point at the freed cache and at the weights' old addresses
        self._static = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # ---- decode partitioning -------------------------------------------------------------------------------
    def _decode_partitions(self) -> tuple[int, int]:
        """Split-K of the decode kernel: one fixed (count, keys per partition) for every step and graph, so each
        Triton kernel compiles once (the count is a compile-time constant) and torch.compile never re-traces."""
        from miles.engine.triton_attention import partition_len

        parts = max(1, min(8, math.ceil(self.max_model_len / 512)))
        return parts, partition_len(self.max_model_len, parts)

    # ---- metadata ------------------------------------------------------------------------------------------
    def _metadata(self, batch: ScheduledBatch) -> tuple[torch.Tensor, torch.Tensor, AttnMetadata, list[int]]:
        bs = self.block_size
        ids, pos, slots, qstart, qlens, clens, tables, sample_rows = [], [], [], [], [], [], [], []
        for seq, n in batch:
            start = seq.num_computed
            qstart.append(len(ids))
            ids.extend(seq.token_ids[start : start + n])
            pos.extend(range(start, start + n))
            table = seq.block_table
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, start + n))
            qlens.append(n)
            clens.append(start + n)
            tables.append(table)
            if start + n == len(seq):
                sample_rows.append(len(ids) - 1)
        width = max(len(t) for t in tables)
        dev, i32 = self.device, torch.int32
        bt = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=i32)
        md = AttnMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.long).to(dev, non_blocking=True),
            block_tables=bt.to(dev, non_blocking=True),
            context_lens=torch.tensor(clens, dtype=i32).to(dev, non_blocking=True),
            query_start=torch.tensor(qstart, dtype=i32).to(dev, non_blocking=True),
            query_lens=torch.tensor(qlens, dtype=i32).to(dev, non_blocking=True),
            query_lens_cpu=qlens,
            context_lens_cpu=clens,
        )
        if self.use_triton:
            from miles.engine.triton_attention import PREFILL_BLOCK_M

            dec = [i for i, n in enumerate(qlens) if n == 1]
            tiles = [(i, m) for i, n in enumerate(qlens) if n > 1 for m in range(0, n, PREFILL_BLOCK_M)]
            md.decode_rows = torch.tensor([qstart[i] for i in dec], dtype=i32).to(dev, non_blocking=True)
            md.decode_seqs = torch.tensor(dec, dtype=i32).to(dev, non_blocking=True)
            md.decode_ctx = torch.tensor([clens[i] for i in dec], dtype=i32).to(dev, non_blocking=True)
            md.prefill_tiles = torch.tensor(tiles, dtype=i32).reshape(-1, 2).to(dev, non_blocking=True)
        input_ids = torch.tensor(ids, dtype=torch.long).to(dev, non_blocking=True)
        positions = torch.tensor(pos, dtype=torch.long).to(dev, non_blocking=True)
        return input_ids, positions, md, sample_rows

    # ---- execution -----------------------------------------------------------------------------------------
    @torch.inference_mode()
    def run(self, batch: ScheduledBatch, sb: SamplingBatch | None,
            want_routing: bool) -> tuple[list[int], list[float], torch.Tensor | None]:
        """Forward the batch; sample one token for every sequence whose last token was computed.

        Returns (tokens, logprobs) for those sequences in batch order, and the routed expert ids
        [T, moe_layers, k] of all computed tokens (CPU) when `want_routing`.
        """
        if self.cache is None:
            raise RuntimeError("engine is asleep: call wake_up() before generating")
        routing = RoutingCapture() if (want_routing and self.is_moe) else None
        n = len(batch)
        if self.event_log is not None:
            start = torch.cuda.Event(enable_timing=True)
            start.record()
        pure_decode = all(k == 1 for _, k in batch) and all(s.num_computed + 1 == len(s) for s, _ in batch)
        graph_ok = not (want_routing and self.is_moe and self.compile)
        if self.use_cuda_graphs and pure_decode and n <= self.graph_max_bs and graph_ok:
            logits, routed = self._replay(batch, want_routing and self.is_moe)
        else:
            input_ids, positions, md, sample_rows = self._metadata(batch)
            attn = PagedAttention(self.cache, md, self.use_triton)
            if self.use_triton:
                attn.num_partitions, attn.part_len = self.decode_parts
            hidden = self.model(input_ids, positions, attn, routing)
            logits = self.model.compute_logits(hidden[sample_rows]) if sample_rows else None
            routed = routing.stacked().cpu() if routing is not None else None
        if logits is None or sb is None:
            return [], [], routed
        tokens, logprobs = sample(logits, sb)
        if self.event_log is not None:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self.event_log.append((start, end, pure_decode, n))
        return tokens.tolist(), logprobs.tolist(), routed

    # ---- CUDA graphs ----------------------------------------------------------------------------------------
    # Graph inputs live in one static int64 buffer [5, max_bs] (token id, position, KV slot, context length,
    # block-table row) filled by a single host-to-device copy per step. Each running sequence owns a row of a
    # persistent device block table; only the entries added since its last replay are copied.
    def _static_buffers(self) -> dict[str, torch.Tensor]:
        if self._static is None:
            m, dev = self.graph_max_bs, self.device
            self._static = dict(
                inp=torch.zeros(5, m, dtype=torch.long, device=dev),
                bt=torch.zeros(self.max_num_seqs + 1, self.max_blocks_per_seq, dtype=torch.int32, device=dev),
                rows=torch.arange(m, dtype=torch.int32, device=dev),
                ones=torch.ones(m, dtype=torch.int32, device=dev),
            )
            self._free_rows = list(range(self.max_num_seqs))
        return self._static

    def release(self, seq: Sequence) -> None:
        """Forget `seq`'s block-table row (called when it finishes or is preempted)."""
        if seq.bt_row >= 0 and self._static is not None:
            self._free_rows.append(seq.bt_row)
        seq.bt_row, seq.bt_synced = -1, 0

    def _graph_forward(self, inp: torch.Tensor, rows: torch.Tensor, routing: RoutingCapture | None) -> torch.Tensor:
        """Decode forward over static inputs `inp` [5, b] -> logits [b, V] (what each graph captures)."""
        md = AttnMetadata(inp[2], self._static["bt"], inp[3], rows, rows, None, None, decode_rows=rows,
                          decode_seqs=inp[4], decode_ctx=inp[3], prefill_tiles=None)
        attn = PagedAttention(self.cache, md, True, *self.decode_parts)
        return self.model.compute_logits(self.model(inp[0], inp[1], attn, routing))

    @torch.inference_mode()
    def capture_graphs(self) -> None:
        """Capture one decode graph per bucket (largest first, sharing one memory pool)."""
        if not self.use_cuda_graphs or self.graphs:
            return
        s = self._static_buffers()
        inp = s["inp"]
        inp[2].fill_(self.cache.scratch_slot)
        inp[4].fill_(self.max_num_seqs)
        fwd = torch.compile(self._graph_forward, dynamic=True) if self.compile else self._graph_forward
        pool = None
        for b in reversed(graph_buckets(self.graph_max_bs)):
            routing = RoutingCapture() if (self.is_moe and not self.compile) else None
            args = (inp[:, :b], s["rows"][:b], routing)
            for _ in range(2):  # warm up: compilation, cuBLAS workspaces
                fwd(*args)
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=pool):
                logits = fwd(*args)
            pool = g.pool()
            self.graphs[b] = (g, logits, routing)
        torch.cuda.synchronize()

    def _replay(self, batch: ScheduledBatch, want_routing: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not self.graphs:
            self.capture_graphs()
        n, bs = len(batch), self.block_size
        b = next(k for k in sorted(self.graphs) if k >= n)
        s = self._static_buffers()
        pad = b - n
        ids, pos, slots, ctx, rows = [], [], [], [], []
        up_r, up_c, up_v = [], [], []
        for seq, _ in batch:
            p = len(seq) - 1
            table = seq.block_table
            ids.append(seq.token_ids[p])
            pos.append(p)
            slots.append(table[p // bs] * bs + p % bs)
            ctx.append(p + 1)
            if seq.bt_row < 0:
                seq.bt_row, seq.bt_synced = self._free_rows.pop(), 0
            rows.append(seq.bt_row)
            if len(table) > seq.bt_synced:
                k = len(table) - seq.bt_synced
                up_r += [seq.bt_row] * k
                up_c += range(seq.bt_synced, len(table))
                up_v += table[seq.bt_synced :]
                seq.bt_synced = len(table)
        if up_v:
            upd = torch.tensor([up_r, up_c, up_v], dtype=torch.long).to(self.device, non_blocking=True)
            s["bt"][upd[0], upd[1]] = upd[2].to(torch.int32)
        host = torch.tensor([ids + [0] * pad, pos + [0] * pad, slots + [self.cache.scratch_slot] * pad,
                             ctx + [0] * pad, rows + [self.max_num_seqs] * pad], dtype=torch.long)
        s["inp"][:, :b].copy_(host, non_blocking=True)
        g, logits, routing = self.graphs[b]
        g.replay()
        self.num_graph_replays += 1
        routed = routing.stacked()[:n].cpu() if (want_routing and routing is not None) else None
        return logits[:n], routed
