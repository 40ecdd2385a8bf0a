"""Flash-decoding over the block table, reading K/V in their stored format (fp16/bf16/fp32 or int8).

Computes what :func:`kvcache.kernels.reference.decode_attention_reference` does, without ever
writing a dequantized copy: each program (batch row, KV head, split) streams tiles of ``BLOCK_N``
tokens, and all query heads of the KV group share each tile load (GQA). Dequantization is folded
into the math in registers (:mod:`kvcache.kernels.folded`), so the inner loop only converts codes.

Softmax is online in fp32 (base 2). With several splits a second kernel merges the partial
results through their log-sum-exp.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from ..storage.layout import LayerKV
from .common import (
    FLOAT_DTYPES,
    FP_FUSION,
    TL_DTYPES,
    check_block_ids,
    check_storage,
    kernel_params,
    param_strides,
    quant_code,
    range_checks_enabled,
    runnable_dot_dtype,
)
from .folded import (
    fold_probs,
    fold_query,
    fold_scores,
    load_kv_tile,
    softmax_state,
    unfold_output,
)

_MAX_SPLITS = 64


@triton.jit
def _decode_partial_kernel(
    q_ptr, k_ptr, v_ptr, ks_ptr, kz_ptr, vs_ptr, vz_ptr, bt_ptr, lens_ptr, o_ptr, lse_ptr,
    sm_scale_log2, num_splits,
    stride_qb, stride_qh,
    stride_cb, stride_ch, stride_ct,
    stride_pb, stride_ph,
    stride_btb,
    stride_ob, stride_oh, stride_os,
    stride_lb, stride_lh,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, QUANT: tl.constexpr,
    USE_DOT: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_FP32: tl.constexpr, STORE_LSE: tl.constexpr,
):
    """One (batch row, KV head, split): partial attention of the group's query heads over its token range."""
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    gmask = offs_g < GROUP
    dmask = offs_d < HEAD_D
    heads = kvh * GROUP + offs_g

    # This split's token range: the row's length cut in num_splits tile-aligned chunks.
    seq_len = tl.load(lens_ptr + b)
    chunk = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
    start = split * chunk
    end = tl.minimum(start + chunk, seq_len)

    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=gmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)  # [BLOCK_G, BLOCK_D]
    qk, q_bias, q_sum, v_s, v_z = fold_query(q, ks_ptr, kz_ptr, vs_ptr, vz_ptr, kvh, stride_ph, offs_d, dmask, QUANT)
    if USE_DOT:
        qk_dot = qk.to(DOT_DTYPE)

    m_i, l_i, pz_i, acc = softmax_state(BLOCK_G, BLOCK_D)

    bt_row = bt_ptr + b * stride_btb
    for start_n in range(start, end, BLOCK_N):
        pos = start_n + offs_n
        valid = pos < end
        # A tile may span several blocks (or part of one): each token's block is looked up.
        k, v, t_ks, t_kz, t_vs, t_vz = load_kv_tile(
            k_ptr, v_ptr, ks_ptr, kz_ptr, vs_ptr, vz_ptr, bt_row, pos, valid, kvh, offs_d, dmask,
            stride_cb, stride_ch, stride_ct, stride_pb, stride_ph, BLOCK_SIZE, QUANT)

        if USE_DOT:
            if DOT_FP32:  # fp32 operands: three tf32 passes (~fp32 accuracy), not one
                s = tl.dot(qk_dot, tl.trans(k.to(DOT_DTYPE)), input_precision="tf32x3")
            else:
                s = tl.dot(qk_dot, tl.trans(k.to(DOT_DTYPE)))
        else:  # one query head: multiply-and-sum over head_dim
            s = tl.sum(qk * k.to(tl.float32), axis=1)[None, :]  # [1, BLOCK_N]
        s = fold_scores(s, q_bias, q_sum, t_ks, t_kz, QUANT)
        s = tl.where(valid[None, :], s * sm_scale_log2, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(s, axis=1))  # finite: every tile holds a valid token
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        p, pz_i = fold_probs(p, pz_i, alpha, t_vs, t_vz, QUANT)
        if USE_DOT:
            if DOT_FP32:
                pv = tl.dot(p.to(DOT_DTYPE), v.to(DOT_DTYPE), input_precision="tf32x3")
            else:
                pv = tl.dot(p.to(DOT_DTYPE), v.to(DOT_DTYPE))
        else:
            pv = tl.sum(tl.reshape(p, (BLOCK_N, 1)) * v.to(tl.float32), axis=0)[None, :]
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    acc = unfold_output(acc, l_i, pz_i, v_s, v_z, QUANT)
    # An empty split (a row shorter than the others) leaves l = 0: output 0 with weight exp(-inf) = 0.
    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    o_ptrs = o_ptr + b * stride_ob + heads[:, None] * stride_oh + split * stride_os + offs_d[None, :]
    tl.store(o_ptrs, o.to(o_ptr.dtype.element_ty), mask=gmask[:, None] & dmask[None, :])
    if STORE_LSE:
        lse = tl.where(l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
        tl.store(lse_ptr + b * stride_lb + heads * stride_lh + split, lse, mask=gmask)


@triton.jit
def _decode_reduce_kernel(
    o_part_ptr, lse_ptr, out_ptr, num_splits,
    stride_pb, stride_ph, stride_ps, stride_lb, stride_lh, stride_ob, stride_oh,
    HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Merge the splits of one (batch row, query head): weights ``2^(lse_s - max lse)``."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    smask = offs_s < num_splits
    dmask = offs_d < HEAD_D
    lse = tl.load(lse_ptr + b * stride_lb + h * stride_lh + offs_s, mask=smask, other=float("-inf"))
    w = tl.exp2(lse - tl.max(lse, axis=0))  # split 0 is never empty, so the max is finite
    o = tl.load(o_part_ptr + b * stride_pb + h * stride_ph + offs_s[:, None] * stride_ps + offs_d[None, :],
                mask=smask[:, None] & dmask[None, :], other=0.0)
    out = tl.sum(w[:, None] * o, axis=0) / tl.sum(w, axis=0)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty), mask=dmask)


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2  # the interpreter: a couple of splits exercise the reduce without slowing tests down


