"""LMDeploy TurboMind's raw ``layers.{i}.past_kv_scale.{tp}.weight`` files (LMDeploy <= 0.3.x).

float32 little-endian, one per layer and tensor-parallel shard (the KV heads chunked over ``num_tp``).
Asymmetric: ``[k_scale, k_zp, v_scale, v_zp]`` with ``zp = (min+max)/2``, ``scale = (max-min)/(2^bits-1)``
over the shard. Symmetric: ``[k_scale, v_scale]`` with ``scale = absmax/(2^(bits-1)-1)``. Layout as written
by LMDeploy's ``lmdeploy/lite/apis/kv_qparams.py`` (``_export_asym`` / ``_export_sym``).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

from ..workdir import CalibStats
from .common import FORMAT_VERSION, ExportError, floor_scale, now, warn_floored

TURBOMIND_SIDECAR = "kv_qparams_turbomind.json"


def export_turbomind(
    stats: CalibStats, out_dir: str | Path, *, kv_sym: bool = False, num_tp: int = 1, kv_bits: int = 8
) -> list[Path]:
    """``layers.{i}.past_kv_scale.{tp}.weight`` per layer and TP shard, plus a JSON sidecar saying what they are."""
    _check(stats, kv_sym, num_tp, kv_bits)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    floored: list[str] = []
    written: list[Path] = []
    for i in range(stats.num_layers):
        for tp in range(num_tp):
            values = _shard_values(stats, i, tp, num_tp, kv_sym, kv_bits, floored)
            path = out / f"layers.{i}.past_kv_scale.{tp}.weight"
            path.write_bytes(_f32_le(values))
            written.append(path)
    warn_floored(floored)
    sidecar = out / TURBOMIND_SIDECAR
    sidecar.write_text(json.dumps(_sidecar(stats, kv_sym, num_tp, kv_bits), indent=2) + "\n", encoding="utf-8")
    return [*written, sidecar]


def _check(stats: CalibStats, kv_sym: bool, num_tp: int, kv_bits: int) -> None:
    if kv_bits != 8:
        raise ExportError(
            f"TurboMind's KV cache int8 mode (quant_policy=4) takes 8-bit parameters only: --kv-bits must be 8, not {kv_bits}"
        )
    heads = stats.num_kv_heads
    if num_tp < 1 or heads % num_tp:
        divisors = ", ".join(str(d) for d in range(1, heads + 1) if heads % d == 0)
        raise ExportError(f"--num-tp {num_tp} does not divide the model's {heads} KV heads: use one of {divisors}")
    if kv_sym:
        warnings.warn(
            "the symmetric TurboMind layout [k_scale, v_scale] is read only by TurboMind from before LMDeploy "
            "PR #218 (mid 2023); later TurboMind (to LMDeploy 0.3.x) reads [k_scale, k_zp, v_scale, v_zp]: "
            "leave out --kv-sym for those",
            stacklevel=4,
        )


def _shard_values(
    stats: CalibStats, i: int, tp: int, num_tp: int, kv_sym: bool, kv_bits: int, floored: list[str]
) -> list[torch.Tensor]:
    values: list[torch.Tensor] = []
    for prefix, st in (("K", stats.key_stats), ("V", stats.value_stats)):
        where = f"layer {i} {prefix} (TP shard {tp})"
        if kv_sym:
            absmax = torch.chunk(st["absmax"][i], num_tp)[tp].max()
            values.append(floor_scale(absmax / ((1 << (kv_bits - 1)) - 1), floored, where))
        else:
            lo = torch.chunk(st["min"][i], num_tp)[tp].min()
            hi = torch.chunk(st["max"][i], num_tp)[tp].max()
            values.append(floor_scale((hi - lo) / ((1 << kv_bits) - 1), floored, where))
            values.append((hi + lo) / 2)
    return values


def _sidecar(stats: CalibStats, kv_sym: bool, num_tp: int, kv_bits: int) -> dict:
    return {
        "format": "turbomind-past-kv-scale",
        "format_version": FORMAT_VERSION,
        "files": "layers.{i}.past_kv_scale.{tp}.weight, raw float32 little-endian",
        "layout": ["k_scale", "v_scale"] if kv_sym else ["k_scale", "k_zp", "v_scale", "v_zp"],
        "granularity": "tensor (per layer and TP shard)",
        "symmetric": kv_sym,
        "bits": kv_bits,
        "num_tp": num_tp,
        "num_layers": stats.num_layers,
        "num_kv_heads": stats.num_kv_heads,
        "head_dim": stats.head_dim,
        "reader": (
            "TurboMind with quant_policy=4 (LMDeploy <= 0.3.x); the 2-value symmetric layout only in TurboMind "
            "from before LMDeploy PR #218 (mid 2023)" if kv_sym else
            "TurboMind with quant_policy=4 (LMDeploy from PR #218, Aug 2023, to 0.3.x)"
        ),
        "exported": now(),
        "metadata": stats.metadata(),
    }


def _f32_le(values: list[torch.Tensor]) -> bytes:
    return torch.stack([v.float().reshape(()) for v in values]).numpy().astype("<f4").tobytes()
