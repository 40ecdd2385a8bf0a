"""Prefill / multi-turn attention: a chunk of new queries over the paged history (itself included), read in the stored format.

Computes what :func:`kvcache.kernels.reference.prefill_attention_reference` does (dequantize the
history, then SDPA) without the dequantized copy: each program takes ``BLOCK_M`` queries of one
head and streams the KV head's tiles of ``BLOCK_N`` tokens through the block table. As in the
decode kernel, dequantization is folded into the math (:mod:`kvcache.kernels.folded`), so the
tensor-core dots take the codes, converted exactly to fp16.
Softmax is online in fp32 (base 2), FlashAttention-style. Without a mask the chunk is causal
(query ``i`` sits at position ``kv_len - q_len + i``); with one (transformers' boolean or additive
``[batch, 1 or heads, q_len, kv_len]`` mask: sliding windows, padding) the mask alone decides.
"""

from __future__ import annotations

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

# fp32 queries would need fp32-accurate dots (three tf32 passes), which spilled registers at every
# tile tried (bench/kernel_compile.py): fp32 models prefill through the reference.
PREFILL_DTYPES = (torch.float16, torch.bfloat16)
_LOG2E = 1.4426950408889634
_LOG2E_C = tl.constexpr(_LOG2E)  # additive masks are in natural-log units, the scores in base 2


@triton.jit
def _prefill_kernel(
    q_ptr, k_ptr, v_ptr, ks_ptr, kz_ptr, vs_ptr, vz_ptr, bt_ptr, mask_ptr, o_ptr,
    q_len, kv_len, sm_scale_log2,
    stride_qb, stride_qh, stride_qm,
    stride_cb, stride_ch, stride_ct,
    stride_pb, stride_ph,
    stride_btb,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_ob, stride_om, stride_oh,
    GROUP: tl.constexpr, HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, QUANT: tl.constexpr, MASK: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
):
    """One (query tile, head, batch row). QUANT as in the store kernel; MASK: 0 causal, 1 boolean (True attends), 2 additive."""
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    kvh = h // GROUP

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mmask = offs_m < q_len
    dmask = offs_d < HEAD_D
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :],
                mask=mmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
    q_pos = kv_len - q_len + offs_m
    qk, q_bias, q_sum, v_s, v_z = fold_query(q, ks_ptr, kz_ptr, vs_ptr, vz_ptr, kvh, stride_ph, offs_d, dmask, QUANT)
    q_dot = qk.to(DOT_DTYPE)

    m_i, l_i, pz_i, acc = softmax_state(BLOCK_M, BLOCK_D)
    bt_row = bt_ptr + b * stride_btb
    hi = kv_len
    if MASK == 0:  # causal: nothing past this tile's last query
        hi = tl.minimum(kv_len, kv_len - q_len + (pid_m + 1) * BLOCK_M)
    for start_n in range(0, hi, BLOCK_N):
        pos = start_n + offs_n
        valid = pos < kv_len
        k, v, t_ks, t_kz, t_vs, t_vz = load_kv_tile(
            k_ptr, v_ptr, ks_ptr, kz_ptr, vs_ptr, vz_ptr, bt_row, pos, valid, kvh, offs_d, dmask,
            stride_cb, stride_ch, stride_ct, stride_pb, stride_ph, BLOCK_SIZE, QUANT)

        s = fold_scores(tl.dot(q_dot, tl.trans(k.to(DOT_DTYPE))), q_bias, q_sum, t_ks, t_kz, QUANT) * sm_scale_log2
        keep = mmask[:, None] & valid[None, :]
        if MASK == 0:
            keep = keep & (pos[None, :] <= q_pos[:, None])
        else:
            m_ptrs = mask_ptr + b * stride_mb + h * stride_mh + offs_m[:, None] * stride_mm + pos[None, :] * stride_mn
            if MASK == 1:
                keep = keep & (tl.load(m_ptrs, mask=keep, other=0) != 0)
            else:
                s = s + tl.load(m_ptrs, mask=keep, other=0.0).to(tl.float32) * _LOG2E_C
        s = tl.where(keep, s, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing to attend to yet
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        p, pz_i = fold_probs(p, pz_i, alpha, t_vs, t_vz, QUANT)
        acc = acc * alpha[:, None] + tl.dot(p.to(DOT_DTYPE), v.to(DOT_DTYPE))
        m_i = m_new

    acc = unfold_output(acc, l_i, pz_i, v_s, v_z, QUANT)
    o = acc / tl.where(mmask, l_i, 1.0)[:, None]  # a fully masked query row gives NaN, as SDPA does
    o_ptrs = o_ptr + b * stride_ob + offs_m[:, None] * stride_om + h * stride_oh + offs_d[None, :]
    tl.store(o_ptrs, o.to(o_ptr.dtype.element_ty), mask=mmask[:, None] & dmask[None, :])


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
    # Dot operands: int8 codes convert exactly to fp16 (scales are applied around the dots); float
    # storage is cast to the query's dtype, as the reference does.
    dot_dtype = runnable_dot_dtype(torch.float16 if layer.k.dtype == torch.int8 else query.dtype)
    ks, kz, vs, vz = kernel_params(layer)
    stride_pb, stride_ph = param_strides(layer)
    if attention_mask is None:
        kind, mask, m_strides = 0, query, (0, 0, 0, 0)
    else:
        kind, mask = (1 if attention_mask.dtype == torch.bool else 2), attention_mask
        m_strides = tuple(0 if mask.shape[i] == 1 else mask.stride(i) for i in range(4))
    grid = (triton.cdiv(q_len, block_m), hq, b)
    _prefill_kernel[grid](
        query, layer.k, layer.v, ks, kz, vs, vz, block_tables, mask, out,
        q_len, kv_len, scale * _LOG2E,
        query.stride(0), query.stride(1), query.stride(2),
        layer.k.stride(0), layer.k.stride(1), layer.k.stride(2),
        stride_pb, stride_ph,
        block_tables.stride(0),
        *m_strides,
        out.stride(0), out.stride(1), out.stride(2),
        GROUP=hq // layer.num_kv_heads, HEAD_D=d, BLOCK_D=block_d, BLOCK_SIZE=layer.block_size,
        BLOCK_M=block_m, BLOCK_N=block_n, QUANT=quant_code(layer), MASK=kind,
        DOT_DTYPE=TL_DTYPES[dot_dtype],
        num_warps=num_warps or (8 if block_m * block_d > 4096 else 4), num_stages=num_stages,
        enable_fp_fusion=FP_FUSION,
    )
    return out
