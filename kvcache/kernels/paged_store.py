"""Triton kernel that writes (and quantizes) new K/V into the block storage.

Computes exactly what :func:`kvcache.kernels.reference.store_kv_reference` does, K and V each per its
codec: codes and per-token parameters bit-identical to :func:`kvcache.quant.token_qparams` and
:func:`kvcache.quant.quantize_groups` (IEEE division, round-half-even, parameters rounded to fp16 with
scales rounded up, the symmetric peak at the first channel of largest magnitude), 4-bit codes packed as
:func:`kvcache.quant.pack_int4`, 3- and 2-bit codes in bit planes as :func:`kvcache.quant.pack_codes`
(:func:`pack_planes`), and the fp16 copy of sink tokens. Codes on a peak codebook (``lloyd-max-peak``, 4, 3
or 2 bits) take the same signed scale (the group's peak over the lowest level, -1) and the index of the nearest
level of ``x / scale`` (ties to the even index, :func:`kvcache.quant.nearest_codes`), as :func:`kvcache.encoding.kvq_rule`,
packed the same way. One program handles one token and a tile of its heads, K and V together.

A side's tile is ``[BLOCK_H, groups, lanes per group]`` (one group of all lanes when parameters are per
head or static), so per-group minima, maxima and peaks are reductions over the last axis. 4-bit codes
are computed as two such tiles, the two halves of head_dim, and byte ``j`` packs lane ``j`` of each.

The wrappers check shapes, dtypes and layouts for free, and index ranges (slots, block tables,
lengths) with one host sync per call; ``KVQ_KERNEL_CHECKS=0`` skips the range checks. The cache's
own calls skip them unless ``KVQ_KERNEL_CHECKS=1`` (see :mod:`kvcache.kernels`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..codebooks import PEAK_LOWEST
from ..quant import SCALE_EPS, qrange
from ..storage.layout import LayerKV
from .common import (FLOAT_DTYPES, FP_FUSION, SideArgs, check_storage, range_checks_enabled, side_args, sink_args,
                     unsupported_store)

# Adding then subtracting 1.5 * 2**23 rounds an fp32 of magnitude < 2**22 to the nearest integer,
# ties to even (the IEEE default), like torch.round; no libdevice call, same on GPU and interpreter.
_ROUND_MAGIC = tl.constexpr(12582912.0)


@triton.jit
def _quantize(x, scale, zp, QMIN: tl.constexpr, QMAX: tl.constexpr):
    """``clamp(round((x - zp) / scale))`` in fp32 with IEEE division, as :func:`kvcache.quant.quantize`."""
    y = tl.math.div_rn(x - zp, scale)
    y = tl.minimum(tl.maximum(y, QMIN - 1.0), QMAX + 1.0)  # clamping first keeps the magic rounding exact
    y = (y + _ROUND_MAGIC) - _ROUND_MAGIC
    return tl.minimum(tl.maximum(y, QMIN), QMAX)


@triton.jit
def _nearest(unit, t_row, hmask, BITS: tl.constexpr):
    """Signed codes (fp32) of the nearest level of each head's table (``t_row``: its first level) to ``unit``, as
    :func:`kvcache.quant.nearest_codes` with ``ties="even"``: the index is the count of midpoints below ``unit``,
    plus one on a midpoint whose lower index is odd; then minus 2^(b-1), as the packing takes codes. The midpoints
    are the reference's, ``(t[i] + t[i+1]) / 2`` in fp32 (an add, then an exact halving: no fused op to differ)."""
    codes = tl.zeros_like(unit) - (1 << (BITS - 1))
    lo = tl.load(t_row, mask=hmask, other=0.0)
    for i in tl.static_range((1 << BITS) - 1):
        hi = tl.load(t_row + (i + 1), mask=hmask, other=0.0)
        mid = ((lo + hi) * 0.5)[:, None, None]
        above = unit > mid
        if i % 2 == 1:
            above = above | (unit == mid)
        codes = tl.where(above, codes + 1.0, codes)
        lo = hi
    return codes


@triton.jit
def _codes(x, scale, zp, t_row, hmask, QMIN: tl.constexpr, QMAX: tl.constexpr, BITS: tl.constexpr,
           GRID: tl.constexpr):
    """Signed codes (fp32) of ``x``: the nearest level of ``x / scale`` (``GRID``), else the integer grid's."""
    if GRID:
        codes = _nearest(tl.math.div_rn(x, scale), t_row, hmask, BITS)
    else:
        codes = _quantize(x, scale, zp, QMIN, QMAX)
    return codes


