"""What a layer's storage holds once per side beyond static parameters: its codebook, its per-tensor scale and, for
allocated codes, every channel's code width.

A fixed codebook (fp8/fp4 values, iq4nl, Lloyd-Max centroids) is one tensor per device shared by every layer
and pool, expanded over the KV heads (counted once, like the Hadamard matrix); a calibrated table is the
parameters file's, per layer and KV head. A per-tensor scale is the calibrated one when parameters are given
(absmax over the codebook's largest magnitude: vLLM's ``k_scale = absmax / 448``), else 1.0, the engines' default.
"""

from __future__ import annotations

import functools

import torch

from ..codebooks import FLOAT_MAX, fixed_grid, gauss_distortion, gauss_levels
from ..codec import Codec
from ..errors import ModeError
from ..quant import allocate_bits


@functools.lru_cache(maxsize=4)
def _shared_gauss(device: str) -> torch.Tensor:
    return gauss_levels().to(device)


@functools.lru_cache(maxsize=32)
def _shared_grid(name: str, bits: int, head_dim: int, group_size: int, device: str) -> torch.Tensor:
    return fixed_grid(name, bits, head_dim, group_size).to(device)


def layer_grid(codec: Codec, num_kv_heads: int, head_dim: int, device: torch.device | str,
               table: torch.Tensor | None = None) -> torch.Tensor | None:
    """``[kv_heads, 2^bits]`` fp32 codebook of a side, or None for the integer grids (the ``gauss`` grid: its levels of
    every width, ``[9, 256]``, :func:`kvcache.codebooks.gauss_levels`)."""
    if not codec.quantized or codec.grid in ("int", "uint"):
        return None
    if codec.grid == "gauss":
        return _shared_gauss(str(device))
    if codec.grid == "table":
        if table is None:
            raise ModeError(f"{codec.label()} reads a calibrated codebook: pass --qparams from a calibration that "
                            "made one (`python -m calib kv_qparams WORK_DIR OUT --format kvq`)")
        if tuple(table.shape) != (num_kv_heads, codec.grid_size()):
            raise ModeError(f"the calibrated codebook is {tuple(table.shape)}, {codec.label()} needs "
                            f"({num_kv_heads}, {codec.grid_size()}): recalibrate for this model and bit width")
        return table.float().to(device).contiguous()
    bits = codec.bits - 1 if codec.residual_sign else codec.bits
    grid = _shared_grid(codec.grid, bits, head_dim, codec.group_size, str(device))
    return grid.expand(num_kv_heads, grid.numel())


def layer_tensor_scale(codec: Codec, absmax: float | None, device: torch.device | str) -> torch.Tensor | None:
    """``[]`` fp32 per-tensor scale of a side (``tensor_scale`` codecs): calibrated absmax over the grid's max, or 1."""
    if not codec.tensor_scale:
        return None
    top = FLOAT_MAX.get(codec.grid)
    if absmax is None or top is None:
        return torch.ones((), dtype=torch.float32, device=device)
    return torch.tensor(max(absmax, 1e-12) / top, dtype=torch.float32, device=device)


def allocated_widths(weight: torch.Tensor, codec: Codec, head_dim: int) -> torch.Tensor:
    """``[kv_heads, head_dim]`` int32 code widths of an allocated codec: ``codec.allocated * head_dim`` bits per head
    spread over the channels by their calibrated weights (``[kv_heads, head_dim]``), at most ``codec.bits`` each."""
    total = codec.code_width(head_dim) * 8
    return allocate_bits(weight.float().cpu(), total, gauss_distortion()[: codec.bits + 1])
