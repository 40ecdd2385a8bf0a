"""Codebooks: what each code of a grid stands for before scaling (pure torch, no state but caches).

- ``int`` / ``uint``: the uniform integer grids (``u - 2^(b-1)`` and ``u``); no table is stored.
- ``e4m3`` / ``e5m2``: the fp8 formats (OCP FP8: e4m3 "fn", finite only, max 448; e5m2 IEEE-like, max 57344),
  code = the 8-bit pattern; ``e2m1``: fp4 (OCP MX), sign bit 3, magnitudes 0, .5, 1, 1.5, 2, 3, 4, 6.
- ``iq4nl``: llama.cpp's non-linear 4-bit table (``kvalues_iq4nl`` in ggml-common.h), int8 levels times a scale.
- ``lloyd-max``: the MSE-optimal scalar quantizer of one coordinate of a unit vector rotated at random in
  ``d`` dimensions, which is close to N(0, 1/d) for d >= 64 (TurboQuant; vLLM solves the same conditions
  in turboquant/centroids.py); sorted ascending.
- ``lloyd-max-peak``: ours, the MSE-optimal levels for the coordinates of a group of ``g`` rotated channels
  divided by the group's peak with its sign flipped (so the peak itself is level 0, ``-1``, stored exactly, as
  llama.cpp's q4_0 stores its peak as ``-8``): :func:`lloyd_max_peak`;
- ``signmag``: 4-bit sign-and-magnitude codes (``magnitude index | sign << 3``) over the positive 4-bit Gaussian
  Lloyd-Max centroids scaled to a largest level of 1 (vLLM's int4_per_token_head has such a codebook; its exact
  levels were not in the sources we read: an approximation);
- ``table``: calibrated per layer, KV head and side, carried by the parameters file.

Encoding to a float format saturates to its largest finite value and rounds to nearest, ties to even, as
the engines' fp8 casts do (``__NV_SATFINITE``); :func:`float_codes` returns the bit patterns.
"""

from __future__ import annotations

import functools
import math

import torch

from .quant import nearest_codes

IQ4NL_LEVELS = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
FLOAT_MAX = {"e4m3": 448.0, "e5m2": 57344.0, "e2m1": 6.0}
_TORCH_FP8 = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
PEAK_GRIDS = ("lloyd-max-peak",)  # level 0 is -1 and a group's peak is scaled onto it (a signed scale)
PEAK_LOWEST = -1.0  # every peak grid's level 0, exactly: the kernels divide the peak by it for the scale


@functools.lru_cache(maxsize=None)
def float_grid(name: str) -> torch.Tensor:
    """Value of every bit pattern of a float format (fp32, indexed by code); the NaN patterns read as the max."""
    if name == "e2m1":
        mags = torch.tensor(E2M1_MAGNITUDES)
        return torch.cat([mags, -mags])
    values = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(_TORCH_FP8[name]).float()
    top = FLOAT_MAX[name]
    values = torch.where(torch.isnan(values), torch.copysign(torch.full_like(values, top), values), values)
    return torch.where(torch.isinf(values), torch.copysign(torch.full_like(values, top), values), values)


def float_codes(x: torch.Tensor, name: str) -> torch.Tensor:
    """Bit patterns (int32) of ``x`` in a float format: saturated to the largest finite value, round-half-even."""
    top = FLOAT_MAX[name]
    x = x.float().clamp(-top, top)
    if name in _TORCH_FP8:
        return x.to(_TORCH_FP8[name]).view(torch.uint8).to(torch.int32)
    mags = torch.tensor(E2M1_MAGNITUDES, device=x.device)
    u = nearest_codes(x.abs(), mags, ties="even").to(torch.int32)
    return torch.where(torch.signbit(x) & (u > 0), u | 8, u)  # -0 is stored as +0


def _normal_cdf(z: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1 + torch.erf(z / math.sqrt(2)))


@functools.lru_cache(maxsize=64)
def lloyd_max(bits: int, dim: int, iterations: int = 500) -> torch.Tensor:
    """The ``2^bits`` Lloyd-Max centroids of N(0, 1/dim), ascending (fp32), solved in float64 with exact moments.

    Lloyd's conditions: every boundary halfway between neighbouring centroids, every centroid the mean of its
    cell. For a Gaussian the cell means are closed-form (``sigma^2 (pdf(a) - pdf(b)) / (cdf(b) - cdf(a))``).
    """
    n = 1 << bits
    sigma = 1.0 / math.sqrt(dim)
    c = torch.linspace(-2.5, 2.5, n, dtype=torch.float64) if n > 1 else torch.zeros(1, dtype=torch.float64)
    for _ in range(iterations):
        edges = torch.cat([torch.tensor([-math.inf], dtype=torch.float64), (c[1:] + c[:-1]) / 2,
                           torch.tensor([math.inf], dtype=torch.float64)])
        pdf = torch.exp(-edges ** 2 / 2) / math.sqrt(2 * math.pi)
        mass = _normal_cdf(edges[1:]) - _normal_cdf(edges[:-1])
        new = (pdf[:-1] - pdf[1:]) / mass.clamp_min(1e-300)
        if torch.max(torch.abs(new - c)) < 1e-13:
            c = new
            break
        c = new
    return (c * sigma).float()


