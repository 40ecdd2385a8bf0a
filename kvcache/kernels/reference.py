"""Plain-torch references: they define what every kernel must compute, and run on CPU.

Shapes: ``key``/``value`` for a write are ``[num_tokens, num_kv_heads, head_dim]`` with one slot
each; ``block_tables`` is ``[batch, max_blocks]`` int32; ``seq_lens`` is ``[batch]`` int32.

They are also the CPU path every new user runs, so they read the history as the kernels do, never
forming a dequantized copy of it in decode: each row's blocks are gathered once in the stored dtype
(``index_select``) and converted once to fp32 (exact for fp16 values and int8 codes), and the
quantization parameters are folded around the dots (:mod:`kvcache.kernels.folded` has the algebra).
The query heads of one KV head attend as that head's rows (no ``repeat_interleave`` copies): one SDPA
for fp16 values and static codes, two matmuls for dynamic codes (their per-token parameters sit
between the dots). Decode equals dequantize-then-attend in fp32 up to fp32 rounding; store, gather and
prefill compute exactly what those plain definitions do (``tests/test_reference_fast.py`` checks both).
"""

from __future__ import annotations

import torch

from ..codec import INT8_TOKEN
from ..encoding import decode, encode, from_storage, to_storage
from ..quant import dynamic_qparams, quantize
from ..storage.layout import LayerKV


def _store_side(layer: LayerKV, side: str, x: torch.Tensor, blk: torch.Tensor, off: torch.Tensor) -> None:
    """Encode ``x`` (``[tokens, kv_heads, head_dim]``) per the side's codec and write it at (block, offset)."""
    codec, data = layer.codec(side), getattr(layer, side)
    if not codec.quantized:
        data[blk, :, off] = x.to(data.dtype)
        return
    enc = encode(codec, x, layer.side_params(side))
    if enc.scale is not None:
        getattr(layer, f"{side}_scale")[blk, :, off] = enc.scale
    if enc.zp is not None:
        getattr(layer, f"{side}_zp")[blk, :, off] = enc.zp
    data[blk, :, off] = to_storage(codec, enc.codes, layer.widths(side))


def _store_sinks(layer: LayerKV, key: torch.Tensor, value: torch.Tensor, blk: torch.Tensor, off: torch.Tensor) -> None:
    """Tokens below ``sink_tokens`` of a sequence's first block also go, unquantized, to its sink slot."""
    slot = layer.sink_slot[blk]
    keep = (slot >= 0) & (off < layer.sink_tokens)
    if keep.any():
        layer.k_sink[slot[keep].long(), :, off[keep]] = key[keep].to(layer.k_sink.dtype)
        layer.v_sink[slot[keep].long(), :, off[keep]] = value[keep].to(layer.v_sink.dtype)


def store_kv_reference(layer: LayerKV, key: torch.Tensor, value: torch.Tensor, slots: torch.Tensor) -> None:
    """Encode (per each side's codec) and write each token's K/V at its slot; sink tokens also as floats."""
    bs = layer.block_size
    blk, off = slots // bs, slots % bs
    if layer.k_codec == layer.v_codec == INT8_TOKEN:  # parameters per (token, head): K and V as one batch
        kv = torch.stack((key, value))
        scale, zp = dynamic_qparams(kv, 8, layer.k_scale.dtype)  # the pool's parameter dtype
        codes = quantize(kv, scale[..., None], zp[..., None], 8)
        for i, name in enumerate(("k", "v")):
            getattr(layer, name)[blk, :, off] = codes[i]
            getattr(layer, f"{name}_scale")[blk, :, off] = scale[i][..., None]
            getattr(layer, f"{name}_zp")[blk, :, off] = zp[i][..., None]
    else:
        _store_side(layer, "k", key, blk, off)
        _store_side(layer, "v", value, blk, off)
    if layer.sink_tokens:
        _store_sinks(layer, key, value, blk, off)


