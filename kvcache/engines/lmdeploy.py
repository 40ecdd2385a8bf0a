"""LMDeploy's online KV quantization (``lmdeploy serve api_server MODEL --quant-policy N``).

- ``8`` / ``4``: per token and KV head, asymmetric, as TurboMind (the default engine for the Llama, Qwen and
  InternLM families) does it: ``src/turbomind/kernels/attention/quantization.h`` (``warp_stats``, ``quantize``,
  ``ConvertKvCache``), ``kv_cache_utils_v2.cu`` ``ProcessKV_v2``: in the model's 16-bit dtype T, ``scale =
  T((max - min) / (2^b - 1))``, ``zero = T(min)``, codes ``rne((x - zero) * T(1 / scale))`` saturated, decoded
  ``code * scale + zero``. (The PyTorch engine, ``--backend pytorch``, computes in fp32 and rounds half up:
  ``lmdeploy/pytorch/kernels/cuda/fill_kv_cache.py``.)
- ``42`` (TurboQuant, ``--backend pytorch`` only): ``fill_kv_cache.py`` (``_fill_page_quant_turbo_qjl4`` for K,
  ``_fill_page_quant_turbo_int2`` for V), ``turbo_quant.py`` (Lloyd-Max codebooks), ``pagedattention.py``: K and V
  Hadamard-rotated; keys 3-bit Lloyd-Max codes of the unit vector plus one bit per coordinate, the sign of the
  residual, with a per-vector magnitude (``qjl_norm``, the residual's RMS; LMDeploy's "QJL" bit), values 2-bit
  Lloyd-Max codes with a norm; no norm correction. Norms in the model dtype.

Prefill: the PyTorch engine attends a prompt's fresh K/V; we score every position against the stored copy.
"""

from __future__ import annotations

import math

import torch

from ..codec import Codec, KVMode
from ..encoding import Encoded, SideParams
from ..quant import group_view, nearest_codes

_TM_SRC = ("LMDeploy: src/turbomind/kernels/attention/quantization.h (warp_stats, quantize, ConvertKvCache), "
           "kv_cache_utils_v2.cu ProcessKV_v2")
_TQ_SRC = ("LMDeploy: lmdeploy/pytorch/kernels/cuda/fill_kv_cache.py (_fill_page_quant_turbo_qjl4, "
           "_fill_page_quant_turbo_int2), turbo_quant.py, pagedattention.py")


def turbomind(codec: Codec, x: torch.Tensor, side: SideParams) -> Encoded:
    """TurboMind's per token-head int8/int4, in the parameters' 16-bit dtype T as its kernels compute."""
    t = side.param_dtype
    g = group_view(x.to(t), codec.group_size)
    lo, hi = g.amin(-1), g.amax(-1)
    top = (1 << codec.bits) - 1
    scale = ((hi - lo).float() * (1.0 / top)).to(t)
    inv = (1.0 / scale.float()).to(t)
    v = ((g - lo[..., None]) * inv[..., None]).float()
    u = torch.clamp(torch.round(v), 0, 255).clamp(max=top)  # cvt.rni.sat to uint8, then min(code, 15) for 4 bits
    return Encoded(u.reshape(x.shape).to(torch.int32), scale, lo)


def _unit(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    norm = torch.sqrt((g * g).sum(-1) + 1e-8)
    return norm, g / norm[..., None]


def turbo(codec: Codec, x: torch.Tensor, side: SideParams) -> Encoded:
    """Policy 42. Keys (residual-sign codecs): 3-bit index ``#{u > boundary}`` (a value on a boundary goes down),
    sign bit ``u - c[idx] >= 0``, ``qjl_norm = sqrt(sum r^2 + 1e-8) / sqrt(D)``. Values: the 2-bit index and the norm."""
    g = group_view(x.float(), codec.group_size)
    norm, u = _unit(g)
    table = side.grid  # [kv_heads, 2^bits] (keys: 2^(bits-1)) Lloyd-Max centroids for the group's dimension
    idx = nearest_codes(u.transpose(0, 1), table, ties="down").transpose(0, 1)
    if not codec.residual_sign:
        return Encoded(idx.reshape(x.shape).to(torch.int32), norm.to(side.param_dtype), None)
    c = torch.gather(table.float()[None, :, None, :].expand(*u.shape[:-1], table.shape[-1]), -1, idx)
    r = u - c
    qjl = torch.sqrt((r * r).sum(-1) + 1e-8) / math.sqrt(g.shape[-1])
    code = idx.to(torch.int32) | ((r >= 0).to(torch.int32) << (codec.bits - 1))
    return Encoded(code.reshape(x.shape), norm.to(side.param_dtype), qjl.to(side.param_dtype))


RULES = {"lmdeploy-tm": turbomind, "lmdeploy-42": turbo}


def _mode(flag: str, description: str, k: Codec, v: Codec, source: str, pytorch: bool = False) -> KVMode:
    backend = " --backend pytorch" if pytorch else ""
    return KVMode(f"lmdeploy:{flag}", description, k, v, engine="lmdeploy",
                  serve=f"lmdeploy serve api_server MODEL{backend} --quant-policy {flag}", source=source)


_TM8 = Codec(8, "token", grid="uint", param_dtype="pool", rule="lmdeploy-tm")
_TM4 = Codec(4, "token", grid="uint", param_dtype="pool", rule="lmdeploy-tm")

MODES = [
    _mode("8", "LMDeploy int8 per token and KV head, asymmetric (TurboMind's arithmetic)", _TM8, _TM8, _TM_SRC),
    _mode("4", "LMDeploy int4 per token and KV head, asymmetric (TurboMind's arithmetic)", _TM4, _TM4, _TM_SRC),
    _mode("42", "LMDeploy TurboQuant: K 3-bit Lloyd-Max + a residual sign bit per coordinate, V 2-bit Lloyd-Max, "
          "both Hadamard-rotated, per-vector norms",
          Codec(4, "token", grid="lloyd-max", param_dtype="pool", rule="lmdeploy-42", rotate=True, residual_sign=True),
          Codec(2, "token", symmetric=True, grid="lloyd-max", param_dtype="pool", rule="lmdeploy-42", rotate=True),
          _TQ_SRC, pytorch=True),
]
ALIASES = {"int4-lmdeploy": "lmdeploy:4"}
