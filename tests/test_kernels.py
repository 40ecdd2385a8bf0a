"""Triton kernels against their plain-torch references (``kvcache/kernels/reference.py``).

Without a GPU the kernels run in Triton's interpreter (conftest sets TRITON_INTERPRET=1), so shapes
are tiny; with one, the same tests run the compiled kernels on CUDA tensors.
"""

from __future__ import annotations


from dataclasses import replace

import pytest
import torch
from conftest import INT4_HEAD_MODE, clone_layer, stored_tensors

from kvcache.codebooks import PEAK_GRIDS, gauss_distortion, gauss_levels
from kvcache.kernels.common import unsupported, unsupported_store
from kvcache.quant import allocate_bits, width_layout
from kvcache.kernels import decode_attention, prefill_attention, store_kv, use_triton
from kvcache.kernels.reference import (
    decode_attention_reference,
    prefill_attention_reference,
    store_kv_reference,
)
from kvcache.modes import INT2_G32_MODE, INT8_TOKEN, Codec, KVMode, get_mode, peak_lloyd_max
from kvcache.qparams import KVQParams
from kvcache.storage.layout import LayerKV, new_blocks

try:
    import triton  # noqa: F401

    HAVE_TRITON = True
except ImportError:
    HAVE_TRITON = False

needs_triton = pytest.mark.skipif(
    not HAVE_TRITON, reason="triton is not importable: the kernels cannot run, not even in the interpreter")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (mode, granularity, symmetric) for every way the 8-bit storage can be parameterised.
MODES = [
    ("fp16", None, False),
    *(("int8", g, sym) for g in ("tensor", "head", "channel") for sym in (False, True)),
    ("int8-dynamic", None, False),
]
MODE_IDS = [m if g is None else f"{m}-{g}-{'sym' if s else 'asym'}" for m, g, s in MODES]


def _layout(name: str, k: Codec, v: Codec, sinks: int = 0) -> KVMode:
    return KVMode(name, "a test layout", k, v, sinks)


INT4_HEAD, INT4_G16_SYM = Codec(4, "token"), Codec(4, "token", 16, True)
# The lower-bit codecs, K and V independently: 4-bit per head asymmetric (LMDeploy's), in groups of 16
# symmetric (llama.cpp's q4_0 rule) and of 32 asymmetric, 8-bit in groups, K8/V4 with sinks, static
# 4-bit, 8-bit per head with sinks, and mixed: symmetric 4-bit per head with symmetric 8-bit groups.
LOWBIT = [
    _layout("int4-head", INT4_HEAD, INT4_HEAD),
    _layout("int4-g16-sym", INT4_G16_SYM, INT4_G16_SYM),
    _layout("int4-g32", Codec(4, "token", 32), Codec(4, "token", 32)),
    _layout("int8-g32", Codec(8, "token", 32), Codec(8, "token", 32)),
    _layout("k8v4-sinks", INT8_TOKEN, INT4_G16_SYM, 4),
    _layout("int4-static", Codec(4, "static"), Codec(4, "static")),
    _layout("int8-head-sinks", INT8_TOKEN, INT8_TOKEN, 4),
    _layout("k4sym-v8g16sym", Codec(4, "token", 0, True), Codec(8, "token", 16, True)),
]
LOWBIT_IDS = [m.name for m in LOWBIT]
# 3- and 2-bit codes in bit planes: groups of 32 and per head, symmetric and not, with sinks, K and V mixed.
PLANES = [
    _layout("int3-g32-sym", Codec(3, "token", 32, True), Codec(3, "token", 32, True)),
    _layout("int3-head-sym-sinks", Codec(3, "token", 0, True), Codec(3, "token", 0, True), 4),
    _layout("int2-g32-sym", Codec(2, "token", 32, True), Codec(2, "token", 32, True)),
    _layout("k3-v2g16-asym", Codec(3, "token"), Codec(2, "token", 16)),
]
PLANES_IDS = [m.name for m in PLANES]
NAMED_LOWBIT = [INT4_HEAD_MODE, "int8-rot", "k8v4", "int4", "k8v4-lm"]  # per-head int4 and the mode table's (rotations are outside the kernels)


def _store_triton(*args):
    from kvcache.kernels.paged_store import store_kv_triton

    return store_kv_triton(*args)


def _decode_triton(*args, **kwargs):
    from kvcache.kernels.paged_decode import decode_attention_triton

    return decode_attention_triton(*args, **kwargs)


def _prefill_triton(*args, **kwargs):
    from kvcache.kernels.paged_prefill import prefill_attention_triton

    return prefill_attention_triton(*args, **kwargs)


def peak_table(bits: int) -> torch.Tensor:
    """Stand-in ``lloyd-max-peak`` levels: ascending, level 0 exactly -1, unevenly spaced. The solved levels take
    seconds to minutes on a CPU (:func:`kvcache.codebooks.lloyd_max_peak`); kernel and reference read whatever table
    the layer holds, so these test the same code (one test takes the solved 2-bit levels, the quick ones)."""
    t = torch.linspace(-1.0, 1.0, (1 << bits) + 1, dtype=torch.float64)[:-1]
    return (t.sign() * t.abs() ** 1.3).float()


