"""Continuous batching with chunked prefill and preemption by recompute.

Each step gets a token budget (`max_num_batched_tokens`) and a sequence cap (`max_num_seqs`). Running
sequences that decode (one token each) are scheduled first, so a long prompt never stalls decoding; then
running sequences still prefilling get chunks; then waiting sequences are admitted (all their blocks are
allocated at admission; shared prefix blocks are taken from the prefix cache). When a decoding sequence
needs a new block and none is free, the most recently admitted running sequence is preempted: its blocks
are freed and it is re-queued at the front, to be recomputed later (its KV for computed blocks often stays
in the prefix cache). The oldest sequence always progresses, and `add` rejects requests that could never
fit in the cache, so there is neither a crash nor a hang.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from miles.engine.block_manager import BlockManager
from miles.engine.sequence import SeqStatus, Sequence

ScheduledBatch = list[tuple[Sequence, int]]


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.bm = block_manager
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.watermark = max(1, block_manager.num_blocks // 100)
        self.num_preemptions = 0
        self.on_release: Callable[[Sequence], None] | None = None  # told when a running sequence leaves

    def add(self, seq: Sequence) -> None:
        need = self.bm.blocks_needed(seq.num_prompt + seq.max_new_tokens)
        if need > self.bm.num_blocks:
            raise ValueError(
                f"request {seq.request_id}: prompt ({seq.num_prompt} tokens) + max_new_tokens ({seq.max_new_tokens}) "
                f"needs {need} KV blocks but the cache has only {self.bm.num_blocks} "
                f"(block_size {self.bm.block_size}); lower max_new_tokens or enlarge the KV cache"
            )
        seq.status = SeqStatus.WAITING
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.bm.free_seq(seq)
        if self.on_release is not None:
            self.on_release(seq)
        seq.num_computed = 0
        seq.routed_experts = []
        seq.num_preemptions += 1
        seq.status = SeqStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def retract_all(self) -> None:
        """Push every running sequence back to the waiting queue (frees all blocks; they are recomputed)."""
        for seq in reversed(list(self.running)):
            self.preempt(seq)

    def finish(self, seq: Sequence, reason: str, matched: int | str | None = None) -> None:
        if seq.status == SeqStatus.RUNNING:
            self.running.remove(seq)
            self.bm.free_seq(seq)
            if self.on_release is not None:
                self.on_release(seq)
        elif seq.status == SeqStatus.WAITING:
            self.waiting.remove(seq)
        seq.status, seq.finish_reason, seq.matched_stop = SeqStatus.FINISHED, reason, matched

    def schedule(self) -> ScheduledBatch:
        budget = self.max_num_batched_tokens
        scheduled: ScheduledBatch = []
        preempted = False
        # 1. decoding sequences (one token each); make room by preempting the newest
        for seq in list(self.running):
            if seq.status != SeqStatus.RUNNING or len(seq) - seq.num_computed != 1:
                continue
            if budget == 0:
                break
            while not self.bm.append_slots(seq, len(seq)):
                victim = self.running[-1]
                self.preempt(victim)
                preempted = True
                if victim is seq:
                    break
            if seq.status == SeqStatus.RUNNING:
                scheduled.append((seq, 1))
                budget -= 1
        # 2. running sequences in the middle of a (chunked) prefill: their blocks are already allocated
        for seq in self.running:
            remaining = len(seq) - seq.num_computed
            if remaining > 1 and budget > 0:
                n = min(remaining, budget)
                scheduled.append((seq, n))
                budget -= n
        # 3. admit waiting sequences
        if preempted:
            return scheduled
        for seq in list(self.waiting):
            if budget == 0 or len(self.running) >= self.max_num_seqs:
                break
            hits, pending = ([], False) if seq.params.return_routed_experts else self.bm.match_prefix(seq)
            if pending:
                continue  # its prefix is being computed by another sequence: share it next step
            need = self.bm.blocks_needed(len(seq)) - len(hits)
            reserve = self.watermark if self.running else 0
            if need + reserve > self.bm.num_free_blocks or not self.bm.allocate(seq, hits):
                break
            if seq.num_preemptions == 0:
                seq.num_cached_prompt = min(seq.num_computed, seq.num_prompt)
            self.waiting.remove(seq)
            self.running.append(seq)
            seq.status = SeqStatus.RUNNING
            n = min(len(seq) - seq.num_computed, budget)
            scheduled.append((seq, n))
            budget -= n
        return scheduled
