"""llama.cpp's KV cache types (``-ctk T -ctv T``), with its default K/V Hadamard rotation and without it (``-norot``).

Reproduced from the llama.cpp vendored by llama-cpp-python 0.3.36 (llama.cpp 0c1e5709, 2026-10):
``ggml/src/ggml-quants.c`` ``quantize_row_q8_0_ref``, ``quantize_row_q4_0_ref``, ``quantize_row_q4_1_ref``,
``quantize_row_q5_0_ref``, ``quantize_row_q5_1_ref``, ``quantize_row_iq4_nl_ref`` (-> ``quantize_row_iq4_nl_impl``,
``best_index_int8``, ``kvalues_iq4nl``) and the ``dequantize_row_*`` twins; the rotation from
``src/llama-kv-cache.cpp`` (``ggml_gen_hadamard``, ``attn_rot_k/v``) and ``src/llama-graph.cpp`` (``build_attn``:
Q and K rotated before the store, V rotated, the output rotated back). Every row of K/V is quantized in blocks
of 32 consecutive channels with an fp16 scale ``d`` (and minimum ``m``) rounded *after* the codes were computed
with the fp32 ones; the types differ in how ``d`` and the codes are chosen:

- q8_0: ``d = amax / 127``, ``code = roundf(x / d)`` (half away from zero; the x86 SIMD copy rounds half to even);
- q4_0 / q5_0: ``d = max / -2^(b-1)`` (``max`` the signed value of largest magnitude), ``code = min(2^b - 1,
  trunc(x / d + 2^(b-1) + 0.5))``, value ``(code - 2^(b-1)) d``;
- q4_1 / q5_1: ``d = (max - min) / (2^b - 1)``, ``code = min(2^b - 1, trunc((x - min) / d + 0.5))``, value
  ``code d + m``;
- iq4_nl: nearest of 16 non-uniform levels (ties up) at ``d0 = max / -127``, then ``d`` refitted by least
  squares weighted by ``x^2``, codes kept.

The rotation (on unless ``LLAMA_ATTN_ROT_DISABLE=1``, for quantized types when head_dim % 64 == 0): keys in one
Hadamard block of the whole head (llama.cpp: the largest power of two >= 64 dividing head_dim, the same for the
power-of-two head_dims of the families we load), values in blocks of 64; heads whose head_dim 64 does not
divide stay unrotated, as in llama.cpp. What differs from
llama.cpp itself: its CPU flash attention also rounds the query to q8_0/q8_1 before the dots (engine arithmetic
beyond the cache, about the noise of its f16 cache vs an exact one), and we store the 5-bit types' high bits as a
bit plane beside the nibbles rather than in its ``qh`` word (same bytes).
"""

from __future__ import annotations

import torch

from ..codec import Codec, KVMode
from ..codebooks import IQ4NL_LEVELS
from ..encoding import Encoded, SideParams
from ..quant import group_view, nearest_codes

BLOCK = 32
SOURCE = ("llama.cpp 0c1e5709: ggml/src/ggml-quants.c quantize_row_{q8_0,q4_0,q4_1,q5_0,q5_1,iq4_nl}_ref; "
          "src/llama-kv-cache.cpp attn_rot_k/v, src/llama-graph.cpp build_attn")


def _peak(g: torch.Tensor) -> torch.Tensor:
    """The signed value of largest magnitude of each block (its first occurrence), ``[..., blocks]``."""
    return g.gather(-1, g.abs().argmax(dim=-1, keepdim=True))[..., 0]


def _inverse(d: torch.Tensor) -> torch.Tensor:
    """``1/d``, 0 where d is 0 (llama.cpp's ``id = d ? 1.0f/d : 0.0f``)."""
    return torch.where(d != 0, 1 / torch.where(d != 0, d, torch.ones_like(d)), torch.zeros_like(d))