@triton.jit
def _to_float(v, dt: tl.constexpr):
    """fp32 ``v`` as the float dtype ``dt``, rounded to nearest, ties to even. For bf16 the rounding is done on the
    fp32 bits first (then the cast is exact), so Triton's interpreter, whose bf16 cast truncates, agrees with the GPU."""
    if dt == tl.bfloat16:
        bits = v.to(tl.uint32, bitcast=True)
        bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16  # uint32: logical shifts
        v = bits.to(tl.float32, bitcast=True)
    return v.to(dt)


@triton.jit
def _round_up(v, pdt: tl.constexpr):
    """``v`` (>= 0, fp32) in the 16-bit ``pdt``, never rounded down: where round-to-nearest went down,
    one ulp up (+1 on the bit pattern of a positive value)."""
    r = _to_float(v, pdt)
    bits = r.to(tl.int16, bitcast=True)
    return tl.where(r.to(tl.float32) < v, bits + 1, bits).to(pdt, bitcast=True)


@triton.jit
def _range(x, mask):
    """Per-group minimum and maximum over the real lanes (the last axis)."""
    return (tl.min(tl.where(mask, x, float("inf")), axis=2), tl.max(tl.where(mask, x, float("-inf")), axis=2))


@triton.jit
def _peak(x, mask, lane):
    """Per group: the largest magnitude and the value that has it, at its first lane (torch's ``argmax`` of ``abs``)."""
    ax = tl.where(mask, tl.abs(x), -1.0)
    amax = tl.max(ax, axis=2)
    first = tl.min(tl.where(ax == amax[:, :, None], lane, 1 << 30), axis=2)
    return amax, tl.max(tl.where(lane == first[:, :, None], x, float("-inf")), axis=2)


@triton.jit
def _token_params(a, b, mask, lane, QMIN: tl.constexpr, QMAX: tl.constexpr, SYM: tl.constexpr,
                  BOTH: tl.constexpr, SCALE_FLOOR: tl.constexpr, pdt: tl.constexpr):
    """(scale in ``pdt``, zero point in fp32) per group of ``a`` (``BOTH``: of ``a`` and ``b`` together, the two
    halves of one head, ``b``'s lanes after ``a``'s), as :func:`kvcache.quant.token_qparams`."""
    if SYM:  # sym_token_qparams: a signed scale, the peak maps to QMIN, magnitude rounded up
        amax, peak = _peak(a, mask, lane)
        if BOTH:
            amax_b, peak_b = _peak(b, mask, lane)
            peak = tl.where(amax >= amax_b, peak, peak_b)  # a tie goes to the earlier channel: a's
        signed = tl.math.div_rn(peak, QMIN)
        mag = _round_up(tl.maximum(tl.abs(signed), SCALE_FLOOR), pdt).to(tl.float32)
        scale = tl.where(signed < 0, -mag, mag).to(pdt)  # the sign in fp32: exact, and no bf16 arithmetic
        zp = 0.0
    else:
        x_min, x_max = _range(a, mask)
        if BOTH:
            b_min, b_max = _range(b, mask)
            x_min, x_max = tl.minimum(x_min, b_min), tl.maximum(x_max, b_max)
        real = x_min <= x_max  # padded heads and groups: keep the arithmetic finite
        x_min, x_max = tl.where(real, x_min, 0.0), tl.where(real, x_max, 0.0)
        zp = _to_float((x_min + x_max) * 0.5, pdt).to(tl.float32)  # rounded to storage first, as dynamic_qparams
        scale = tl.math.div_rn(tl.maximum(x_max - zp, zp - x_min), (QMAX - QMIN) / 2)
        scale = _round_up(tl.maximum(scale, SCALE_FLOOR), pdt)
    return scale, zp


@triton.jit
def _store_params(s_ptr, z_ptr, p_row, first, gi, gmask, scale, zp, SYM: tl.constexpr):
    """Per-token parameters ``[BLOCK_H, groups]`` at group ``first + gi`` of each head's row."""
    p_off = p_row[:, None] + first + gi[None, :]
    tl.store(s_ptr + p_off, scale, mask=gmask)
    if not SYM:
        tl.store(z_ptr + p_off, zp.to(z_ptr.dtype.element_ty), mask=gmask)


