"""Attention sinks: the first tokens of every sequence, kept in 16-bit floats beside its quantized blocks.

A mode with ``sink_tokens`` N gives each sequence one *sink slot*: N tokens of K and V per layer and KV
head in the pool's float dtype, bound to the sequence's first block when that block is allocated
(``sink_slot[block] = slot``, -1 for every other block) and freed with it. Attention reads positions
below N from the slot. A growable pool adds slots as sequences arrive; a fixed one holds a slot for each
sequence its scheduler may run at once (``max_num_seqs``, or one per block if the pool has fewer), counted
in its bytes, so slots never run out while blocks are free.
"""

from __future__ import annotations

import torch

from ..shape import KVShape
from .layout import LayerKV


def fixed_pool_slots(num_blocks: int, max_num_seqs: int) -> int:
    """Sink slots a fixed pool of ``num_blocks`` blocks holds: one per sequence it can run at once."""
    return min(num_blocks, max_num_seqs)


class SinkSlots:
    def __init__(self, tokens: int, shape: KVShape, device: torch.device, fp_dtype: torch.dtype, num_blocks: int,
                 growable: bool, max_num_seqs: int):
        self.tokens, self.shape, self.device, self.fp_dtype, self.growable = tokens, shape, device, fp_dtype, growable
        self.num_slots = fixed_pool_slots(num_blocks, max_num_seqs) if tokens and not growable else 0
        self._free = list(range(self.num_slots - 1, -1, -1))
        self._slot_of: dict[int, int] = {}  # block -> slot, the host's copy of ``sink_slot`` (no device reads)
        self.sink_slot = torch.full((num_blocks,), -1, dtype=torch.int32, device=device) if tokens else None
        self._layers: list[LayerKV] = []

    @property
    def slot_bytes(self) -> int:
        """Bytes of one slot: N tokens of K and V, every layer and KV head."""
        return self.tokens * self.shape.float_bytes_per_token(self.fp_dtype.itemsize)

    @property
    def nbytes(self) -> int:
        return self.num_slots * self.slot_bytes

    @property
    def used_bytes(self) -> int:
        return len(self._slot_of) * self.slot_bytes

    def _new(self, n: int) -> torch.Tensor:
        s = self.shape
        return torch.zeros((n, s.num_kv_heads, self.tokens, s.head_dim), dtype=self.fp_dtype, device=self.device)

    def attach(self, layer: LayerKV, index: int) -> None:
        """Give layer ``index`` its sink storage (nothing for a mode without sinks)."""
        if not self.tokens:
            return
        layer.sink_tokens, layer.sink_slot = self.tokens, self.sink_slot
        layer.k_sink, layer.v_sink = self._new(self.num_slots), self._new(self.num_slots)
        self._layers.append(layer)

    def can_take(self, n: int) -> bool:
        return not self.tokens or self.growable or len(self._free) >= n

    @property
    def num_free(self) -> int:
        return len(self._free) if self.tokens and not self.growable else 1 << 30

    def take(self, block: int) -> None:
        """Bind a free slot to ``block``, a sequence's first block (a growable pool adds slots as needed)."""
        if not self.tokens:
            return
        if not self._free:
            self._grow(max(self.num_slots // 2, 4))
        slot = self._free.pop()
        self._slot_of[block] = slot
        with torch.inference_mode():  # the map may have been made under inference mode (an evaluation's pool)
            self.sink_slot[block] = slot

    def release(self, blocks: list[int]) -> None:
        for block in blocks:
            slot = self._slot_of.pop(block, None)
            if slot is not None:
                self._free.append(slot)
                with torch.inference_mode():
                    self.sink_slot[block] = -1

    def _grow(self, extra: int) -> None:
        for layer in self._layers:
            layer.k_sink = torch.cat([layer.k_sink, self._new(extra)])
            layer.v_sink = torch.cat([layer.v_sink, self._new(extra)])
        self._free = list(range(self.num_slots + extra - 1, self.num_slots - 1, -1)) + self._free
        self.num_slots += extra

    def grow_blocks(self, extra: int, layers: list[LayerKV]) -> None:
        """The pool grew by ``extra`` blocks: extend the block -> slot map (every layer shares it)."""
        if not self.tokens:
            return
        self.sink_slot = torch.cat([self.sink_slot, torch.full((extra,), -1, dtype=torch.int32, device=self.device)])
        for layer in layers:
            layer.sink_slot = self.sink_slot
