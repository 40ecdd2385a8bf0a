"""Dequantization folded into attention's math: the pieces the decode and prefill kernels share.

The dots take the stored codes (int8 converts exactly to fp16) and the parameters are applied
around them, so no dequantized tile is ever formed:

- static, per-channel ``s``/``z``: ``q.k = (q*s).c + q.z``, and ``sum p v = s * sum p c + z * sum p``;
- dynamic, per-token ``s_n``/``z_n``: ``q.k_n = s_n (q.c_n) + z_n sum(q)``, and
  ``sum p v = sum (p s) c + sum p z``.

``QUANT`` is the store kernel's switch (0 float storage, 1 static int8, 2 dynamic int8); values a
mode does not use come back as 0 and are never read.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def fold_query(q, ks_ptr, kz_ptr, vs_ptr, vz_ptr, kvh, stride_ph, offs_d, dmask, QUANT: tl.constexpr):
    """For fp32 queries ``[rows, BLOCK_D]``: (q with the K scale in, q.K-zero-point, sum q, V scale, V zero point)."""
    qk = q
    q_bias = 0.0
    q_sum = 0.0
    v_s = 0.0
    v_z = 0.0
    if QUANT == 1:  # static parameters are [kv_heads, head_dim]: loaded once per program
        p_off = kvh * stride_ph + offs_d
        k_s = tl.load(ks_ptr + p_off, mask=dmask, other=0.0)
        k_z = tl.load(kz_ptr + p_off, mask=dmask, other=0.0)
        v_s = tl.load(vs_ptr + p_off, mask=dmask, other=0.0)
        v_z = tl.load(vz_ptr + p_off, mask=dmask, other=0.0)
        qk = q * k_s[None, :]
        q_bias = tl.sum(q * k_z[None, :], axis=1)
    if QUANT == 2:
        q_sum = tl.sum(q, axis=1)
    return qk, q_bias, q_sum, v_s, v_z


@triton.jit
def softmax_state(ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """Online-softmax state per query row: running max (base 2), sum of weights, sum p * v_zp (dynamic mode), output."""
    m_i = tl.full([ROWS], float("-inf"), tl.float32)
    l_i = tl.zeros([ROWS], tl.float32)
    pz = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, BLOCK_D], tl.float32)
    return m_i, l_i, pz, acc


@triton.jit
def load_kv_tile(
    k_ptr, v_ptr, ks_ptr, kz_ptr, vs_ptr, vz_ptr, bt_row, pos, valid, kvh, offs_d, dmask,
    stride_cb, stride_ch, stride_ct, stride_pb, stride_ph,
    BLOCK_SIZE: tl.constexpr, QUANT: tl.constexpr,
):
    """K and V at positions ``pos`` (each looked up in the block table) in the stored dtype, and their per-token parameters."""
    blk = tl.load(bt_row + pos // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
    in_blk = pos % BLOCK_SIZE
    row = blk * stride_cb + kvh * stride_ch + in_blk * stride_ct
    kv_mask = valid[:, None] & dmask[None, :]
    kv_off = row[:, None] + offs_d[None, :]
    k = tl.load(k_ptr + kv_off, mask=kv_mask, other=0)
    v = tl.load(v_ptr + kv_off, mask=kv_mask, other=0)
    t_ks = 0.0
    t_kz = 0.0
    t_vs = 0.0
    t_vz = 0.0
    if QUANT == 2:  # per-token parameters are [num_blocks, kv_heads, block_size]
        t_off = blk * stride_pb + kvh * stride_ph + in_blk
        t_ks = tl.load(ks_ptr + t_off, mask=valid, other=0.0).to(tl.float32)
        t_kz = tl.load(kz_ptr + t_off, mask=valid, other=0.0).to(tl.float32)
        t_vs = tl.load(vs_ptr + t_off, mask=valid, other=0.0).to(tl.float32)
        t_vz = tl.load(vz_ptr + t_off, mask=valid, other=0.0).to(tl.float32)
    return k, v, t_ks, t_kz, t_vs, t_vz


@triton.jit
def fold_scores(s, q_bias, q_sum, t_ks, t_kz, QUANT: tl.constexpr):
    """Scores of the codes (``[rows, tokens]``) -> scores of the dequantized keys."""
    if QUANT == 1:
        s = s + q_bias[:, None]
    elif QUANT == 2:
        s = s * t_ks[None, :] + q_sum[:, None] * t_kz[None, :]
    return s


@triton.jit
def fold_probs(p, pz, alpha, t_vs, t_vz, QUANT: tl.constexpr):
    """Dynamic mode: the V zero points' share (sum p z, rescaled like the rest) apart, and p times the V scales."""
    if QUANT == 2:
        pz = pz * alpha + tl.sum(p * t_vz[None, :], axis=1)
        p = p * t_vs[None, :]
    return p, pz


@triton.jit
def unfold_output(acc, l_i, pz, v_s, v_z, QUANT: tl.constexpr):
    """Accumulated ``sum p c`` -> ``sum p v`` (still unnormalised)."""
    if QUANT == 1:
        acc = acc * v_s[None, :] + l_i[:, None] * v_z[None, :]
    elif QUANT == 2:
        acc = acc + pz[:, None]
    return acc
