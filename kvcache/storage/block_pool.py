"""Block storage for all layers of one model, with a free list.

The pool hands out block ids; every layer stores a token at the same slot, so one block
table per sequence serves all layers. A pool is either growable (the default for a single
cache: it grows geometrically as sequences get longer) or fixed at a number of blocks
(a memory budget), in which case running out raises :class:`KVCacheFull`. Blocks are reference-counted:
sequences that start with the same tokens share the full blocks storing them (:mod:`.prefix_cache`), and a
block goes back to the free list when its last holder frees it.
"""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass
from typing import Any

import torch

from ..config import BLOCK_SIZE
from ..errors import ConfigError, KVCacheFull
from ..codec import FP16
from ..modes import KVMode, require_qparams
from ..qparams import KVQParams
from .layout import LayerKV, new_blocks
from .maps import layer_maps
from .prefix_cache import PrefixCache
from ..shape import KVShape
from .sinks import SinkSlots
from .tables import layer_grid, layer_tensor_scale


@dataclass
class KVMemory:
    """Exact byte accounting of one cache or conversation."""

    kv: str
    tokens_stored: int
    blocks_used: int
    block_size: int
    bytes_per_token: int  # marginal: data + per-token parameters, all layers
    param_bytes: int  # static parameters, held once
    bytes_used: int  # blocks in use + parameters
    bytes_held: int  # all storage this cache's pool holds, used or free
    blocks_shared: int = 0  # of blocks_used, those others hold too (a shared prefix: its pool counts them once)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)




