"""Who holds which block: the free list, reference counts, the prefix cache's hooks and the sink slots' bookkeeping.

As nano-vllm's BlockManager, it knows block ids only, never the tensors holding K/V (:mod:`.kv_storage`). A
growable allocator asks its storage for more blocks when the free list runs out; a fixed one raises
:class:`KVCacheFull`. Blocks are reference-counted: sequences that start with the same tokens share the full
blocks storing them (:mod:`.prefix_cache`), and a block goes back to the free list when its last holder frees it.
"""

from __future__ import annotations

import threading
from typing import Callable

from ..errors import KVCacheFull
from .prefix_cache import PrefixCache
from .sinks import SinkSlots


class BlockAllocator:
    def __init__(self, num_blocks: int, block_size: int, sinks: SinkSlots, *, growable: bool,
                 prefix: PrefixCache | None, grow: Callable[[int], None]):
        """``grow(extra)``: the storage adds ``extra`` blocks (called for a growable allocator only)."""
        self.num_blocks, self.block_size, self.sinks, self.growable = num_blocks, block_size, sinks, growable
        self.prefix = prefix  # None: this mode shares nothing
        self._grow_storage = grow
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))
        self._refs = [0] * num_blocks  # holders of each block (sequences sharing a prefix)
        # A chat session frees its blocks from its own thread while the worker allocates and shares: who holds
        # which block changes under this lock only (a prefix matched and then freed before it is shared is lost).
        self._lock = threading.RLock()

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def num_shared(self) -> int:
        """Blocks more than one sequence holds (a shared prefix), each counted once in :attr:`num_used`."""
        return sum(r > 1 for r in self._refs)

    def allocate(self, n: int, first: bool = False) -> list[int]:
        """``n`` free block ids; grows the storage if allowed, else raises :class:`KVCacheFull`.

        ``first``: they start a sequence, whose first block then gets a sink slot (modes with sinks).
        """
        with self._lock:
            return self._allocate(n, first)

    def _allocate(self, n: int, first: bool) -> list[int]:
        if first and n and not self.sinks.can_take(1):
            raise KVCacheFull(f"KV cache full: all {self.sinks.num_slots} sink slots are in use (one per sequence); "
                              "end a session or raise cache_max_entry_count")
        if n > len(self._free):
            if not self.growable:
                raise KVCacheFull(
                    f"KV cache full: {self.num_used * self.block_size} tokens in use of "
                    f"{self.num_blocks * self.block_size} ({self.num_blocks} blocks of {self.block_size}); "
                    "end a session or raise cache_max_entry_count"
                )
            self._grow(max(n - len(self._free), self.num_blocks // 2, 1))
        blocks = [self._free.pop() for _ in range(n)]
        for b in blocks:
            self._refs[b] = 1
        if first and blocks:
            self.sinks.take(blocks[0])
        return blocks

    def share_prefix(self, token_ids: list[int], max_blocks: int) -> list[int]:
        """The registered blocks storing the longest prefix of ``token_ids`` (at most ``max_blocks``), each with one
        more holder, who frees them once (none for a mode that shares nothing)."""
        if self.prefix is None:
            return []
        with self._lock:
            blocks = self.prefix.match(token_ids, max_blocks)
            for b in blocks:
                self._refs[b] += 1
        return blocks

    def register_prefix(self, table: list[int], token_ids: list[int], start: int, num_tokens: int) -> int:
        """Offer the full blocks of a sequence's first ``num_tokens`` to later sequences
        (:meth:`PrefixCache.register`); the blocks checked so far."""
        if self.prefix is None:
            return start
        with self._lock:
            return self.prefix.register(table, token_ids, start, num_tokens)

    def refs(self, block: int) -> int:
        """Holders of ``block`` (0: free)."""
        return self._refs[block]

    def free(self, blocks: list[int]) -> None:
        """Drop one reference to each of ``blocks``; those nobody holds any more go back to the free list."""
        with self._lock:
            self._free_blocks(blocks)

    def _free_blocks(self, blocks: list[int]) -> None:
        freed = []
        for b in blocks:
            self._refs[b] -= 1
            if self._refs[b] == 0:
                freed.append(b)
                if self.prefix is not None:
                    self.prefix.forget(b)
        self.sinks.release(freed)
        self._free.extend(reversed(freed))

    def truncate(self, table: list[int], num_tokens: int) -> int:
        """Give back the blocks of ``table`` (a sequence's, changed in place) past its first ``num_tokens``; the
        tokens it still stores. New tokens will be written after them, so a block kept in part must be the
        sequence's own: one that others share is given back whole (fewer tokens stay stored), one only it holds
        stops being a shared prefix."""
        with self._lock:
            return self._truncate(table, num_tokens)

    def _truncate(self, table: list[int], num_tokens: int) -> int:
        keep = -(-num_tokens // self.block_size)
        if num_tokens % self.block_size and keep <= len(table):
            last = table[keep - 1]
            if self._refs[last] > 1:
                keep -= 1
                num_tokens = keep * self.block_size
            elif self.prefix is not None:
                self.prefix.forget(last)
        self._free_blocks(table[keep:])
        del table[keep:]
        return num_tokens

    def _grow(self, extra: int) -> None:
        self._grow_storage(extra)
        self._free = list(range(self.num_blocks + extra - 1, self.num_blocks - 1, -1)) + self._free
        self._refs += [0] * extra
        self.num_blocks += extra
