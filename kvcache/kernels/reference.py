"""Plain-torch references: they define what every kernel must compute, and run on CPU.

Shapes: ``key``/``value`` for a write are ``[num_tokens, num_kv_heads, head_dim]`` with one slot
each; ``block_tables`` is ``[batch, max_blocks]`` int32; ``seq_lens`` is ``[batch]`` int32.
"""

from __future__ import annotations

import torch

from ..layout import LayerKV
from ..quant import dequantize, dynamic_qparams, quantize


def store_kv_reference(layer: LayerKV, key: torch.Tensor, value: torch.Tensor, slots: torch.Tensor) -> None:
    """Quantize (per the layer's mode) and write each token's K/V at its slot."""
    mode, bs = layer.mode, layer.block_size
    blk, off = slots // bs, slots % bs
    for name, x in (("k", key), ("v", value)):
        data = getattr(layer, name)
        if not mode.quantized:
            data[blk, :, off] = x.to(data.dtype)
        elif mode.dynamic:
            scale, zp = dynamic_qparams(x, mode.bits, mode.param_dtype)
            data[blk, :, off] = quantize(x, scale[..., None], zp[..., None], mode.bits)
            getattr(layer, f"{name}_scale")[blk, :, off] = scale
            getattr(layer, f"{name}_zp")[blk, :, off] = zp
        else:
            data[blk, :, off] = quantize(x, getattr(layer, f"{name}_scale"), getattr(layer, f"{name}_zp"), mode.bits)


def gather_kv_reference(
    layer: LayerKV, block_tables: torch.Tensor, length: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dequantized K and V of the first ``length`` positions of each row: ``[batch, kv_heads, length, head_dim]``."""
    bs = layer.block_size
    n = -(-length // bs)
    blocks = block_tables[:, :n].long()
    b = blocks.shape[0]

    def read(name: str) -> torch.Tensor:
        data = getattr(layer, name)[blocks]  # [b, n, kvh, bs, d]
        data = data.permute(0, 2, 1, 3, 4).reshape(b, layer.num_kv_heads, n * bs, layer.head_dim)[:, :, :length]
        if not layer.mode.quantized:
            return data.to(dtype)
        scale, zp = getattr(layer, f"{name}_scale"), getattr(layer, f"{name}_zp")
        if layer.mode.dynamic:
            scale, zp = (
                t[blocks].permute(0, 2, 1, 3).reshape(b, layer.num_kv_heads, n * bs)[:, :, :length, None]
                for t in (scale, zp)
            )
        else:
            scale, zp = scale[None, :, None, :], zp[None, :, None, :]
        return dequantize(data, scale, zp, dtype)

    return read("k"), read("v")


def decode_attention_reference(
    query: torch.Tensor, layer: LayerKV, block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float
) -> torch.Tensor:
    """One query token per sequence (``[batch, num_heads, head_dim]``) over each sequence's own length."""
    b, hq, d = query.shape
    max_len = int(seq_lens.max())
    k, v = gather_kv_reference(layer, block_tables, max_len, torch.float32)
    group = hq // layer.num_kv_heads
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = torch.einsum("bhd,bhld->bhl", query.float(), k) * scale
    pad = torch.arange(max_len, device=query.device)[None, :] >= seq_lens[:, None].to(query.device)
    scores = scores.masked_fill(pad[:, None, :], float("-inf"))
    out = torch.einsum("bhl,bhld->bhd", scores.softmax(dim=-1), v)
    return out.to(query.dtype)


def prefill_attention_reference(
    query: torch.Tensor, layer: LayerKV, block_tables: torch.Tensor, kv_len: int, scale: float,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """A chunk of queries (``[batch, heads, q_len, head_dim]``, the last ``q_len`` of ``kv_len`` positions) over the history.

    The history is dequantized into the query's dtype, then SDPA: causal for the chunk's offset, or
    ``attention_mask`` (boolean: True attends; float: added) when given. Returns ``[batch, q_len, heads, head_dim]``.
    """
    b, hq, q_len, d = query.shape
    k, v = gather_kv_reference(layer, block_tables, kv_len, query.dtype)
    group = hq // layer.num_kv_heads
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    if attention_mask is None:
        q_pos = kv_len - q_len + torch.arange(q_len, device=query.device)
        attention_mask = torch.arange(kv_len, device=query.device)[None, :] <= q_pos[:, None]
    out = torch.nn.functional.scaled_dot_product_attention(query, k, v, attn_mask=attention_mask, scale=scale)
    return out.transpose(1, 2)
