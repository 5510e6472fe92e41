"""Paged KV-cache blocks: ref-counted, with hash-based prefix caching.

A full block is identified by a chained hash of (parent block hash, its token ids). When a sequence is
admitted, its leading full blocks are looked up; blocks whose KV is already computed are shared (ref count
+1) instead of recomputed, so the n samples of one prompt hold its blocks once. A block found in the table
but not yet computed ("pending": its owner is still prefilling it) makes the newcomer wait a step rather
than allocate a duplicate. Freed computed blocks stay findable until their memory is reused (LRU order).
The block holding a sequence's last token is never shared: it is always recomputed so that the last
position's logits exist, and so that decode writes only ever touch private blocks (no copy-on-write).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from miles.engine.sequence import Sequence


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None
    token_ids: tuple[int, ...] = ()
    parent: int | None = None
    computed: bool = False


class BlockManager:
    """Allocates KV blocks to sequences. Counters: `num_allocated_blocks` (fresh allocations, cumulative) and
    `num_prefix_hit_blocks` (blocks reused from the prefix cache, cumulative)."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.hash_to_block: dict[int, int] = {}
        self.num_allocated_blocks = 0
        self.num_prefix_hit_blocks = 0

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- hashing -------------------------------------------------------------------------------------------
    def _block_hashes(self, seq: Sequence, num_full: int) -> list[int]:
        bs, hashes = self.block_size, seq.block_hashes
        while len(hashes) < num_full:
            i = len(hashes)
            parent = hashes[-1] if hashes else None
            hashes.append(hash((parent, tuple(seq.token_ids[i * bs : (i + 1) * bs]))))
        return hashes[:num_full]

    def _lookup(self, h: int, parent: int | None, tokens: tuple[int, ...]) -> Block | None:
        bid = self.hash_to_block.get(h)
        if bid is None:
            return None
        b = self.blocks[bid]
        return b if b.hash == h and b.parent == parent and b.token_ids == tokens else None

    def match_prefix(self, seq: Sequence) -> tuple[list[int], bool]:
        """(ids of computed cached blocks covering seq's leading tokens, whether a pending block blocks more)."""
        if not self.enable_prefix_caching:
            return [], False
        bs = self.block_size
        num_shareable = (len(seq) - 1) // bs  # never share the block holding the last token
        hits: list[int] = []
        parent = None
        for i, h in enumerate(self._block_hashes(seq, num_shareable)):
            b = self._lookup(h, parent, tuple(seq.token_ids[i * bs : (i + 1) * bs]))
            if b is None:
                return hits, False
            if not b.computed:
                return hits, True
            hits.append(b.block_id)
            parent = h
        return hits, False

    def _register(self, b: Block, h: int, parent: int | None, tokens: tuple[int, ...]) -> None:
        b.hash, b.parent, b.token_ids = h, parent, tokens
        if self._lookup(h, parent, tokens) is None:
            self.hash_to_block[h] = b.block_id

    # ---- allocation ----------------------------------------------------------------------------------------
    def _take_fresh(self) -> int:
        bid, _ = self.free.popitem(last=False)
        b = self.blocks[bid]
        if b.hash is not None and self.hash_to_block.get(b.hash) == bid:
            del self.hash_to_block[b.hash]
        b.hash, b.parent, b.token_ids, b.computed, b.ref_count = None, None, (), False, 1
        self.num_allocated_blocks += 1
        return bid

    def allocate(self, seq: Sequence, hits: list[int]) -> bool:
        """Give `seq` blocks for all its tokens, sharing `hits` (from `match_prefix`). False if out of blocks."""
        assert not seq.block_table, "sequence already has blocks"
        need = self.blocks_needed(len(seq)) - len(hits)
        revived = sum(1 for bid in hits if self.blocks[bid].ref_count == 0)
        if need + revived > len(self.free):
            return False
        for bid in hits:
            b = self.blocks[bid]
            if b.ref_count == 0:
                del self.free[bid]
            b.ref_count += 1
        self.num_prefix_hit_blocks += len(hits)
        seq.block_table = list(hits) + [self._take_fresh() for _ in range(need)]
        seq.num_computed = len(hits) * self.block_size
        if self.enable_prefix_caching:  # fresh full blocks become findable now, as pending
            bs = self.block_size
            hashes = self._block_hashes(seq, len(seq) // bs)
            for i in range(len(hits), len(hashes)):
                b = self.blocks[seq.block_table[i]]
                self._register(b, hashes[i], hashes[i - 1] if i else None, tuple(seq.token_ids[i * bs : (i + 1) * bs]))
        return True

    def append_slots(self, seq: Sequence, num_tokens: int) -> bool:
        """Make room for `num_tokens` KV entries of `seq`. False if out of blocks (nothing is changed)."""
        need = self.blocks_needed(num_tokens) - len(seq.block_table)
        if need > len(self.free):
            return False
        seq.block_table.extend(self._take_fresh() for _ in range(need))
        return True

    def mark_computed(self, seq: Sequence) -> None:
        """After a step: blocks fully covered by `seq.num_computed` become computed (and findable)."""
        bs = self.block_size
        num_full = min(seq.num_computed, len(seq)) // bs
        if num_full == 0 or self.blocks[seq.block_table[num_full - 1]].computed:
            return
        hashes = self._block_hashes(seq, num_full) if self.enable_prefix_caching else []
        for i in range(num_full - 1, -1, -1):
            b = self.blocks[seq.block_table[i]]
            if b.computed:
                break
            b.computed = True
            if self.enable_prefix_caching and b.hash is None:
                self._register(b, hashes[i], hashes[i - 1] if i else None, tuple(seq.token_ids[i * bs : (i + 1) * bs]))

    def free_seq(self, seq: Sequence) -> None:
        """Release `seq`'s blocks. Computed blocks stay in the prefix cache until their memory is reused."""
        for bid in reversed(seq.block_table):
            b = self.blocks[bid]
            b.ref_count -= 1
            assert b.ref_count >= 0, f"block {bid} freed twice"
            if b.ref_count == 0:
                if not b.computed:
                    if b.hash is not None and self.hash_to_block.get(b.hash) == bid:
                        del self.hash_to_block[b.hash]
                    b.hash = None
                self.free[bid] = None
                if b.hash is None:
                    self.free.move_to_end(bid, last=False)  # worthless content: reuse first
        seq.block_table = []

    def reset_prefix_cache(self) -> None:
        """Forget all cached content (e.g. after a weight update: the cached KV is stale)."""
        self.hash_to_block.clear()
        for b in self.blocks:
            if b.ref_count == 0:
                b.hash, b.parent, b.token_ids, b.computed = None, None, (), False
