"""A model's KV pool: the pair of a :class:`~.allocator.BlockAllocator` (who holds which block) and a
:class:`~.kv_storage.KVStorage` (the tensors holding K/V), with the byte accounting of both.

A pool is either growable (the default for a single cache: it grows geometrically as sequences get longer)
or fixed at a number of blocks (a memory budget), in which case running out raises :class:`KVCacheFull`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from ..config import BLOCK_SIZE, MAX_NUM_SEQS
from ..errors import ConfigError
from ..modes import KVMode, require_qparams
from ..qparams import KVQParams
from ..shape import KVShape
from .allocator import BlockAllocator
from .kv_storage import KVStorage
from .prefix_cache import PrefixCache
from .sinks import SinkSlots


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
        max_num_seqs: int = MAX_NUM_SEQS,
    ):
        """``fp_dtype``: the float dtype of 16-bit sides, sinks and our per-token parameters; a model's pool takes
        :func:`kvcache.codec.kv_float_dtype` of the model's dtype (bf16 for a bf16 model, else fp16).
        ``max_num_seqs``: sequences run at once, each with a sink slot (a fixed pool of a mode with sinks)."""
        block_size = BLOCK_SIZE if block_size is None else block_size
        if block_size < 1:
            raise ConfigError(f"block_size must be >= 1, got {block_size}")
        if mode.sink_tokens > block_size:
            raise ConfigError(f"{mode.sink_tokens} sink tokens do not fit a block of {block_size}: raise block_size")
        require_qparams(mode, qparams)
        mode.check_shape(shape)
        self.mode, self.shape, self.block_size = mode, shape, block_size
        self.qparams = qparams  # the parameters its blocks are coded with (held, so an id(qparams) key stays unique)
        self.growable, self.device, self.fp_dtype = growable, torch.device(device), fp_dtype
        self.sinks = SinkSlots(mode.sink_tokens, shape, self.device, fp_dtype, num_blocks, growable, max_num_seqs)
        self.storage = KVStorage(mode, shape, block_size=block_size, num_blocks=num_blocks, device=self.device,
                                 fp_dtype=fp_dtype, qparams=qparams, sinks=self.sinks)
        self.allocator = BlockAllocator(num_blocks, block_size, self.sinks, growable=growable,
                                        prefix=PrefixCache(block_size) if mode.shares_prefix else None,
                                        grow=self.storage.grow)
        self.layers = self.storage.layers
        a = self.allocator
        self.allocate, self.share_prefix, self.register_prefix = a.allocate, a.share_prefix, a.register_prefix
        self.refs, self.free, self.truncate = a.refs, a.free, a.truncate

    # --- allocation (the allocator's) ---------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return self.allocator.num_blocks

    @property
    def num_free(self) -> int:
        return self.allocator.num_free

    @property
    def num_used(self) -> int:
        return self.allocator.num_used

    @property
    def num_shared(self) -> int:
        """Blocks more than one sequence holds (a shared prefix), each counted once in :attr:`num_used`."""
        return self.allocator.num_shared

    @property
    def prefix(self) -> PrefixCache | None:
        return self.allocator.prefix

    # --- accounting -------------------------------------------------------------------------
    @property
    def bytes_per_token(self) -> int:
        """Marginal bytes of one token across all layers as this pool stores it (data + per-token parameters)."""
        return self.storage.bytes_per_token

    @property
    def sink_bytes(self) -> int:
        """Bytes of the sink slots the pool holds (one sequence's first tokens in the pool's float dtype each)."""
        return self.sinks.nbytes

    @property
    def bytes_per_block(self) -> int:
        return self.storage.bytes_per_block

    @property
    def param_bytes(self) -> int:
        """Bytes of static parameters, held once whatever the number of tokens."""
        return self.storage.param_bytes

    @property
    def capacity_bytes(self) -> int:
        """Bytes of storage the pool holds now, used or free (what the device really spends)."""
        return self.storage.nbytes

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
            bytes_held=self.capacity_bytes, blocks_shared=sum(self.refs(b) > 1 for b in blocks),
        )
