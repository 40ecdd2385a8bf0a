"""vLLM's KV cache dtypes (``vllm serve MODEL --kv-cache-dtype X``).

- ``fp8`` (= ``fp8_e4m3``) / ``fp8_e5m2``: every element ``fp8(x / scale)`` with one fp32 scale per layer and side,
  division, round half to even, saturated (``__NV_SATFINITE``): ``csrc/quantization/w8a8/fp8/nvidia/quant_utils.cuh``
  ``scaled_vec_conversion``, ``vllm/v1/attention/ops/triton_reshape_and_cache_flash.py``. The scales come from
  the checkpoint (what ``kv_qparams --format vllm`` writes: absmax / 448) or are 1.0.
- ``int8_per_token_head`` / ``fp8_per_token_head``: one fp32 scale per token and KV head, ``max(absmax / QMAX,
  1e-6)``, codes ``x * (1 / scale)`` truncated to int8 (the Triton store kernel truncates; the test reference
  ``tests/quantization/test_per_token_kv_cache.py`` rounds, which its tolerance cannot tell apart) or cast to e4m3.
- ``int4_per_token_head``: 4-bit sign and magnitude codes of the Hadamard-rotated keys (values unrotated) with one
  fp32 absmax scale per token and head (``TritonAttentionBackend.customize_spec``: "data + one scale" per side).
  APPROXIMATE: the eight magnitude levels (``INT4_MAGNITUDE_LEVELS``) were in no version of the sources we could
  read; we use the 4-bit Gaussian Lloyd-Max magnitudes scaled so the largest is 1.0.
- ``nvfp4``: fp4 e2m1 in blocks of 16 with an e4m3 block scale ``e4m3(absmax / 6 / g)`` and a per-tensor fp32
  ``g`` (1.0 without calibration): the NVFP4 recipe (flashinfer ``nvfp4_kv_quantize``). APPROXIMATE: vLLM's own
  store kernel was not in the sources we could read.
- ``turboquant_*`` (``vllm/model_executor/layers/quantization/turboquant/config.py`` ``TQ_PRESETS``, store
  ``vllm/v1/attention/ops/triton_turboquant_store.py``, backend ``vllm/v1/attention/backends/turboquant_attn.py``):
  keys Hadamard-rotated, per vector an fp16 L2 norm and the nearest Lloyd-Max centroid of each coordinate of the
  unit vector (ties up; centroids ``centroids.solve_lloyd_max``), decoded with norm correction; ``k8v4`` keys plain
  e4m3 without scale or rotation; values per vector uniform ``trunc((v - min) / scale + 0.5)`` with fp16 scale and
  minimum (rounded after use); the first and last 2 layers stay in 16 bits (``get_boundary_skip_layers``).
  Bytes as vLLM stores them (its slot is padded to even bytes, already even here).

Prefill: vLLM's TurboQuant backend attends a prompt's first chunk unquantized and its FlashAttention fp8 path casts
the query to fp8 too; we score every position against the stored copy, what decoding sees.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from ..codebooks import float_codes
from ..codec import Codec, KVMode
from ..encoding import Encoded, SideParams
from ..quant import group_view, nearest_codes

_FP8_SRC = ("vLLM: csrc/quantization/w8a8/fp8/nvidia/quant_utils.cuh scaled_vec_conversion; "
            "vllm/v1/attention/ops/triton_reshape_and_cache_flash.py")
_PTH_SRC = ("vLLM: vllm/v1/attention/ops/triton_reshape_and_cache_flash.py (per-token-head store), "
            "tests/quantization/test_per_token_kv_cache.py, vllm/v1/attention/kv_dequant/flashinfer_tile.py")
_TQ_SRC = ("vLLM: vllm/model_executor/layers/quantization/turboquant/{config,centroids}.py, "
           "vllm/v1/attention/ops/triton_turboquant_store.py, vllm/v1/attention/backends/turboquant_attn.py")


def per_token_head(codec: Codec, x: torch.Tensor, side: SideParams) -> Encoded:
    """int8 / fp8 / int4 per token and head: ``scale = max(absmax / QMAX, 1e-6)`` fp32, codes of ``x * (1 / scale)``."""
    g = group_view(x.float(), codec.group_size)
    qmax = {"int": 127.0, "e4m3": 448.0}.get(codec.grid, 1.0)
    scale = torch.clamp(g.abs().amax(-1) / qmax, min=1e-6)
    y = g * (1 / scale)[..., None]
    if codec.grid == "e4m3":
        u = float_codes(y.clamp(-448, 448), "e4m3")
    elif codec.grid == "int":
        u = torch.trunc(y.clamp(-128, 127)).to(torch.int32) + 128
    else:  # int4: sign bit 3, the nearest magnitude (argmin: the lower level on a tie)
        mags = side.grid[0, :8].float()
        idx = nearest_codes(y.abs(), mags, ties="down").to(torch.int32)
        u = idx | ((y < 0).to(torch.int32) << 3)
    return Encoded(u.reshape(x.shape), scale.to(side.param_dtype), None)


def nvfp4(codec: Codec, x: torch.Tensor, side: SideParams) -> Encoded:
    """NVFP4: block scale ``e4m3(absmax / 6 / g)``, codes ``e2m1(x / (scale * g))`` (round half to even, saturated)."""
    g = group_view(x.float(), codec.group_size)
    tensor = side.tensor_scale.float()
    block = (g.abs().amax(-1) / 6 / tensor).clamp(max=448).to(torch.float8_e4m3fn)
    denom = block.float() * tensor
    y = g / torch.where(denom > 0, denom, torch.ones_like(denom))[..., None]
    u = torch.where(denom[..., None] > 0, float_codes(y, "e2m1"), torch.zeros_like(y, dtype=torch.int32))
    return Encoded(u.reshape(x.shape), block, None)


def turboquant(codec: Codec, x: torch.Tensor, side: SideParams) -> Encoded:
    """Keys (a Lloyd-Max grid): norm, unit vector, nearest centroid (a value on a midpoint goes up), fp16 norm.
    Values (uint grid): ``scale = max((max - min) / (2^b - 1), 1e-8)``, ``code = trunc((v - min) / scale + 0.5)``."""
    g = group_view(x.float(), codec.group_size)
    if codec.grid == "uint":
        lo, hi = g.amin(-1), g.amax(-1)
        scale = (hi - lo) / ((1 << codec.bits) - 1)
        scale = torch.where(scale <= 1e-8, torch.full_like(scale, 1e-8), scale)
        u = torch.clamp(torch.trunc((g - lo[..., None]) / scale[..., None] + 0.5), 0, (1 << codec.bits) - 1)
        return Encoded(u.reshape(x.shape).to(torch.int32), scale.to(side.param_dtype), lo.to(side.param_dtype))
    norm = g.norm(dim=-1)
    unit = g / (norm + 1e-8)[..., None]
    u = nearest_codes(unit.transpose(0, 1), side.grid, ties="up").transpose(0, 1).to(torch.int32)
    return Encoded(u.reshape(x.shape), norm.to(side.param_dtype), None)


RULES = {"vllm-pth": per_token_head, "vllm-nvfp4": nvfp4, "vllm-tq": turboquant}


def _fp8(grid: str) -> Codec:
    return Codec(8, "none", grid=grid, tensor_scale=True)


def _tq_key(bits: int) -> Codec:
    return Codec(bits, "token", symmetric=True, grid="lloyd-max-vllm", param_dtype="fp16", rule="vllm-tq", rotate=True,
                 norm_correction=True)


def _tq_value(bits: int) -> Codec:
    return Codec(bits, "token", grid="uint", param_dtype="fp16", rule="vllm-tq")


def _mode(flag: str, description: str, k: Codec, v: Codec, source: str, skip: int = 0) -> KVMode:
    return KVMode(f"vllm:{flag}", description, k, v, engine="vllm", serve=f"vllm serve MODEL --kv-cache-dtype {flag}",
                  source=source, skip_layers=skip)


_INT8_PTH = Codec(8, "token", symmetric=True, param_dtype="fp32", rule="vllm-pth")
_INT4_PTH = Codec(4, "token", symmetric=True, grid="signmag", param_dtype="fp32", rule="vllm-pth")

MODES = [
    _mode("fp8", "vLLM fp8 (e4m3) with one scale per layer (1.0, or calibrated with --qparams)", _fp8("e4m3"),
          _fp8("e4m3"), _FP8_SRC),
    _mode("fp8_e5m2", "vLLM fp8 e5m2 with one scale per layer (1.0, or calibrated with --qparams)", _fp8("e5m2"),
          _fp8("e5m2"), _FP8_SRC),
    _mode("int8_per_token_head", "vLLM int8, one fp32 absmax scale per token and head (codes truncated)",
          _INT8_PTH, _INT8_PTH, _PTH_SRC),
    _mode("fp8_per_token_head", "vLLM fp8 e4m3, one fp32 absmax scale per token and head",
          replace(_INT8_PTH, grid="e4m3"), replace(_INT8_PTH, grid="e4m3"), _PTH_SRC),
    _mode("int4_per_token_head", "vLLM 4-bit sign-magnitude codes, one fp32 scale per token and head, keys "
          "Hadamard-rotated (magnitude levels approximate)", replace(_INT4_PTH, rotate=True), _INT4_PTH, _PTH_SRC),
    _mode("nvfp4", "vLLM NVFP4: fp4 e2m1 in blocks of 16, e4m3 block scales, one fp32 scale per layer (recipe "
          "approximate)", *[Codec(4, "token", group_size=16, symmetric=True, grid="e2m1", param_dtype="e4m3",
                                   tensor_scale=True, rule="vllm-nvfp4")] * 2, "vLLM --kv-cache-dtype nvfp4; "
          "flashinfer nvfp4_kv_quantize"),
    _mode("turboquant_k8v4", "vLLM TurboQuant: K fp8 e4m3 (no scale, no rotation), V 4-bit per vector; first and "
          "last 2 layers 16-bit", Codec(8, "none", grid="e4m3"), _tq_value(4), _TQ_SRC, skip=2),
    _mode("turboquant_4bit_nc", "vLLM TurboQuant: K 4-bit Lloyd-Max of the rotated unit vector with an fp16 norm "
          "and norm correction, V 4-bit per vector; first and last 2 layers 16-bit", _tq_key(4), _tq_value(4),
          _TQ_SRC, skip=2),
    _mode("turboquant_k3v4_nc", "vLLM TurboQuant: K 3-bit Lloyd-Max (rotated, fp16 norm, norm correction), V 4-bit "
          "per vector; first and last 2 layers 16-bit", _tq_key(3), _tq_value(4), _TQ_SRC, skip=2),
    _mode("turboquant_3bit_nc", "vLLM TurboQuant: K 3-bit Lloyd-Max (rotated, fp16 norm, norm correction), V 3-bit "
          "per vector; first and last 2 layers 16-bit", _tq_key(3), _tq_value(3), _TQ_SRC, skip=2),
]
