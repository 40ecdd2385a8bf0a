"""Flash-decoding over the block table, reading K and V each in its stored format (floats, 8-, 4-, 3- or 2-bit codes).

Computes what :func:`kvcache.kernels.reference.decode_attention_reference` does, without ever
writing a dequantized copy: each program (batch row, KV head, split) streams tiles of ``BLOCK_N``
tokens, and all query heads of the KV group share each tile load (GQA). Where one parameter covers a
head's vector (static codes, per-token per-head codes) dequantization is folded into the math
(:mod:`kvcache.kernels.folded`), so the inner loop only converts codes; 4-bit codes and bit planes unpack in
registers, codebook codes (``lloyd-max-peak``) become their levels there, and per-group parameters are applied to
the tile there (:mod:`kvcache.kernels.codes`). Sink tokens are
one more tile of their 16-bit copies, attended by split 0.

Softmax is online in fp32 (base 2). With several splits a second kernel merges the partial
results through their log-sum-exp.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from ..modes import FP16
from ..storage.layout import LayerKV
from .codes import merge_tile, part_scores, read_side, sink_limit, sink_tile, softmax_state, weighted_sum
from .common import (
    FLOAT_DTYPES,
    FP_FUSION,
    TL_DTYPES,
    check_block_ids,
    check_storage,
    dot_dtype_for,
    range_checks_enabled,
    side_args,
    sink_args,
    sink_block,
)
from .folded import fold_probs, fold_query, fold_scores, static_values, unfold_output

_MAX_SPLITS = 64


@triton.jit
def _decode_partial_kernel(
    q_ptr, k_ptr, v_ptr, ks_ptr, kz_ptr, vs_ptr, vz_ptr, kt_ptr, vt_ptr, kl_ptr, vl_ptr, bt_ptr, lens_ptr, o_ptr, lse_ptr,
    slot_map_ptr, k_sink_ptr, v_sink_ptr,
    sm_scale_log2, num_splits,
    stride_qb, stride_qh,
    stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
    stride_kpb, stride_kph, stride_kpt, stride_vpb, stride_vph, stride_vpt,
    stride_ss, stride_sh, stride_st,
    stride_btb,
    stride_ob, stride_oh, stride_os,
    stride_lb, stride_lh,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, SINKS: tl.constexpr, BLOCK_S: tl.constexpr,
    K_QUANT: tl.constexpr, K_BITS: tl.constexpr, K_GROUP: tl.constexpr, K_SYM: tl.constexpr,
    K_PART: tl.constexpr, K_LANES: tl.constexpr, K_GP: tl.constexpr, K_GRID: tl.constexpr, K_TSTRIDE: tl.constexpr,
    K_ALLOC: tl.constexpr, K_WIDTH: tl.constexpr, K_LEVELS: tl.constexpr,
    V_QUANT: tl.constexpr, V_BITS: tl.constexpr, V_GROUP: tl.constexpr, V_SYM: tl.constexpr,
    V_PART: tl.constexpr, V_LANES: tl.constexpr, V_GP: tl.constexpr, V_GRID: tl.constexpr, V_TSTRIDE: tl.constexpr,
    V_ALLOC: tl.constexpr, V_WIDTH: tl.constexpr, V_LEVELS: tl.constexpr,
    USE_DOT: tl.constexpr, K_DOT: tl.constexpr, V_DOT: tl.constexpr, S_DOT: tl.constexpr,
    K_FP32: tl.constexpr, V_FP32: tl.constexpr, S_FP32: tl.constexpr, STORE_LSE: tl.constexpr,
):
    """One (batch row, KV head, split): partial attention of the group's query heads over its token range.

    K and V are each read per their own codec (the K_*/V_* switches, :mod:`kvcache.kernels.common`); one
    kernel for all of them because the loop is the same and only the tile reads and folds differ.
    """
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)

    offs_g = tl.arange(0, BLOCK_G)
    offs_n = tl.arange(0, BLOCK_N)
    k_lanes = tl.arange(0, K_LANES)
    v_lanes = tl.arange(0, V_LANES)
    k_lmask = k_lanes < K_PART
    v_lmask = v_lanes < V_PART
    gmask = offs_g < GROUP
    heads = kvh * GROUP + offs_g

    # This split's token range: the row's length cut in num_splits tile-aligned chunks.
    seq_len = tl.load(lens_ptr + b)
    chunk = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
    start = split * chunk
    end = tl.minimum(start + chunk, seq_len)

    q_row = q_ptr + b * stride_qb + heads * stride_qh
    qa = tl.load(q_row[:, None] + k_lanes[None, :], mask=gmask[:, None] & k_lmask[None, :], other=0.0).to(tl.float32)
    qb = 0.0
    if K_BITS == 4:
        qb = tl.load(q_row[:, None] + K_PART + k_lanes[None, :], mask=gmask[:, None] & k_lmask[None, :],
                     other=0.0).to(tl.float32)
    qa, qb, q_bias, q_sum = fold_query(qa, qb, ks_ptr, kz_ptr, kvh * stride_kph, k_lanes, k_lmask,
                                       HEAD_D, K_QUANT, K_BITS, K_GROUP, K_SYM, K_PART)
    if USE_DOT:
        qa = qa.to(K_DOT)
        if K_BITS == 4:
            qb = qb.to(K_DOT)
    v_sa, v_za, v_sb, v_zb = static_values(vs_ptr, vz_ptr, kvh * stride_vph, v_lanes, v_lmask, V_QUANT, V_BITS, V_PART)

    m_i, l_i, pz_i, acc_a, acc_b = softmax_state(BLOCK_G, V_LANES, V_BITS)

    bt_row = bt_ptr + b * stride_btb
    sink_lo = 0
    if SINKS > 0:  # the row's sink positions come from their fp16 copies (after the loop), not the codes
        sink_lo, sink_slot = sink_limit(slot_map_ptr, bt_row, SINKS)
    for start_n in range(start, end, BLOCK_N):
        pos = start_n + offs_n
        valid = (pos < end) & (pos >= sink_lo)
        # A tile may span several blocks (or part of one): each token's block is looked up.
        blk = tl.load(bt_row + pos // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
        in_blk = pos % BLOCK_SIZE
        ka, kb, t_ks, t_kz = read_side(
            k_ptr, ks_ptr, kz_ptr, kt_ptr + kvh * K_TSTRIDE, kl_ptr + kvh * HEAD_D, blk * stride_kb + kvh * stride_kh + in_blk * stride_kt,
            blk * stride_kpb + kvh * stride_kph + in_blk * stride_kpt, valid, k_lanes, k_lmask,
            HEAD_D, K_QUANT, K_BITS, K_GROUP, K_SYM, K_PART, K_LANES, BLOCK_N, K_DOT, K_GRID, K_ALLOC, K_WIDTH, K_LEVELS)
        s = part_scores(qa, qb, ka, kb, K_BITS, USE_DOT, K_FP32)
        s = fold_scores(s, q_bias, q_sum, t_ks, t_kz, HEAD_D, K_QUANT, K_GROUP, K_SYM)
        s = tl.where(valid[None, :], s * sm_scale_log2, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_use = m_new  # finite: every tile holds a valid token ...
        if SINKS > 0:  # ... unless its only ones are sinks
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        va, vb, t_vs, t_vz = read_side(
            v_ptr, vs_ptr, vz_ptr, vt_ptr + kvh * V_TSTRIDE, vl_ptr + kvh * HEAD_D, blk * stride_vb + kvh * stride_vh + in_blk * stride_vt,
            blk * stride_vpb + kvh * stride_vph + in_blk * stride_vpt, valid, v_lanes, v_lmask,
            HEAD_D, V_QUANT, V_BITS, V_GROUP, V_SYM, V_PART, V_LANES, BLOCK_N, V_DOT, V_GRID, V_ALLOC, V_WIDTH, V_LEVELS)
        p, pz_i = fold_probs(p, pz_i, alpha, t_vs, t_vz, HEAD_D, V_QUANT, V_GROUP, V_SYM)
        acc_a = acc_a * alpha[:, None] + weighted_sum(p, va, USE_DOT, V_FP32, BLOCK_N)
        if V_BITS == 4:
            acc_b = acc_b * alpha[:, None] + weighted_sum(p, vb, USE_DOT, V_FP32, BLOCK_N)
        m_i = m_new

    acc_a, acc_b = unfold_output(acc_a, acc_b, l_i, pz_i, v_sa, v_za, v_sb, v_zb, HEAD_D, V_QUANT, V_BITS, V_GROUP, V_SYM)
    if SINKS > 0:  # split 0 attends the sink copies: one more tile, merged into the softmax state
        offs_s = tl.arange(0, BLOCK_S)
        offs_d = tl.arange(0, BLOCK_D)
        dmask = offs_d < HEAD_D
        smask = offs_s < tl.minimum(sink_lo * (split == 0).to(tl.int32), seq_len)
        ks, vsa, vsb = sink_tile(k_sink_ptr, v_sink_ptr, sink_slot * stride_ss + kvh * stride_sh, stride_st, offs_s, smask,
                                 offs_d, dmask, v_lanes, v_lmask, V_PART, V_BITS, S_DOT)
        q = tl.load(q_row[:, None] + offs_d[None, :], mask=gmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
        if USE_DOT:
            q = q.to(S_DOT)
        s = part_scores(q, 0.0, ks, 0.0, 8, USE_DOT, S_FP32)
        s = tl.where(smask[None, :], s * sm_scale_log2, float("-inf"))
        m_i, l_i, acc_a, acc_b = merge_tile(s, vsa, vsb, m_i, l_i, acc_a, acc_b, V_BITS, USE_DOT, S_FP32, BLOCK_S)

    # An empty split (a row shorter than the others) leaves l = 0: output 0 with weight exp(-inf) = 0.
    denom = tl.where(l_i > 0, l_i, 1.0)[:, None]
    o_row = o_ptr + b * stride_ob + heads * stride_oh + split * stride_os
    o_mask = gmask[:, None] & v_lmask[None, :]
    tl.store(o_row[:, None] + v_lanes[None, :], (acc_a / denom).to(o_ptr.dtype.element_ty), mask=o_mask)
    if V_BITS == 4:
        tl.store(o_row[:, None] + V_PART + v_lanes[None, :], (acc_b / denom).to(o_ptr.dtype.element_ty), mask=o_mask)
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

    # Dot operands: codes (and tiles dequantized in registers) in fp16 (bf16 for bf16 queries), fp16/bf16 values
    # as stored; fp32 anywhere keeps ~fp32 accuracy through tf32x3 ("ieee" would spill registers).
    k, v = side_args(layer, "k"), side_args(layer, "v")
    k_dot = dot_dtype_for(layer.k_codec, layer.k.dtype, query.dtype, fp32_dots=True)
    v_dot = dot_dtype_for(layer.v_codec, layer.v.dtype, query.dtype, fp32_dots=True)
    slot_map, k_sink, v_sink, sink_strides = sink_args(layer)
    s_dot = dot_dtype_for(FP16, k_sink.dtype, query.dtype, fp32_dots=True) if layer.sink_tokens else k_dot

    if splits == 1:  # write the final output directly, no reduce
        o_part, lse = out, out
        o_strides, l_strides = (out.stride(0), out.stride(1), 0), (0, 0)
    else:
        o_part = torch.empty((b, hq, splits, d), dtype=torch.float32, device=query.device)
        lse = torch.empty((b, hq, splits), dtype=torch.float32, device=query.device)
        o_strides, l_strides = o_part.stride()[:3], lse.stride()[:2]

    if num_warps is None:
        fp32_dot = use_dot and torch.float32 in (k_dot, v_dot)
        planes = min(layer.k_codec.bits, layer.v_codec.bits) < 4  # bit-plane unpacking: 4 warps spill at head_dim 128
        num_warps = 8 if block_n * block_d > 8192 or fp32_dot or planes else 4
    _decode_partial_kernel[(b, kvh, splits)](
        query, k.data, v.data, k.scale, k.zp, v.scale, v.zp, k.table, v.table, k.layout, v.layout, block_tables, seq_lens, o_part, lse,
        slot_map, k_sink, v_sink,
        scale * math.log2(math.e), splits,
        query.stride(0), query.stride(1),
        *k.strides, *v.strides, *k.param_strides, *v.param_strides, *sink_strides,
        block_tables.stride(0),
        *o_strides, *l_strides,
        GROUP=group, BLOCK_G=block_g, HEAD_D=d, BLOCK_D=block_d,
        BLOCK_SIZE=layer.block_size, BLOCK_N=block_n, SINKS=layer.sink_tokens, BLOCK_S=sink_block(layer),
        **k.read_consts("K"), **v.read_consts("V"),
        USE_DOT=use_dot, K_DOT=TL_DTYPES[k_dot], V_DOT=TL_DTYPES[v_dot], S_DOT=TL_DTYPES[s_dot],
        K_FP32=k_dot == torch.float32, V_FP32=v_dot == torch.float32, S_FP32=s_dot == torch.float32,
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