class BlockPool:
    def __init__(
        self,
        mode: KVMode,
        shape: KVShape,
        *,
        block_size: int | None = None,
        num_blocks: int = 0,
        growable: bool = True,
        device: torch.device | str = "cpu",
        fp_dtype: torch.dtype = torch.float16,
        qparams: KVQParams | None = None,
    ):
        """``fp_dtype``: the float dtype of 16-bit sides, sinks and our per-token parameters; a model's pool takes
        :func:`kvcache.codec.kv_float_dtype` of the model's dtype (bf16 for a bf16 model, else fp16)."""
        block_size = BLOCK_SIZE if block_size is None else block_size
        if block_size < 1:
            raise ConfigError(f"block_size must be >= 1, got {block_size}")
        if mode.sink_tokens > block_size:
            raise ConfigError(f"{mode.sink_tokens} sink tokens do not fit a block of {block_size}: raise block_size")
        require_qparams(mode, qparams)
        mode.check_shape(shape)
        self.codecs = mode.layer_codecs(shape.num_layers)
        if mode.emulated:  # the sequence is kept as decoded 16-bit values and re-quantized in place
            self.emulated, self.codecs = self.codecs, [(FP16, FP16)] * shape.num_layers
        if qparams is not None:
            qparams.check_matches(shape, needs_transform=any(k.qk_transform for k, _ in self.codecs))
        self.mode, self.shape, self.block_size = mode, shape, block_size
        self.qparams = qparams  # the parameters its blocks are coded with (held, so an id(qparams) key stays unique)
        self.growable, self.device, self.fp_dtype = growable, torch.device(device), fp_dtype
        self.num_blocks = num_blocks
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))
        self._refs = [0] * num_blocks  # holders of each block (sequences sharing a prefix)
        self.prefix = PrefixCache(block_size) if mode.shares_prefix else None  # None: this mode shares nothing
        # A chat session frees its blocks from its own thread while the worker allocates and shares: who holds
        # which block changes under this lock only (a prefix matched and then freed before it is shared is lost).
        self._lock = threading.RLock()
        self.sinks = SinkSlots(mode.sink_tokens, shape, self.device, fp_dtype, num_blocks, growable)
        self.layers = [self._layer(i) for i in range(shape.num_layers)]

    def _layer(self, i: int) -> LayerKV:
        """Layer ``i``'s storage for its codecs: blocks, static parameters, maps, sinks."""
        k_codec, v_codec = self.codecs[i]
        shape, dev = self.shape, self.device
        blocks = new_blocks(k_codec, v_codec, self.num_blocks, shape.num_kv_heads, self.block_size, shape.head_dim,
                            dev, self.fp_dtype)
        layer = LayerKV(k_codec, v_codec, shape.head_dim, **blocks)
        for side, codec in (("k", k_codec), ("v", v_codec)):
            if codec.scaling == "static":
                scale, zp = self.qparams.side(side, i, shape.num_kv_heads, shape.head_dim, codec.bits)
                setattr(layer, f"{side}_scale", scale.to(dev))
                setattr(layer, f"{side}_zp", zp.to(dev))
            table = getattr(self.qparams, f"{side}_table", None) if self.qparams is not None else None
            layer_table = table[i] if table is not None and codec.grid == "table" else None
            setattr(layer, f"{side}_grid", layer_grid(codec, shape.num_kv_heads, shape.head_dim, dev, layer_table))
            absmax = self.qparams.absmax(side, i) if codec.tensor_scale and self.qparams is not None else None
            setattr(layer, f"{side}_tscale", layer_tensor_scale(codec, absmax, dev))
        transform = self.qparams.k_transform[i] if k_codec.qk_transform else None
        layer.k_map, layer.q_map, layer.v_map = layer_maps(k_codec, v_codec, shape.num_kv_heads, shape.head_dim,
                                                           transform, dev)
        self.sinks.attach(layer, i)
        if self.mode.emulated:
            layer.residual, layer.emulated = self.mode.residual, self.emulated[i]
        return layer

    # --- allocation -------------------------------------------------------------------------
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
        for i, layer in enumerate(self.layers):
            k_codec, v_codec = self.codecs[i]
            more = new_blocks(k_codec, v_codec, extra, self.shape.num_kv_heads, self.block_size, self.shape.head_dim,
                              self.device, self.fp_dtype)
            for name in layer.per_block_tensors():
                setattr(layer, name, torch.cat([getattr(layer, name), more[name]]))
        self._free = list(range(self.num_blocks + extra - 1, self.num_blocks - 1, -1)) + self._free
        self._refs += [0] * extra
        self.num_blocks += extra
        self.sinks.grow_blocks(extra, self.layers)

    # --- accounting -------------------------------------------------------------------------
    @property
    def bytes_per_token(self) -> int:
        """Marginal bytes of one token across all layers as this pool stores it (data + per-token parameters)."""
        return self.mode.pool_bytes_per_token(self.shape, self.fp_dtype)

    @property
    def sink_bytes(self) -> int:
        """Bytes of the sink slots the pool holds (one sequence's first tokens in the pool's float dtype each)."""
        return self.sinks.nbytes

    @property
    def bytes_per_block(self) -> int:
        return self.bytes_per_token * self.block_size

    @property
    def param_bytes(self) -> int:
        """Bytes of static parameters, held once whatever the number of tokens."""
        held = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()  # a shared map counts once
                for layer in self.layers for t in layer.static_tensors()}
        return sum(held.values())

    @property
    def capacity_bytes(self) -> int:
        """Bytes of storage the pool holds now, used or free (what the device really spends)."""
        return self.num_blocks * self.bytes_per_block + self.param_bytes + self.sink_bytes

    @property
    def used_bytes(self) -> int:
        """Bytes of the blocks and sink slots in use plus the static parameters."""
        return self.num_used * self.bytes_per_block + self.param_bytes + self.sinks.used_bytes

    def memory(self, blocks: list[int], tokens_stored: int) -> KVMemory:
        """The accounting of one cache or conversation holding ``blocks`` of this pool (a shared block counts in
        full for each holder here, its bytes once in :attr:`used_bytes`)."""
        n = len(blocks)
        return KVMemory(
            kv=self.mode.name, tokens_stored=tokens_stored, blocks_used=n, block_size=self.block_size,
            bytes_per_token=self.bytes_per_token, param_bytes=self.param_bytes,
            bytes_used=n * self.bytes_per_block + self.param_bytes + (self.sinks.slot_bytes if n else 0),
            bytes_held=self.capacity_bytes, blocks_shared=sum(self._refs[b] > 1 for b in blocks),
        )
