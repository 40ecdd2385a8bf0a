"""Reading stored tiles in the attention kernels: codes unpacked in registers, per-group dequantization, sinks.

A side (K or V) is read in *parts* (:mod:`kvcache.kernels.common`): one part of head_dim lanes, or for
4-bit codes two parts of head_dim/2 lanes, the low and high nibbles of the same bytes
(:func:`kvcache.quant.pack_int4` splits head_dim in halves, so a ``[BLOCK_N, head_dim/2]`` byte tile
unpacks with a mask and a shift into two tiles that each dot against the matching half of the query).
Codes of 3 and 2 bits are stored in bit planes (:func:`kvcache.quant.pack_codes`) and read in one part of
head_dim lanes: :func:`unpack_planes` loads each plane's bytes once and spreads them over the channels.
Allocated sides (``int3-klt``'s keys: each channel its own width, one bit stream per head) read each channel's
one or two bytes by the head's layout and take the level of its width (:func:`unpack_allocated`).
Codebook sides (``GRID``, the ``lloyd-max-peak`` levels) unpack the same signed codes ``c`` and read each one's
level, ``table[c + 2^(b-1)]`` in fp32 (:func:`levels`), where integer sides take ``c`` itself; the scale then
applies the same way (the peak grids have no zero point). Parameters per group of channels are applied to the tile in registers (one fp32 multiply-add per
element; the ``[BLOCK_N, groups]`` parameters are broadcast over each group's lanes); per-head and
static parameters are folded around the dots instead (:mod:`kvcache.kernels.folded`).

Sinks: positions below N of a row whose first block has a sink slot are masked out of the code tiles and
attended in one extra tile of the fp16 copies, merged into the online softmax after the main loop.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def mma(a, b, FP32: tl.constexpr):
    """``tl.dot``; fp32 operands take three tf32 passes (~fp32 accuracy), not one."""
    if FP32:
        out = tl.dot(a, b, input_precision="tf32x3")
    else:
        out = tl.dot(a, b)
    return out


@triton.jit
def load_parts(base, lanes, lmask, rmask, PART: tl.constexpr, BITS: tl.constexpr):
    """Rows of a full-width fp tensor (``base``: a pointer per row) in the side's parts: (a, b), b = 0 unless 4-bit."""
    m = rmask[:, None] & lmask[None, :]
    a = tl.load(base[:, None] + lanes[None, :], mask=m, other=0.0).to(tl.float32)
    b = 0.0
    if BITS == 4:
        b = tl.load(base[:, None] + PART + lanes[None, :], mask=m, other=0.0).to(tl.float32)
    return a, b


