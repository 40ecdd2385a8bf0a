"""KV modes by name: what each stores per token, and how many bytes that costs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .errors import ModeError

if TYPE_CHECKING:
    from .storage.shape import KVShape

STATIC_PARAM_DTYPE = torch.float32  # static parameters are fp32 so they add no error of their own


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

    def bytes_per_token(self, shape: "KVShape", fp_dtype: torch.dtype = torch.float16) -> int:
        """Marginal bytes one token costs across all layers and KV heads."""
        return shape.num_layers * shape.num_kv_heads * self.bytes_per_token_per_head(shape.head_dim, fp_dtype)

    def static_param_bytes(self, shape: "KVShape", granularity: str = "channel") -> int:
        """Bytes of a static mode's per-layer parameters (scale and zp for K and V), held once per pool."""
        if not self.needs_qparams:
            return 0
        per_layer = {"tensor": 1, "head": shape.num_kv_heads, "channel": shape.num_kv_heads * shape.head_dim}[granularity]
        return shape.num_layers * 4 * per_layer * STATIC_PARAM_DTYPE.itemsize


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


def get_mode(name: "str | KVMode") -> KVMode:
    """The mode called ``name`` (a mode is returned as it is); the error lists the valid ones."""
    if isinstance(name, KVMode):
        return name
    try:
        return KV_MODES[name.strip()]
    except KeyError:
        raise ModeError(f"unknown KV mode {name!r}; valid modes: {', '.join(KV_MODES)}") from None


def parse_modes(spec: str) -> list[KVMode]:
    """Modes from a comma-separated list such as ``fp16,int8-dynamic``."""
    names = [n for n in (s.strip() for s in spec.split(",")) if n]
    if not names:
        raise ModeError(f"no KV mode given; valid modes: {', '.join(KV_MODES)}")
    return [get_mode(n) for n in names]


QPARAMS_HINT = "pass --qparams FILE_OR_DIR, made by `python -m calib calibrate` then `python -m calib kv_qparams WORK_DIR OUT_DIR --format kvq`"


def require_qparams(mode: "str | KVMode", qparams: object | None, hint: str = QPARAMS_HINT) -> None:
    """The one rule for static modes: they need calibrated parameters; ``hint`` says how to get them."""
    mode = get_mode(mode)
    if mode.needs_qparams and qparams is None:
        raise ModeError(f"KV mode {mode.name} needs calibrated parameters: {hint}")
