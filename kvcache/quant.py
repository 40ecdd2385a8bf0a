"""Quantization math for the KV cache: pure torch functions, no state.

Asymmetric follows LMDeploy's recipe: ``zp = (min+max)/2``, ``scale = (max-min)/(2^bits-1)``,
``q = clamp(round((x-zp)/scale))``, ``x ~ q*scale + zp``. Symmetric uses
``scale = absmax/(2^(bits-1)-1)`` and ``zp = 0``. Inside the calibrated range the
round trip error is at most ``scale/2`` (the clamp at the top edge moves a value by half a
step, never more).
"""

from __future__ import annotations

import torch

# A floor for scales: a channel whose range is zero would otherwise divide by zero.
SCALE_EPS = 1e-8


def qrange(bits: int) -> tuple[int, int]:
    """Signed integer range of a ``bits``-bit code, e.g. (-128, 127) for 8 bits."""
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be between 2 and 8, got {bits}")
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def asym_qparams(
    x_min: torch.Tensor, x_max: torch.Tensor, bits: int = 8
) -> tuple[torch.Tensor, torch.Tensor]:
    """LMDeploy's asymmetric parameters from observed ranges (fp32, so they add no error)."""
    x_min, x_max = x_min.float(), x_max.float()
    scale = ((x_max - x_min) / ((1 << bits) - 1)).clamp_min(SCALE_EPS)
    zp = (x_min + x_max) / 2
    return scale, zp


