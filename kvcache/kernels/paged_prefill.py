"""Prefill / multi-turn attention: a chunk of new queries over the paged history (itself included), read in the stored format.

Computes what :func:`kvcache.kernels.reference.prefill_attention_reference` does (dequantize the
history, then SDPA) without the dequantized copy: each program takes ``BLOCK_M`` queries of one
head and streams the KV head's tiles of ``BLOCK_N`` tokens through the block table. As in the
decode kernel, K and V are each read per their codec: dequantization folded into the math where one
parameter covers a head (:mod:`kvcache.kernels.folded`), so the tensor-core dots take the codes
converted exactly to fp16 (bf16 for a bf16 model; codebook levels rounded to it); 4-bit codes and bit planes
unpacked, codebook codes looked up and per-group parameters applied in registers (:mod:`kvcache.kernels.codes`); sink tokens one more tile of their 16-bit copies.
Softmax is online in fp32 (base 2), FlashAttention-style. Without a mask the chunk is causal
(query ``i`` sits at position ``kv_len - q_len + i``); with one (transformers' boolean or additive
``[batch, 1 or heads, q_len, kv_len]`` mask: sliding windows, padding) the mask alone decides.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..modes import FP16
from ..storage.layout import LayerKV
from .codes import merge_tile, part_scores, read_side, sink_limit, sink_tile, softmax_state
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

# fp32 queries would need fp32-accurate dots (three tf32 passes), which spilled registers at every
# tile tried (bench/kernel_compile.py): fp32 models prefill through the reference.
PREFILL_DTYPES = (torch.float16, torch.bfloat16)
_LOG2E = 1.4426950408889634
_LOG2E_C = tl.constexpr(_LOG2E)  # additive masks are in natural-log units, the scores in base 2


@triton.jit
def _masked(s, pos, valid, mmask, q_pos, m_row, stride_mn, MASK: tl.constexpr):
    """Scores (base 2) with -inf where a query does not attend: causal (MASK 0), or the boolean (1) / additive (2) mask."""
    keep = mmask[:, None] & valid[None, :]
    if MASK == 0:
        keep = keep & (pos[None, :] <= q_pos[:, None])
    else:
        m_ptrs = m_row[:, None] + pos[None, :] * stride_mn
        if MASK == 1:
            keep = keep & (tl.load(m_ptrs, mask=keep, other=0) != 0)
        else:
            s = s + tl.load(m_ptrs, mask=keep, other=0.0).to(tl.float32) * _LOG2E_C
    return tl.where(keep, s, float("-inf"))


@triton.jit
def _prefill_kernel(
    q_ptr, k_ptr, v_ptr, ks_ptr, kz_ptr, vs_ptr, vz_ptr, kt_ptr, vt_ptr, kl_ptr, vl_ptr, bt_ptr, mask_ptr, o_ptr,
    slot_map_ptr, k_sink_ptr, v_sink_ptr,
    q_len, kv_len, sm_scale_log2,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
    stride_kpb, stride_kph, stride_kpt, stride_vpb, stride_vph, stride_vpt,
    stride_ss, stride_sh, stride_st,
    stride_btb,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_ob, stride_om, stride_oh,
    GROUP: tl.constexpr, HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MASK: tl.constexpr, SINKS: tl.constexpr, BLOCK_S: tl.constexpr,
    K_QUANT: tl.constexpr, K_BITS: tl.constexpr, K_GROUP: tl.constexpr, K_SYM: tl.constexpr,
    K_PART: tl.constexpr, K_LANES: tl.constexpr, K_GP: tl.constexpr, K_GRID: tl.constexpr, K_TSTRIDE: tl.constexpr,
    K_ALLOC: tl.constexpr, K_WIDTH: tl.constexpr, K_LEVELS: tl.constexpr,
    V_QUANT: tl.constexpr, V_BITS: tl.constexpr, V_GROUP: tl.constexpr, V_SYM: tl.constexpr,
    V_PART: tl.constexpr, V_LANES: tl.constexpr, V_GP: tl.constexpr, V_GRID: tl.constexpr, V_TSTRIDE: tl.constexpr,
    V_ALLOC: tl.constexpr, V_WIDTH: tl.constexpr, V_LEVELS: tl.constexpr,
    K_DOT: tl.constexpr, V_DOT: tl.constexpr, S_DOT: tl.constexpr,
):
    """One (query tile, head, batch row); K and V each per its codec (K_*/V_*, as in the decode kernel).
    MASK: 0 causal, 1 boolean (True attends), 2 additive."""
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    kvh = h // GROUP

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    k_lanes = tl.arange(0, K_LANES)
    v_lanes = tl.arange(0, V_LANES)
    k_lmask = k_lanes < K_PART
    v_lmask = v_lanes < V_PART
    mmask = offs_m < q_len
    q_row = q_ptr + b * stride_qb + h * stride_qh + offs_m * stride_qm
    qa = tl.load(q_row[:, None] + k_lanes[None, :], mask=mmask[:, None] & k_lmask[None, :], other=0.0).to(tl.float32)
    qb = 0.0
    if K_BITS == 4:
        qb = tl.load(q_row[:, None] + K_PART + k_lanes[None, :], mask=mmask[:, None] & k_lmask[None, :],
                     other=0.0).to(tl.float32)
    q_pos = kv_len - q_len + offs_m
    m_row = mask_ptr + b * stride_mb + h * stride_mh + offs_m * stride_mm
    qa, qb, q_bias, q_sum = fold_query(qa, qb, ks_ptr, kz_ptr, kvh * stride_kph, k_lanes, k_lmask,
                                       HEAD_D, K_QUANT, K_BITS, K_GROUP, K_SYM, K_PART)
    qa = qa.to(K_DOT)
    if K_BITS == 4:
        qb = qb.to(K_DOT)
    v_sa, v_za, v_sb, v_zb = static_values(vs_ptr, vz_ptr, kvh * stride_vph, v_lanes, v_lmask, V_QUANT, V_BITS, V_PART)

    m_i, l_i, pz_i, acc_a, acc_b = softmax_state(BLOCK_M, V_LANES, V_BITS)
    bt_row = bt_ptr + b * stride_btb
    sink_lo = 0
    if SINKS > 0:  # the row's sink positions come from their fp16 copies (after the loop), not the codes
        sink_lo, sink_slot = sink_limit(slot_map_ptr, bt_row, SINKS)
    hi = kv_len
    if MASK == 0:  # causal: nothing past this tile's last query
        hi = tl.minimum(kv_len, kv_len - q_len + (pid_m + 1) * BLOCK_M)
    for start_n in range(0, hi, BLOCK_N):
        pos = start_n + offs_n
        valid = (pos < kv_len) & (pos >= sink_lo)
        blk = tl.load(bt_row + pos // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
        in_blk = pos % BLOCK_SIZE
        ka, kb, t_ks, t_kz = read_side(
            k_ptr, ks_ptr, kz_ptr, kt_ptr + kvh * K_TSTRIDE, kl_ptr + kvh * HEAD_D, blk * stride_kb + kvh * stride_kh + in_blk * stride_kt,
            blk * stride_kpb + kvh * stride_kph + in_blk * stride_kpt, valid, k_lanes, k_lmask,
            HEAD_D, K_QUANT, K_BITS, K_GROUP, K_SYM, K_PART, K_LANES, BLOCK_N, K_DOT, K_GRID, K_ALLOC, K_WIDTH, K_LEVELS)
        s = fold_scores(part_scores(qa, qb, ka, kb, K_BITS, True, False), q_bias, q_sum, t_ks, t_kz,
                        HEAD_D, K_QUANT, K_GROUP, K_SYM) * sm_scale_log2
        s = _masked(s, pos, valid, mmask, q_pos, m_row, stride_mn, MASK)

        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing to attend to yet
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        va, vb, t_vs, t_vz = read_side(
            v_ptr, vs_ptr, vz_ptr, vt_ptr + kvh * V_TSTRIDE, vl_ptr + kvh * HEAD_D, blk * stride_vb + kvh * stride_vh + in_blk * stride_vt,
            blk * stride_vpb + kvh * stride_vph + in_blk * stride_vpt, valid, v_lanes, v_lmask,
            HEAD_D, V_QUANT, V_BITS, V_GROUP, V_SYM, V_PART, V_LANES, BLOCK_N, V_DOT, V_GRID, V_ALLOC, V_WIDTH, V_LEVELS)
        p, pz_i = fold_probs(p, pz_i, alpha, t_vs, t_vz, HEAD_D, V_QUANT, V_GROUP, V_SYM)
        acc_a = acc_a * alpha[:, None] + tl.dot(p.to(V_DOT), va)
        if V_BITS == 4:
            acc_b = acc_b * alpha[:, None] + tl.dot(p.to(V_DOT), vb)
        m_i = m_new

    acc_a, acc_b = unfold_output(acc_a, acc_b, l_i, pz_i, v_sa, v_za, v_sb, v_zb, HEAD_D, V_QUANT, V_BITS, V_GROUP, V_SYM)
    if SINKS > 0:  # the sink copies: one more tile, merged into the softmax state
        offs_s = tl.arange(0, BLOCK_S)
        offs_d = tl.arange(0, BLOCK_D)
        dmask = offs_d < HEAD_D
        smask = offs_s < tl.minimum(sink_lo, kv_len)
        ks, vsa, vsb = sink_tile(k_sink_ptr, v_sink_ptr, sink_slot * stride_ss + kvh * stride_sh, stride_st, offs_s, smask,
                                 offs_d, dmask, v_lanes, v_lmask, V_PART, V_BITS, S_DOT)
        q = tl.load(q_row[:, None] + offs_d[None, :], mask=mmask[:, None] & dmask[None, :], other=0.0).to(S_DOT)
        s = _masked(part_scores(q, 0.0, ks, 0.0, 8, True, False) * sm_scale_log2, offs_s, smask, mmask, q_pos,
                    m_row, stride_mn, MASK)
        m_i, l_i, acc_a, acc_b = merge_tile(s, vsa, vsb, m_i, l_i, acc_a, acc_b, V_BITS, True, False, BLOCK_S)

    denom = tl.where(mmask, l_i, 1.0)[:, None]  # a fully masked query row gives NaN, as SDPA does
    o_row = o_ptr + b * stride_ob + offs_m * stride_om + h * stride_oh
    o_mask = mmask[:, None] & v_lmask[None, :]
    tl.store(o_row[:, None] + v_lanes[None, :], (acc_a / denom).to(o_ptr.dtype.element_ty), mask=o_mask)
    if V_BITS == 4:
        tl.store(o_row[:, None] + V_PART + v_lanes[None, :], (acc_b / denom).to(o_ptr.dtype.element_ty), mask=o_mask)


def _check_inputs(query: torch.Tensor, layer: LayerKV, block_tables: torch.Tensor, kv_len: int,
                  mask: torch.Tensor | None, check_ranges: bool) -> None:
    """Raise ValueError on anything the kernel cannot read safely."""
    check_storage(layer)
    if query.dim() != 4:
        raise ValueError(f"query must be [batch, num_heads, q_len, head_dim], got {tuple(query.shape)}")
    b, hq, q_len, d = query.shape
    if query.dtype not in PREFILL_DTYPES or query.stride(-1) != 1:
        raise ValueError(f"query must be fp16 or bf16 and contiguous along head_dim, got {query.dtype} "
                         f"(stride {query.stride(-1)}); fp32 models prefill through the reference")
    if d != layer.head_dim or hq % layer.num_kv_heads:
        raise ValueError(f"query has {hq} heads x head_dim {d}; the storage {layer.num_kv_heads} KV heads x {layer.head_dim}")
    if not 1 <= q_len <= kv_len:
        raise ValueError(f"q_len {q_len} must be in [1, kv_len {kv_len}]: the chunk is part of the history it attends to")
    if block_tables.dim() != 2 or block_tables.shape[0] != b or block_tables.dtype != torch.int32:
        raise ValueError(f"block_tables must be int32 [{b}, max_blocks], got {block_tables.dtype} {tuple(block_tables.shape)}")
    if not block_tables.is_contiguous() or block_tables.device != layer.k.device or query.device != layer.k.device:
        raise ValueError(f"query and block_tables must be on the storage's device ({layer.k.device}), the table contiguous")
    need = -(-kv_len // layer.block_size)
    if block_tables.shape[1] < need:
        raise ValueError(f"kv_len {kv_len} needs {need} blocks of {layer.block_size}; block_tables has {block_tables.shape[1]}")
    if mask is not None:
        if mask.dim() != 4 or mask.shape[0] not in (1, b) or mask.shape[1] not in (1, hq) or mask.shape[2:] != (q_len, kv_len):
            raise ValueError(f"attention mask must be [{b}, 1 or {hq}, {q_len}, {kv_len}], got {tuple(mask.shape)}")
        if mask.device != query.device or not (mask.dtype == torch.bool or mask.dtype in FLOAT_DTYPES):
            raise ValueError(f"attention mask must be bool or float on {query.device}, got {mask.dtype} on {mask.device}")
    if check_ranges:  # one host sync: an out-of-range block id would be an illegal memory access
        check_block_ids(*torch.stack(torch.aminmax(block_tables[:, :need])).tolist(), layer)


def prefill_attention_triton(
    query: torch.Tensor, layer: LayerKV, block_tables: torch.Tensor, kv_len: int, scale: float,
    attention_mask: torch.Tensor | None = None, *, block_m: int | None = None, block_n: int | None = None,
    num_warps: int | None = None, num_stages: int = 2, check_ranges: bool | None = None,
) -> torch.Tensor:
    """Attention of ``query`` (``[batch, heads, q_len, head_dim]``, the last ``q_len`` of ``kv_len`` positions).

    Returns ``[batch, q_len, heads, head_dim]`` (the layout attention modules hand back to transformers).
    ``block_m``/``block_n``/``num_warps``/``num_stages`` override the defaults (tests, tuning);
    ``check_ranges`` as in :func:`kvcache.kernels.paged_decode.decode_attention_triton`.
    """
    if check_ranges is None:
        check_ranges = range_checks_enabled()
    _check_inputs(query, layer, block_tables, kv_len, attention_mask, check_ranges)
    b, hq, q_len, d = query.shape
    out = torch.empty((b, q_len, hq, d), dtype=query.dtype, device=query.device)
    block_d = triton.next_power_of_2(d)
    block_m = block_m or (64 if q_len > 32 else 16)
    block_n = block_n or (64 if block_d <= 64 else 32)
    for name, v in (("block_m", block_m), ("block_n", block_n)):
        if v < 16 or v & (v - 1):
            raise ValueError(f"{name} must be a power of two >= 16, got {v}")
    # Dot operands: codes (and tiles dequantized in registers) in fp16 (bf16 for bf16 queries), scales applied
    # around the dots or on the tile; float storage is cast to the query's dtype, as the reference does.
    k_dot = dot_dtype_for(layer.k_codec, query.dtype, query.dtype, fp32_dots=False)
    v_dot = dot_dtype_for(layer.v_codec, query.dtype, query.dtype, fp32_dots=False)
    s_dot = dot_dtype_for(FP16, query.dtype, query.dtype, fp32_dots=False)
    k, v = side_args(layer, "k"), side_args(layer, "v")
    slot_map, k_sink, v_sink, sink_strides = sink_args(layer)
    if attention_mask is None:
        kind, mask, m_strides = 0, query, (0, 0, 0, 0)
    else:
        kind, mask = (1 if attention_mask.dtype == torch.bool else 2), attention_mask
        m_strides = tuple(0 if mask.shape[i] == 1 else mask.stride(i) for i in range(4))
    grid = (triton.cdiv(q_len, block_m), hq, b)
    _prefill_kernel[grid](
        query, k.data, v.data, k.scale, k.zp, v.scale, v.zp, k.table, v.table, k.layout, v.layout, block_tables, mask, out,
        slot_map, k_sink, v_sink,
        q_len, kv_len, scale * _LOG2E,
        query.stride(0), query.stride(1), query.stride(2),
        *k.strides, *v.strides, *k.param_strides, *v.param_strides, *sink_strides,
        block_tables.stride(0),
        *m_strides,
        out.stride(0), out.stride(1), out.stride(2),
        GROUP=hq // layer.num_kv_heads, HEAD_D=d, BLOCK_D=block_d, BLOCK_SIZE=layer.block_size,
        BLOCK_M=block_m, BLOCK_N=block_n, MASK=kind, SINKS=layer.sink_tokens, BLOCK_S=sink_block(layer),
        **k.read_consts("K"), **v.read_consts("V"),
        K_DOT=TL_DTYPES[k_dot], V_DOT=TL_DTYPES[v_dot], S_DOT=TL_DTYPES[s_dot],
        # allocated keys (two byte loads and a table lookup per element) spill with 4 warps at head_dim 64
        num_warps=num_warps or (8 if block_m * block_d > 4096 or layer.k_codec.allocated else 4), num_stages=num_stages,
        enable_fp_fusion=FP_FUSION,
    )
    return out