def read_blocks(t: torch.Tensor, blocks: torch.Tensor, batch: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A per-block tensor (``[num_blocks, kv_heads, block_size, ...]``) at ``blocks`` (``batch`` rows of
    ``n`` ids, flattened), as ``dtype`` ``[batch, kv_heads, n * block_size, ...]``: one gather, one conversion."""
    x = t.index_select(0, blocks)
    x = x.view(batch, -1, *x.shape[1:]).transpose(1, 2)  # [batch, kv_heads, n, block_size, ...]
    return torch.empty(x.shape, dtype=dtype, device=x.device).copy_(x).flatten(2, 3)


def _read_side(layer: LayerKV, side: str, blocks: torch.Tensor, b: int, length: int, dtype: torch.dtype) -> torch.Tensor:
    """One side's first ``length`` positions per row, decoded: ``[batch, kv_heads, length, head_dim]``."""
    codec, data = layer.codec(side), getattr(layer, side)
    if not codec.quantized:
        return read_blocks(data, blocks, b, dtype)[:, :, :length]
    codes = from_storage(codec, read_blocks(data, blocks, b, data.dtype)[:, :, :length], layer.head_dim,
                         layer.widths(side), head_axis=1)
    scale = zp = None
    if codec.scaling == "token":
        s, z = layer.params(side)
        scale = read_blocks(s, blocks, b, s.dtype)[:, :, :length]
        zp = None if z is None else read_blocks(z, blocks, b, z.dtype)[:, :, :length]
    return decode(codec, codes, scale, zp, layer.side_params(side), dtype, head_axis=1)


def _overlay_sinks(layer: LayerKV, side: str, x: torch.Tensor, block_tables: torch.Tensor) -> None:
    """Positions below ``sink_tokens`` of rows whose first block has a sink slot: their fp16 copies, in place."""
    n = min(layer.sink_tokens, x.shape[2])
    slot = layer.sink_slot[block_tables[:, 0].long()]
    rows = (slot >= 0).nonzero()[:, 0]
    if n and len(rows):
        x[rows, :, :n] = getattr(layer, f"{side}_sink")[slot[rows].long(), :, :n].to(x.dtype)


def gather_kv_reference(
    layer: LayerKV, block_tables: torch.Tensor, length: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoded K and V of the first ``length`` positions of each row: ``[batch, kv_heads, length, head_dim]``."""
    n = -(-length // layer.block_size)
    b = block_tables.shape[0]
    blocks = block_tables[:, :n].reshape(-1).long()
    out = []
    for side in ("k", "v"):
        x = _read_side(layer, side, blocks, b, length, dtype)
        if layer.sink_tokens:
            _overlay_sinks(layer, side, x, block_tables)
        out.append(x)
    return out[0], out[1]


def _folded_kind(layer: LayerKV) -> str | None:
    """Which folded decode path fits the layer ('float', 'static', 'token'), or None (decode, then attend)."""
    if layer.sink_tokens or layer.k_codec != layer.v_codec:
        return None
    codec = layer.k_codec
    if not codec.quantized:
        return "float"
    if codec.bits == 8 and codec.scaling == "static":
        return "static"
    return "token" if codec == INT8_TOKEN else None


def _decode_decoded(query: torch.Tensor, layer: LayerKV, block_tables: torch.Tensor, seq_lens: torch.Tensor,
                    scale: float) -> torch.Tensor:
    """Decode for any codec: the rows' histories decoded in fp32, then SDPA per KV-head group, masked per row."""
    b, hq, d = query.shape
    kvh, length = layer.num_kv_heads, int(seq_lens.max())
    k, v = gather_kv_reference(layer, block_tables, length, torch.float32)
    q = query.float().view(b, kvh, hq // kvh, d)
    valid = torch.arange(length, device=query.device) < seq_lens.to(query.device)[:, None]
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=valid[:, None, None], scale=scale)
    return out.reshape(b, hq, d).to(query.dtype)


def decode_attention_reference(
    query: torch.Tensor, layer: LayerKV, block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float
) -> torch.Tensor:
    """One query token per sequence (``[batch, num_heads, head_dim]``) over each sequence's own length, in fp32.

    With ``c`` the stored values (fp16 values or int8 codes, in fp32) and ``p`` the attention weights:
    - fp16: scores ``q.c``, output ``sum p c``;
    - static int8 (per-channel ``s``/``z``): scores ``(q*s).c + q.z``, output ``s * sum p c + z * sum p``;
      ``q.z`` is the same at every position, so the softmax cancels it, and ``sum p`` is 1;
    - dynamic int8 (per-token ``s_n``/``z_n``): scores ``s_n (q.c_n) + z_n sum(q)``, output
      ``sum (p s) c + sum p z``.
    Every row reads the same number of whole blocks; positions at or past a row's length are masked.
    """
    b, hq, d = query.shape
    kind = _folded_kind(layer)
    if kind is None:  # 4-bit codes, groups, symmetric scales, sinks: decode the history, then attend
        return _decode_decoded(query, layer, block_tables, seq_lens, scale)
    kvh, bs = layer.num_kv_heads, layer.block_size
    n = -(-int(seq_lens.max()) // bs)
    blocks = block_tables[:, :n].reshape(-1).long()
    k = read_blocks(layer.k, blocks, b)  # [b, kvh, n * bs, d]
    v = read_blocks(layer.v, blocks, b)
    q = query.float().view(b, kvh, hq // kvh, d)  # the query heads of each KV head, as rows
    valid = torch.arange(n * bs, device=query.device) < seq_lens.to(query.device)[:, None]  # [b, n * bs]

    if kind != "token":  # one SDPA over the stored values, static parameters around it
        if kind == "static":
            q = q * layer.k_scale[None, :, None]
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=valid[:, None, None], scale=scale)
        if kind == "static":
            out = torch.addcmul(layer.v_zp[None, :, None], out, layer.v_scale[None, :, None])
        return out.reshape(b, hq, d).to(query.dtype)

    def per_token(name: str) -> torch.Tensor:  # [b, kvh, 1, n, bs] in the stored dtype (the ops below widen it)
        return getattr(layer, name).index_select(0, blocks).view(b, n, kvh, 1, bs).permute(0, 2, 3, 1, 4)

    q = q * scale
    scores = q @ k.transpose(-1, -2)  # [b, kvh, group, n * bs]
    blocked = scores.view(b, kvh, -1, n, bs)
    torch.addcmul(q.sum(-1)[..., None, None] * per_token("k_zp"), blocked, per_token("k_scale"), out=blocked)
    p = scores.masked_fill_(~valid[:, None, None], float("-inf")).softmax(dim=-1)
    blocked = p.view(b, kvh, -1, n, bs)
    out = (blocked * per_token("v_scale")).view_as(p) @ v + (blocked * per_token("v_zp")).sum((-2, -1))[..., None]
    return out.reshape(b, hq, d).to(query.dtype)


def prefill_attention_reference(
    query: torch.Tensor, layer: LayerKV, block_tables: torch.Tensor, kv_len: int, scale: float,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """A chunk of queries (``[batch, heads, q_len, head_dim]``, the last ``q_len`` of ``kv_len`` positions) over the history.

    The history is dequantized into the query's dtype, then SDPA (grouped: each KV head serves its
    query heads): causal for the chunk's offset, or ``attention_mask`` (boolean: True attends; float:
    added) when given. Returns ``[batch, q_len, heads, head_dim]``.
    """
    q_len = query.shape[2]
    k, v = gather_kv_reference(layer, block_tables, kv_len, query.dtype)
    if attention_mask is None:
        q_pos = kv_len - q_len + torch.arange(q_len, device=query.device)
        attention_mask = torch.arange(kv_len, device=query.device)[None, :] <= q_pos[:, None]
    out = torch.nn.functional.scaled_dot_product_attention(
        query, k, v, attn_mask=attention_mask, scale=scale, enable_gqa=True)
    return out.transpose(1, 2)