GAUSS_MAX_BITS = 8  # the widest code a channel of the ``gauss`` grid gets


@functools.lru_cache(maxsize=1)
def gauss_levels() -> torch.Tensor:
    """The ``gauss`` grid: Lloyd-Max levels of N(0, 1) for every width, ``[GAUSS_MAX_BITS + 1, 2^GAUSS_MAX_BITS]`` fp32;
    row ``b`` holds the ``2^b`` levels of a ``b``-bit code (row 0: the 0-bit code, 0), zero-padded."""
    out = torch.zeros(GAUSS_MAX_BITS + 1, 1 << GAUSS_MAX_BITS)
    for b in range(1, GAUSS_MAX_BITS + 1):
        out[b, : 1 << b] = lloyd_max(b, 1)
    return out


@functools.lru_cache(maxsize=1)
def gauss_distortion() -> torch.Tensor:
    """Squared error of N(0, 1) on each width's :func:`gauss_levels` (``[GAUSS_MAX_BITS + 1]`` float64; 1 at 0 bits):
    ``1 - sum_j P(cell j) c_j^2``, exact for Lloyd-Max centroids (each the mean of its cell)."""
    out = [1.0]
    for b in range(1, GAUSS_MAX_BITS + 1):
        c = lloyd_max(b, 1).double()
        edges = torch.cat([c.new_tensor([-math.inf]), (c[1:] + c[:-1]) / 2, c.new_tensor([math.inf])])
        mass = _normal_cdf(edges[1:]) - _normal_cdf(edges[:-1])
        out.append(float(1 - (mass * c * c).sum()))
    return torch.tensor(out, dtype=torch.float64)


def gauss_values(u: torch.Tensor, widths: torch.Tensor, head_axis: int = 1, levels: torch.Tensor | None = None,
                 ) -> torch.Tensor:
    """What ``gauss`` codes ``u`` (``[..., D]``, KV head at ``head_axis``) stand for, given each head's per-channel
    ``widths`` (``[H, D]``): ``levels[width, code]`` (``levels``: :func:`gauss_levels`)."""
    levels = (gauss_levels() if levels is None else levels).to(u.device)
    shape = [1] * u.dim()
    shape[head_axis], shape[-1] = widths.shape
    w = widths.long().reshape(shape).expand(u.shape)
    return levels[w, u.long()]


@functools.lru_cache(maxsize=64)
def lloyd_max_peak(bits: int, group: int, iterations: int = 1000) -> torch.Tensor:
    """``2^bits`` levels, ascending, the first exactly ``-1``: Lloyd-Max for ``y = -x_i / p`` where ``x`` is a group of
    ``group`` iid Gaussians (what a Hadamard rotation makes of a token's channels) and ``p`` its value of largest
    magnitude. The peak is always ``-1`` (held by level 0); the other ``group - 1`` coordinates, given
    ``m = |p|``, are Gaussians truncated to ``(-m, m)`` over ``m``. Their density's cell masses and means are
    integrals over ``m`` of closed forms (``Phi``, ``phi``), summed on a fine grid in float64.

    Against the uniform grid with the peak at ``-2^(b-1)`` (``int`` sym) it cuts the squared error of such
    groups by 8% at 4 bits in groups of 16 and 10% at 3 bits in groups of 32.
    """
    n, g = 1 << bits, group
    m = torch.linspace(1e-4, 9.0, 4001, dtype=torch.float64)  # the peak's magnitude; P(m > 9) is ~1e-18 per value

    def pdf(t: torch.Tensor) -> torch.Tensor:
        return torch.exp(-t * t / 2) / math.sqrt(2 * math.pi)

    inside = 2 * _normal_cdf(m) - 1
    weight = g * 2 * pdf(m) * inside ** (g - 2) * (g - 1) / g  # density of m, over P(|x| < m), times the share
    weight = weight * (m[1] - m[0])
    weight[0] /= 2
    weight[-1] /= 2
    c = torch.linspace(-1, 1 - 2 / n, n, dtype=torch.float64)
    for _ in range(iterations):
        edges = torch.cat([c.new_tensor([-1.0]), (c[1:] + c[:-1]) / 2, c.new_tensor([1.0])])
        a, b = edges[:-1, None] * m, edges[1:, None] * m
        mass = ((_normal_cdf(b) - _normal_cdf(a)) * weight).sum(-1)
        mean = ((pdf(a) - pdf(b)) / m * weight).sum(-1) / mass.clamp_min(1e-300)
        mean[0] = -1.0
        if torch.max(torch.abs(mean - c)) < 1e-10:
            c = mean
            break
        c = mean
    return c.float()