@triton.jit
def _group_params(ptr, p_row, valid, FIRST: tl.constexpr, GROUP: tl.constexpr, PART: tl.constexpr,
                  LANES: tl.constexpr, BLOCK_N: tl.constexpr):
    """Per-token parameters of a part's groups (``FIRST`` on), one per lane: ``[BLOCK_N, LANES]`` fp32."""
    gi = tl.arange(0, LANES // GROUP)
    m = valid[:, None] & (gi * GROUP < PART)[None, :]
    p = tl.load(ptr + p_row[:, None] + FIRST + gi[None, :], mask=m, other=0.0).to(tl.float32)
    return tl.reshape(tl.broadcast_to(p[:, :, None], (BLOCK_N, LANES // GROUP, GROUP)), (BLOCK_N, LANES))


@triton.jit
def _dequant_part(c, s_ptr, z_ptr, p_row, valid, FIRST: tl.constexpr, GROUP: tl.constexpr, SYM: tl.constexpr,
                  PART: tl.constexpr, LANES: tl.constexpr, BLOCK_N: tl.constexpr):
    """Codes ``c`` of one part times their group's scale, plus its zero point, in fp32."""
    x = c.to(tl.float32) * _group_params(s_ptr, p_row, valid, FIRST, GROUP, PART, LANES, BLOCK_N)
    if not SYM:
        x = x + _group_params(z_ptr, p_row, valid, FIRST, GROUP, PART, LANES, BLOCK_N)
    return x


@triton.jit
def _plane(data_ptr, row, valid, AT: tl.constexpr, W: tl.constexpr, HEAD_D: tl.constexpr, BLOCK_N: tl.constexpr):
    """One ``W``-bit plane (starting at byte ``AT``) of a tile's codes, per channel: ``[BLOCK_N, HEAD_D]`` int32.

    Byte ``j`` holds channel ``j + k * HEAD_D * W / 8`` at bit ``k * W``, so the bytes broadcast over ``k`` and
    shifted, in row-major order, are the channels in order (HEAD_D a power of two)."""
    j = tl.arange(0, HEAD_D * W // 8)
    x = tl.load(data_ptr + row[:, None] + AT + j[None, :], mask=valid[:, None], other=0).to(tl.int32)
    k = tl.arange(0, 8 // W)
    f = (x[:, None, :] >> (k[None, :, None] * W)) & ((1 << W) - 1)
    return tl.reshape(f, (BLOCK_N, HEAD_D))


@triton.jit
def unpack_planes(data_ptr, row, valid, BITS: tl.constexpr, HEAD_D: tl.constexpr, BLOCK_N: tl.constexpr):
    """Signed codes ``[BLOCK_N, HEAD_D]`` (int8) of 3-, 2- or 1-bit codes stored as :func:`kvcache.quant.pack_codes`:
    a 2-bit plane (the low bits) then a 1-bit plane, each present when ``BITS`` has that bit; index minus 2^(b-1)."""
    u = 0
    if BITS & 2:
        u = _plane(data_ptr, row, valid, 0, 2, HEAD_D, BLOCK_N)
    if BITS & 1:
        u = u | (_plane(data_ptr, row, valid, (BITS & 2) * HEAD_D // 8, 1, HEAD_D, BLOCK_N) << (BITS & 2))
    return (u - (1 << (BITS - 1))).to(tl.int8)


@triton.jit
def unpack_allocated(data_ptr, row, valid, lay_ptr, t_ptr, WIDTH: tl.constexpr, HEAD_D: tl.constexpr,
                     LEVELS: tl.constexpr):
    """The levels (fp32, ``[BLOCK_N, HEAD_D]``) of allocated codes (:func:`kvcache.quant.pack_widths`): channel ``c``
    of the head whose layout is at ``lay_ptr`` (``start_bit << 4 | width``) takes the ``width`` bits from
    ``start_bit`` of the token's ``WIDTH``-byte stream, at most two bytes, lowest first, and is
    ``t_ptr[width * LEVELS + code]`` (the N(0, 1) levels per width; width 0 reads level 0, which is 0)."""
    d = tl.arange(0, HEAD_D)
    lay = tl.load(lay_ptr + d)
    byte, shift, width = lay >> 7, (lay >> 4) & 7, lay & 15
    lo = tl.load(data_ptr + row[:, None] + byte[None, :], mask=valid[:, None], other=0).to(tl.int32)
    hi = tl.load(data_ptr + row[:, None] + byte[None, :] + 1, mask=valid[:, None] & (byte + 1 < WIDTH)[None, :],
                 other=0).to(tl.int32)
    code = ((lo | (hi << 8)) >> shift[None, :]) & ((1 << width) - 1)[None, :]
    return tl.load(t_ptr + width[None, :] * LEVELS + code)


@triton.jit
def levels(c, t_ptr, BITS: tl.constexpr):
    """The codebook levels (fp32) of signed codes ``c``: ``t_ptr[c + 2^(b-1)]`` (``t_ptr``: the head's table).
    Every index is in range, masked lanes included (they hold code 0 or the lowest code)."""
    return tl.load(t_ptr + (c.to(tl.int32) + (1 << (BITS - 1))))


@triton.jit
def read_side(
    data_ptr, s_ptr, z_ptr, t_ptr, lay_ptr, row, p_row, valid, lanes, lmask,
    HEAD_D: tl.constexpr, QUANT: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr, SYM: tl.constexpr,
    PART: tl.constexpr, LANES: tl.constexpr, BLOCK_N: tl.constexpr, DOT: tl.constexpr, GRID: tl.constexpr,
    ALLOC: tl.constexpr, WIDTH: tl.constexpr, LEVELS: tl.constexpr,
):
    """One side's tile at ``row`` (element offsets of each token's vector) as dot operands.

    Returns (a, b, scale, zp): the parts in ``DOT`` (b = 0 unless 4-bit), codes as they are (``GRID``: their
    levels from the head's table at ``t_ptr``; ``ALLOC``: per-channel widths, the head's layout at ``lay_ptr``)
    except in groups (dequantized here), and the per-token, per-head scale and zero point ``[BLOCK_N]`` the folded
    paths apply around the dots (0 where none).
    """
    b = 0.0
    if ALLOC:  # one bit stream per head: a part of head_dim lanes (a power of two), already levels
        a = unpack_allocated(data_ptr, row, valid, lay_ptr, t_ptr, WIDTH, HEAD_D, LEVELS)
    elif BITS < 4:  # bit planes: one part of head_dim lanes (a power of two, :func:`kvcache.kernels.common.unsupported`)
        a = unpack_planes(data_ptr, row, valid, BITS, HEAD_D, BLOCK_N)
    else:
        x = tl.load(data_ptr + row[:, None] + lanes[None, :], mask=valid[:, None] & lmask[None, :], other=0)
        a = x
    if BITS == 4:  # pack_int4: low nibble channel j, high nibble channel j + head_dim/2, both offset by 8
        a = (x & 15).to(tl.int8) - 8
        b = (x >> 4).to(tl.int8) - 8
    if GRID and not ALLOC:
        a = levels(a, t_ptr, BITS)
        if BITS == 4:
            b = levels(b, t_ptr, BITS)
    t_s = 0.0
    t_z = 0.0
    if QUANT == 2:
        if GROUP == HEAD_D:  # one group per head: folded around the dots
            t_s = tl.load(s_ptr + p_row, mask=valid, other=0.0).to(tl.float32)
            if not SYM:
                t_z = tl.load(z_ptr + p_row, mask=valid, other=0.0).to(tl.float32)
        else:
            a = _dequant_part(a, s_ptr, z_ptr, p_row, valid, 0, GROUP, SYM, PART, LANES, BLOCK_N)
            if BITS == 4:  # the high half's groups follow the low half's
                b = _dequant_part(b, s_ptr, z_ptr, p_row, valid, PART // GROUP, GROUP, SYM, PART, LANES, BLOCK_N)
    a = a.to(DOT)
    if BITS == 4:
        b = b.to(DOT)
    return a, b, t_s, t_z


@triton.jit
def part_scores(qa, qb, ka, kb, BITS: tl.constexpr, USE_DOT: tl.constexpr, FP32: tl.constexpr):
    """``q . k`` over the parts: ``[rows, BLOCK_N]`` (``USE_DOT`` False: one query row, multiply-and-sum)."""
    if USE_DOT:
        s = mma(qa, tl.trans(ka), FP32)
        if BITS == 4:
            s += mma(qb, tl.trans(kb), FP32)
    else:
        s = tl.sum(qa * ka.to(tl.float32), axis=1)
        if BITS == 4:
            s += tl.sum(qb * kb.to(tl.float32), axis=1)
        s = s[None, :]
    return s


@triton.jit
def weighted_sum(p, v, USE_DOT: tl.constexpr, FP32: tl.constexpr, BLOCK_N: tl.constexpr):
    """``p @ v`` for one part: ``[rows, LANES]`` (``USE_DOT`` False: one row)."""
    if USE_DOT:
        out = mma(p.to(v.dtype), v, FP32)
    else:
        out = tl.sum(tl.reshape(p, (BLOCK_N, 1)) * v.to(tl.float32), axis=0)[None, :]
    return out


@triton.jit
def sink_limit(sink_slot_ptr, bt_row, SINKS: tl.constexpr):
    """N when the row's first block has a sink slot, else 0 (positions below it come from the sink copies), and the slot."""
    slot = tl.load(sink_slot_ptr + tl.load(bt_row).to(tl.int64)).to(tl.int64)
    return (slot >= 0).to(tl.int32) * SINKS, tl.maximum(slot, 0)


@triton.jit
def sink_tile(k_sink_ptr, v_sink_ptr, base, stride_st, offs_s, smask, offs_d, dmask, v_lanes, v_lmask,
              V_PART: tl.constexpr, V_BITS: tl.constexpr, DOT: tl.constexpr):
    """The sink copies at positions ``offs_s`` (``base``: the slot's and head's offset): K ``[BLOCK_S, BLOCK_D]``
    and V in the V side's parts, in ``DOT``."""
    rows = base + offs_s * stride_st
    k = tl.load(k_sink_ptr + rows[:, None] + offs_d[None, :], mask=smask[:, None] & dmask[None, :], other=0.0)
    va, vb = load_parts(v_sink_ptr + rows, v_lanes, v_lmask, smask, V_PART, V_BITS)
    va = va.to(DOT)
    if V_BITS == 4:
        vb = vb.to(DOT)
    return k.to(DOT), va, vb


@triton.jit
def softmax_state(ROWS: tl.constexpr, V_LANES: tl.constexpr, V_BITS: tl.constexpr):
    """Online-softmax state of ``ROWS`` query rows: running max, denominator, sum of weights (for V's zero
    points), and an accumulator per V part (the second only for 4-bit V)."""
    m_i = tl.full([ROWS], float("-inf"), tl.float32)
    l_i = tl.zeros([ROWS], tl.float32)
    pz_i = tl.zeros([ROWS], tl.float32)
    acc_a = tl.zeros([ROWS, V_LANES], tl.float32)
    acc_b = 0.0
    if V_BITS == 4:
        acc_b = tl.zeros([ROWS, V_LANES], tl.float32)
    return m_i, l_i, pz_i, acc_a, acc_b


@triton.jit
def merge_tile(s, va, vb, m_i, l_i, acc_a, acc_b, V_BITS: tl.constexpr, USE_DOT: tl.constexpr, FP32: tl.constexpr,
               BLOCK_N: tl.constexpr):
    """One online-softmax step over a tile of attended values (scores ``s`` in base 2, -inf where not attended)."""
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing to attend to yet
    alpha = tl.exp2(m_i - m_use)
    p = tl.exp2(s - m_use[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc_a = acc_a * alpha[:, None] + weighted_sum(p, va, USE_DOT, FP32, BLOCK_N)
    if V_BITS == 4:
        acc_b = acc_b * alpha[:, None] + weighted_sum(p, vb, USE_DOT, FP32, BLOCK_N)
    return m_new, l_i, acc_a, acc_b