def make_layer(kv: str | KVMode, num_blocks: int, kvh: int, block_size: int, head_dim: int, *,
               granularity: str | None = None, symmetric: bool = False, fp_dtype: torch.dtype = torch.float16,
               lim: float = 2.5, seed: int = 0) -> LayerKV:
    """Zeroed storage from ``new_blocks``, codebook sides their fixed table; static sides get random calibrated-looking parameters; sinks get
    ``num_blocks // 2`` zeroed slots, bound to no block yet (``fill_rows`` binds them)."""
    mode = get_mode(kv)
    layer = LayerKV(mode.k, mode.v, head_dim, **new_blocks(mode.k, mode.v, num_blocks, kvh, block_size, head_dim,
                                                            DEVICE, fp_dtype))
    for side, codec in (("k", mode.k), ("v", mode.v)):  # peak codebooks: a stand-in table, laid out as the pool's
        if codec.quantized and codec.grid in PEAK_GRIDS:
            setattr(layer, f"{side}_grid", peak_table(codec.bits).to(DEVICE).expand(kvh, codec.grid_size()))
    if mode.needs_qparams:
        g = torch.Generator().manual_seed(seed)
        lo = -lim * (0.5 + torch.rand(kvh, head_dim, generator=g))
        hi = lim * (0.5 + torch.rand(kvh, head_dim, generator=g))
        stats = {"min": [lo], "max": [hi], "absmax": [torch.maximum(-lo, hi)]}
        vstats = {k: [v[0] * 0.7] for k, v in stats.items()}
        qp = KVQParams.from_stats(stats, vstats, granularity=granularity or "channel", symmetric=symmetric)
        for side, codec in (("k", mode.k), ("v", mode.v)):
            if codec.scaling == "static":
                scale, zp = qp.side(side, 0, kvh, head_dim, codec.bits)
                setattr(layer, f"{side}_scale", scale.to(DEVICE))
                setattr(layer, f"{side}_zp", zp.to(DEVICE))
    if mode.sink_tokens:
        layer.sink_tokens = mode.sink_tokens
        layer.k_sink, layer.v_sink = (torch.zeros(max(1, num_blocks // 2), kvh, mode.sink_tokens, head_dim,
                                                  dtype=fp_dtype, device=DEVICE) for _ in range(2))
        layer.sink_slot = torch.full((num_blocks,), -1, dtype=torch.int32, device=DEVICE)
    return layer


def assert_same_storage(got: LayerKV, want: LayerKV) -> None:
    for name in stored_tensors(got):
        a, b = getattr(got, name), getattr(want, name)
        if not torch.equal(a, b):
            diff = (a.float() - b.float()).abs()
            raise AssertionError(f"{name}: {int((diff > 0).sum())} of {a.numel()} differ, max {float(diff.max())}")


# --- store ------------------------------------------------------------------------------------------


@needs_triton
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("kv,granularity,symmetric", MODES, ids=MODE_IDS)
def test_store_matches_reference(kv, granularity, symmetric, head_dim):
    torch.manual_seed(1)
    layer = make_layer(kv, 6, 3, 8, head_dim, granularity=granularity, symmetric=symmetric)
    ref = clone_layer(layer)
    n = 13
    key = (torch.randn(n, 3, head_dim) * 2).half().to(DEVICE)  # some values beyond the static range: clamped
    value = torch.randn(n, 3, head_dim).half().to(DEVICE)
    key[0, 0] = 0.5  # a constant vector: zero range, the scale floor
    key[1, 1, :5] = 40.0  # an outlier
    slots = torch.randperm(6 * 8)[:n].to(DEVICE)
    _store_triton(layer, key, value, slots)
    store_kv_reference(ref, key, value, slots)
    assert_same_storage(layer, ref)


def _store_both(layer: LayerKV, key: torch.Tensor, value: torch.Tensor, slots: torch.Tensor) -> LayerKV:
    """Store through the kernel into ``layer`` and through the reference into a copy; return the copy."""
    ref = clone_layer(layer)
    _store_triton(layer, key, value, slots)
    store_kv_reference(ref, key, value, slots)
    return ref


@needs_triton
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("kv", LOWBIT + PLANES, ids=LOWBIT_IDS + PLANES_IDS)
def test_store_lowbit_matches_reference(kv, head_dim):
    """4-bit packing, 3- and 2-bit bit planes, groups, symmetric scales and the sink copies: codes and parameters
    bit-identical, in exactly head_dim * bits / 8 bytes of codes per token and head."""
    torch.manual_seed(1)
    layer = make_layer(kv, 6, 3, 8, head_dim)
    if kv.sink_tokens:
        layer.sink_slot[torch.tensor([0, 3])] = torch.tensor([2, 0], dtype=torch.int32, device=DEVICE)
    n = 13
    key = (torch.randn(n, 3, head_dim) * 2).half().to(DEVICE)
    value = torch.randn(n, 3, head_dim).half().to(DEVICE)
    key[0, 0] = 0.5  # a constant vector: zero range, the scale floor
    key[1, 1, :5] = 40.0  # an outlier
    value[2, 2] = 0.0  # all zeros: the symmetric scale floor
    # Offsets 0 and 3 of the blocks with sink slots (5: not a sink), then other slots.
    first = torch.tensor([0, 3, 24, 29])
    rest = torch.randperm(6 * 8)
    slots = torch.cat([first, rest[~torch.isin(rest, first)][: n - 4]]).to(DEVICE)
    ref = _store_both(layer, key, value, slots)
    assert_same_storage(layer, ref)
    if kv.sink_tokens:
        assert torch.equal(layer.k_sink[2, :, 3], key[1]) and not layer.k_sink[1].any()
    for side, codec in (("k", kv.k), ("v", kv.v)):
        assert getattr(layer, side).shape[-1] == head_dim * codec.bits // 8
        params = 2 * codec.groups(head_dim) * codec.params_per_group()  # fp16 scales (and zero points)
        assert codec.bytes_per_token_per_head(head_dim) == head_dim * codec.bits // 8 + params


@needs_triton
@pytest.mark.parametrize("kv", [LOWBIT[1], LOWBIT[7]], ids=[LOWBIT_IDS[1], LOWBIT_IDS[7]])
def test_store_symmetric_peak_ties_and_signs(kv):
    """The symmetric scale takes the value of largest magnitude at its FIRST channel (torch's argmax of abs):
    +a before -a gives a negative scale, -a before +a a positive one, in a group and across the two halves."""
    layer = make_layer(kv, 2, 4, 4, 64)
    key = torch.zeros(4, 4, 64, device=DEVICE)
    value = torch.zeros(4, 4, 64, device=DEVICE)
    for t, (i, j) in enumerate([(3, 40), (40, 3), (5, 9), (9, 5)]):  # channels 3/40: other halves; 5/9: one group
        for x in (key, value):
            x[t, :, i], x[t, :, j] = 3.0, -3.0
            x[t, 1, i + 1] = -1.5
            x[t, 2] += torch.linspace(-1, 1, 64, device=DEVICE)  # a clear peak elsewhere too
    slots = torch.tensor([0, 1, 4, 6], device=DEVICE)
    ref = _store_both(layer, key.half(), value.half(), slots)
    assert_same_storage(layer, ref)
    signs = torch.sign(layer.k_scale[slots // 4, 0, slots % 4, 0].float()).tolist()
    assert signs == [-1.0, 1.0, -1.0, 1.0]  # the peak's sign decides: 3 / -8 < 0


@needs_triton
def test_store_lowbit_padded_head_dim_and_dtypes():
    """head_dim 48 (halves of 24 lanes padded to 32): padding never enters min/max or a peak; bf16 and fp32 in, fp16
    and bf16 pools (bf16 parameters and sinks rounded to nearest even, as torch does)."""
    torch.manual_seed(4)
    k4v8_sinks = _layout("k4-v8g16-sinks", INT4_HEAD, Codec(8, "token", 16), 4)
    for kv, in_dtype, fp_dtype in ((LOWBIT[0], torch.float16, torch.float16), (LOWBIT[7], torch.bfloat16, torch.bfloat16),
                                   (k4v8_sinks, torch.float32, torch.float16), (LOWBIT[0], torch.float32, torch.bfloat16),
                                   (k4v8_sinks, torch.float32, torch.bfloat16), (LOWBIT[7], torch.float32, torch.bfloat16)):
        layer = make_layer(kv, 3, 5, 4, 48, fp_dtype=fp_dtype)
        if kv.sink_tokens:
            layer.sink_slot[1] = 0
        key = (torch.randn(6, 5, 48, device=DEVICE) + 3.0).to(in_dtype)  # all positive: a zero in a padded lane would show
        value = (-torch.rand(6, 5, 48, device=DEVICE) - 1.0).to(in_dtype)  # all negative
        ref = _store_both(layer, key, value, torch.arange(6, device=DEVICE) * 2)
        assert_same_storage(layer, ref)


@needs_triton
def test_store_lowbit_ties_round_half_even():
    """Half-way codes round to even at 4 bits too, static and per token, and pack as pack_int4."""
    from kvcache.quant import pack_int4

    layer = make_layer(LOWBIT[5], 1, 1, 4, 32)
    layer.k_scale.fill_(0.5)
    layer.k_zp.zero_()
    halves = (torch.arange(32, device=DEVICE, dtype=torch.float32) % 16 - 8) * 0.25  # x/0.5 = -4, -3.5, ..., 3.5
    ref = _store_both(layer, halves.reshape(1, 1, 32), halves.reshape(1, 1, 32), torch.tensor([1], device=DEVICE))
    assert_same_storage(layer, ref)
    want = torch.tensor([-4, -4, -3, -2, -2, -2, -1, 0, 0, 0, 1, 2, 2, 2, 3, 4] * 2, dtype=torch.int8)
    assert torch.equal(layer.k[0, 0, 1].cpu(), pack_int4(want))


INT8_FP16_PARAMS = _layout("int8-fp16-params", *[replace(INT8_TOKEN, param_dtype="fp16")] * 2)  # a codec's own dtype


@needs_triton
@pytest.mark.parametrize("kv", ["fp16", "int8-dynamic", INT8_FP16_PARAMS], ids=lambda x: getattr(x, "name", x))
@pytest.mark.parametrize("in_dtype,fp_dtype", [(torch.float32, torch.float16), (torch.bfloat16, torch.bfloat16),
                                                (torch.float32, torch.bfloat16), (torch.float16, torch.float32)])
def test_store_dtypes(kv, in_dtype, fp_dtype):
    """Our per-token parameters are in the pool's dtype (bf16 in a bf16 pool), a codec's own where it names one;
    the kernels write them as the reference does. An fp32 pool's fp32 parameters go to the reference."""
    from kvcache.kernels.common import unsupported

    torch.manual_seed(2)
    layer = make_layer(kv, 4, 2, 4, 32, fp_dtype=fp_dtype)
    if layer.k_scale is not None:
        assert layer.k_scale.dtype == layer.v_zp.dtype == (torch.float16 if kv is INT8_FP16_PARAMS else fp_dtype)
        if layer.k_scale.dtype == torch.float32:
            assert "k_scale must be torch.float16 or torch.bfloat16 for the Triton kernels" in unsupported(layer)
            return
    ref = clone_layer(layer)
    key, value = (torch.randn(7, 2, 32, dtype=in_dtype, device=DEVICE) for _ in range(2))
    slots = torch.tensor([0, 3, 4, 5, 9, 14, 15], device=DEVICE)
    _store_triton(layer, key, value, slots)
    store_kv_reference(ref, key, value, slots)
    assert_same_storage(layer, ref)


@needs_triton
def test_store_dynamic_padded_head_dim_and_ties():
    """head_dim 48 pads to 64 lanes: padding must never enter min/max; half-way codes round to even."""
    torch.manual_seed(3)
    layer = make_layer("int8-dynamic", 3, 5, 4, 48)
    ref = clone_layer(layer)
    key = torch.randn(6, 5, 48, device=DEVICE).half() + 3.0  # all positive: a zero in a padded lane would show
    value = -torch.rand(6, 5, 48, device=DEVICE).half() - 1.0  # all negative
    # Integers plus exact halves: with min -128, max 127 the codes land on .5 ties.
    value[0, 0] = torch.arange(48, device=DEVICE).half() - 24.5
    key[0, 1] = torch.linspace(-127.5, 127.5, 48, device=DEVICE).half()
    slots = torch.arange(6, device=DEVICE) * 2
    _store_triton(layer, key, value, slots)
    store_kv_reference(ref, key, value, slots)
    assert_same_storage(layer, ref)
    zps = layer.k_zp[slots // 4, :, slots % 4]
    assert zps[1:].min() > 0  # all-positive rows: padded lanes' zeros never pulled the minimum down


@needs_triton
def test_store_static_ties_round_half_even():
    layer = make_layer("int8", 1, 1, 4, 16)
    layer.k_scale.fill_(0.5)
    layer.k_zp.zero_()
    layer.v_scale.fill_(1.0)
    layer.v_zp.fill_(0.25)
    ref = clone_layer(layer)
    halves = (torch.arange(16, device=DEVICE, dtype=torch.float32) - 8) * 0.25  # x/0.5 = ..., -1.5, -1, -0.5, 0, ...
    key = halves.reshape(1, 1, 16).repeat(2, 1, 1)
    value = halves.reshape(1, 1, 16).repeat(2, 1, 1) + 0.25
    _store_triton(layer, key, value, torch.tensor([0, 2], device=DEVICE))
    store_kv_reference(ref, key, value, torch.tensor([0, 2], device=DEVICE))
    assert_same_storage(layer, ref)
    assert layer.k[0, 0, 0, :8].tolist() == [-4, -4, -3, -2, -2, -2, -1, 0]


# --- decode attention -------------------------------------------------------------------------------


def fill_rows(layer: LayerKV, lengths: list[int], max_blocks: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random history for each row at randomly placed blocks; returns (block_tables, seq_lens).

    With sinks, even rows' first blocks get a sink slot (as a pool binds one to a sequence's first block)
    and odd rows' do not, so both kinds of row are read.
    """
    g = torch.Generator().manual_seed(seed)
    b, bs = len(lengths), layer.block_size
    ids = torch.randperm(layer.num_blocks, generator=g)[: b * max_blocks].reshape(b, max_blocks)
    for i, n in enumerate(lengths):
        ids[i, -(-n // bs):] = 0  # padding past the row's length, like PagedKVCache's tables
        if layer.sink_tokens and i % 2 == 0:
            layer.sink_slot[ids[i, 0]] = i // 2
        pos = torch.arange(n)
        slots = (ids[i, pos // bs] * bs + pos % bs).to(DEVICE)
        k = torch.randn(n, layer.num_kv_heads, layer.head_dim, generator=g) * 1.5
        v = torch.randn(n, layer.num_kv_heads, layer.head_dim, generator=g)
        store_kv_reference(layer, k.to(DEVICE), v.to(DEVICE), slots)
    return ids.to(torch.int32).to(DEVICE), torch.tensor(lengths, dtype=torch.int32, device=DEVICE)


TOL = {torch.float32: 1e-4, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def check_decode(layer, block_tables, seq_lens, num_heads, dtype=torch.float16, seed=0, **kwargs):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(len(seq_lens), num_heads, layer.head_dim, generator=g).to(dtype).to(DEVICE)
    scale = layer.head_dim**-0.5
    want = decode_attention_reference(q, layer, block_tables, seq_lens, scale)
    got = _decode_triton(q, layer, block_tables, seq_lens, scale, **kwargs)
    assert got.shape == want.shape and got.dtype == dtype
    torch.testing.assert_close(got, want, atol=TOL[dtype], rtol=TOL[dtype])


@needs_triton
@pytest.mark.parametrize("group", [1, 3, 4])
@pytest.mark.parametrize("kv,granularity,symmetric", MODES, ids=MODE_IDS)
def test_decode_matches_reference(kv, granularity, symmetric, group):
    """Unequal lengths, none a multiple of the block size, blocks scattered; auto splits and one split."""
    layer = make_layer(kv, 24, 2, 16, 64, granularity=granularity, symmetric=symmetric)
    tables, lens = fill_rows(layer, [37, 5, 70], max_blocks=5)
    check_decode(layer, tables, lens, 2 * group, block_n=32)
    check_decode(layer, tables, lens, 2 * group, dtype=torch.float32, num_splits=1, seed=1)


@needs_triton
@pytest.mark.parametrize("group", [1, 3, 4])
@pytest.mark.parametrize("kv", LOWBIT + PLANES, ids=LOWBIT_IDS + PLANES_IDS)
def test_decode_lowbit_matches_reference(kv, group):
    """K and V each per its codec (4-bit and bit planes unpacked in registers, groups, symmetric, sinks on rows 0 and 2)."""
    layer = make_layer(kv, 24, 2, 16, 64)
    tables, lens = fill_rows(layer, [37, 5, 70], max_blocks=5)
    check_decode(layer, tables, lens, 2 * group, block_n=32)
    check_decode(layer, tables, lens, 2 * group, dtype=torch.float32, num_splits=1, seed=1)


@needs_triton
@pytest.mark.parametrize("kv,head_dim,dtype", [(INT4_HEAD_MODE, 128, torch.float16), ("k8v4", 128, torch.float16),
                                               ("int4", 128, torch.float16), (INT4_HEAD_MODE, 48, torch.bfloat16),
                                               (LOWBIT[7], 48, torch.bfloat16)], ids=lambda x: getattr(x, "name", x))
def test_decode_lowbit_head_dims_and_dtypes(kv, head_dim, dtype):
    """Named 4-bit modes at head_dim 128 (default tiles and splits); head_dim 48 (halves of 24 lanes padded to 32)
    with a bf16 pool and queries, MHA both ways."""
    layer = make_layer(kv, 10, 2, 32, head_dim, fp_dtype=dtype)
    tables, lens = fill_rows(layer, [77, 19], max_blocks=4, seed=2)
    check_decode(layer, tables, lens, 8, dtype=dtype)
    check_decode(layer, tables, lens, 2, dtype=dtype, use_dot=head_dim == 48)


@needs_triton
@pytest.mark.parametrize("kv", [LOWBIT[4], LOWBIT[6]], ids=[LOWBIT_IDS[4], LOWBIT_IDS[6]])
def test_decode_reads_the_sink_copies(kv):
    """Sink copies unlike the codes (as if scrambled) must change the output of rows with a slot, and only
    theirs; rows shorter than the sinks, a split that starts past them, and many splits."""
    layer = make_layer(kv, 30, 2, 16, 32)
    tables, lens = fill_rows(layer, [3, 40, 70, 2], max_blocks=5, seed=3)
    layer.k_sink.normal_(0, 2)
    layer.v_sink.normal_(0, 2)
    check_decode(layer, tables, lens, 4, num_splits=4, block_n=16)
    check_decode(layer, tables, lens, 2, dtype=torch.float32, num_splits=1, seed=1)
    q = torch.randn(4, 4, 32, device=DEVICE, dtype=torch.float16)
    with_sinks = _decode_triton(q, layer, tables, lens, 0.2)
    layer.sink_slot.fill_(-1)
    without = _decode_triton(q, layer, tables, lens, 0.2)
    changed = (with_sinks - without).abs().amax(dim=(1, 2)) > 1e-2
    assert changed.tolist() == [True, False, True, False]


@needs_triton
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("kv", ["fp16", "int8", "int8-dynamic"])
def test_decode_head_dims(kv, group, head_dim):
    layer = make_layer(kv, 10, 2, 32, head_dim)
    tables, lens = fill_rows(layer, [77, 19], max_blocks=4, seed=2)
    check_decode(layer, tables, lens, 2 * group)  # default tile size and split heuristic


@needs_triton
@pytest.mark.parametrize("kv", ["fp16", "int8", "int8-dynamic"])
def test_decode_many_splits_and_empty_splits(kv):
    """Four splits over rows of 130 and 3 tokens: the short row leaves splits empty."""
    layer = make_layer(kv, 20, 1, 16, 32)
    tables, lens = fill_rows(layer, [130, 3], max_blocks=9, seed=3)
    check_decode(layer, tables, lens, 3, dtype=torch.float32, num_splits=4, block_n=16)


@needs_triton
@pytest.mark.parametrize("block_size,block_n", [(8, 32), (64, 16), (5, 16)])
def test_decode_tile_vs_block_size(block_size, block_n):
    """A tile spanning several blocks, a tile inside one block, and a block size that is not a power of two."""
    layer = make_layer("int8-dynamic", 40, 2, block_size, 32)
    tables, lens = fill_rows(layer, [100, 41], max_blocks=-(-100 // block_size), seed=4)
    check_decode(layer, tables, lens, 4, dtype=torch.float32, block_n=block_n)


@needs_triton
@pytest.mark.parametrize("dtype,fp_dtype", [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32),
                                            (torch.float16, torch.float32)])
def test_decode_float_dtypes(dtype, fp_dtype):
    layer = make_layer("fp16", 8, 2, 16, 32, fp_dtype=fp_dtype)
    tables, lens = fill_rows(layer, [40, 17], max_blocks=3, seed=5)
    check_decode(layer, tables, lens, 6, dtype=dtype)
    check_decode(layer, tables, lens, 2, dtype=dtype)


@needs_triton
@pytest.mark.parametrize("kv", ["int8", "int8-dynamic"])
def test_decode_mha_with_dot_and_padded_head_dim(kv):
    """The tensor-core path for one query head per KV head, and head_dim 48 padded to 64 lanes."""
    layer = make_layer(kv, 8, 2, 16, 48)
    tables, lens = fill_rows(layer, [50, 23], max_blocks=4, seed=6)
    check_decode(layer, tables, lens, 2, use_dot=True)
    check_decode(layer, tables, lens, 2, dtype=torch.float32)


# --- prefill attention ------------------------------------------------------------------------------

PREFILL_TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}


def check_prefill(layer, tables, kv_len, q_len, num_heads, dtype=torch.float16, mask=None, seed=0, **kwargs):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(tables.shape[0], num_heads, q_len, layer.head_dim, generator=g).to(dtype).to(DEVICE)
    scale = layer.head_dim**-0.5
    want = prefill_attention_reference(q, layer, tables, kv_len, scale, mask)
    got = _prefill_triton(q, layer, tables, kv_len, scale, mask, **kwargs)
    assert got.shape == (tables.shape[0], q_len, num_heads, layer.head_dim) and got.dtype == dtype
    torch.testing.assert_close(got, want, atol=PREFILL_TOL[dtype], rtol=PREFILL_TOL[dtype])


@needs_triton
@pytest.mark.parametrize("q_len", [37, 9], ids=["whole-prompt", "new-turn"])
@pytest.mark.parametrize("group", [1, 3, 4])
@pytest.mark.parametrize("kv,granularity,symmetric", MODES, ids=MODE_IDS)
def test_prefill_matches_reference(kv, granularity, symmetric, group, q_len):
    """37 positions over scattered blocks of 16: the chunk is the whole prompt, or a new turn after 28 cached."""
    layer = make_layer(kv, 12, 2, 16, 32, granularity=granularity, symmetric=symmetric)
    tables, _ = fill_rows(layer, [37, 37], max_blocks=3)
    check_prefill(layer, tables, 37, q_len, 2 * group, block_m=16, block_n=16)


@needs_triton
@pytest.mark.parametrize("q_len", [37, 9], ids=["whole-prompt", "new-turn"])
@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("kv", LOWBIT + PLANES, ids=LOWBIT_IDS + PLANES_IDS)
def test_prefill_lowbit_matches_reference(kv, group, q_len):
    """As above, K and V each per its codec (3- and 2-bit too); with sinks, row 0's first block has a slot and row 1's none."""
    layer = make_layer(kv, 12, 2, 16, 64)
    tables, _ = fill_rows(layer, [37, 37], max_blocks=3)
    check_prefill(layer, tables, 37, q_len, 2 * group, block_m=16, block_n=16)


@needs_triton
@pytest.mark.parametrize("kv", ["int3", "int3-compact", "int3-lm", INT2_G32_MODE], ids=lambda x: getattr(x, "name", x))
def test_named_bit_plane_modes_at_head_dim_128(kv):
    """The mode table's 3-bit modes and the 2-bit test mode through all three kernels (default tiles)."""
    layer = make_layer(kv, 10, 2, 32, 128)
    key, value = torch.randn(2, 5, 2, 128, device=DEVICE).half()
    ref = _store_both(layer, key, value, torch.tensor([0, 1, 2, 40, 70], device=DEVICE))
    assert_same_storage(layer, ref)
    tables, lens = fill_rows(layer, [77, 19], max_blocks=4, seed=2)
    check_decode(layer, tables, lens, 8)
    check_prefill(layer, tables, 77, 9, 8)


# --- lloyd-max-peak codebooks ----------------------------------------------------------------------

PEAK4_G16, PEAK3_G32 = peak_lloyd_max(4, 16), peak_lloyd_max(3, 32)
PEAK = [_layout("lm4-g16", PEAK4_G16, PEAK4_G16), _layout("lm3-g32", PEAK3_G32, PEAK3_G32),
        _layout("lm2-g32", peak_lloyd_max(2, 32), peak_lloyd_max(2, 32))]


def _peak_ties(table: torch.Tensor, width: int, sign: float) -> torch.Tensor:
    """A group of ``width`` values whose peak is ``-2 * sign`` (so the scale is exactly ``2 * sign``) and whose other
    values sit exactly on every midpoint of ``table`` once divided by that scale (then zeros)."""
    mids = (table[1:] + table[:-1]) / 2  # as nearest_codes forms them
    x = torch.zeros(width)
    x[0] = -2.0 * sign
    x[1:len(mids) + 1] = 2.0 * sign * mids  # exact: a power-of-two multiple
    return x


@needs_triton
@pytest.mark.parametrize("kv", PEAK, ids=[m.name for m in PEAK])
def test_store_peak_grid_matches_reference(kv):
    """lloyd-max-peak codes: signed scales (a negative peak gives a positive scale, a positive one a negative scale),
    the nearest level with midpoints going to the even index, packed as pack_int4 / bit planes; bit-identical,
    on a table shared by the heads and on one table per head (V: the rows differ). 2-bit: the solved levels."""
    from kvcache.encoding import from_storage

    torch.manual_seed(5)
    layer = make_layer(kv, 3, 2, 4, 64)
    if kv.k.bits == 2:
        from kvcache.storage.tables import layer_grid

        layer.k_grid = layer_grid(kv.k, 2, 64, DEVICE)  # lloyd_max_peak(2, 32): quick to solve
    layer.v_grid = torch.stack([peak_table(kv.v.bits), peak_table(kv.v.bits) ** 3]).to(DEVICE)  # odd powers: ascending
    g, table = kv.k.group_size, layer.k_grid[0].cpu()
    key = torch.randn(4, 2, 64) * 1.5
    value = torch.randn(4, 2, 64)
    key[0, 0, :g], key[0, 0, g:2 * g] = _peak_ties(table, g, 1.0), _peak_ties(table, g, -1.0)
    for h in (0, 1):
        value[0, h, :g] = _peak_ties(layer.v_grid[h].cpu(), g, 1.0)
    key[1, 1, 3], key[1, 1, g + 5] = -9.0, 9.0  # a clear negative and a clear positive peak
    key[2, 0] = 0.0  # all zeros: the scale floor
    slots = torch.tensor([0, 5, 6, 11], device=DEVICE)
    ref = _store_both(layer, key.to(DEVICE), value.to(DEVICE), slots)
    assert_same_storage(layer, ref)
    mids = torch.arange(len(table) - 1)
    want = torch.where(mids % 2 == 0, mids, mids + 1)  # a tie goes to the even index
    got = from_storage(kv.k, layer.k[0, 0, 0].cpu(), 64)
    assert got[1:len(mids) + 1].tolist() == want.tolist() and got[g + 1:g + len(mids) + 1].tolist() == want.tolist()
    assert got[0] == got[g] == 0  # the peak itself: level 0, -1, whichever its sign
    assert from_storage(kv.v, layer.v[0, 1, 0].cpu(), 64)[1:len(mids) + 1].tolist() == want.tolist()
    scales = layer.k_scale[1, 1, 1].float().cpu()  # token 1 (slot 5), head 1
    assert scales[0] > 0 and scales[1] < 0  # -9 over -1, and 9 over -1


@needs_triton
@pytest.mark.parametrize("kv", ["k8v4-lm", "int3-lm"])
def test_peak_grid_modes_decode_and_prefill(kv):
    """The two lloyd-max-peak modes (K int8 per head and V 4-bit groups of 16; 3-bit groups of 32 on both sides),
    with their sinks, through the three kernels; V with one table per head in the second pass."""
    layer = make_layer(kv, 12, 2, 16, 64)
    key, value = torch.randn(2, 5, 2, 64, device=DEVICE).half()
    assert_same_storage(layer, _store_both(layer, key, value, torch.tensor([0, 1, 2, 40, 70], device=DEVICE)))
    for per_head in (False, True):
        if per_head:
            layer.sink_slot.fill_(-1)  # fill_rows binds slots again
            layer.v_grid = torch.stack([peak_table(layer.v_codec.bits), peak_table(layer.v_codec.bits) ** 3]).to(DEVICE)
        tables, lens = fill_rows(layer, [37, 5, 23], max_blocks=3, seed=int(per_head))
        check_decode(layer, tables, lens, 8, block_n=16)
        check_decode(layer, tables, lens, 2, dtype=torch.float32, num_splits=1, seed=1)
        check_prefill(layer, tables[:1], 37, 9, 4, block_m=16, block_n=16)


def _allocated_layer(kv: str, num_blocks: int, kvh: int, block_size: int, head_dim: int, seed: int = 0) -> LayerKV:
    """An allocated-keys layer as a pool lays it out: widths allocated for random channel weights (0 to 8 bits, every
    head the mode's total), their stream layout, the shared levels of every width."""
    layer = make_layer(kv, num_blocks, kvh, block_size, head_dim)
    g = torch.Generator().manual_seed(seed)
    weight = torch.exp(4 * torch.randn(kvh, head_dim, generator=g))  # a few channels worth far more than the rest
    layer.k_widths = allocate_bits(weight, int(layer.k_codec.allocated * head_dim), gauss_distortion()).to(torch.int32).to(DEVICE)
    layer.k_layout = width_layout(layer.k_widths)
    layer.k_grid = gauss_levels().to(DEVICE)
    assert int(layer.k_widths.max()) >= 6 and int((layer.k_widths == 0).sum()) > 0  # wide, narrow and empty channels
    return layer


@needs_triton
@pytest.mark.parametrize("kv", ["int3-klt", "int2-klt"])
def test_allocated_keys_decode_and_prefill(kv):
    """Keys allocated per channel (codes 0 to 8 bits wide, one bit stream per head, crossing byte boundaries) with
    lloyd-max-peak values and sinks: decode (GQA, one query head, fp32) and prefill read them as the references do;
    the store kernel refuses them (the dispatch stores them through the reference)."""
    layer = _allocated_layer(kv, 12, 2, 16, 64)
    assert unsupported(layer) is None and "allocated bit streams" in unsupported_store(layer)
    tables, lens = fill_rows(layer, [37, 5, 23], max_blocks=3, seed=3)
    check_decode(layer, tables, lens, 8, block_n=16)
    check_decode(layer, tables, lens, 2, dtype=torch.float32, num_splits=1, seed=1)
    check_prefill(layer, tables[:1], 37, 9, 4, block_m=16, block_n=16)
    key = torch.randn(3, 2, 64, device=DEVICE).half()
    with pytest.raises(ValueError, match="allocated bit streams"):
        _store_triton(layer, key, key, torch.tensor([0, 1, 2], device=DEVICE))


@needs_triton
def test_allocated_keys_are_stored_by_the_reference_and_read_by_the_kernels(monkeypatch):
    """On a GPU the dispatch stores allocated keys through the reference (the store kernel would refuse them) and
    decodes them through the kernel (which differs from the reference by its fp16 dots, not 0)."""
    import kvcache.kernels as kernels

    monkeypatch.setattr(kernels, "use_triton", lambda t: True)
    layer = _allocated_layer("int3-klt", 6, 2, 8, 64, seed=1)
    want = clone_layer(layer)
    key = torch.randn(2, 2, 64, device=DEVICE).half()
    kernels.store_kv(layer, key, key, torch.tensor([3, 9], device=DEVICE))
    store_kv_reference(want, key, key, torch.tensor([3, 9], device=DEVICE))
    assert_same_storage(layer, want)
    tables, lens = fill_rows(layer, [20, 9], max_blocks=3)
    q = torch.randn(2, 4, 64, device=DEVICE).half()
    got, ref = kernels.decode_attention(q, layer, tables, lens, 0.2), decode_attention_reference(q, layer, tables, lens, 0.2)
    torch.testing.assert_close(got, ref, atol=TOL[torch.float16], rtol=TOL[torch.float16])
    assert not torch.equal(got, ref)


@needs_triton
@pytest.mark.parametrize("kv", ["int4", "k8v4"])
def test_prefill_lowbit_masks_sinks_and_dtypes(kv):
    """transformers' masks apply to the sink positions too (a window that excludes them, an additive bias on
    them); scrambled sink copies must be what row 0 reads; bf16 and head_dim 128 with the default tiles."""
    layer = make_layer(kv, 12, 2, 16, 64)
    tables, _ = fill_rows(layer, [40, 40], max_blocks=3, seed=7)
    layer.k_sink.normal_(0, 2)
    layer.v_sink.normal_(0, 2)
    q_pos = torch.arange(40 - 20, 40)[:, None]
    k_pos = torch.arange(40)[None, :]
    window = ((k_pos <= q_pos) & ((k_pos > q_pos - 8) | (k_pos < 2) & (q_pos < 30))).expand(2, 1, 20, 40).to(DEVICE)
    check_prefill(layer, tables, 40, 20, 4, mask=window, block_m=16, block_n=16)
    additive = torch.zeros(2, 1, 20, 40).masked_fill(~window.cpu(), torch.finfo(torch.float16).min)
    additive[:, 0, :, :3] += 1.5  # a soft bias on sink positions
    check_prefill(layer, tables, 40, 20, 4, mask=additive.half().to(DEVICE), block_m=16, block_n=16)
    check_prefill(layer, tables, 40, 40, 4, block_m=16, block_n=16)
    layer = make_layer(kv, 8, 2, 8, 128, fp_dtype=torch.bfloat16)
    tables, _ = fill_rows(layer, [21], max_blocks=3, seed=8)
    check_prefill(layer, tables, 21, 21, 4, dtype=torch.bfloat16)


@needs_triton
@pytest.mark.parametrize("kv", ["fp16", "int8", "int8-dynamic"])
def test_prefill_with_masks(kv):
    """transformers' masks: a boolean sliding window (True attends) and an additive float mask, both [b, 1, q, kv]."""
    layer = make_layer(kv, 12, 2, 16, 32)
    tables, _ = fill_rows(layer, [40, 40], max_blocks=3, seed=7)
    q_pos = torch.arange(40 - 20, 40)[:, None]
    k_pos = torch.arange(40)[None, :]
    window = ((k_pos <= q_pos) & (k_pos > q_pos - 8)).expand(2, 1, 20, 40).to(DEVICE)
    check_prefill(layer, tables, 40, 20, 4, mask=window, block_m=16, block_n=16)
    additive = torch.zeros(2, 1, 20, 40).masked_fill(~window.cpu(), torch.finfo(torch.float16).min)
    additive[1, 0, :, :5] -= 1.5  # a soft bias, not just a mask
    check_prefill(layer, tables, 40, 20, 4, mask=additive.half().to(DEVICE), block_m=16, block_n=16)


@needs_triton
@pytest.mark.parametrize("dtype,head_dim", [(torch.bfloat16, 64), (torch.bfloat16, 48), (torch.float16, 128)])
def test_prefill_dtypes_and_head_dims(dtype, head_dim):
    layer = make_layer("int8-dynamic", 8, 2, 8, head_dim)
    tables, _ = fill_rows(layer, [21], max_blocks=3, seed=8)
    check_prefill(layer, tables, 21, 21, 4, dtype=dtype, block_m=16, block_n=16)
    check_prefill(layer, tables, 21, 1, 4, dtype=dtype)  # one query with the default tiles


# --- bad inputs -------------------------------------------------------------------------------------


@needs_triton
def test_store_rejects_bad_inputs():
    layer = make_layer("int8-dynamic", 4, 2, 4, 32)
    key = torch.randn(3, 2, 32, device=DEVICE)
    slots = torch.tensor([0, 1, 2], device=DEVICE)
    with pytest.raises(ValueError, match="fp16, bf16 or fp32"):
        _store_triton(layer, key.double(), key.double(), slots)
    with pytest.raises(ValueError, match="contiguous along head_dim"):
        wide = torch.randn(3, 2, 64, device=DEVICE)[..., ::2]
        _store_triton(layer, wide, wide, slots)
    with pytest.raises(ValueError, match="key and value"):
        _store_triton(layer, key, key[:2], slots)
    with pytest.raises(ValueError, match="heads"):
        _store_triton(layer, key[:, :1], key[:, :1], slots)
    with pytest.raises(ValueError, match=r"slots must be in \[0, 16\)"):
        _store_triton(layer, key, key, torch.tensor([0, 1, 16], device=DEVICE))
    with pytest.raises(ValueError, match="slots must be in"):
        _store_triton(layer, key, key, torch.tensor([-1, 1, 2], device=DEVICE))
    with pytest.raises(ValueError, match="slots must be int64"):
        _store_triton(layer, key, key, slots.float())
    with pytest.raises(ValueError, match="head_dim 8 is not supported"):
        small = make_layer("fp16", 2, 1, 4, 8)
        _store_triton(small, torch.randn(1, 1, 8, device=DEVICE), torch.randn(1, 1, 8, device=DEVICE), slots[:1])
    static = make_layer("int8", 4, 2, 4, 32)
    static.k_scale = None
    with pytest.raises(ValueError, match="needs k_scale"):
        _store_triton(static, key, key, slots)
    bad = make_layer("int8", 4, 2, 4, 32)
    bad.v_zp = bad.v_zp.half()
    with pytest.raises(ValueError, match="v_zp must be torch.float32"):
        _store_triton(bad, key, key, slots)


@needs_triton
def test_decode_rejects_bad_inputs():
    layer = make_layer("int8", 6, 2, 8, 32)
    tables, lens = fill_rows(layer, [20, 9], max_blocks=3)
    q = torch.randn(2, 4, 32, device=DEVICE, dtype=torch.float16)
    run = lambda q=q, layer=layer, tables=tables, lens=lens: _decode_triton(q, layer, tables, lens, 0.1)  # noqa: E731
    run()  # the good case works
    with pytest.raises(ValueError, match=r"block_tables entries must be in \[0, 6\)"):
        run(tables=torch.where(tables == tables.max(), 6, tables).int())
    with pytest.raises(ValueError, match="block_tables entries"):
        run(tables=torch.where(tables == tables.max(), -1, tables).int())
    with pytest.raises(ValueError, match=r"seq_lens must be in \[1, 24\]"):
        run(lens=torch.tensor([25, 9], dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match="seq_lens must be in"):
        run(lens=torch.tensor([0, 9], dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match="block_tables must be int32"):
        run(tables=tables.long())
    with pytest.raises(ValueError, match="seq_lens must be int32"):
        run(lens=lens[:1])
    with pytest.raises(ValueError, match="query must be fp16, bf16 or fp32"):
        run(q=q.double())
    with pytest.raises(ValueError, match="head_dim 16 does not match"):
        run(q=q[..., :16].contiguous())
    with pytest.raises(ValueError, match="contiguous along head_dim"):
        run(q=torch.randn(2, 4, 64, device=DEVICE, dtype=torch.float16)[..., ::2])
    with pytest.raises(ValueError, match="not a multiple of 2 KV heads"):
        run(q=q[:, :3].contiguous())
    with pytest.raises(ValueError, match="block_tables and seq_lens must be contiguous"):
        run(tables=torch.zeros(2, 6, dtype=torch.int32, device=DEVICE)[:, ::2])
    strided = clone_layer(layer)
    strided.k = layer.k.transpose(2, 3).contiguous().transpose(2, 3)
    with pytest.raises(ValueError, match="storage must be contiguous"):
        run(layer=strided)
    wrong = clone_layer(layer)
    wrong.k = wrong.k.half()
    with pytest.raises(ValueError, match="K codec int8 static stores torch.int8, got torch.float16"):
        run(layer=wrong)
    for d in (8, 512):
        odd = make_layer("fp16", 2, 1, 4, d)
        with pytest.raises(ValueError, match=f"head_dim {d} is not supported"):
            _decode_triton(torch.randn(1, 1, d, device=DEVICE), odd, tables[:1, :1], lens[:1].clamp(max=4), 0.1)


@needs_triton
def test_prefill_rejects_bad_inputs():
    layer = make_layer("int8-dynamic", 6, 2, 8, 32)
    tables, _ = fill_rows(layer, [20, 20], max_blocks=3)
    q = torch.randn(2, 4, 5, 32, device=DEVICE, dtype=torch.float16)

    def run(q=q, layer=layer, tables=tables, kv_len=20, mask=None):
        return _prefill_triton(q, layer, tables, kv_len, 0.1, mask)

    run()  # the good case works
    with pytest.raises(ValueError, match=r"block_tables entries must be in \[0, 6\)"):
        run(tables=torch.where(tables == tables.max(), 6, tables).int())
    with pytest.raises(ValueError, match=r"kv_len 25 needs 4 blocks of 8; block_tables has 3"):
        run(kv_len=25)
    with pytest.raises(ValueError, match=r"q_len 5 must be in \[1, kv_len 4\]"):
        run(kv_len=4)
    with pytest.raises(ValueError, match="query must be \\[batch, num_heads, q_len, head_dim\\]"):
        run(q=q[:, :, 0])
    with pytest.raises(ValueError, match="contiguous along head_dim"):
        run(q=torch.randn(2, 4, 5, 64, device=DEVICE, dtype=torch.float16)[..., ::2])
    with pytest.raises(ValueError, match="fp32 models prefill through the reference"):
        run(q=q.float())
    with pytest.raises(ValueError, match="query has 3 heads x head_dim 32; the storage 2 KV heads"):
        run(q=q[:, :3].contiguous())
    with pytest.raises(ValueError, match="block_tables must be int32"):
        run(tables=tables.long())
    with pytest.raises(ValueError, match=r"attention mask must be \[2, 1 or 4, 5, 20\]"):
        run(mask=torch.ones(2, 1, 5, 19, dtype=torch.bool, device=DEVICE))
    with pytest.raises(ValueError, match="attention mask must be bool or float"):
        run(mask=torch.ones(2, 1, 5, 20, dtype=torch.int64, device=DEVICE))


@needs_triton
def test_lowbit_storage_is_checked():
    """4-bit widths and dtypes, per-token parameter shapes (the trailing groups dim), sinks, and layouts the kernels
    do not take are refused with a sentence."""
    q = torch.randn(1, 2, 64, device=DEVICE, dtype=torch.float16)
    tables, lens = torch.zeros(1, 1, dtype=torch.int32, device=DEVICE), torch.ones(1, dtype=torch.int32, device=DEVICE)
    run = lambda layer: _decode_triton(q, layer, tables, lens, 0.1)  # noqa: E731
    run(make_layer("k8v4", 2, 2, 4, 64))  # the good case works
    cases = {
        "V storage is 64 wide; int4 g16 sym .* needs 32": ("v", lambda t: torch.zeros(2, 2, 4, 64, dtype=torch.uint8)),
        "V codec int4 g16 sym .*stores torch.uint8, got torch.int8": ("v", lambda t: t.to(torch.int8)),
        r"k_scale must be a contiguous \(2, 2, 4, 1\) tensor": ("k_scale", lambda t: t[..., 0]),
        "v_scale must be torch.float16 or torch.bfloat16": ("v_scale", lambda t: t.float()),
        r"k_sink must be a contiguous float \[slots, 2, 4, 64\]": ("k_sink", lambda t: t[:, :, :2]),
        "4 sink tokens need sink_slot": ("sink_slot", lambda t: t.long()),
    }
    for message, (name, change) in cases.items():
        layer = make_layer("k8v4", 2, 2, 4, 64)
        setattr(layer, name, change(getattr(layer, name)).to(DEVICE))
        with pytest.raises(ValueError, match=message):
            run(layer)
    from kvcache.kernels.common import unsupported

    assert "head_dim/2 (24) to be a multiple of the group size" in unsupported(make_layer("int4", 2, 2, 4, 48))
    assert "4-bit codes need head_dim >= 32" in unsupported(make_layer(INT4_HEAD_MODE, 2, 2, 4, 16))
    assert "3- and 2-bit and allocated codes need a power-of-two head_dim" in unsupported(make_layer(PLANES[3], 2, 2, 4, 48))
    lm8 = _layout("lm8", peak_lloyd_max(8, 32), PEAK3_G32)  # 8-bit indices are stored unsigned: the references'
    assert "4-, 3- and 2-bit lloyd-max-peak codes and allocated codes by our rule" in unsupported(make_layer(lm8, 2, 2, 4, 64))
    assert unsupported(make_layer("int3-lm", 2, 2, 4, 64)) is None
    layer = make_layer("int3-lm", 2, 2, 4, 64)
    layer.v_grid = None
    with pytest.raises(ValueError, match=r"v_grid must be a \[2, 8\] fp32 table"):
        run(layer)
    kv = torch.randn(1, 2, 48, device=DEVICE)
    with pytest.raises(ValueError, match="multiple of the group size"):
        _store_triton(make_layer("int4", 2, 2, 4, 48), kv, kv, torch.zeros(1, dtype=torch.long, device=DEVICE))


@pytest.mark.parametrize("kv", ["int4", PLANES[3]], ids=["int4", "3-2-bit"])
def test_dispatch_takes_the_reference_for_layouts_the_kernels_do_not_take(monkeypatch, kv):
    """On a GPU, a layer the kernels cannot read (4-bit groups straddling head_dim's halves; 3- and 2-bit codes at
    a head_dim that is not a power of two) goes to the references."""
    import kvcache.kernels as kernels

    monkeypatch.setattr(kernels, "use_triton", lambda t: True)
    layer = make_layer(kv, 6, 2, 8, 48)
    want = clone_layer(layer)
    tables, lens = fill_rows(layer, [20, 9], max_blocks=3)
    fill_rows(want, [20, 9], max_blocks=3)
    q = torch.randn(2, 4, 48, device=DEVICE)
    kernels.store_kv(layer, q[:1, :2], q[:1, 2:], torch.tensor([3], device=DEVICE))
    store_kv_reference(want, q[:1, :2], q[:1, 2:], torch.tensor([3], device=DEVICE))
    assert_same_storage(layer, want)
    torch.testing.assert_close(kernels.decode_attention(q, layer, tables, lens, 0.2),
                               decode_attention_reference(q, layer, tables, lens, 0.2), rtol=0, atol=0)
    chunk = torch.randn(2, 4, 3, 48, dtype=torch.float16, device=DEVICE)
    torch.testing.assert_close(kernels.prefill_attention(chunk, layer, tables, 9, 0.2),
                               prefill_attention_reference(chunk, layer, tables, 9, 0.2), rtol=0, atol=0)


# --- dispatch ---------------------------------------------------------------------------------------


@needs_triton
def test_kernel_modules_do_not_shadow_the_dispatch_functions():
    """Importing a kernel module sets it as an attribute of the package: it must not replace a function."""
    import importlib
    import pkgutil

    import kvcache.kernels as kernels

    for module in pkgutil.iter_modules(kernels.__path__):  # every module of the package, present and future
        importlib.import_module(f"kvcache.kernels.{module.name}")
    for fn in ("store_kv", "prefill_attention", "decode_attention", "use_triton"):
        assert callable(getattr(kernels, fn)), fn


@needs_triton
@pytest.mark.parametrize("env,want", [(None, False), ("1", True), ("0", False)])
def test_cache_calls_skip_range_checks_unless_asked(monkeypatch, env, want):
    """The cache's own kernel calls skip the host-syncing index checks on a GPU, unless KVQ_KERNEL_CHECKS=1."""
    import kvcache.kernels as kernels
    from kvcache.kernels import paged_decode, paged_prefill
    from kvcache.kernels import paged_store as store

    seen = []
    monkeypatch.setattr(kernels, "use_triton", lambda t: True)
    monkeypatch.setattr(store, "store_kv_triton", lambda *a, check_ranges: seen.append(("store", check_ranges)))
    monkeypatch.setattr(paged_decode, "decode_attention_triton", lambda *a, check_ranges: seen.append(("decode", check_ranges)))
    monkeypatch.setattr(paged_prefill, "prefill_attention_triton", lambda *a, check_ranges: seen.append(("prefill", check_ranges)))
    if env is None:
        monkeypatch.delenv("KVQ_KERNEL_CHECKS", raising=False)
    else:
        monkeypatch.setenv("KVQ_KERNEL_CHECKS", env)
    layer = make_layer("int8-dynamic", 2, 1, 4, 16)
    kernels.store_kv(layer, None, None, None)
    kernels.decode_attention(torch.zeros(1, 2, 16, dtype=torch.float16), layer, None, None, 1.0)
    kernels.prefill_attention(torch.zeros(1, 2, 3, 16, dtype=torch.float16), layer, None, 3, 1.0)
    assert seen == [("store", want), ("decode", want), ("prefill", want)]
    # Direct calls of the wrappers check unless told not to.
    assert store.range_checks_enabled() is (env != "0")


def test_fp32_prefill_takes_the_reference_on_a_gpu(monkeypatch):
    """The prefill kernel takes fp16/bf16 queries; an fp32 model's prefill goes to the reference even on CUDA."""
    import kvcache.kernels as kernels

    monkeypatch.setattr(kernels, "use_triton", lambda t: True)
    layer = make_layer("int8-dynamic", 4, 1, 8, 16)
    tables, _ = fill_rows(layer, [10], max_blocks=2)
    q = torch.randn(1, 2, 4, 16, device=DEVICE)
    got = kernels.prefill_attention(q, layer, tables, 10, 0.25)
    torch.testing.assert_close(got, prefill_attention_reference(q, layer, tables, 10, 0.25), rtol=0, atol=0)


def test_fp32_decode_over_sinks_takes_the_reference_on_a_gpu(monkeypatch):
    """fp32 queries over a layer with sinks decode through the reference even on CUDA (the kernel's tf32x3
    sink tile spilled on sm_90); fp16 queries over it, and fp32 ones over a layer without sinks, take the kernel."""
    import kvcache.kernels as kernels
    from kvcache.kernels import paged_decode

    seen = []
    monkeypatch.setattr(kernels, "use_triton", lambda t: True)
    monkeypatch.setattr(paged_decode, "decode_attention_triton", lambda *a, check_ranges: seen.append(a[0].dtype))
    sinks = make_layer("int8-rot", 4, 1, 8, 64)
    tables, lens = fill_rows(sinks, [10], max_blocks=2)
    q = torch.randn(1, 2, 64, device=DEVICE)
    got = kernels.decode_attention(q, sinks, tables, lens, 0.25)
    torch.testing.assert_close(got, decode_attention_reference(q, sinks, tables, lens, 0.25), rtol=0, atol=0)
    kernels.decode_attention(q.half(), sinks, tables, lens, 0.25)
    kernels.decode_attention(q, make_layer("int8-dynamic", 4, 1, 8, 64), tables, lens, 0.25)
    assert seen == [torch.float16, torch.float32]


def test_dispatch_uses_reference_on_cpu(monkeypatch):
    """CPU tensors go to the references even where Triton is installed."""
    import sys

    def boom(*args, **kwargs):
        raise AssertionError("the Triton path was taken for CPU tensors")

    for mod, name in (("kvcache.kernels.paged_store", "store_kv_triton"),
                      ("kvcache.kernels.paged_decode", "decode_attention_triton"),
                      ("kvcache.kernels.paged_prefill", "prefill_attention_triton")):
        if HAVE_TRITON:
            __import__(mod)
            monkeypatch.setattr(sys.modules[mod], name, boom)
        else:
            monkeypatch.setitem(sys.modules, mod, type(sys)("stub"))
            setattr(sys.modules[mod], name, boom)
    mode = get_mode("int8-dynamic")
    layer = LayerKV(mode.k, mode.v, 16, **new_blocks(mode.k, mode.v, 3, 2, 4, 16, "cpu", torch.float16))
    ref = clone_layer(layer)
    key, value = torch.randn(5, 2, 16), torch.randn(5, 2, 16)
    slots = torch.tensor([0, 1, 2, 4, 5])
    assert not use_triton(key)
    store_kv(layer, key, value, slots)
    store_kv_reference(ref, key, value, slots)
    assert_same_storage(layer, ref)
    q = torch.randn(2, 4, 16)
    tables = torch.tensor([[0, 1], [1, 0]], dtype=torch.int32)
    lens = torch.tensor([3, 6], dtype=torch.int32)
    torch.testing.assert_close(decode_attention(q, layer, tables, lens, 0.25),
                               decode_attention_reference(q, layer, tables, lens, 0.25), rtol=0, atol=0)
    chunk = torch.randn(2, 4, 3, 16, dtype=torch.float16)
    torch.testing.assert_close(prefill_attention(chunk, layer, tables, 6, 0.25),
                               prefill_attention_reference(chunk, layer, tables, 6, 0.25), rtol=0, atol=0)


# --- real shapes, on a GPU only (bench/gpu_check.sh runs these) ----------------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="real-shape kernel tests need a CUDA GPU: run bench/gpu_check.sh on one")
REAL_SHAPES = {"mha": (32, 32), "gqa": (32, 8)}  # (query heads, KV heads), head_dim 128: Llama-2-7B and its GQA variant


def assert_close_storage(got: LayerKV, want: LayerKV) -> None:
    """Compiled code may round a tie the other way: codes within one step, and almost all identical."""
    from kvcache.quant import unpack_int4

    for name in stored_tensors(got):
        a, b = getattr(got, name), getattr(want, name)
        if name in ("k", "v") and got.codec(name).quantized:
            if got.codec(name).bits == 4:
                a, b = unpack_int4(a), unpack_int4(b)
            diff = (a.float() - b.float()).abs()
            assert float(diff.max()) <= 1 and float((diff > 0).float().mean()) < 1e-4, name
        else:
            torch.testing.assert_close(a.float(), b.float(), rtol=1e-3, atol=1e-6, msg=name)


def check_real_shapes(layer: LayerKV, heads: int, kv_heads: int, lengths: list[int], max_blocks: int) -> None:
    """Store 4K new tokens (bit-close to the reference), then decode over the rows' histories."""
    ref = clone_layer(layer)
    n, bs = 4096, layer.block_size
    key = torch.randn(n, kv_heads, 128, device=DEVICE, dtype=torch.float16) * 2
    value = torch.randn(n, kv_heads, 128, device=DEVICE, dtype=torch.float16)
    slots = torch.randperm(layer.num_blocks * bs, device=DEVICE)[:n]
    if layer.sink_tokens:
        layer.sink_slot[: layer.k_sink.shape[0]] = torch.arange(layer.k_sink.shape[0], dtype=torch.int32, device=DEVICE)
        ref.sink_slot.copy_(layer.sink_slot)
    _store_triton(layer, key, value, slots)
    store_kv_reference(ref, key, value, slots)
    assert_close_storage(layer, ref)
    if layer.sink_tokens:
        layer.sink_slot.fill_(-1)
    tables, lens = fill_rows(layer, lengths, max_blocks, seed=3)
    check_decode(layer, tables, lens, heads)


@needs_cuda
@needs_triton
@pytest.mark.parametrize("shape", REAL_SHAPES, ids=list(REAL_SHAPES))
@pytest.mark.parametrize("kv,granularity,symmetric", MODES, ids=MODE_IDS)
def test_real_shapes_on_gpu(kv, granularity, symmetric, shape):
    """Blocks of 64, head_dim 128, a batch of long unequal rows: store 4K new tokens, then decode over 16K."""
    heads, kv_heads = REAL_SHAPES[shape]
    lengths, bs = [16384, 4097, 1, 9001], 64
    max_blocks = -(-max(lengths) // bs)
    layer = make_layer(kv, len(lengths) * max_blocks + 8, kv_heads, bs, 128, granularity=granularity,
                       symmetric=symmetric)
    check_real_shapes(layer, heads, kv_heads, lengths, max_blocks)


@needs_cuda
@needs_triton
@pytest.mark.parametrize("shape", REAL_SHAPES, ids=list(REAL_SHAPES))
@pytest.mark.parametrize("kv", NAMED_LOWBIT + [LOWBIT[2], LOWBIT[5]], ids=lambda x: getattr(x, "name", x))
def test_real_shapes_lowbit_on_gpu(kv, shape):
    """As above for the 4-bit and sink modes (and 4-bit g32, static 4-bit): sinks on rows 0 and 2."""
    heads, kv_heads = REAL_SHAPES[shape]
    lengths, bs = [16384, 4097, 1, 9001], 64
    max_blocks = -(-max(lengths) // bs)
    layer = make_layer(kv, len(lengths) * max_blocks + 8, kv_heads, bs, 128)
    check_real_shapes(layer, heads, kv_heads, lengths, max_blocks)


@needs_cuda
@needs_triton
@pytest.mark.parametrize("shape", REAL_SHAPES, ids=list(REAL_SHAPES))
@pytest.mark.parametrize("kv", ["int3-klt", "int2-klt"])
def test_real_shapes_allocated_on_gpu(kv, shape):
    """Allocated keys at head_dim 128, blocks of 64 (stored by the reference): decode over 16K, a 1K new turn over 8K."""
    heads, kv_heads = REAL_SHAPES[shape]
    lengths, bs = [16384, 4097, 1, 9001], 64
    max_blocks = -(-max(lengths) // bs)
    layer = _allocated_layer(kv, len(lengths) * max_blocks + 8, kv_heads, bs, 128)
    tables, lens = fill_rows(layer, lengths, max_blocks, seed=3)
    check_decode(layer, tables, lens, heads)
    check_prefill(layer, tables[:1, : 8192 // bs].contiguous(), 8192, 1024, heads)


@needs_cuda
@needs_triton
@pytest.mark.parametrize("shape", REAL_SHAPES, ids=list(REAL_SHAPES))
@pytest.mark.parametrize("kv", ["fp16", "int8", "int8-dynamic", *NAMED_LOWBIT], ids=lambda x: getattr(x, "name", x))
def test_real_shape_prefill_on_gpu(kv, shape):
    """Blocks of 64, head_dim 128: a 1K-token new turn over 8K cached tokens, and a whole 2K prompt."""
    heads, kv_heads = REAL_SHAPES[shape]
    bs, kv_len = 64, 8192
    layer = make_layer(kv, 2 * kv_len // bs + 4, kv_heads, bs, 128)
    tables, _ = fill_rows(layer, [kv_len, kv_len], max_blocks=kv_len // bs, seed=9)
    check_prefill(layer, tables, kv_len, 1024, heads)
    check_prefill(layer, tables[:, : 2048 // bs].contiguous(), 2048, 2048, heads)
