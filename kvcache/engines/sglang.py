"""SGLang's KV cache dtypes (``python -m sglang.launch_server --model-path MODEL --kv-cache-dtype X``).

- ``fp8_e4m3`` / ``fp8_e5m2``: ``python/sglang/srt/mem_cache/memory_pool.py`` ``MHATokenToKVPool.set_kv_buffer``:
  ``x.div_(k_scale)`` in the model's dtype, then torch's cast (round half to even; e4m3fn saturates at 448, e5m2
  overflows to inf past 57344), one scale per layer and side from the checkpoint or 1.0. Our e5m2 codebook reads
  the inf pattern as the largest finite value (no real K/V reaches it).
- ``fp4_e2m1`` (MXFP4 in blocks of 16; ``fp4_mx_block16`` in newer versions):
  ``python/sglang/srt/layers/quantization/kvfp4_tensor.py`` ``FP4MXBlock16KVQuantizeUtil``: per block of 16
  channels a power-of-two scale ``2^ceil(log2(max(absmax / 6, 1e-10)))`` stored as its biased exponent (E8M0),
  codes the nearest e2m1 magnitude of ``x / scale`` with ties going up, sign in bit 3.

SGLang has no int8 KV cache flag in the sources read (its ``--kv-cache-dtype`` choices: auto, fp8_e5m2, fp8_e4m3,
bf16, fp4_e2m1), so there is no ``sglang:int8`` here.
"""

from __future__ import annotations

import torch

from ..codebooks import E2M1_MAGNITUDES
from ..codec import Codec, KVMode
from ..encoding import Encoded, SideParams
from ..quant import group_view, nearest_codes

_FP8_SRC = "SGLang: python/sglang/srt/mem_cache/memory_pool.py MHATokenToKVPool.set_kv_buffer"
_FP4_SRC = "SGLang: python/sglang/srt/layers/quantization/kvfp4_tensor.py FP4MXBlock16KVQuantizeUtil"
_TORCH_FP8 = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}


def fp8(codec: Codec, x: torch.Tensor, side: SideParams) -> Encoded:
    """``x / k_scale`` in the input's dtype, then torch's fp8 cast (no clamp of our own)."""
    y = x / side.tensor_scale.to(x.dtype)
    return Encoded(y.to(_TORCH_FP8[codec.grid]).view(torch.uint8).to(torch.int32), None, None)


def mxfp4(codec: Codec, x: torch.Tensor, side: SideParams) -> Encoded:
    """Power-of-two block scales and e2m1 magnitudes, ties up."""
    g = group_view(x.float(), codec.group_size)
    exp = torch.ceil(torch.log2(torch.clamp(g.abs().amax(-1) / 6, min=1e-10)))
    scale = torch.exp2(exp)
    s = g / scale[..., None]
    mags = torch.tensor(E2M1_MAGNITUDES, device=x.device)
    u = nearest_codes(s.abs(), mags, ties="up").to(torch.int32) | ((s < 0).to(torch.int32) << 3)
    return Encoded(u.reshape(x.shape), (exp + 127).to(torch.uint8), None)  # stored as the biased exponent


RULES = {"sglang-fp8": fp8, "sglang-mxfp4": mxfp4}


def _mode(flag: str, description: str, codec: Codec, source: str) -> KVMode:
    return KVMode(f"sglang:{flag}", description, codec, codec, engine="sglang",
                  serve=f"python -m sglang.launch_server --model-path MODEL --kv-cache-dtype {flag}", source=source)


MODES = [
    _mode("fp8_e4m3", "SGLang fp8 e4m3 with one scale per layer (1.0, or calibrated with --qparams)",
          Codec(8, "none", grid="e4m3", tensor_scale=True, rule="sglang-fp8"), _FP8_SRC),
    _mode("fp8_e5m2", "SGLang fp8 e5m2 with one scale per layer (1.0, or calibrated with --qparams)",
          Codec(8, "none", grid="e5m2", tensor_scale=True, rule="sglang-fp8"), _FP8_SRC),
    _mode("fp4_e2m1", "SGLang MXFP4: fp4 e2m1 in blocks of 16 with power-of-two (E8M0) block scales",
          Codec(4, "token", group_size=16, symmetric=True, grid="e2m1", param_dtype="ue8m0", rule="sglang-mxfp4"),
          _FP4_SRC),
]
