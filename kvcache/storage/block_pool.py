"""Block storage for all layers of one model, with a free list.

The pool hands out block ids; every layer stores a token at the same slot, so one block
table per sequence serves all layers. A pool is either growable (the default for a single
cache: it grows geometrically as sequences get longer) or fixed at a number of blocks
(a memory budget), in which case running out raises :class:`KVCacheFull`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from ..config import BLOCK_SIZE
from ..errors import ConfigError, KVCacheFull
from ..modes import KVMode, require_qparams
from ..qparams import KVQParams
from .layout import LayerKV, new_blocks
from .shape import KVShape


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
        block_size = BLOCK_SIZE if block_size is None else block_size
        if block_size < 1:
            raise ConfigError(f"block_size must be >= 1, got {block_size}")
        require_qparams(mode, qparams)
        if qparams is not None:
            qparams.check_matches(shape)
        self.mode, self.shape, self.block_size = mode, shape, block_size
        self.qparams = qparams  # the parameters its int8 blocks are coded with (held, so an id(qparams) key stays unique)
        self.growable, self.device, self.fp_dtype = growable, torch.device(device), fp_dtype
        self.layers: list[LayerKV] = []
        for i in range(shape.num_layers):
            blocks = new_blocks(mode, num_blocks, shape.num_kv_heads, block_size, shape.head_dim, self.device, fp_dtype)
            layer = LayerKV(mode, **blocks)
            if mode.needs_qparams:
                ks, kz, vs, vz = (t.to(self.device) for t in qparams.layer(i, shape.num_kv_heads, shape.head_dim))
                layer.k_scale, layer.k_zp, layer.v_scale, layer.v_zp = ks, kz, vs, vz
            self.layers.append(layer)
        self.num_blocks = num_blocks
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))

    # --- allocation -------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def allocate(self, n: int) -> list[int]:
        """``n`` free block ids; grows the storage if allowed, else raises :class:`KVCacheFull`."""
        if n > len(self._free):
            if not self.growable:
                raise KVCacheFull(
                    f"KV cache full: {self.num_used * self.block_size} tokens in use of "
                    f"{self.num_blocks * self.block_size} ({self.num_blocks} blocks of {self.block_size}); "
                    "end a session or raise cache_max_entry_count"
                )
            self._grow(max(n - len(self._free), self.num_blocks // 2, 1))
        return [self._free.pop() for _ in range(n)]

    def free(self, blocks: list[int]) -> None:
        self._free.extend(reversed(blocks))

    def truncate(self, table: list[int], num_tokens: int) -> None:
        """Give back the blocks of ``table`` (a sequence's, changed in place) past its first ``num_tokens``."""
        keep = -(-num_tokens // self.block_size)
        self.free(table[keep:])
        del table[keep:]

    def _grow(self, extra: int) -> None:
        for layer in self.layers:
            more = new_blocks(self.mode, extra, self.shape.num_kv_heads, self.block_size, self.shape.head_dim, self.device, self.fp_dtype)
            for name in layer.per_block_tensors():
                setattr(layer, name, torch.cat([getattr(layer, name), more[name]]))
        self._free = list(range(self.num_blocks + extra - 1, self.num_blocks - 1, -1)) + self._free
        self.num_blocks += extra

    # --- accounting -------------------------------------------------------------------------
    @property
    def bytes_per_token(self) -> int:
        """Marginal bytes of one token across all layers (data + per-token parameters)."""
        return self.mode.bytes_per_token(self.shape, self.fp_dtype)

    @property
    def bytes_per_block(self) -> int:
        return self.bytes_per_token * self.block_size

    @property
    def param_bytes(self) -> int:
        """Bytes of static parameters, held once whatever the number of tokens."""
        return sum(t.nbytes for layer in self.layers for t in layer.static_params())

    @property
    def capacity_bytes(self) -> int:
        """Bytes of storage the pool holds now, used or free (what the device really spends)."""
        return self.num_blocks * self.bytes_per_block + self.param_bytes

    @property
    def used_bytes(self) -> int:
        """Bytes of the blocks in use plus the static parameters."""
        return self.num_used * self.bytes_per_block + self.param_bytes

    def memory(self, blocks_used: int, tokens_stored: int) -> KVMemory:
        """The accounting of one cache or conversation holding ``blocks_used`` blocks of this pool."""
        return KVMemory(
            kv=self.mode.name, tokens_stored=tokens_stored, blocks_used=blocks_used, block_size=self.block_size,
            bytes_per_token=self.bytes_per_token, param_bytes=self.param_bytes,
            bytes_used=blocks_used * self.bytes_per_block + self.param_bytes, bytes_held=self.capacity_bytes,
        )