def default_block_n(head_dim: int) -> int:
    """Tokens per tile: ~8K elements per K tile (64 tokens at head_dim 128, 128 at 64)."""
    return max(16, min(128, 8192 // triton.next_power_of_2(head_dim)))


def default_num_splits(batch: int, num_kv_heads: int, max_len: int, block_n: int, device: torch.device) -> int:
    """Enough (row, head, split) programs to fill the SMs a few times, each with >= 4 tiles of work."""
    programs = batch * num_kv_heads
    want = triton.cdiv(4 * _sm_count(device), programs)
    return max(1, min(want, triton.cdiv(triton.cdiv(max_len, block_n), 4), _MAX_SPLITS))


def _check_inputs(
    query: torch.Tensor, layer: LayerKV, block_tables: torch.Tensor, seq_lens: torch.Tensor, check_ranges: bool
) -> int:
    """Raise ValueError on anything the kernel cannot read safely; return the longest length (or a bound)."""
    check_storage(layer)
    if query.dim() != 3:
        raise ValueError(f"query must be [batch, num_heads, head_dim], got {tuple(query.shape)}")
    b, hq, d = query.shape
    if query.dtype not in FLOAT_DTYPES:
        raise ValueError(f"query must be fp16, bf16 or fp32, got {query.dtype}")
    if query.stride(-1) != 1:
        raise ValueError(f"query must be contiguous along head_dim (stride {query.stride(-1)})")
    if d != layer.head_dim:
        raise ValueError(f"query head_dim {d} does not match the storage's {layer.head_dim}")
    if hq % layer.num_kv_heads:
        raise ValueError(f"{hq} query heads is not a multiple of {layer.num_kv_heads} KV heads")
    if block_tables.dim() != 2 or block_tables.shape[0] != b or block_tables.dtype != torch.int32:
        raise ValueError(f"block_tables must be int32 [{b}, max_blocks], got {block_tables.dtype} {tuple(block_tables.shape)}")
    if seq_lens.shape != (b,) or seq_lens.dtype != torch.int32:
        raise ValueError(f"seq_lens must be int32 [{b}], got {seq_lens.dtype} {tuple(seq_lens.shape)}")
    for name, t in (("query", query), ("block_tables", block_tables), ("seq_lens", seq_lens)):
        if t.device != layer.k.device:
            raise ValueError(f"{name} is on {t.device}, the storage on {layer.k.device}")
    if not (block_tables.is_contiguous() and seq_lens.is_contiguous()):
        raise ValueError("block_tables and seq_lens must be contiguous")
    if b == 0:
        return 0
    if block_tables.shape[1] == 0:
        raise ValueError("block_tables has no columns: every sequence needs at least one block")
    covered = block_tables.shape[1] * layer.block_size
    if not check_ranges:
        return covered
    # One host sync for all range checks: an out-of-range id would be an illegal memory access.
    bt_min, bt_max, len_min, len_max = torch.stack(
        [block_tables.min(), block_tables.max(), seq_lens.min(), seq_lens.max()]).tolist()
    check_block_ids(bt_min, bt_max, layer)
    if len_min < 1 or len_max > covered:
        raise ValueError(f"seq_lens must be in [1, {covered}] (max_blocks {block_tables.shape[1]} x block_size "
                         f"{layer.block_size}), got [{len_min}, {len_max}]")
    return len_max


def decode_attention_triton(
    query: torch.Tensor, layer: LayerKV, block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
    *, num_splits: int | None = None, block_n: int | None = None, use_dot: bool | None = None,
    num_warps: int | None = None, num_stages: int = 3, check_ranges: bool | None = None,
) -> torch.Tensor:
    """Attention of one query token per row (``[batch, heads, head_dim]``) over its paged history.

    ``num_splits``/``block_n``/``use_dot``/``num_warps``/``num_stages`` override the defaults (tests, tuning); ``use_dot``
    defaults to tensor-core dots when a KV head serves several query heads, else a multiply-and-sum.
    ``check_ranges=False`` skips the one host sync that range-checks ``block_tables``/``seq_lens``
    (default: on, unless ``KVQ_KERNEL_CHECKS=0``): only for callers whose indices are known good.
    """
    if check_ranges is None:
        check_ranges = range_checks_enabled()
    max_len = _check_inputs(query, layer, block_tables, seq_lens, check_ranges)
    b, hq, d = query.shape
    out = torch.empty((b, hq, d), dtype=query.dtype, device=query.device)
    if b == 0:
        return out
    kvh = layer.num_kv_heads
    group = hq // kvh
    block_d = triton.next_power_of_2(d)
    block_n = block_n or default_block_n(d)
    if block_n < 16 or block_n & (block_n - 1):
        raise ValueError(f"block_n must be a power of two >= 16, got {block_n}")
    use_dot = group > 1 if use_dot is None else use_dot
    if not use_dot and group != 1:
        raise ValueError("the multiply-and-sum path serves one query head per KV head; use_dot=True for GQA")
    block_g = max(16, triton.next_power_of_2(group)) if use_dot else 1
    splits = num_splits or default_num_splits(b, kvh, max_len, block_n, query.device)
    splits = max(1, min(splits, triton.cdiv(max_len, block_n)))  # no split is empty for the longest row

    # Dot operands: int8 codes and fp16/bf16 values convert exactly to fp16 (or the stored dtype);
    # fp32 anywhere keeps ~fp32 accuracy through tf32x3 ("ieee" would spill registers).
    if query.dtype == torch.float32 or layer.k.dtype == torch.float32:
        dot_dtype = torch.float32
    else:
        dot_dtype = torch.float16 if layer.k.dtype == torch.int8 else layer.k.dtype
    dot_dtype = runnable_dot_dtype(dot_dtype)
    quant = quant_code(layer)
    ks, kz, vs, vz = kernel_params(layer)
    stride_pb, stride_ph = param_strides(layer)

    if splits == 1:  # write the final output directly, no reduce
        o_part, lse = out, out
        o_strides, l_strides = (out.stride(0), out.stride(1), 0), (0, 0)
    else:
        o_part = torch.empty((b, hq, splits, d), dtype=torch.float32, device=query.device)
        lse = torch.empty((b, hq, splits), dtype=torch.float32, device=query.device)
        o_strides, l_strides = o_part.stride()[:3], lse.stride()[:2]

    if num_warps is None:
        num_warps = 8 if block_n * block_d > 8192 or (use_dot and dot_dtype == torch.float32) else 4
    _decode_partial_kernel[(b, kvh, splits)](
        query, layer.k, layer.v, ks, kz, vs, vz, block_tables, seq_lens, o_part, lse,
        scale * math.log2(math.e), splits,
        query.stride(0), query.stride(1),
        layer.k.stride(0), layer.k.stride(1), layer.k.stride(2),
        stride_pb, stride_ph,
        block_tables.stride(0),
        *o_strides, *l_strides,
        GROUP=group, BLOCK_G=block_g, HEAD_D=d, BLOCK_D=block_d,
        BLOCK_SIZE=layer.block_size, BLOCK_N=block_n, QUANT=quant,
        USE_DOT=use_dot, DOT_DTYPE=TL_DTYPES[dot_dtype], DOT_FP32=dot_dtype == torch.float32,
        STORE_LSE=splits > 1,
        num_warps=num_warps, num_stages=num_stages, enable_fp_fusion=FP_FUSION,
    )
    if splits > 1:
        _decode_reduce_kernel[(b, hq)](
            o_part, lse, out, splits,
            *o_part.stride()[:3], *lse.stride()[:2], out.stride(0), out.stride(1),
            HEAD_D=d, BLOCK_D=block_d, BLOCK_S=triton.next_power_of_2(splits),
            num_warps=4, enable_fp_fusion=FP_FUSION,
        )
    return out
