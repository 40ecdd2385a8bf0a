"""The block layout every part of the cache agrees on (storage, kernels, accounting).

One layer's storage is a set of blocks: ``k``/``v`` are ``[num_blocks, num_kv_heads, block_size, head_dim]``
so one (block, head) tile is contiguous. A token's *slot* is ``block_id * block_size + offset``.
Parameters depend on the mode:
- ``fp16``: none.
- ``int8`` (static): ``k_scale``/``k_zp``/``v_scale``/``v_zp`` of shape ``[num_kv_heads, head_dim]`` fp32.
- ``int8-dynamic``: the same four of shape ``[num_blocks, num_kv_heads, block_size]`` (one pair per token and head).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..modes import KVMode


@dataclass
class LayerKV:
    mode: KVMode
    k: torch.Tensor
    v: torch.Tensor
    k_scale: torch.Tensor | None = None
    k_zp: torch.Tensor | None = None
    v_scale: torch.Tensor | None = None
    v_zp: torch.Tensor | None = None

    @property
    def block_size(self) -> int:
        return self.k.shape[2]

    @property
    def num_blocks(self) -> int:
        return self.k.shape[0]

    @property
    def num_kv_heads(self) -> int:
        return self.k.shape[1]

    @property
    def head_dim(self) -> int:
        return self.k.shape[3]

    def per_block_tensors(self) -> list[str]:
        """Names of the tensors that have a block dimension (they grow with the pool)."""
        names = ["k", "v"]
        if self.mode.dynamic:
            names += ["k_scale", "k_zp", "v_scale", "v_zp"]
        return names

    def static_params(self) -> list[torch.Tensor]:
        """Tensors held once per layer, whatever the number of tokens."""
        if self.mode.quantized and not self.mode.dynamic:
            return [self.k_scale, self.k_zp, self.v_scale, self.v_zp]
        return []


def new_blocks(
    mode: KVMode, num_blocks: int, num_kv_heads: int, block_size: int, head_dim: int,
    device: torch.device | str, fp_dtype: torch.dtype,
) -> dict[str, torch.Tensor]:
    """Zeroed per-block tensors for ``num_blocks`` blocks of one layer."""
    shape = (num_blocks, num_kv_heads, block_size, head_dim)
    out = {
        "k": torch.zeros(shape, dtype=mode.data_dtype(fp_dtype), device=device),
        "v": torch.zeros(shape, dtype=mode.data_dtype(fp_dtype), device=device),
    }
    if mode.dynamic:
        for n in ("k_scale", "k_zp", "v_scale", "v_zp"):
            out[n] = torch.zeros(shape[:3], dtype=mode.param_dtype, device=device)
    return out


def slot_mapping(block_tables: torch.Tensor, positions: torch.Tensor, block_size: int) -> torch.Tensor:
    """Slots of ``positions`` (``[batch, n]``) given per-row block tables (``[batch, max_blocks]``)."""
    blocks = torch.gather(block_tables.long(), 1, positions // block_size)
    return blocks * block_size + positions % block_size
