"""Block storage for all layers of one model, with a free list.

The pool hands out block ids; every layer stores a token at the same slot, so one block
table per sequence serves all layers. A pool is either growable (the default for a single
cache: it grows geometrically as sequences get longer) or fixed at a number of blocks
(a memory budget), in which case running out raises :class:`KVCacheFull`.
"""

from __future__ import annotations

import torch

from .kv_shape import KVShape
from .layout import LayerKV, new_blocks
from .modes import KVMode
from .qparams import KVQParams


class KVCacheFull(RuntimeError):
    """The pool has no free block left; nothing already stored was touched."""


class BlockPool:
    def __init__(
        self,
        mode: KVMode,
        shape: KVShape,
        *,
        block_size: int = 64,
        num_blocks: int = 0,
        growable: bool = True,
        device: torch.device | str = "cpu",
        fp_dtype: torch.dtype = torch.float16,
        qparams: KVQParams | None = None,
    ):
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        if mode.needs_qparams and qparams is None:
            raise ValueError(f"KV mode {mode.name!r} needs static qparams: pass --qparams FILE (made by `python -m calib kv_qparams`)")
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
        return self.shape.num_layers * self.shape.num_kv_heads * self.mode.bytes_per_token_per_head(self.shape.head_dim, self.fp_dtype)

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
