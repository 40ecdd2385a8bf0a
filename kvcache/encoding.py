"""A codec's encode and decode in plain torch: the definition every store and attention kernel must match.

``encode`` turns vectors into codes and per-token parameters by the codec's *rule* (whose arithmetic picks the
scale and rounds: ours, ``kvq``, here; each engine's in :mod:`kvcache.engines`), ``decode`` reads them back as
``grid[code] * scale + zero point`` (times the per-tensor scale; divided by the decoded vector's norm with
norm correction). ``to_storage`` / ``from_storage`` convert codes to the stored bytes (8-bit signed integers as
int8, everything else as unsigned code indices, packed in bit planes below 8 bits) and back.

Codes are *code indices* ``u`` in ``0 .. 2^bits - 1``: for the ``int`` grid ``u = c + 2^(bits-1)`` where ``c`` is
the signed integer code, so a 4-bit nibble holds ``c + 8`` as :func:`kvcache.quant.pack_int4` always did.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .codebooks import FLOAT_MAX, PEAK_GRIDS, PEAK_LOWEST, float_codes, gauss_levels, gauss_values, grid_values
from .codec import Codec
from .quant import (SCALE_EPS, group_view, nearest_codes, pack_codes, pack_widths, peak_scale, quantize,
                    quantize_groups, round_up_to, token_qparams, unpack_codes, unpack_widths)


@dataclass
class SideParams:
    """What one layer holds once for K or V: static parameters, its codebook, its per-tensor scale."""

    static_scale: torch.Tensor | None = None  # [kv_heads, head_dim] fp32 (static codecs)
    static_zp: torch.Tensor | None = None
    grid: torch.Tensor | None = None  # [kv_heads, 2^bits] fp32 (codebook grids)
    tensor_scale: torch.Tensor | None = None  # [] fp32 (codecs with a per-tensor scale)
    param_dtype: torch.dtype = torch.float16  # what per-token parameters are stored in (the codec's, in this pool)
    widths: torch.Tensor | None = None  # [kv_heads, head_dim] int32: each channel's code width (allocated codecs)


@dataclass
class Encoded:
    codes: torch.Tensor  # [..., head_dim] int32 code indices
    scale: torch.Tensor | None  # [..., groups] in the codec's param dtype (per-token codecs)
    zp: torch.Tensor | None


Rule = Callable[[Codec, torch.Tensor, SideParams], Encoded]


def _offset(codec: Codec) -> int:
    return 1 << (codec.bits - 1) if codec.grid == "int" else 0


def _tensor_scaled(codec: Codec, x: torch.Tensor, side: SideParams) -> torch.Tensor:
    return x.float() / side.tensor_scale.float() if codec.tensor_scale else x.float()


def _table_extent(table: torch.Tensor) -> torch.Tensor:
    """Per KV head, the largest magnitude of its codebook: ``[kv_heads, 1, 1]``."""
    return table.float().abs().amax(dim=-1)[:, None, None]


def kvq_rule(codec: Codec, x: torch.Tensor, side: SideParams) -> Encoded:
    """Ours. Integer grids: :func:`kvcache.quant.token_qparams` (asymmetric ``zp = (min+max)/2`` with the scale
    rounded up so the range fits, or llama.cpp's q4_0-style signed peak) or static parameters; codes
    round-half-even. Codebooks: per group, the largest magnitude maps to the codebook's (scale rounded up; for
    the peak grids the peak itself, signed, onto level 0), nearest entry (ties to the even index). ``x`` is ``[tokens, kv_heads, head_dim]``."""
    x = _tensor_scaled(codec, x, side)
    if codec.allocated:
        return _allocated(x, side)
    if codec.grid == "int":
        if codec.scaling == "static":
            c = quantize(x, side.static_scale, side.static_zp, codec.bits)
            return Encoded(c.to(torch.int32) + _offset(codec), None, None)
        scale, zp = token_qparams(x, codec.bits, codec.group_size, codec.symmetric, side.param_dtype)
        c = quantize_groups(x, scale, zp, codec.bits, codec.group_size)
        return Encoded(c.to(torch.int32) + _offset(codec), scale, zp)
    if codec.scaling == "none":  # a float format as it is
        return Encoded(float_codes(x, codec.grid), None, None)
    if not codec.symmetric:
        raise ValueError(f"{codec.label()}: the kvq rule reads codebooks with a scale only (symmetric)")
    groups = group_view(x, codec.group_size)  # [tokens, kv_heads, groups, g]
    if codec.grid in PEAK_GRIDS:  # the peak onto level 0 (-1), signed
        scale = peak_scale(groups, PEAK_LOWEST, side.param_dtype)
    else:
        extent = _table_extent(side.grid)  # [kv_heads, 1, 1]
        scale = round_up_to((groups.abs().amax(dim=-1) / extent[..., 0]).clamp_min(SCALE_EPS), side.param_dtype)
    unit = groups / scale.float()[..., None]
    if codec.grid in FLOAT_MAX:
        u = float_codes(unit, codec.grid)
    else:
        u = nearest_codes(unit.transpose(0, 1), side.grid, ties="even").transpose(0, 1).to(torch.int32)
    return Encoded(u.reshape(x.shape), scale, None)


def _allocated(x: torch.Tensor, side: SideParams) -> Encoded:
    """Allocated codes: the scale is the RMS of the coded channels (rounded up to the param dtype), each channel the
    nearest of the N(0, 1) Lloyd-Max levels of its own width (ties to the even index); a 0-bit channel decodes to 0."""
    widths = side.widths.to(x.device)
    coded = (widths > 0).float()
    rms = ((x * x * coded).sum(-1) / coded.sum(-1).clamp_min(1)).sqrt()  # [tokens, kv_heads]
    scale = round_up_to(rms.clamp_min(SCALE_EPS), side.param_dtype)[..., None]
    unit = x / scale.float()
    levels = (gauss_levels() if side.grid is None else side.grid).to(x.device)
    u = torch.zeros(x.shape, dtype=torch.int32, device=x.device)
    for b in widths.unique().tolist():
        if b:
            u = torch.where(widths == b, nearest_codes(unit, levels[b, : 1 << b], ties="even").to(torch.int32), u)
    return Encoded(u, scale, None)


def norm_rule(codec: Codec, x: torch.Tensor, side: SideParams) -> Encoded:
    """TurboQuant's MSE codes: per group, the L2 norm (stored in the param dtype) and the nearest codebook entry
    of every coordinate of the unit vector (the codebook is for unit vectors of the group's dimension)."""
    groups = group_view(x.float(), codec.group_size)
    norm = groups.norm(dim=-1)
    unit = groups / norm.clamp_min(SCALE_EPS)[..., None]
    u = nearest_codes(unit.transpose(0, 1), side.grid, ties="down").transpose(0, 1).to(torch.int32)
    return Encoded(u.reshape(x.shape), norm.to(side.param_dtype), None)


def _rules() -> dict[str, Rule]:
    from .engines import RULES

    return {"kvq": kvq_rule, "norm": norm_rule, **RULES}


def encode(codec: Codec, x: torch.Tensor, side: SideParams) -> Encoded:
    """Codes and per-token parameters of ``x`` (``[tokens, kv_heads, head_dim]``) by the codec's rule."""
    rules = _rules()
    if codec.rule not in rules:
        raise ValueError(f"{codec.label()}: unknown encoder rule {codec.rule!r} (known: {', '.join(rules)})")
    return rules[codec.rule](codec, x, side)


def decode(codec: Codec, codes: torch.Tensor, scale: torch.Tensor | None, zp: torch.Tensor | None, side: SideParams,
           dtype: torch.dtype = torch.float32, head_axis: int = 1) -> torch.Tensor:
    """``grid[code] * scale + zp`` (per group, or static per channel) times the per-tensor scale, in fp32, as ``dtype``.

    ``codes`` is ``[..., head_dim]`` with the KV head at ``head_axis``; ``scale``/``zp`` (per-token codecs) are
    ``[..., groups]``; static parameters ``[kv_heads, head_dim]`` broadcast over the other dims.
    """
    if codec.residual_sign:  # grid[low bits] plus or minus the residual magnitude (zp), all times the norm (scale)
        top = codec.bits - 1
        base = grid_values(codes & ((1 << top) - 1), codec.grid, top, side.grid, head_axis)
        sign = (codes >> top).float() * 2 - 1
        groups = group_view(base, codec.group_size) + group_view(sign, codec.group_size) * zp.float()[..., None]
        x = (groups * scale.float()[..., None]).reshape(base.shape)
        return (x * side.tensor_scale.float() if codec.tensor_scale else x).to(dtype)
    if codec.allocated:
        x = gauss_values(codes, side.widths.to(codes.device), head_axis, side.grid)
    else:
        x = grid_values(codes, codec.grid, codec.bits, side.grid, head_axis)
    if codec.scaling == "static":
        shape = [1] * x.dim()
        shape[head_axis], shape[-1] = x.shape[head_axis], x.shape[-1]
        x = x * side.static_scale.float().reshape(shape) + side.static_zp.float().reshape(shape)
    elif codec.scaling == "token":
        groups = group_view(x, codec.group_size)
        if codec.param_dtype == "ue8m0":  # a biased exponent byte
            scale = torch.exp2(scale.float() - 127)
        if codec.norm_correction:
            groups = groups / groups.norm(dim=-1, keepdim=True).clamp_min(SCALE_EPS)
        groups = groups * scale.float()[..., None]
        if zp is not None:
            groups = groups + zp.float()[..., None]
        x = groups.reshape(x.shape)
    if codec.tensor_scale:
        x = x * side.tensor_scale.float()
    return x.to(dtype)


def to_storage(codec: Codec, codes: torch.Tensor, widths: torch.Tensor | None = None) -> torch.Tensor:
    """Code indices as stored: int8 signed codes for the 8-bit int grid, else uint8 (packed below 8 bits; allocated
    codes, ``[..., kv_heads, head_dim]``, in one bit stream per head of their ``widths``)."""
    if codec.allocated:
        return pack_widths(codes, widths.to(codes.device))
    if codec.bits == 8 and codec.grid == "int":
        return (codes - 128).to(torch.int8)
    return pack_codes(codes, codec.bits)


def from_storage(codec: Codec, stored: torch.Tensor, head_dim: int, widths: torch.Tensor | None = None,
                 head_axis: int = -2) -> torch.Tensor:
    """The inverse of :func:`to_storage`: int32 code indices ``[..., head_dim]`` (allocated codes: the KV head at
    ``head_axis``)."""
    if codec.allocated:
        return unpack_widths(stored.movedim(head_axis, -2), widths.to(stored.device)).movedim(-2, head_axis)
    if codec.bits == 8 and codec.grid == "int":
        return stored.to(torch.int32) + 128
    return unpack_codes(stored, codec.bits, head_dim)
