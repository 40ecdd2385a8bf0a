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

import os

import torch
import triton
import triton.language as tl

from ..layout import LayerKV
from ..quant import SCALE_EPS

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}
PARAM_DTYPES = (torch.float16, torch.bfloat16)  # per-token parameters; the round-up below works on 16-bit floats
MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 256
# Fused multiply-adds, pinned: Triton's default flips to off in 3.10 (3.9 warns about it), and the
# kernels should compile the same on the GPU image's 3.6 and anything newer. The quantizing paths
# have no multiply-then-add to fuse, so their codes stay bit-identical to the references either way.
FP_FUSION = True

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


def range_checks_enabled(default: bool = True) -> bool:
    """Whether to run the host-syncing index range checks: ``KVQ_KERNEL_CHECKS`` (1 or 0) if set, else ``default``."""
    value = os.environ.get("KVQ_KERNEL_CHECKS")
    return default if value is None else value != "0"


def check_storage(layer: LayerKV) -> None:
    """Raise ValueError unless ``layer``'s tensors have the layout and dtypes the kernels assume."""
    mode, k, v = layer.mode, layer.k, layer.v
    if k.dim() != 4 or k.shape != v.shape or k.dtype != v.dtype or k.device != v.device:
        raise ValueError(f"K/V storage must be two equal [num_blocks, kv_heads, block_size, head_dim] tensors, "
                         f"got {tuple(k.shape)} {k.dtype} and {tuple(v.shape)} {v.dtype}")
    if not (k.is_contiguous() and v.is_contiguous()):
        raise ValueError("K/V storage must be contiguous")
    if not MIN_HEAD_DIM <= layer.head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim {layer.head_dim} is not supported by the Triton kernels "
                         f"(supported: {MIN_HEAD_DIM}..{MAX_HEAD_DIM}, e.g. 64 or 128)")
    if mode.quantized:
        if k.dtype != torch.int8 or mode.bits != 8:
            raise ValueError(f"mode {mode.name!r} needs int8 storage with 8-bit codes, got {k.dtype}, {mode.bits} bits")
        want = (layer.num_blocks, layer.num_kv_heads, layer.block_size) if mode.dynamic else (layer.num_kv_heads, layer.head_dim)
        for name in ("k_scale", "k_zp", "v_scale", "v_zp"):
            t = getattr(layer, name)
            if t is None:
                raise ValueError(f"mode {mode.name!r} needs {name}, but the layer has none")
            if tuple(t.shape) != want or not t.is_contiguous() or t.device != k.device:
                raise ValueError(f"{name} must be a contiguous {want} tensor on {k.device}, got {tuple(t.shape)} "
                                 f"(contiguous={t.is_contiguous()}) on {t.device}")
            ok = PARAM_DTYPES if mode.dynamic else (torch.float32,)
            if t.dtype not in ok:
                raise ValueError(f"{name} must be {' or '.join(map(str, ok))} in mode {mode.name!r}, got {t.dtype}")
    elif k.dtype not in FLOAT_DTYPES:
        raise ValueError(f"mode {mode.name!r} stores floats (fp16/bf16/fp32), got {k.dtype}")


def _params(layer: LayerKV) -> tuple[torch.Tensor, ...]:
    """(k_scale, k_zp, v_scale, v_zp), or the data tensor four times where the mode has none (never read)."""
    if not layer.mode.quantized:
        return (layer.k,) * 4
    return layer.k_scale, layer.k_zp, layer.v_scale, layer.v_zp


def runnable_dot_dtype(dtype: torch.dtype) -> torch.dtype:
    """``dtype`` for ``tl.dot`` operands, except bf16 in the interpreter (its tl.dot multiplies bf16 bit patterns as integers): fp32."""
    if dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1":
        return torch.float32
    return dtype


def check_block_ids(lo: int, hi: int, layer: LayerKV) -> None:
    """Raise unless the smallest and largest block id of a table index the storage (else: an illegal memory access)."""
    if lo < 0 or hi >= layer.num_blocks:
        raise ValueError(f"block_tables entries must be in [0, {layer.num_blocks}) (the storage's num_blocks), "
                         f"got [{lo}, {hi}]")


def param_strides(layer: LayerKV) -> tuple[int, int]:
    """(block, head) strides of the parameter tensors: per-token ones are indexed by both, static ones by head."""
    t = layer.k_scale
    if not layer.mode.quantized:
        return 0, 0
    return (t.stride(0), t.stride(1)) if layer.mode.dynamic else (0, t.stride(0))


def quant_code(layer: LayerKV) -> int:
    """The kernels' QUANT switch: 0 float storage, 1 static int8, 2 dynamic int8."""
    return 0 if not layer.mode.quantized else (2 if layer.mode.dynamic else 1)


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
    ks, kz, vs, vz = _params(layer)
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