def sym_qparams(absmax: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric parameters from the observed absolute maximum; the zero point is 0."""
    scale = (absmax.float() / qrange(bits)[1]).clamp_min(SCALE_EPS)
    return scale, torch.zeros_like(scale)


def quantize(x: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """Codes of ``x`` as int8 (any bits <= 8 fit); ``scale``/``zp`` broadcast against ``x``."""
    lo, hi = qrange(bits)
    q = torch.round((x.float() - zp.float()) / scale.float())
    return q.clamp_(lo, hi).to(torch.int8)


def dequantize(
    q: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``q*scale + zp`` computed in fp32, returned in ``dtype``."""
    return (q.float() * scale.float() + zp.float()).to(dtype)


def dynamic_qparams(
    x: torch.Tensor, bits: int = 8, param_dtype: torch.dtype = torch.float16
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-vector asymmetric parameters over the last dim (per token, per head), stored in ``param_dtype``.

    The parameters are rounded to their storage dtype *before* quantizing, and the scale is
    widened so that ``[min, max]`` still fits around the rounded zero point: the stored
    parameters are exactly the ones used, so they add no error of their own.
    """
    x = x.float()
    x_min, x_max = x.amin(dim=-1), x.amax(dim=-1)
    zp = ((x_min + x_max) / 2).to(param_dtype).float()
    half_steps = ((1 << bits) - 1) / 2  # 127.5 for 8 bits: the clamp costs at most half a step
    scale = torch.maximum(x_max - zp, zp - x_min) / half_steps
    scale = _round_up(scale.clamp_min(SCALE_EPS), param_dtype)
    return scale, zp.to(param_dtype)


def _round_up(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Round fp32 values to ``dtype``, never downwards, so a range never shrinks."""
    r = x.to(dtype)
    low = r.float() < x
    if low.any():
        r = torch.where(low, torch.nextafter(r, torch.full_like(r, float("inf"))), r)
    return r


def granularity_shape(granularity: str, num_kv_heads: int, head_dim: int) -> tuple[int, int]:
    """Shape of one layer's static parameter tensor for a granularity name."""
    shapes = {"tensor": (1, 1), "head": (num_kv_heads, 1), "channel": (num_kv_heads, head_dim)}
    if granularity not in shapes:
        raise ValueError(f"unknown granularity {granularity!r}; use one of {', '.join(shapes)}")
    return shapes[granularity]


def reduce_to_granularity(
    stat: torch.Tensor, granularity: str, reduce: str
) -> torch.Tensor:
    """Collapse a (num_kv_heads, head_dim) statistic to a coarser granularity with ``min``/``max``."""
    fn = {"min": torch.amin, "max": torch.amax}[reduce]
    if granularity == "channel":
        return stat.clone()
    if granularity == "head":
        return fn(stat, dim=-1, keepdim=True)
    if granularity == "tensor":
        return fn(stat.reshape(1, -1), dim=-1, keepdim=True)
    granularity_shape(granularity, 1, 1)  # raises the readable error
    raise AssertionError


# --- per-token codes in groups, and 4-bit packing (the sub-8-bit modes) ---------------------------------


def group_view(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """``[..., D]`` as ``[..., D // group_size, group_size]`` (0 or D: one group per vector)."""
    d = x.shape[-1]
    g = group_size or d
    if d % g:
        raise ValueError(f"group size {g} does not divide head_dim {d}")
    return x.reshape(*x.shape[:-1], d // g, g)


def sym_token_qparams(x: torch.Tensor, bits: int = 4, param_dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """llama.cpp's q4_0-style symmetric scale over the last dim: the value of largest magnitude maps to ``-2^(b-1)``.

    The scale is signed (it carries that value's sign) and rounded to ``param_dtype`` with its magnitude never
    shrinking, so every value stays within ``[-2^(b-1), 2^(b-1)]`` steps; codes clamp at ``2^(b-1) - 1``.
    """
    return peak_scale(x, qrange(bits)[0], param_dtype)


def peak_scale(x: torch.Tensor, lowest: float, param_dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """The signed scale that maps the value of largest magnitude over the last dim onto the grid's ``lowest`` level
    (negative), its magnitude rounded up to ``param_dtype`` so no value lands beyond that level."""
    x = x.float()
    peak = x.gather(-1, x.abs().argmax(dim=-1, keepdim=True))[..., 0]
    scale = peak / lowest
    magnitude = _round_up(scale.abs().clamp_min(SCALE_EPS), param_dtype)
    return torch.where(scale < 0, -magnitude.float(), magnitude.float()).to(param_dtype)


def token_qparams(
    x: torch.Tensor, bits: int, group_size: int = 0, symmetric: bool = False, param_dtype: torch.dtype = torch.float16
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token parameters of ``x`` (``[..., D]``) per group of ``group_size`` channels: ``[..., D // G]`` each.

    Asymmetric: :func:`dynamic_qparams` per group (scale and zero point). Symmetric: :func:`sym_token_qparams`,
    and no zero point (None).
    """
    groups = group_view(x, group_size)
    if symmetric:
        return sym_token_qparams(groups, bits, param_dtype), None
    return dynamic_qparams(groups, bits, param_dtype)


def quantize_groups(x: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor | None, bits: int,
                    group_size: int = 0) -> torch.Tensor:
    """int8 codes of ``x`` (``[..., D]``) with per-group ``scale``/``zp`` (``[..., D // G]``)."""
    groups = group_view(x, group_size)
    zero = torch.zeros_like(scale) if zp is None else zp
    return quantize(groups, scale[..., None], zero[..., None], bits).reshape(x.shape)


def dequantize_groups(codes: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor | None, group_size: int = 0,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``codes * scale + zp`` per group, in fp32, returned in ``dtype``."""
    groups = group_view(codes, group_size)
    zero = torch.zeros_like(scale) if zp is None else zp
    return dequantize(groups, scale[..., None], zero[..., None], dtype).reshape(codes.shape)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Two 4-bit codes per byte: byte ``j`` of a vector holds channel ``j`` in its low nibble and channel
    ``j + D/2`` in its high nibble, each offset by 8 (codes -8..7 -> 0..15). ``[..., D]`` int8 -> ``[..., D/2]`` uint8.

    Splitting the vector in halves (not interleaving neighbours) lets a kernel unpack a tile into two
    half-width tiles with two shifts and dot each against the matching half of the query.
    """
    d = codes.shape[-1]
    if d % 2:
        raise ValueError(f"4-bit codes pack in pairs: head_dim {d} is odd")
    u = (codes.to(torch.int16) + 8).to(torch.uint8)
    return u[..., : d // 2] | (u[..., d // 2:] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`pack_int4`: ``[..., D/2]`` uint8 -> ``[..., D]`` int8 codes in -8..7."""
    lo = (packed & 15).to(torch.int8) - 8
    hi = (packed >> 4).to(torch.int8) - 8
    return torch.cat([lo, hi], dim=-1)


# --- codes of any width: bit planes, and codebooks -------------------------------------------------------


def code_planes(bits: int) -> tuple[int, ...]:
    """Widths of the bit planes a ``bits``-bit code is stored in, lowest bits first (5 = 4 + 1, 3 = 2 + 1)."""
    if not 1 <= bits <= 8:
        raise ValueError(f"codes are 1 to 8 bits, got {bits}")
    return (8,) if bits == 8 else tuple(w for w in (4, 2, 1) if bits & w)


def pack_codes(u: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes ``u`` (``[..., D]``, values ``0 .. 2^bits - 1``) as ``[..., D * bits / 8]`` uint8 bit planes.

    Plane by plane (lowest bits first, :func:`code_planes`): a plane of width ``w`` holds those ``w`` bits of
    every channel in ``D * w / 8`` bytes, byte ``j`` holding channel ``j + k * D * w / 8`` at bit ``k * w``
    (``k = 0 .. 8/w - 1``). A plane thus splits the vector into ``8 / w`` contiguous parts, one per bit
    position, so a kernel unpacks a tile with one shift and mask per part; for 4-bit codes this is
    :func:`pack_int4`'s layout (channel ``j`` low nibble, ``j + D/2`` high nibble).
    """
    d = u.shape[-1]
    if bits == 8:
        return u.to(torch.uint8)
    if d % 8:
        raise ValueError(f"{bits}-bit codes pack in bytes: head_dim {d} is not a multiple of 8")
    u = u.to(torch.int32)
    out, lo = [], 0
    for w in code_planes(bits):
        per, width = 8 // w, d * w // 8
        field = (u >> lo) & ((1 << w) - 1)
        byte = torch.zeros((*u.shape[:-1], width), dtype=torch.int32, device=u.device)
        for k in range(per):
            byte |= field[..., k * width:(k + 1) * width] << (k * w)
        out.append(byte.to(torch.uint8))
        lo += w
    return torch.cat(out, dim=-1)


def unpack_codes(packed: torch.Tensor, bits: int, head_dim: int) -> torch.Tensor:
    """The inverse of :func:`pack_codes`: ``[..., head_dim * bits / 8]`` uint8 -> ``[..., head_dim]`` int32 codes."""
    if bits == 8:
        return packed.to(torch.int32)
    p = packed.to(torch.int32)
    u, lo, at = 0, 0, 0
    for w in code_planes(bits):
        per, width = 8 // w, head_dim * w // 8
        plane = p[..., at:at + width]
        field = torch.cat([(plane >> (k * w)) & ((1 << w) - 1) for k in range(per)], dim=-1)
        u = u + (field << lo)
        lo, at = lo + w, at + width
    return u


def nearest_codes(x: torch.Tensor, table: torch.Tensor, ties: str = "even") -> torch.Tensor:
    """Index of the nearest entry of an ascending ``table`` for every value of ``x`` (int64).

    ``table`` is ``[M]`` or ``[H, M]`` with ``x`` ``[H, ...]`` (one table per leading index). A value exactly
    halfway between two entries goes to the ``even`` index (round-half-even for floating-point formats),
    the ``up``per or the ``down``/lower one, as the scheme being reproduced does.
    """
    t = table.float()
    x = x.float()
    mids = (t[..., 1:] + t[..., :-1]) / 2
    flat = x.reshape(x.shape[0], -1) if t.dim() == 2 else x.reshape(1, -1)
    m = mids if t.dim() == 2 else mids[None]
    lower = torch.searchsorted(m.contiguous(), flat.contiguous(), right=False)  # ties counted down
    if ties != "down":
        upper = torch.searchsorted(m.contiguous(), flat.contiguous(), right=True)  # ties counted up
        tie = upper != lower
        pick = upper if ties == "up" else torch.where(lower % 2 == 0, lower, upper)
        lower = torch.where(tie, pick, lower)
    return lower.reshape(x.shape)


def round_up_to(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Non-negative fp32 ``x`` rounded to ``dtype``, never downwards (16-bit floats and fp32)."""
    if dtype == torch.float32:
        return x.float()
    return _round_up(x, dtype)


# --- codes of a width per channel: bit allocation -------------------------------------------------------


def allocate_bits(weight: torch.Tensor, total: int, distortion: torch.Tensor) -> torch.Tensor:
    """Bits per channel (``[..., D]`` int32, summing to ``total`` over the last dim) minimising ``sum w_i D(b_i)``.

    ``weight`` (``[..., D]``, >= 0) is what a unit of squared error costs in each channel; ``distortion``
    (``[max_bits + 1]``, decreasing, ``D(0) = 1``) is the squared error of a unit-variance channel coded in
    ``b`` bits. Greedy by marginal return, one bit at a time, which is optimal because ``D`` is convex in ``b``
    (reverse water-filling on integers); ties go to the lower channel index.
    """
    top = distortion.numel() - 1
    if not 0 <= total <= top * weight.shape[-1]:
        raise ValueError(f"{total} bits over {weight.shape[-1]} channels of at most {top} bits each")
    w = weight.double().clamp_min(0)
    drop = torch.cat([distortion[:-1] - distortion[1:], distortion.new_full((1,), -1.0)]).double()
    bits = torch.zeros(w.shape, dtype=torch.long)
    for _ in range(total):
        gain = torch.where(bits < top, w * drop[bits], torch.full_like(w, -1.0))
        bits.scatter_add_(-1, gain.argmax(-1, keepdim=True), torch.ones_like(bits[..., :1]))
    return bits.to(torch.int32)


def _bit_fields(widths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For a stream of codes of ``widths`` (``[H, D]``, every row summing to the same ``T``): the channel and the bit
    of that channel's code that each stream bit holds (``[H, T]`` each)."""
    w = widths.long()
    end = torch.cumsum(w, -1)  # channel i holds stream bits end[i] - w[i] .. end[i] - 1
    at = torch.arange(int(end[0, -1]), device=w.device).expand(w.shape[0], -1).contiguous()
    channel = torch.searchsorted(end, at, right=True)  # the first channel whose code ends after the bit
    bit = at - torch.gather(end - w, 1, channel)
    return channel, bit.to(torch.int32)


def width_layout(widths: torch.Tensor) -> torch.Tensor:
    """Each channel's place in its head's bit stream (:func:`pack_widths`) as the kernels read it: ``[H, D]`` int32
    ``start_bit << 4 | width``."""
    w = widths.long()
    return (((torch.cumsum(w, -1) - w) << 4) | w).to(torch.int32)


def pack_widths(u: torch.Tensor, widths: torch.Tensor) -> torch.Tensor:
    """Codes ``u`` (``[..., H, D]``) of per-channel ``widths`` (``[H, D]``, 0-8 bits, each row summing to ``T``, a
    multiple of 8) as ``[..., H, T / 8]`` uint8: one little-endian bit stream per head, channel after channel,
    each code lowest bit first (channel ``i`` starts at bit ``sum(widths[:i])``; a 0-bit channel takes none)."""
    total = int(widths[0].sum())
    if total % 8 or bool((widths.sum(-1) != total).any()):
        raise ValueError(f"per-channel widths must sum to the same multiple of 8 bits in every head, got {widths.sum(-1).tolist()}")
    channel, bit = _bit_fields(widths)
    index = channel.expand(*u.shape[:-1], -1)
    stream = (torch.gather(u.to(torch.int32), -1, index) >> bit) & 1  # [..., H, T]
    stream = stream.reshape(*stream.shape[:-1], total // 8, 8) << torch.arange(8, device=u.device, dtype=torch.int32)
    return stream.sum(-1).to(torch.uint8)


def unpack_widths(packed: torch.Tensor, widths: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`pack_widths`: ``[..., H, T / 8]`` uint8 -> ``[..., H, D]`` int32 codes (0 where 0 bits)."""
    channel, bit = _bit_fields(widths)
    p = packed.to(torch.int32)
    stream = (p[..., :, None] >> torch.arange(8, device=p.device, dtype=torch.int32)) & 1
    stream = stream.reshape(*p.shape[:-1], -1) << bit
    out = torch.zeros((*p.shape[:-1], widths.shape[-1]), dtype=torch.int32, device=p.device)
    return out.scatter_add_(-1, channel.expand_as(stream), stream)
