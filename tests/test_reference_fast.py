"""The plain-torch references (``kvcache/kernels/reference.py``) against their definitions.

The references are also the CPU path, so they are written for speed: one gather per tensor in the
stored dtype, parameters folded around the dots, grouped query heads instead of copies, K and V of
``int8-dynamic`` quantized as one batch. The definitions below are the simple versions they replaced,
written here from :mod:`kvcache.quant`'s primitives only (never reference.py's helpers): encode each
side per its codec, dequantize the whole history to fp32 (static: ``[kv_heads, head_dim]`` parameters;
per token: groups, symmetric or not; 4-bit: unpacked nibbles), overlay the fp16 sink tokens of rows
whose first block has a sink slot, ``repeat_interleave`` the KV heads, einsum / SDPA. The fast ones
must agree with them bit for bit where the arithmetic is the same (store, gather, prefill) and within
fp32 rounding where the folding reorders it (decode), over GQA groups, head dims, block tables with
holes and stale data in freed blocks, per-row lengths, fp32/fp16 queries, and every codec: floats in
three pool dtypes, static int8 at every granularity (symmetric or not), per-token int8, 4-bit per head
and in symmetric groups, the named modes with sinks, and K and V with different codecs.

Rotations and the query-aware key transform are applied by the transformers glue, not by storage, so
at this level ``int8-rot`` (and ``int8-qk``, the same storage) is just its codec plus sinks.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import INT4_HEAD_MODE, clone_layer, stored_tensors

from kvcache.kernels.reference import (
    decode_attention_reference,
    gather_kv_reference,
    prefill_attention_reference,
    store_kv_reference,
)
from kvcache.modes import FP16, INT8_STATIC, INT8_TOKEN, Codec, KVMode, get_mode
from kvcache.qparams import KVQParams
from kvcache.quant import (dequantize, dequantize_groups, pack_int4, quantize, quantize_groups, token_qparams,
                           unpack_int4)
from kvcache.storage.layout import LayerKV, new_blocks

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@dataclasses.dataclass(frozen=True)
class Kind:
    """One way the storage can be parameterised: a mode (K and V codecs, sinks), static granularity, pool dtype."""

    id: str
    mode: KVMode
    granularity: str = "channel"
    symmetric: bool = False
    fp_dtype: torch.dtype = torch.float16


def _layout(name: str, k: Codec, v: Codec, sinks: int = 0) -> KVMode:
    return KVMode(name, "a test layout", k, v, sinks)


KINDS = [
    *(Kind(f"fp16-{str(fp).split('.')[-1]}", get_mode("fp16"), fp_dtype=fp)
      for fp in (torch.float16, torch.bfloat16, torch.float32)),
    *(Kind(f"int8-{g}-{'sym' if s else 'asym'}", get_mode("int8"), g, s)
      for g in ("tensor", "head", "channel") for s in (False, True)),
    Kind("int4-head", INT4_HEAD_MODE),
    *(Kind(m, get_mode(m)) for m in ("int8-dynamic", "int8-rot", "k8v4", "int4")),
    # K and V with different codecs: static 8-bit keys, 4-bit asymmetric values in groups (no sinks: the
    # decoded path for unequal codecs); fp16 keys, per-token int8 values, two sink tokens in a bf16 pool.
    Kind("mixed-k8static-v4g16", _layout("k8static-v4g16", INT8_STATIC, Codec(4, "token", 16))),
    Kind("mixed-kfp16-v8token-sinks2", _layout("kfp16-v8token-sinks2", FP16, INT8_TOKEN, 2), fp_dtype=torch.bfloat16),
    # A bf16 pool: our per-token parameters in bf16 (4-bit groups and 8-bit per head), or fp16 where a codec says
    # so (plans written before parameters followed the pool).
    Kind("int4-g16-bf16", _layout("int4-g16", Codec(4, "token", 16), Codec(4, "token", 16)), fp_dtype=torch.bfloat16),
    Kind("int8-dynamic-bf16", get_mode("int8-dynamic"), fp_dtype=torch.bfloat16),
    Kind("int8-fp16-params-bf16", _layout("int8-fp16-params", *[dataclasses.replace(INT8_TOKEN, param_dtype="fp16")] * 2),
         fp_dtype=torch.bfloat16),
]
KIND_IDS = [k.id for k in KINDS]
assert get_mode("k8v4").sink_tokens and get_mode("int4").sink_tokens and get_mode("int8-rot").sink_tokens


# --- the definitions -------------------------------------------------------------------------------


def _encode(codec: Codec, x: torch.Tensor, scale: torch.Tensor | None, zp: torch.Tensor | None, fp_dtype: torch.dtype):
    """``x`` (``[tokens, kv_heads, head_dim]``) as stored in a pool of ``fp_dtype``: (data, per-token scale or None,
    per-token zp or None)."""
    if not codec.quantized:
        return x, None, None
    if codec.scaling == "static":
        codes = quantize(x, scale, zp, codec.bits)
        tscale = tzp = None
    else:
        tscale, tzp = token_qparams(x, codec.bits, codec.group_size, codec.symmetric, codec.param_dtype_in(fp_dtype))
        codes = quantize_groups(x, tscale, tzp, codec.bits, codec.group_size)
    return (pack_int4(codes) if codec.bits == 4 else codes), tscale, tzp


def store_definition(layer: LayerKV, key: torch.Tensor, value: torch.Tensor, slots: torch.Tensor,
                     fp_dtype: torch.dtype) -> None:
    bs = layer.block_size
    for side, x in (("k", key), ("v", value)):
        codec = layer.codec(side)
        data, tscale, tzp = _encode(codec, x, getattr(layer, f"{side}_scale"), getattr(layer, f"{side}_zp"), fp_dtype)
        for i, s in enumerate(slots.tolist()):  # token by token
            blk, off = divmod(s, bs)
            getattr(layer, side)[blk, :, off] = data[i].to(getattr(layer, side).dtype)
            if tscale is not None:
                getattr(layer, f"{side}_scale")[blk, :, off] = tscale[i]
            if tzp is not None:
                getattr(layer, f"{side}_zp")[blk, :, off] = tzp[i]
            if layer.sink_tokens and off < layer.sink_tokens and int(layer.sink_slot[blk]) >= 0:
                sink = getattr(layer, f"{side}_sink")
                sink[int(layer.sink_slot[blk]), :, off] = x[i].to(sink.dtype)


def gather_definition(layer: LayerKV, block_tables: torch.Tensor, length: int, dtype: torch.dtype):
    bs, kvh = layer.block_size, layer.num_kv_heads
    n = -(-length // bs)
    blocks = block_tables[:, :n].long()
    b = blocks.shape[0]

    def history(t: torch.Tensor) -> torch.Tensor:  # [num_blocks, kvh, bs, w] -> [b, kvh, length, w], as stored
        return t[blocks].permute(0, 2, 1, 3, 4).reshape(b, kvh, n * bs, t.shape[-1])[:, :, :length]

    def read(side: str) -> torch.Tensor:
        codec = layer.codec(side)
        data = history(getattr(layer, side))
        if not codec.quantized:
            x = data.to(dtype)
        else:
            codes = unpack_int4(data) if codec.bits == 4 else data
            assert codes.dtype == torch.int8 and codes.shape[-1] == layer.head_dim
            scale, zp = getattr(layer, f"{side}_scale"), getattr(layer, f"{side}_zp")
            if codec.scaling == "static":
                x = dequantize(codes, scale[None, :, None, :], zp[None, :, None, :], dtype)
            else:
                x = dequantize_groups(codes, history(scale), None if zp is None else history(zp), codec.group_size,
                                      dtype)
        for r in range(b):  # sinks: the first positions of rows whose first block has a slot, from that slot
            slot = int(layer.sink_slot[blocks[r, 0]]) if layer.sink_tokens else -1
            if slot >= 0:
                m = min(layer.sink_tokens, length)
                x[r, :, :m] = getattr(layer, f"{side}_sink")[slot, :, :m].to(dtype)
        return x

    return read("k"), read("v")


def decode_definition(query, layer, block_tables, seq_lens, scale):
    hq = query.shape[1]
    max_len = int(seq_lens.max())
    k, v = gather_definition(layer, block_tables, max_len, torch.float32)
    group = hq // layer.num_kv_heads
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = torch.einsum("bhd,bhld->bhl", query.float(), k) * scale
    pad = torch.arange(max_len)[None, :] >= seq_lens[:, None]
    scores = scores.masked_fill(pad[:, None, :], float("-inf"))
    out = torch.einsum("bhl,bhld->bhd", scores.softmax(dim=-1), v)
    return out.to(query.dtype)


def prefill_definition(query, layer, block_tables, kv_len, scale, attention_mask=None):
    hq, q_len = query.shape[1:3]
    k, v = gather_definition(layer, block_tables, kv_len, query.dtype)
    group = hq // layer.num_kv_heads
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    if attention_mask is None:
        q_pos = kv_len - q_len + torch.arange(q_len)
        attention_mask = torch.arange(kv_len)[None, :] <= q_pos[:, None]
    out = torch.nn.functional.scaled_dot_product_attention(query, k, v, attn_mask=attention_mask, scale=scale)
    return out.transpose(1, 2)


# --- fixtures ---------------------------------------------------------------------------------------


def make_layer(kind: Kind, num_blocks: int, kvh: int, block_size: int, head_dim: int, seed: int = 0) -> LayerKV:
    """Storage full of stale values (what freed blocks and slots hold), so that reading past a row's length,
    or a sink slot the row does not own, would show. Static sides get calibrated-looking parameters; sinks get
    ``num_blocks // 2`` slots, bound to no block yet (``fill_rows`` binds them)."""
    mode = kind.mode
    layer = LayerKV(mode.k, mode.v, head_dim,
                    **new_blocks(mode.k, mode.v, num_blocks, kvh, block_size, head_dim, "cpu", kind.fp_dtype))
    g = torch.Generator().manual_seed(seed)
    for name in layer.per_block_tensors():
        t = getattr(layer, name)
        if t.dtype == torch.int8:
            t.copy_(torch.randint(-128, 128, t.shape, generator=g))
        elif t.dtype == torch.uint8:
            t.copy_(torch.randint(0, 256, t.shape, generator=g))
        elif name.endswith("_scale"):
            t.copy_(torch.rand(t.shape, generator=g) * 0.05 + 1e-3)
        else:
            t.copy_(torch.randn(t.shape, generator=g) * 3)
    if any(c.scaling == "static" for c in (mode.k, mode.v)):
        lo = -2.5 * (0.5 + torch.rand(kvh, head_dim, generator=g)) + 1.0
        hi = 2.5 * (0.5 + torch.rand(kvh, head_dim, generator=g)) + 1.0
        stats = {"min": [lo], "max": [hi], "absmax": [torch.maximum(-lo, hi)]}
        vstats = {k: [v[0] * 0.7] for k, v in stats.items()}
        qp = KVQParams.from_stats(stats, vstats, granularity=kind.granularity, symmetric=kind.symmetric)
        for side in ("k", "v"):
            codec = layer.codec(side)
            if codec.scaling == "static":
                scale, zp = qp.side(side, 0, kvh, head_dim, codec.bits)
                if codec.bits == 8:  # the file's own width: the same as layer()
                    assert torch.equal(scale, qp.layer(0, kvh, head_dim)[0 if side == "k" else 2])
                setattr(layer, f"{side}_scale", scale)
                setattr(layer, f"{side}_zp", zp)
    if mode.sink_tokens:
        layer.sink_tokens = mode.sink_tokens
        layer.k_sink, layer.v_sink = (torch.randn(max(1, num_blocks // 2), kvh, mode.sink_tokens, head_dim,
                                                  generator=g).to(kind.fp_dtype) * 3 for _ in range(2))
        layer.sink_slot = torch.full((num_blocks,), -1, dtype=torch.int32)
    return layer


def fill_rows(layer: LayerKV, lengths: list[int], max_blocks: int, seed: int = 0, offset: float = 0.0):
    """Each row's history at scattered block ids (holes between them); tables padded with block 0 (never
    written: stale) past each row. With sinks, even rows' first blocks get a sink slot and odd rows' do not."""
    g = torch.Generator().manual_seed(seed)
    b, bs = len(lengths), layer.block_size
    ids = 1 + torch.randperm(layer.num_blocks - 1, generator=g)[: b * max_blocks].reshape(b, max_blocks)
    for i, n in enumerate(lengths):
        ids[i, -(-n // bs):] = 0
        if layer.sink_tokens and i % 2 == 0:
            layer.sink_slot[ids[i, 0]] = i // 2
        pos = torch.arange(n)
        slots = ids[i, pos // bs] * bs + pos % bs
        k = torch.randn(n, layer.num_kv_heads, layer.head_dim, generator=g) * 1.5 + offset
        v = torch.randn(n, layer.num_kv_heads, layer.head_dim, generator=g) + offset
        store_kv_reference(layer, k, v, slots)
    return ids.to(torch.int32), torch.tensor(lengths, dtype=torch.int32)


# --- store and gather: the same arithmetic, so the same bits ----------------------------------------


@pytest.mark.parametrize("d", [48, 128])
@pytest.mark.parametrize("kind", KINDS, ids=KIND_IDS)
def test_store_is_the_definition(kind, d):
    nb, bs, kvh = 12, 16, 3
    layer = make_layer(kind, nb, kvh, bs, d)
    if layer.sink_tokens:
        layer.sink_slot[torch.tensor([0, 5, 7])] = torch.tensor([2, 0, 1], dtype=torch.int32)
    g = torch.Generator().manual_seed(1)
    # The long chunk writes offsets 0..3 of sink-bound blocks 5 and 7 (and offset 5 of 5: not a sink), then others.
    first = torch.tensor([5 * bs + 0, 5 * bs + 3, 7 * bs + 1, 5 * bs + 5, 7 * bs + 2])
    for in_dtype in (torch.float32, torch.float16, torch.bfloat16):
        got, want = layer, clone_layer(layer)
        for num_tokens in (1, 5, 40):  # a decode step, a short and a long chunk
            rest = torch.randperm(nb * bs, generator=g)
            slots = torch.cat([first, rest[~torch.isin(rest, first)]])[:num_tokens] if num_tokens == 40 else rest[:num_tokens]
            key = (torch.randn(num_tokens, kvh, d, generator=g) * 2 + 0.5)
            value = torch.randn(num_tokens, kvh, d, generator=g)
            if num_tokens == 40:
                key[0, 0] = 0.5  # a constant vector: zero range, the scale floor
                key[1, 1, :5] = 40.0  # an outlier (clamped by static parameters)
                value[2, 2] = 0.0  # all zeros: the symmetric scale floor
            key, value = key.to(in_dtype), value.to(in_dtype)
            store_kv_reference(got, key, value, slots)
            store_definition(want, key, value, slots, kind.fp_dtype)
        for name in stored_tensors(got):
            assert torch.equal(getattr(got, name), getattr(want, name)), f"{name} ({in_dtype})"
        if layer.sink_tokens:  # the definition did copy the sink tokens (block 5 offset 0 is slot 0, position 0)
            assert torch.equal(want.k_sink[0, :, 0], key[0].to(want.k_sink.dtype))


@pytest.mark.parametrize("head_dim", [48, 64])
@pytest.mark.parametrize("kind", KINDS, ids=KIND_IDS)
def test_gather_is_the_definition(kind, head_dim):
    layer = make_layer(kind, 20, 3, 16, head_dim)
    tables, _ = fill_rows(layer, [37, 5, 70], max_blocks=6)
    for dtype in (torch.float32, torch.float16):
        for length in (1, 3, 16, 37, 70):
            got, want = gather_kv_reference(layer, tables, length, dtype), gather_definition(layer, tables, length, dtype)
            for a, b in zip(got, want):
                assert a.shape == b.shape == (3, 3, length, head_dim) and a.dtype == b.dtype == dtype
                assert torch.equal(a, b), (dtype, length)
    if layer.sink_tokens:  # row 0 reads its sink slot, row 1 (no slot) its blocks
        k, _ = gather_definition(layer, tables, 16, torch.float32)
        assert torch.equal(k[0, :, :layer.sink_tokens], layer.k_sink[0].float())
        assert not torch.equal(k[1, :, :layer.sink_tokens], layer.k_sink[0].float())


# --- decode: folded, so equal within fp32 rounding --------------------------------------------------

TOL = {torch.float32: {"atol": 1e-5, "rtol": 1e-5}, torch.float16: {"atol": 1e-3, "rtol": 1e-3}}


def check_decode(layer, tables, lens, num_heads, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(len(lens), num_heads, layer.head_dim, generator=g) * 2).to(dtype)
    scale = layer.head_dim**-0.5
    got = decode_attention_reference(q, layer, tables, lens, scale)
    want = decode_definition(q, layer, tables, lens, scale)
    assert got.shape == want.shape == q.shape and got.dtype == dtype
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, **TOL[dtype])


@pytest.mark.parametrize("head_dim", [48, 64, 128])
@pytest.mark.parametrize("group", [1, 3, 4])
@pytest.mark.parametrize("kind", KINDS, ids=KIND_IDS)
def test_decode_within_fp32_rounding_of_the_definition(kind, group, head_dim):
    """Unequal lengths (one of a single token, one a whole number of blocks), blocks scattered, stale tails;
    with sinks, rows 0 and 2 read their first tokens from sink slots (row 1, of one token, would not)."""
    layer = make_layer(kind, 30, 2, 16, head_dim, seed=group)
    tables, lens = fill_rows(layer, [37, 1, 70, 32], max_blocks=6, seed=head_dim)
    for dtype in (torch.float32, torch.float16):
        check_decode(layer, tables, lens, 2 * group, dtype)
        check_decode(layer, tables[1:2], lens[1:2], 2 * group, dtype, seed=1)  # one row, one token
        check_decode(layer, tables[3:], lens[3:], 2 * group, dtype, seed=2)  # one row that fills its blocks


@pytest.mark.parametrize("kind", KINDS, ids=KIND_IDS)
def test_decode_real_shape_long_context(kind):
    """SmolLM2-135M's attention (9 heads over 3 KV heads, head_dim 64, blocks of 64) over 1K tokens, shifted values."""
    layer = make_layer(kind, 40, 3, 64, 64)
    tables, lens = fill_rows(layer, [1030, 600], max_blocks=17, offset=0.75)
    for dtype in (torch.float32, torch.float16):
        check_decode(layer, tables, lens, 9, dtype)


# --- prefill: grouped SDPA on the same history -------------------------------------------------------


@pytest.mark.parametrize("group", [1, 3, 4])
@pytest.mark.parametrize("kind", KINDS, ids=KIND_IDS)
def test_prefill_is_the_definition(kind, group):
    layer = make_layer(kind, 20, 2, 16, 64)
    tables, _ = fill_rows(layer, [45, 45], max_blocks=4)
    g = torch.Generator().manual_seed(3)
    for dtype in (torch.float32, torch.float16):
        for q_len in (1, 7, 45):
            q = torch.randn(2, 2 * group, q_len, 64, generator=g).to(dtype)
            pos = 45 - q_len + torch.arange(q_len)
            bool_mask = (torch.arange(45)[None, :] <= pos[:, None]) & (torch.arange(45)[None, :] >= 3)  # left-padded
            float_mask = torch.zeros(45).masked_fill(torch.arange(45) < 3, float("-inf")).to(dtype)[None, None, None]
            for mask in (None, bool_mask[None, None].expand(2, 1, q_len, 45), float_mask):
                got = prefill_attention_reference(q, layer, tables, 45, 0.125, mask)
                want = prefill_definition(q, layer, tables, 45, 0.125, mask)
                assert got.shape == want.shape == (2, q_len, 2 * group, 64) and got.dtype == dtype
                torch.testing.assert_close(got, want, atol=0, rtol=0)
