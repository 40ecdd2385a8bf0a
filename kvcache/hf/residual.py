"""Attention over an emulated residual window (``KVMode.residual``: the ``hf:`` schemes, and ``MODE+recentN``).

The pool holds every token as 16-bit values: the tokens up to the last re-quantization as their decoded values,
the newer ones as they came. A query at position ``t`` attends exactly that (what a token-by-token decode sees),
and after the query at a position ``p`` with ``p % residual == 0`` the row's whole sequence ``0..p`` is quantized
again by the engine's backend and written back decoded (:func:`kvcache.engines.hf.requantize`). A prefill chunk is
attended in segments that end at those positions, so every query reads the sequence as quantized before it.
Our modes with a window (``int2-klt+recent128``) do the same with their own codecs, coding only the tokens the
window lets go (each token is coded once, as in their pools), so between 1 and N of the newest are 16-bit.
"""

from __future__ import annotations

import torch

from ..encoding import decode, encode
from ..engines.hf import requantize
from ..kernels import decode_attention, prefill_attention
from ..kernels.reference import gather_kv_reference, store_kv_reference
from ..storage.context import Phase, StepContext
from ..storage.layout import LayerKV, slot_mapping


def flush(layer: LayerKV, table: torch.Tensor, position: int) -> None:
    """Quantize one row's window ending at ``position`` (``table``: its block table, ``[max_blocks]``) in place.

    transformers' backends re-quantize the whole sequence ``0..position``; our codecs (a ``+recentN`` window,
    ``layer.flush_codes``) code each token once, so only the window's tokens are coded, as a pool of the
    mode would store them, and their sink copies stay 16-bit."""
    if layer.flush_codes is None:
        n = position + 1
        k, v = gather_kv_reference(layer, table[None], n, layer.k.dtype)  # [1, kv_heads, n, d]
        k_codec, v_codec = layer.emulated
        k, v = requantize(k_codec, k[0]), requantize(v_codec, v[0])
        slots = slot_mapping(table[None].long(), torch.arange(n, device=table.device)[None], layer.block_size)[0]
        store_kv_reference(layer, k.transpose(0, 1).contiguous(), v.transpose(0, 1).contiguous(), slots)
        return
    first = max(position + 1 - layer.residual, 0)
    positions = torch.arange(first, position + 1, device=table.device)
    slots = slot_mapping(table[None].long(), positions[None], layer.block_size)[0]
    blk, off = slots // layer.block_size, slots % layer.block_size
    coded = layer.flush_codes
    for side in ("k", "v"):
        data = getattr(layer, side)
        x = data[blk, :, off]  # [tokens, kv_heads, head_dim], as the maps store them
        codec, params = coded.codec(side), coded.side_params(side)
        if codec.quantized:
            enc = encode(codec, x, params)
            data[blk, :, off] = decode(codec, enc.codes, enc.scale, enc.zp, params, data.dtype, head_axis=1)


def residual_attention(query: torch.Tensor, layer: LayerKV, ctx: StepContext, scale: float,
                       attention_mask: torch.Tensor | None) -> torch.Tensor:
    """``[batch, q_len, heads, head_dim]`` attention of this step's queries, flushing where a position calls for it."""
    every = layer.residual
    if ctx.phase is Phase.DECODE:
        out = decode_attention(query[:, :, 0], layer, ctx.block_tables, ctx.seq_lens, scale)[:, None]
        for row, length in enumerate(ctx.seq_lens.tolist()):
            if (length - 1) % every == 0:
                flush(layer, ctx.block_tables[row], length - 1)
        return out
    start, end = ctx.end - ctx.num_new, ctx.end
    cuts = [p + 1 for p in range(start, end) if p % every == 0 and p + 1 < end] + [end]
    pieces, lo = [], start
    for hi in cuts:  # queries lo..hi-1 attend 0..hi-1 as stored now
        mask = None
        if attention_mask is not None and attention_mask.dim() == 4:
            mask = attention_mask[:, :, lo - start:hi - start, :hi]
        pieces.append(prefill_attention(query[:, :, lo - start:hi - start], layer, ctx.block_tables, hi, scale, mask))
        if (hi - 1) % every == 0:
            for row in range(ctx.batch):
                flush(layer, ctx.block_tables[row], hi - 1)
        lo = hi
    return torch.cat(pieces, dim=1)
