"""The plain-torch references (``kvcache/kernels/reference.py``) against their definitions.

The references are also the CPU path, so they are written for speed: one gather per tensor in the
stored dtype, parameters folded around the dots, grouped query heads instead of copies. The
definitions below are the simple versions they replaced (dequantize the whole history to fp32,
``repeat_interleave`` the KV heads, einsum): the fast ones must agree with them bit for bit where
the arithmetic is the same (store, gather, prefill) and within fp32 rounding where the folding
reorders it (decode), over GQA groups, head dims, block tables with holes, per-row lengths, every
KV mode, and fp32/fp16 queries.
"""

from __future__ import annotations

import pytest
import torch

from kvcache.kernels.reference import (
    decode_attention_reference,
    gather_kv_reference,
    prefill_attention_reference,
    store_kv_reference,
)
from kvcache.modes import get_mode
from kvcache.qparams import KVQParams
from kvcache.quant import dequantize, dynamic_qparams, quantize
from kvcache.storage.layout import LayerKV, new_blocks

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# (mode, granularity, symmetric, fp_dtype) for every way the storage can be parameterised.
MODES = [
    ("fp16", None, False, torch.float16),
    ("fp16", None, False, torch.bfloat16),
    ("fp16", None, False, torch.float32),
    *(("int8", g, sym, torch.float16) for g in ("tensor", "head", "channel") for sym in (False, True)),
    ("int8-dynamic", None, False, torch.float16),
]
MODE_IDS = [f"{m}-{str(fp).split('.')[-1]}" if g is None else f"{m}-{g}-{'sym' if s else 'asym'}" for m, g, s, fp in MODES]


# --- the definitions -------------------------------------------------------------------------------


def store_definition(layer: LayerKV, key: torch.Tensor, value: torch.Tensor, slots: torch.Tensor) -> None:
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


def gather_definition(layer: LayerKV, block_tables: torch.Tensor, length: int, dtype: torch.dtype):
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


def make_layer(kv: str, num_blocks: int, kvh: int, block_size: int, head_dim: int, granularity: str | None = None,
               symmetric: bool = False, fp_dtype: torch.dtype = torch.float16, seed: int = 0) -> LayerKV:
    """Storage full of stale values (what freed blocks hold), so that reading past a row's length would show."""
    mode = get_mode(kv)
    layer = LayerKV(mode, **new_blocks(mode, num_blocks, kvh, block_size, head_dim, "cpu", fp_dtype))
    g = torch.Generator().manual_seed(seed)
    for name in layer.per_block_tensors():
        t = getattr(layer, name)
        if t.dtype == torch.int8:
            t.copy_(torch.randint(-128, 128, t.shape, generator=g))
        elif name.endswith("_scale"):
            t.copy_(torch.rand(t.shape, generator=g) * 0.05 + 1e-3)
        else:
            t.copy_(torch.randn(t.shape, generator=g) * 3)
    if mode.needs_qparams:
        lo = -2.5 * (0.5 + torch.rand(kvh, head_dim, generator=g)) + 1.0
        hi = 2.5 * (0.5 + torch.rand(kvh, head_dim, generator=g)) + 1.0
        stats = {"min": [lo], "max": [hi], "absmax": [torch.maximum(-lo, hi)]}
        vstats = {k: [v[0] * 0.7] for k, v in stats.items()}
        qp = KVQParams.from_stats(stats, vstats, granularity=granularity or "channel", symmetric=symmetric)
        layer.k_scale, layer.k_zp, layer.v_scale, layer.v_zp = qp.layer(0, kvh, head_dim)
    return layer


def clone_layer(layer: LayerKV) -> LayerKV:
    return LayerKV(layer.mode, *(None if t is None else t.clone() for t in
                                 (layer.k, layer.v, layer.k_scale, layer.k_zp, layer.v_scale, layer.v_zp)))