def encode(codec: Codec, x: torch.Tensor, side: SideParams) -> Encoded:
    """One llama.cpp type per codec: q8_0 (8-bit int, symmetric), q4_0/q5_0 (symmetric), q4_1/q5_1 (uint), iq4_nl."""
    g = group_view(x.float(), codec.group_size)  # [tokens, kv_heads, blocks, 32]
    f16 = torch.float16
    if codec.grid == "iq4nl":
        levels = torch.tensor(IQ4NL_LEVELS, dtype=torch.float32, device=x.device)
        peak = _peak(g)
        d0 = peak / levels[0]
        u = nearest_codes(g * _inverse(d0)[..., None], levels, ties="up")
        q = levels[u]
        w = g * g
        num, den = (w * q * g).sum(-1), (w * q * q).sum(-1)
        d = torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), d0)
        d = torch.where(g.abs().amax(-1) < 1e-15, torch.zeros_like(d), d)
        return Encoded(u.reshape(x.shape).to(torch.int32), d.to(f16), None)
    half = 1 << (codec.bits - 1)
    top = (1 << codec.bits) - 1
    if codec.bits == 8:  # q8_0
        d = g.abs().amax(-1) / 127
        y = g * _inverse(d)[..., None]
        c = torch.sign(y) * torch.floor(y.abs() + 0.5)  # roundf: half away from zero
        return Encoded((c + 128).reshape(x.shape).to(torch.int32), d.to(f16), None)
    if codec.symmetric:  # q4_0, q5_0
        d = _peak(g) / -half
        u = torch.clamp(torch.trunc(g * _inverse(d)[..., None] + half + 0.5), max=top)
        return Encoded(u.reshape(x.shape).to(torch.int32), d.to(f16), None)
    lo, hi = g.amin(-1), g.amax(-1)  # q4_1, q5_1
    d = (hi - lo) / top
    u = torch.clamp(torch.trunc((g - lo[..., None]) * _inverse(d)[..., None] + 0.5), max=top)
    return Encoded(u.reshape(x.shape).to(torch.int32), d.to(f16), lo.to(f16))


RULES = {"llamacpp": encode}

_TYPES = {
    "q8_0": Codec(8, "token", group_size=BLOCK, symmetric=True, param_dtype="fp16", rule="llamacpp"),
    "q5_0": Codec(5, "token", group_size=BLOCK, symmetric=True, param_dtype="fp16", rule="llamacpp"),
    "q5_1": Codec(5, "token", group_size=BLOCK, grid="uint", param_dtype="fp16", rule="llamacpp"),
    "q4_0": Codec(4, "token", group_size=BLOCK, symmetric=True, param_dtype="fp16", rule="llamacpp"),
    "q4_1": Codec(4, "token", group_size=BLOCK, grid="uint", param_dtype="fp16", rule="llamacpp"),
    "iq4_nl": Codec(4, "token", group_size=BLOCK, symmetric=True, grid="iq4nl", param_dtype="fp16", rule="llamacpp"),
}


def _rotated(codec: Codec, side: str) -> Codec:
    from dataclasses import replace

    return replace(codec, rotate=True, rotation_block=0 if side == "k" else 64, rotation_min=64)


def _modes() -> list[KVMode]:
    modes = []
    pairs = [(t, t) for t in _TYPES] + [("q8_0", "q4_0")]
    for k_type, v_type in pairs:
        flag = k_type if k_type == v_type else f"{k_type}-{v_type}"
        cmd = f"llama-server -m MODEL -ctk {k_type} -ctv {v_type} -fa on"
        for rot in (True, False):
            k, v = _TYPES[k_type], _TYPES[v_type]
            if rot:
                k, v = _rotated(k, "k"), _rotated(v, "v")
            name = f"llamacpp:{flag}" + ("" if rot else "-norot")
            what = f"K {k_type}, V {v_type}" if k_type != v_type else f"K and V {k_type}"
            modes.append(KVMode(
                name, f"llama.cpp {what}: blocks of 32 with an fp16 scale"
                      + (", Hadamard-rotated (llama.cpp's default)" if rot else ", rotation off"),
                k, v, engine="llamacpp", serve=cmd if rot else f"LLAMA_ATTN_ROT_DISABLE=1 {cmd}", source=SOURCE))
    return modes


MODES = _modes()
