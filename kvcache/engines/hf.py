"""transformers' ``QuantizedCache`` with its two backends, optimum-quanto and HQQ, at the class defaults
(``nbits`` 4 or 2, ``axis_key = axis_value = 0``, ``q_group_size`` 64, ``residual_length`` 128).

``transformers/cache_utils.py`` ``QuantizedLayer.update`` (transformers 5.24): the newest tokens are kept in full
precision (the *residual*); when the residual and the new tokens reach ``residual_length``, the whole sequence —
the dequantized old part included — is quantized again and the residual emptied, so quantization error compounds.
Fed one token at a time from the first, that re-quantization happens after tokens 0, 128, 256, ...; a query at
position ``t`` reads the sequence as quantized at the last of those before it, and everything after in full
precision. We emulate exactly that for every position (what decoding sees), with any chunking; transformers itself
quantizes a whole prompt at its first update but lets that prompt attend it unquantized.

- quanto (``QuantoQuantizedLayer._quantize``; optimum-quanto 0.2.7 ``tensor/grouped.py`` ``group`` (axis 0),
  ``tensor/optimizers/max_optimizer.py``, ``library/quantize.py`` ``quantize_affine``): groups of 64 consecutive
  elements of the contiguous ``[batch, heads, tokens, head_dim]`` tensor, i.e. 64 channels of one token and head;
  ``scale = (max - min) / (2^b - 1)``, ``shift = -min``, codes ``clamp(round((x + shift) / scale))`` (half to even),
  decoded ``scale * code - shift``.
- HQQ (``HQQQuantizedLayer._quantize``; hqq 0.2.8 ``hqq/core/quantize.py`` ``Quantizer.quantize`` with
  ``channel_wise``, ``optimize``; ``hqq/core/optimize.py`` ``optimize_weights_proximal_legacy``): axis 0 reshapes the
  tensor to ``[64, numel / 64]`` and groups the 64 elements of each column, elements ``numel / 64`` apart in the
  flattened tensor (one channel of tokens and heads spread over the sequence; the grouping changes whenever the
  sequence grows); inverse scale ``(2^b - 1) / (max - min)`` (1 where the range is <= 1e-4, at most 2e4), zero
  ``-min * scale``, then up to 20 proximal steps (lp 0.7, beta 10) that move only the zero, stopping at the first
  step whose mean error does not improve; decoded ``(code - zero) / scale``.

The pool holds these sequences as decoded 16-bit values (an emulation: the codes are never stored); bytes and
capacity are counted as transformers stores them: codes and per-group parameters in the model's dtype, plus a
residual of up to 128 tokens in 16 bits per sequence.
"""

from __future__ import annotations

import torch

from ..codec import Codec, KVMode

RESIDUAL = 128
GROUP = 64
SOURCE = ("transformers 5.24: transformers/cache_utils.py QuantizedLayer.update, QuantoQuantizedLayer, "
          "HQQQuantizedLayer; optimum-quanto 0.2.7 tensor/grouped.py, tensor/optimizers/max_optimizer.py; "
          "hqq 0.2.8 hqq/core/quantize.py Quantizer.quantize, hqq/core/optimize.py optimize_weights_proximal_legacy")


def quanto(x: torch.Tensor, bits: int) -> torch.Tensor:
    """optimum-quanto's axis-0 group quantization of one layer's ``[heads, tokens, head_dim]``, decoded."""
    g = x.reshape(-1, GROUP).float()
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    scale = (hi - lo) / ((1 << bits) - 1)
    shift = -lo
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    code = torch.where(scale > 0, torch.clamp(torch.round((g + shift) / safe), 0, (1 << bits) - 1), torch.zeros_like(g))
    return (scale * code - shift).to(x.dtype).reshape(x.shape)


def _shrink(x: torch.Tensor, beta: float = 10.0, lp: float = 0.7) -> torch.Tensor:
    a = x.abs()
    return torch.sign(x) * torch.clamp_min(a - (1.0 / beta) * a.pow(lp - 1), 0.0)


def hqq(x: torch.Tensor, bits: int, iterations: int = 20) -> torch.Tensor:
    """HQQ's axis-0 quantization with its default optimiser, of one layer's ``[heads, tokens, head_dim]``, decoded."""
    w = x.float().reshape(GROUP, -1)
    lo, hi = w.amin(0, keepdim=True), w.amax(0, keepdim=True)
    top = float((1 << bits) - 1)
    denom = hi - lo
    scale = torch.where(denom.abs() <= 1e-4, torch.ones_like(denom), top / denom).clamp(max=2e4)
    zero = -lo * scale
    best = torch.tensor(float("inf"))
    for _ in range(iterations):
        q = torch.round(w * scale + zero).clamp(0, top)
        r = (q - zero) / scale
        e = _shrink(w - r)
        zero = torch.mean(q - (w - e) * scale, dim=0, keepdim=True)
        err = (w - r).abs().mean()
        if err < best:
            best = err
        else:
            break
    q = torch.round(w * scale + zero).clamp(0, top)
    dt = x.dtype
    return ((q.to(dt) - zero.to(dt)) * (1.0 / scale).to(dt)).reshape(x.shape)


REQUANTIZERS = {"quanto": quanto, "hqq": hqq}


def requantize(codec: Codec, x: torch.Tensor) -> torch.Tensor:
    """The whole sequence ``x`` (``[heads, tokens, head_dim]``, one layer and side) quantized and decoded by the backend."""
    return REQUANTIZERS[codec.rule](x, codec.bits)


def _mode(backend: str, bits: int) -> KVMode:
    codec = Codec(bits, "token", group_size=GROUP, grid="uint", param_dtype="pool", rule=backend)
    strided = " (groups strided over the sequence, zero points optimised)" if backend == "hqq" else ""
    return KVMode(f"hf:{backend}-int{bits}",
                  f"transformers QuantizedCache, {backend} int{bits} in groups of 64{strided}; the last tokens (up "
                  f"to {RESIDUAL}) in 16 bits, the whole sequence re-quantized when they fill",
                  codec, codec, engine="hf", residual=RESIDUAL, source=SOURCE,
                  serve=f'QuantizedCache(backend="{backend}", config=model.config, nbits={bits})')


RULES: dict = {}  # no per-token encoder: the whole sequence is re-quantized (``requantize``)
MODES = [_mode(b, n) for b in ("quanto", "hqq") for n in (4, 2)]