def fill_rows(layer: LayerKV, lengths: list[int], max_blocks: int, seed: int = 0, offset: float = 0.0):
    """Each row's history at scattered block ids (holes between them); tables padded with block 0 past each row."""
    g = torch.Generator().manual_seed(seed)
    b, bs = len(lengths), layer.block_size
    ids = 1 + torch.randperm(layer.num_blocks - 1, generator=g)[: b * max_blocks].reshape(b, max_blocks)
    for i, n in enumerate(lengths):
        ids[i, -(-n // bs):] = 0
        pos = torch.arange(n)
        slots = ids[i, pos // bs] * bs + pos % bs
        k = torch.randn(n, layer.num_kv_heads, layer.head_dim, generator=g) * 1.5 + offset
        v = torch.randn(n, layer.num_kv_heads, layer.head_dim, generator=g) + offset
        store_kv_reference(layer, k, v, slots)
    return ids.to(torch.int32), torch.tensor(lengths, dtype=torch.int32)


# --- store and gather: the same arithmetic, so the same bits ----------------------------------------


@pytest.mark.parametrize("in_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kv,granularity,symmetric,fp_dtype", MODES, ids=MODE_IDS)
def test_store_is_the_definition(kv, granularity, symmetric, fp_dtype, in_dtype):
    layer = make_layer(kv, 12, 3, 16, 48, granularity, symmetric, fp_dtype)
    want = clone_layer(layer)
    g = torch.Generator().manual_seed(1)
    for num_tokens in (1, 5, 40):  # a decode step, a short and a long chunk
        slots = torch.randperm(12 * 16, generator=g)[:num_tokens]
        key = (torch.randn(num_tokens, 3, 48, generator=g) * 2 + 0.5).to(in_dtype)
        value = torch.randn(num_tokens, 3, 48, generator=g).to(in_dtype)
        store_kv_reference(layer, key, value, slots)
        store_definition(want, key, value, slots)
    for name in layer.per_block_tensors():
        assert torch.equal(getattr(layer, name), getattr(want, name)), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("kv,granularity,symmetric,fp_dtype", MODES, ids=MODE_IDS)
def test_gather_is_the_definition(kv, granularity, symmetric, fp_dtype, dtype):
    layer = make_layer(kv, 20, 3, 16, 64, granularity, symmetric, fp_dtype)
    tables, _ = fill_rows(layer, [37, 5, 70], max_blocks=6)
    for length in (1, 16, 37, 70):
        got, want = gather_kv_reference(layer, tables, length, dtype), gather_definition(layer, tables, length, dtype)
        for a, b in zip(got, want):
            assert a.shape == b.shape and a.dtype == b.dtype
            assert torch.equal(a, b)


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("head_dim", [48, 64, 128])
@pytest.mark.parametrize("group", [1, 3, 4])
@pytest.mark.parametrize("kv,granularity,symmetric,fp_dtype", MODES, ids=MODE_IDS)
def test_decode_within_fp32_rounding_of_the_definition(kv, granularity, symmetric, fp_dtype, group, head_dim, dtype):
    """Unequal lengths (one of a single token, one a whole number of blocks), blocks scattered, stale tails."""
    layer = make_layer(kv, 30, 2, 16, head_dim, granularity, symmetric, fp_dtype, seed=group)
    tables, lens = fill_rows(layer, [37, 1, 70, 32], max_blocks=6, seed=head_dim)
    check_decode(layer, tables, lens, 2 * group, dtype)
    check_decode(layer, tables[1:2], lens[1:2], 2 * group, dtype, seed=1)  # one row, one token
    check_decode(layer, tables[3:], lens[3:], 2 * group, dtype, seed=2)  # one row that fills its blocks


@pytest.mark.parametrize("kv,granularity,symmetric,fp_dtype", MODES, ids=MODE_IDS)
def test_decode_real_shape_long_context(kv, granularity, symmetric, fp_dtype):
    """SmolLM2-135M's attention (9 heads over 3 KV heads, head_dim 64, blocks of 64) over 1K tokens, shifted values."""
    layer = make_layer(kv, 40, 3, 64, 64, granularity, symmetric, fp_dtype)
    tables, lens = fill_rows(layer, [1030, 600], max_blocks=17, offset=0.75)
    for dtype in (torch.float32, torch.float16):
        check_decode(layer, tables, lens, 9, dtype)


# --- prefill: grouped SDPA on the same history -------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("group", [1, 3, 4])
@pytest.mark.parametrize("kv,granularity,symmetric,fp_dtype", MODES, ids=MODE_IDS)
def test_prefill_is_the_definition(kv, granularity, symmetric, fp_dtype, group, dtype):
    layer = make_layer(kv, 20, 2, 16, 64, granularity, symmetric, fp_dtype)
    tables, _ = fill_rows(layer, [45, 45], max_blocks=4)
    g = torch.Generator().manual_seed(3)
    for q_len in (1, 7, 45):
        q = torch.randn(2, 2 * group, q_len, 64, generator=g).to(dtype)
        pos = 45 - q_len + torch.arange(q_len)
        bool_mask = (torch.arange(45)[None, :] <= pos[:, None]) & (torch.arange(45)[None, :] >= 3)  # a left-padded row
        float_mask = torch.zeros(45).masked_fill(torch.arange(45) < 3, float("-inf")).to(dtype)[None, None, None]
        for mask in (None, bool_mask[None, None].expand(2, 1, q_len, 45), float_mask):
            got = prefill_attention_reference(q, layer, tables, 45, 0.125, mask)
            want = prefill_definition(q, layer, tables, 45, 0.125, mask)
            assert got.shape == want.shape == (2, q_len, 2 * group, 64) and got.dtype == dtype
            torch.testing.assert_close(got, want, atol=0, rtol=0)