@functools.lru_cache(maxsize=64)
def lloyd_max_vllm(bits: int, dim: int) -> torch.Tensor:
    """vLLM TurboQuant's centroids (turboquant/centroids.py ``solve_lloyd_max``): the same conditions as
    :func:`lloyd_max`, solved numerically its way, which lands up to ~1e-3 relative from the exact optimum.

    sigma = 1/sqrt(dim); start at ``-3.5 sigma + 7 sigma (i + 0.5) / 2^bits``; up to 200 rounds of: boundaries
    halfway, outer edges at +-10.5 sigma, each centroid the ratio of trapezoid-rule integrals (200 equal steps) of
    ``x pdf`` and ``pdf`` over its cell; stop, keeping the previous centroids, once no centroid moves by 1e-10.
    """
    n = 1 << bits
    s2 = 1.0 / dim
    sigma = math.sqrt(s2)
    lo, hi = -3.5 * sigma, 3.5 * sigma
    steps = 200

    def integrals(a: float, b: float) -> tuple[float, float]:
        h = (b - a) / steps
        xs = torch.linspace(a, b, steps + 1, dtype=torch.float64)
        pdf = torch.exp(-xs * xs / (2 * s2)) / math.sqrt(2 * math.pi * s2)
        w = torch.ones(steps + 1, dtype=torch.float64)
        w[0] = w[-1] = 0.5
        return float((w * xs * pdf).sum() * h), float((w * pdf).sum() * h)

    c = [lo + (hi - lo) * (i + 0.5) / n for i in range(n)]
    for _ in range(200):
        edges = [lo * 3] + [(c[i] + c[i + 1]) / 2 for i in range(n - 1)] + [hi * 3]
        new = []
        for i in range(n):
            num, den = integrals(edges[i], edges[i + 1])
            new.append(num / den if den > 1e-15 else c[i])
        if max(abs(a - b) for a, b in zip(new, c)) < 1e-10:
            break
        c = new
    return torch.tensor(c, dtype=torch.float32)


def fixed_grid(name: str, bits: int, head_dim: int, group_size: int = 0) -> torch.Tensor | None:
    """The table of a fixed codebook (fp32 ``[2^bits]``), or None for the integer grids and calibrated tables.

    ``lloyd-max`` centroids are for unit vectors of the group's dimension (the whole head by default),
    ``lloyd-max-peak`` levels for groups of that many channels.
    """
    if name in ("int", "uint", "table"):
        return None
    if name in FLOAT_MAX:
        return float_grid(name)
    if name == "iq4nl":
        return torch.tensor(IQ4NL_LEVELS, dtype=torch.float32)
    if name == "lloyd-max":
        return lloyd_max(bits, group_size or head_dim)
    if name == "lloyd-max-vllm":
        return lloyd_max_vllm(bits, group_size or head_dim)
    if name == "lloyd-max-peak":
        return lloyd_max_peak(bits, group_size or head_dim)
    if name == "signmag":
        mags = lloyd_max(4, 1)[8:]
        mags = mags / mags[-1]
        return torch.cat([mags, -mags])
    raise ValueError(f"unknown grid {name!r}")


def grid_values(u: torch.Tensor, name: str, bits: int, table: torch.Tensor | None, head_axis: int = 1) -> torch.Tensor:
    """What codes ``u`` (int) stand for, in fp32: the integer grid, or ``table[u]``.

    ``table`` is ``[2^bits]`` (one codebook) or ``[kv_heads, 2^bits]`` (one per KV head, which is ``u``'s
    dimension ``head_axis``).
    """
    if name == "int":
        return u.float() - (1 << (bits - 1))
    if name == "uint":
        return u.float()
    if table is None:
        if name in ("lloyd-max", "lloyd-max-vllm", "lloyd-max-peak", "table"):
            raise ValueError(f"the {name} grid needs its table")
        table = fixed_grid(name, bits, u.shape[-1])
    if table.dim() == 1:
        return table.float()[u.long()]
    heads = u.movedim(head_axis, 0)
    flat = torch.gather(table.float(), 1, heads.reshape(heads.shape[0], -1).long())
    return flat.reshape(heads.shape).movedim(0, head_axis)
