"""KV modes by name: what each stores per token, and how many bytes that costs."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KVMode:
    """One way of storing the KV cache."""

    name: str
    description: str
    quantized: bool
    dynamic: bool  # per-token parameters computed at write time
    needs_qparams: bool  # static parameters from a calibration (``--qparams``)
    bits: int = 16
    param_dtype: torch.dtype = torch.float16  # dtype of per-token parameters (dynamic modes)

    def data_dtype(self, fp_dtype: torch.dtype = torch.float16) -> torch.dtype:
        """Element dtype of the block storage; ``fp_dtype`` only matters for unquantized modes."""
        return torch.int8 if self.quantized else fp_dtype

    def bytes_per_token_per_head(self, head_dim: int, fp_dtype: torch.dtype = torch.float16) -> int:
        """Marginal bytes one token costs in one layer and one KV head, K and V together."""
        data = 2 * head_dim * self.data_dtype(fp_dtype).itemsize
        params = 2 * 2 * self.param_dtype.itemsize if self.dynamic else 0  # scale + zp, for K and V
        return data + params


KV_MODES: dict[str, KVMode] = {
    m.name: m
    for m in (
        KVMode("fp16", "fp16 baseline (no quantization)", quantized=False, dynamic=False, needs_qparams=False),
        KVMode(
            "int8",
            "int8, static parameters from a calibration (--qparams)",
            quantized=True, dynamic=False, needs_qparams=True, bits=8,
        ),
        KVMode(
            "int8-dynamic",
            "int8, per-token per-head parameters computed at write time (no calibration)",
            quantized=True, dynamic=True, needs_qparams=False, bits=8,
        ),
    )
}


def get_mode(name: str) -> KVMode:
    """The mode called ``name``; the error lists the valid ones."""
    try:
        return KV_MODES[name.strip()]
    except KeyError:
        raise ValueError(f"unknown KV mode {name!r}; valid modes: {', '.join(KV_MODES)}") from None


def parse_modes(spec: str) -> list[KVMode]:
    """Modes from a comma-separated list such as ``fp16,int8-dynamic``."""
    names = [n for n in (s.strip() for s in spec.split(",")) if n]
    if not names:
        raise ValueError(f"no KV mode given; valid modes: {', '.join(KV_MODES)}")
    return [get_mode(n) for n in names]
