"""Dequantization folded into attention's math: the pieces the decode and prefill kernels share.

The dots take the stored codes (int8 and 4-bit codes convert exactly to fp16; a codebook's levels are rounded
to the dot dtype) and the parameters are
applied around them, so no dequantized tile is formed, wherever one parameter covers a whole vector
of the dot:

- static, per-channel ``s``/``z``: ``q.k = (q*s).c + q.z``, and ``sum p v = s * sum p c + z * sum p``;
- per token, one group per head ``s_n``/``z_n``: ``q.k_n = s_n (q.c_n) + z_n sum(q)``, and
  ``sum p v = sum (p s) c + sum p z`` (symmetric: no ``z`` terms).

Per-token groups smaller than a head are dequantized in registers instead (:mod:`kvcache.kernels.codes`).
Every helper takes one side's switches (``QUANT`` 0 floats, 1 static, 2 per token; ``BITS``; ``GROUP``;
``SYM``) and its parts (``a``; ``b`` for the high half of 4-bit codes, else 0); values a side does not
use come back as 0 and are never read.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def fold_query(qa, qb, ks_ptr, kz_ptr, p_head, lanes, lmask, HEAD_D: tl.constexpr, QUANT: tl.constexpr,
               BITS: tl.constexpr, GROUP: tl.constexpr, SYM: tl.constexpr, PART: tl.constexpr):
    """For fp32 query parts ``[rows, LANES]``: (parts with the K scale in, q . K zero point, sum q)."""
    q_bias = 0.0
    q_sum = 0.0
    if QUANT == 1:  # static parameters are [kv_heads, head_dim]: loaded once per program
        k_s = tl.load(ks_ptr + p_head + lanes, mask=lmask, other=0.0)
        k_z = tl.load(kz_ptr + p_head + lanes, mask=lmask, other=0.0)
        q_bias = tl.sum(qa * k_z[None, :], axis=1)
        qa = qa * k_s[None, :]
        if BITS == 4:
            k_s = tl.load(ks_ptr + p_head + PART + lanes, mask=lmask, other=0.0)
            k_z = tl.load(kz_ptr + p_head + PART + lanes, mask=lmask, other=0.0)
            q_bias += tl.sum(qb * k_z[None, :], axis=1)
            qb = qb * k_s[None, :]
    if QUANT == 2 and GROUP == HEAD_D and not SYM:
        q_sum = tl.sum(qa, axis=1)
        if BITS == 4:
            q_sum += tl.sum(qb, axis=1)
    return qa, qb, q_bias, q_sum


@triton.jit
def static_values(vs_ptr, vz_ptr, p_head, lanes, lmask, QUANT: tl.constexpr, BITS: tl.constexpr, PART: tl.constexpr):
    """Static V scales and zero points per part: (s_a, z_a, s_b, z_b), 0 where V has none."""
    s_a = 0.0
    z_a = 0.0
    s_b = 0.0
    z_b = 0.0
    if QUANT == 1:
        s_a = tl.load(vs_ptr + p_head + lanes, mask=lmask, other=0.0)
        z_a = tl.load(vz_ptr + p_head + lanes, mask=lmask, other=0.0)
        if BITS == 4:
            s_b = tl.load(vs_ptr + p_head + PART + lanes, mask=lmask, other=0.0)
            z_b = tl.load(vz_ptr + p_head + PART + lanes, mask=lmask, other=0.0)
    return s_a, z_a, s_b, z_b


@triton.jit
def fold_scores(s, q_bias, q_sum, t_ks, t_kz, HEAD_D: tl.constexpr, QUANT: tl.constexpr, GROUP: tl.constexpr,
                SYM: tl.constexpr):
    """Scores of the codes (``[rows, tokens]``) -> scores of the dequantized keys."""
    if QUANT == 1:
        s = s + q_bias[:, None]
    elif QUANT == 2 and GROUP == HEAD_D:
        s = s * t_ks[None, :]
        if not SYM:
            s += q_sum[:, None] * t_kz[None, :]
    return s


@triton.jit
def fold_probs(p, pz, alpha, t_vs, t_vz, HEAD_D: tl.constexpr, QUANT: tl.constexpr, GROUP: tl.constexpr,
               SYM: tl.constexpr):
    """Per-head V parameters: the zero points' share (sum p z, rescaled like the rest) apart, and p times the scales."""
    if QUANT == 2 and GROUP == HEAD_D:
        if not SYM:
            pz = pz * alpha + tl.sum(p * t_vz[None, :], axis=1)
        p = p * t_vs[None, :]
    return p, pz


@triton.jit
def unfold_output(acc_a, acc_b, l_i, pz, s_a, z_a, s_b, z_b, HEAD_D: tl.constexpr, QUANT: tl.constexpr,
                  BITS: tl.constexpr, GROUP: tl.constexpr, SYM: tl.constexpr):
    """Accumulated ``sum p c`` per part -> ``sum p v`` (still unnormalised)."""
    if QUANT == 1:
        acc_a = acc_a * s_a[None, :] + l_i[:, None] * z_a[None, :]
        if BITS == 4:
            acc_b = acc_b * s_b[None, :] + l_i[:, None] * z_b[None, :]
    elif QUANT == 2 and GROUP == HEAD_D and not SYM:
        acc_a = acc_a + pz[:, None]
        if BITS == 4:
            acc_b = acc_b + pz[:, None]
    return acc_a, acc_b
