"""Triton kernel that writes (and quantizes) new K/V into the block storage.

Computes exactly what :func:`kvcache.kernels.reference.store_kv_reference` does: for ``int8-dynamic``
the per-(token, head) parameters and the codes are bit-identical to :func:`kvcache.quant.dynamic_qparams`
and :func:`kvcache.quant.quantize` (IEEE division, round-half-even, fp16 rounding of the parameters).
One program handles one token and a tile of its heads, K and V together.

The wrappers check shapes, dtypes and layouts for free, and index ranges (slots, block tables,
lengths) with one host sync per call; ``KVQ_KERNEL_CHECKS=0`` skips the range checks. The cache's
own calls skip them unless ``KVQ_KERNEL_CHECKS=1`` (see :mod:`kvcache.kernels`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..quant import SCALE_EPS
from ..storage.layout import LayerKV
from .common import (
    FLOAT_DTYPES,
    FP_FUSION,
    check_storage,
    kernel_params,
    param_strides,
    quant_code,
    range_checks_enabled,
)

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
def _store_one(
    x_ptr, stride_xt, stride_xh, dst_ptr, scale_ptr, zp_ptr,
    tok, blk, off, offs_h, offs_d, mask, hmask,
    stride_cb, stride_ch, stride_ct, stride_pb, stride_ph,
    QUANT: tl.constexpr, QMIN: tl.constexpr, QMAX: tl.constexpr, SCALE_FLOOR: tl.constexpr,
):
    """Write one token's ``[BLOCK_H, BLOCK_D]`` tile of K or V; QUANT: 0 float, 1 static int8, 2 dynamic int8."""
    x = tl.load(x_ptr + tok * stride_xt + offs_h[:, None] * stride_xh + offs_d[None, :], mask=mask, other=0.0)
    x = x.to(tl.float32)
    dst = dst_ptr + blk * stride_cb + offs_h[:, None] * stride_ch + off * stride_ct + offs_d[None, :]
    if QUANT == 0:
        tl.store(dst, x.to(dst_ptr.dtype.element_ty), mask=mask)
    elif QUANT == 1:
        # Static parameters are [num_kv_heads, head_dim] fp32 (any granularity, already expanded).
        p_off = offs_h[:, None] * stride_ph + offs_d[None, :]
        scale = tl.load(scale_ptr + p_off, mask=mask, other=1.0)
        zp = tl.load(zp_ptr + p_off, mask=mask, other=0.0)
        tl.store(dst, _quantize(x, scale, zp, QMIN, QMAX).to(tl.int8), mask=mask)
    else:
        # Per-(token, head) parameters over the real lanes only (padding never enters min/max).
        x_min = tl.min(tl.where(mask, x, float("inf")), axis=1)
        x_max = tl.max(tl.where(mask, x, float("-inf")), axis=1)
        x_min = tl.where(hmask, x_min, 0.0)  # padded heads: keep the arithmetic finite
        x_max = tl.where(hmask, x_max, 0.0)
        pdt = scale_ptr.dtype.element_ty
        zp = ((x_min + x_max) * 0.5).to(pdt).to(tl.float32)  # rounded to storage first, as dynamic_qparams
        scale = tl.math.div_rn(tl.maximum(x_max - zp, zp - x_min), (QMAX - QMIN) / 2)
        scale = tl.maximum(scale, SCALE_FLOOR)
        # Round up to the 16-bit storage type: when round-to-nearest went down, step one ulp up
        # (scale > 0, so +1 on the bit pattern is the next representable value).
        s16 = scale.to(pdt)
        bits = s16.to(tl.int16, bitcast=True)
        bits = tl.where(s16.to(tl.float32) < scale, bits + 1, bits)
        s16 = bits.to(pdt, bitcast=True)
        q = _quantize(x, s16.to(tl.float32)[:, None], zp[:, None], QMIN, QMAX)
        tl.store(dst, q.to(tl.int8), mask=mask)
        p_off = blk * stride_pb + offs_h * stride_ph + off
        tl.store(scale_ptr + p_off, s16, mask=hmask)
        tl.store(zp_ptr + p_off, zp.to(pdt), mask=hmask)


@triton.jit
def _store_kv_kernel(
    key_ptr, value_ptr, slots_ptr,
    k_ptr, v_ptr, ks_ptr, kz_ptr, vs_ptr, vz_ptr,
    num_heads,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_cb, stride_ch, stride_ct,
    stride_pb, stride_ph,
    HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    QUANT: tl.constexpr, QMIN: tl.constexpr, QMAX: tl.constexpr, SCALE_FLOOR: tl.constexpr,
):
    tok = tl.program_id(0)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    hmask = offs_h < num_heads
    mask = hmask[:, None] & (offs_d[None, :] < HEAD_D)
    slot = tl.load(slots_ptr + tok).to(tl.int64)
    blk, off = slot // BLOCK_SIZE, slot % BLOCK_SIZE
    _store_one(key_ptr, stride_kt, stride_kh, k_ptr, ks_ptr, kz_ptr, tok, blk, off, offs_h, offs_d, mask, hmask,
               stride_cb, stride_ch, stride_ct, stride_pb, stride_ph, QUANT, QMIN, QMAX, SCALE_FLOOR)
    _store_one(value_ptr, stride_vt, stride_vh, v_ptr, vs_ptr, vz_ptr, tok, blk, off, offs_h, offs_d, mask, hmask,
               stride_cb, stride_ch, stride_ct, stride_pb, stride_ph, QUANT, QMIN, QMAX, SCALE_FLOOR)


def store_kv_triton(
    layer: LayerKV, key: torch.Tensor, value: torch.Tensor, slots: torch.Tensor, *, check_ranges: bool | None = None
) -> None:
    """Quantize (per the layer's mode) and write ``[num_tokens, kv_heads, head_dim]`` K/V at ``slots``."""
    check_storage(layer)
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


def _launch(layer: LayerKV, key: torch.Tensor, value: torch.Tensor, slots: torch.Tensor) -> None:
    """One program per (token, tile of up to 4K head elements): K and V of a token in one go."""
    n, kvh, d = key.shape
    block_d = triton.next_power_of_2(d)
    block_h = min(triton.next_power_of_2(kvh), max(1, 4096 // block_d))
    quant = quant_code(layer)
    ks, kz, vs, vz = kernel_params(layer)
    stride_pb, stride_ph = param_strides(layer)
    grid = (n, triton.cdiv(kvh, block_h))
    _store_kv_kernel[grid](
        key, value, slots, layer.k, layer.v, ks, kz, vs, vz,
        kvh,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        layer.k.stride(0), layer.k.stride(1), layer.k.stride(2),
        stride_pb, stride_ph,
        HEAD_D=d, BLOCK_D=block_d, BLOCK_H=block_h, BLOCK_SIZE=layer.block_size,
        QUANT=quant, QMIN=-128, QMAX=127, SCALE_FLOOR=SCALE_EPS,
        num_warps=4, enable_fp_fusion=FP_FUSION,
    )