@triton.jit
def _pack_plane(u, dst_row, hmask, AT: tl.constexpr, SHIFT: tl.constexpr, W: tl.constexpr, HEAD_D: tl.constexpr,
                BLOCK_H: tl.constexpr):
    """Bits ``SHIFT .. SHIFT + W - 1`` of code indices ``u`` (``HEAD_D`` per head, in order) as one plane of
    ``HEAD_D * W / 8`` bytes at byte ``AT``: byte ``j`` holds channel ``j + k * HEAD_D * W / 8`` at bit ``k * W``."""
    width: tl.constexpr = HEAD_D * W // 8
    f = (tl.reshape(u, (BLOCK_H, 8 // W, width)) >> SHIFT) & ((1 << W) - 1)
    k = tl.arange(0, 8 // W)
    byte = tl.sum(f << (k[None, :, None] * W), axis=1)  # disjoint bits: the sum is the OR
    tl.store(dst_row[:, None] + AT + tl.arange(0, width)[None, :], byte.to(tl.uint8), mask=hmask[:, None])


@triton.jit
def pack_planes(codes, dst_row, hmask, BITS: tl.constexpr, HEAD_D: tl.constexpr, BLOCK_H: tl.constexpr):
    """Signed codes (fp32, ``[BLOCK_H, ...]`` holding each head's ``HEAD_D`` channels in order) as
    :func:`kvcache.quant.pack_codes` stores them: index ``c + 2^(b-1)``, a 2-bit plane then a 1-bit plane."""
    u = (codes + (1 << (BITS - 1))).to(tl.int32)
    if BITS & 2:
        _pack_plane(u, dst_row, hmask, 0, 0, 2, HEAD_D, BLOCK_H)
    if BITS & 1:
        _pack_plane(u, dst_row, hmask, (BITS & 2) * HEAD_D // 8, BITS & 2, 1, HEAD_D, BLOCK_H)


@triton.jit
def _store_side(
    x_row, dst_row, s_ptr, z_ptr, p_row, t_row, sink_row, keep_sink, hmask,
    QUANT: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr, SYM: tl.constexpr, PART: tl.constexpr,
    LANES: tl.constexpr, GP: tl.constexpr, QMIN: tl.constexpr, QMAX: tl.constexpr, SINKS: tl.constexpr,
    SCALE_FLOOR: tl.constexpr, BLOCK_H: tl.constexpr, GRID: tl.constexpr,
):
    """Encode one token's K or V (heads ``[BLOCK_H]``) per the side's codec; rows are per-head base pointers/offsets.

    QUANT 0 floats, 1 static codes (``p_row`` indexes ``[kv_heads, head_dim]``), 2 per-token codes
    (``p_row``: the token's parameter row per head); BITS 4: two halves of PART lanes, packed. GRID: per-token
    symmetric codes on each head's table at ``t_row`` (QMIN its lowest level, -1: the peak's signed scale).
    """
    gi = tl.arange(0, LANES // GP)
    lane = gi[None, :, None] * GP + tl.arange(0, GP)[None, None, :]  # [1, groups, GP]
    mask = hmask[:, None, None] & (lane < PART)
    a = tl.load(x_row[:, None, None] + lane, mask=mask, other=0.0).to(tl.float32)
    b = a
    if BITS == 4:
        b = tl.load(x_row[:, None, None] + PART + lane, mask=mask, other=0.0).to(tl.float32)
    if SINKS > 0:  # the first tokens of a sequence's first block, in the pool's fp dtype as given
        sdt = sink_row.dtype.element_ty
        tl.store(sink_row[:, None, None] + lane, _to_float(a, sdt), mask=mask & keep_sink[:, None, None])
        if BITS == 4:
            tl.store(sink_row[:, None, None] + PART + lane, _to_float(b, sdt), mask=mask & keep_sink[:, None, None])
    if QUANT == 0:
        tl.store(dst_row[:, None, None] + lane, _to_float(a, dst_row.dtype.element_ty), mask=mask)
    else:
        if QUANT == 1:  # static [kv_heads, head_dim] fp32 (any granularity, already expanded)
            s_a = tl.load(s_ptr + p_row[:, None, None] + lane, mask=mask, other=1.0)
            z_a = tl.load(z_ptr + p_row[:, None, None] + lane, mask=mask, other=0.0)
            s_b, z_b = s_a, z_a
            if BITS == 4:
                s_b = tl.load(s_ptr + p_row[:, None, None] + PART + lane, mask=mask, other=1.0)
                z_b = tl.load(z_ptr + p_row[:, None, None] + PART + lane, mask=mask, other=0.0)
        else:
            pdt = s_ptr.dtype.element_ty
            gmask = hmask[:, None] & (gi * GP < PART)[None, :]
            both = BITS == 4 and GROUP == 2 * PART  # one group per head, over both halves
            s16, z16 = _token_params(a, b, mask, lane, QMIN, QMAX, SYM, both, SCALE_FLOOR, pdt)
            _store_params(s_ptr, z_ptr, p_row, 0, gi, gmask, s16, z16, SYM)
            s_a = s16.to(tl.float32)[:, :, None]
            z_a = 0.0
            if not SYM:
                z_a = z16[:, :, None]
            s_b, z_b = s_a, z_a
            if BITS == 4 and GROUP < 2 * PART:  # the high half's groups follow the low half's
                s16, z16 = _token_params(b, b, mask, lane, QMIN, QMAX, SYM, False, SCALE_FLOOR, pdt)
                _store_params(s_ptr, z_ptr, p_row, PART // GROUP, gi, gmask, s16, z16, SYM)
                s_b = s16.to(tl.float32)[:, :, None]
                if not SYM:
                    z_b = z16[:, :, None]
        codes = _codes(a, s_a, z_a, t_row, hmask, QMIN, QMAX, BITS, GRID)
        if BITS == 4:  # pack_int4: low nibble channel j, high nibble channel j + head_dim/2, offset by 8
            high = _codes(b, s_b, z_b, t_row, hmask, QMIN, QMAX, BITS, GRID)
            byte = (codes + 8.0).to(tl.uint8) | ((high + 8.0).to(tl.uint8) << 4)
            tl.store(dst_row[:, None, None] + lane, byte, mask=mask)
        elif BITS < 4:  # bit planes over all of head_dim (a power of two: PART == LANES)
            pack_planes(codes, dst_row, hmask, BITS, PART, BLOCK_H)
        else:
            tl.store(dst_row[:, None, None] + lane, codes.to(tl.int8), mask=mask)


@triton.jit
def _store_kv_kernel(
    key_ptr, value_ptr, slots_ptr,
    k_ptr, v_ptr, ks_ptr, kz_ptr, vs_ptr, vz_ptr, kt_ptr, vt_ptr, slot_map_ptr, k_sink_ptr, v_sink_ptr,
    num_heads,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_kb, stride_kch, stride_kct, stride_vb, stride_vch, stride_vct,
    stride_kpb, stride_kph, stride_kpt, stride_vpb, stride_vph, stride_vpt,
    stride_ss, stride_sh, stride_st,
    BLOCK_H: tl.constexpr, BLOCK_SIZE: tl.constexpr, SINKS: tl.constexpr, SCALE_FLOOR: tl.constexpr,
    K_QUANT: tl.constexpr, K_BITS: tl.constexpr, K_GROUP: tl.constexpr, K_SYM: tl.constexpr,
    K_PART: tl.constexpr, K_LANES: tl.constexpr, K_GP: tl.constexpr, K_QMIN: tl.constexpr, K_QMAX: tl.constexpr,
    K_GRID: tl.constexpr, K_TSTRIDE: tl.constexpr,
    V_QUANT: tl.constexpr, V_BITS: tl.constexpr, V_GROUP: tl.constexpr, V_SYM: tl.constexpr,
    V_PART: tl.constexpr, V_LANES: tl.constexpr, V_GP: tl.constexpr, V_QMIN: tl.constexpr, V_QMAX: tl.constexpr,
    V_GRID: tl.constexpr, V_TSTRIDE: tl.constexpr,
):
    tok = tl.program_id(0)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    hmask = offs_h < num_heads
    slot = tl.load(slots_ptr + tok).to(tl.int64)
    blk, off = slot // BLOCK_SIZE, slot % BLOCK_SIZE
    keep_sink = False
    k_sink_row = k_sink_ptr
    v_sink_row = v_sink_ptr
    if SINKS > 0:
        sink = tl.load(slot_map_ptr + blk).to(tl.int64)
        zero = tl.zeros([BLOCK_H], tl.int64)  # per-head tensors: the interpreter mistypes a scalar bool & a tensor
        keep_sink = hmask & (zero + sink >= 0) & (zero + off < SINKS)
        sink_off = tl.maximum(sink, 0) * stride_ss + offs_h * stride_sh + off * stride_st
        k_sink_row = k_sink_ptr + sink_off
        v_sink_row = v_sink_ptr + sink_off
    k_static = offs_h * stride_kph
    v_static = offs_h * stride_vph
    _store_side(key_ptr + tok * stride_kt + offs_h * stride_kh, k_ptr + blk * stride_kb + offs_h * stride_kch + off * stride_kct,
                ks_ptr, kz_ptr, k_static if K_QUANT == 1 else blk * stride_kpb + k_static + off * stride_kpt,
                kt_ptr + offs_h * K_TSTRIDE, k_sink_row, keep_sink, hmask,
                K_QUANT, K_BITS, K_GROUP, K_SYM, K_PART, K_LANES, K_GP, K_QMIN, K_QMAX, SINKS, SCALE_FLOOR, BLOCK_H,
                K_GRID)
    _store_side(value_ptr + tok * stride_vt + offs_h * stride_vh, v_ptr + blk * stride_vb + offs_h * stride_vch + off * stride_vct,
                vs_ptr, vz_ptr, v_static if V_QUANT == 1 else blk * stride_vpb + v_static + off * stride_vpt,
                vt_ptr + offs_h * V_TSTRIDE, v_sink_row, keep_sink, hmask,
                V_QUANT, V_BITS, V_GROUP, V_SYM, V_PART, V_LANES, V_GP, V_QMIN, V_QMAX, SINKS, SCALE_FLOOR, BLOCK_H,
                V_GRID)


def store_kv_triton(
    layer: LayerKV, key: torch.Tensor, value: torch.Tensor, slots: torch.Tensor, *, check_ranges: bool | None = None
) -> None:
    """Encode (per each side's codec) and write ``[num_tokens, kv_heads, head_dim]`` K/V at ``slots``."""
    check_storage(layer)
    reason = unsupported_store(layer)
    if reason:
        raise ValueError(reason)
    if key.dim() != 3 or key.shape != value.shape:
        raise ValueError(f"key and value must both be [num_tokens, kv_heads, head_dim], "
                         f"got {tuple(key.shape)} and {tuple(value.shape)}")
    n, kvh, d = key.shape
    if (kvh, d) != (layer.num_kv_heads, layer.head_dim):
        raise ValueError(f"key has {kvh} heads x head_dim {d}, the storage {layer.num_kv_heads} x {layer.head_dim}")
    for name, t in (("key", key), ("value", value)):
        if t.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{name} must be fp16, bf16 or fp32, got {t.dtype}")
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous along head_dim (stride {t.stride(-1)})")
        if t.device != layer.k.device:
            raise ValueError(f"{name} is on {t.device}, the storage on {layer.k.device}")
    if slots.dim() != 1 or slots.shape[0] != n or slots.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"slots must be int64 [{n}], got {slots.dtype} {tuple(slots.shape)}")
    if slots.device != key.device or not slots.is_contiguous():
        raise ValueError("slots must be a contiguous tensor on the same device as key")
    if n == 0:
        return
    if check_ranges is None:
        check_ranges = range_checks_enabled()
    if check_ranges:
        _check_slots(slots, layer)
    _launch(layer, key, value, slots)


def _check_slots(slots: torch.Tensor, layer: LayerKV) -> None:
    lo, hi = torch.stack(torch.aminmax(slots)).tolist()  # one host sync: a bad slot must not become a stray write
    capacity = layer.num_blocks * layer.block_size
    if lo < 0 or hi >= capacity:
        raise ValueError(f"slots must be in [0, {capacity}) ({layer.num_blocks} blocks of {layer.block_size}), got [{lo}, {hi}]")


def _store_consts(side: SideArgs, prefix: str) -> dict[str, int | float | bool]:
    """The side's switches and its code range: the integer grid's, or for a peak grid its lowest level (the peak's)."""
    if side.grid:
        lo, hi = PEAK_LOWEST, 1.0
    else:
        lo, hi = qrange(side.bits) if side.quant else (0, 0)
    return {**side.consts(prefix), f"{prefix}_QMIN": lo, f"{prefix}_QMAX": hi}


def _launch(layer: LayerKV, key: torch.Tensor, value: torch.Tensor, slots: torch.Tensor) -> None:
    """One program per (token, tile of up to 4K head elements): K and V of a token in one go."""
    n, kvh, d = key.shape
    block_h = min(triton.next_power_of_2(kvh), max(1, 4096 // triton.next_power_of_2(d)))
    k, v = side_args(layer, "k"), side_args(layer, "v")
    slot_map, k_sink, v_sink, sink_strides = sink_args(layer)
    grid = (n, triton.cdiv(kvh, block_h))
    _store_kv_kernel[grid](
        key, value, slots, k.data, v.data, k.scale, k.zp, v.scale, v.zp, k.table, v.table, slot_map, k_sink, v_sink,
        kvh,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        *k.strides, *v.strides, *k.param_strides, *v.param_strides, *sink_strides,
        BLOCK_H=block_h, BLOCK_SIZE=layer.block_size, SINKS=layer.sink_tokens, SCALE_FLOOR=SCALE_EPS,
        **_store_consts(k, "K"), **_store_consts(v, "V"),
        num_warps=4, enable_fp_fusion=FP_FUSION,
    )
