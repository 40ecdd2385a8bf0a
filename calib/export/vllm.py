"""vLLM's FP8 (e4m3) KV cache: ``k_scale``/``v_scale`` per layer and the compressed-tensors config that makes
vLLM read them.

Scales are ``absmax / 448`` (float8 e4m3fn's largest value), shape (1,) per tensor or (num_kv_heads,) per
KV head, named ``model.layers.{i}.self_attn.k_scale`` as a checkpoint holds them; vLLM's
``maybe_remap_kv_scale_name`` (model_loader/weight_utils.py) maps them to ``...self_attn.attn.k_scale``, and
``CompressedTensorsKVCacheMethod`` creates those parameters only when ``config.json`` has a compressed-tensors
``quantization_config`` with a ``kv_cache_scheme``. :func:`export_vllm` writes the scales alone;
:mod:`calib.export.vllm_folder` builds a servable model folder around them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from kvcache.quant import SCALE_EPS, reduce_to_granularity

from ..workdir import CalibStats
from .common import FORMAT_VERSION, ExportError, now, render, warn_floored

VLLM_FILE = "kv_cache_scales.safetensors"
VLLM_README = "README_vllm.md"
VLLM_FORMAT = "kvq-vllm-kv-scales"
VLLM_DOC = "https://docs.vllm.ai/en/latest/features/quantization/quantized_kvcache/"
# Largest finite float8 e4m3fn value (NVIDIA); ROCm's e4m3fnuz tops out at 240.
FP8_E4M3_MAX = 448.0
# Our granularity -> compressed-tensors' QuantizationStrategy value.
STRATEGY = {"tensor": "tensor", "head": "attn_head"}
# The kv_cache_scheme fields vLLM's CompressedTensorsKVCacheMethod reads; two schemes agreeing on them are the same.
SCHEME_KEYS = ("num_bits", "type", "strategy", "dynamic", "symmetric")


def check_granularity(granularity: str) -> None:
    if granularity not in STRATEGY:
        raise ExportError(
            f"vLLM's FP8 KV cache takes per-tensor or per-KV-head scales: --granularity must be tensor or head, not {granularity}"
        )


def scale_tensors(stats: CalibStats, granularity: str = "tensor") -> dict[str, torch.Tensor]:
    """``model.layers.{i}.self_attn.{k,v}_scale`` = absmax / 448, float32; zero ranges floored (with a warning)."""
    check_granularity(granularity)
    floored: list[str] = []
    tensors: dict[str, torch.Tensor] = {}
    for i in range(stats.num_layers):
        for prefix, st in (("k", stats.key_stats), ("v", stats.value_stats)):
            scale = reduce_to_granularity(st["absmax"][i], granularity, "max").reshape(-1) / FP8_E4M3_MAX
            if (scale < SCALE_EPS).any():
                floored.append(f"layer {i} {prefix.upper()}")
                scale = scale.clamp_min(SCALE_EPS)
            tensors[f"model.layers.{i}.self_attn.{prefix}_scale"] = scale.float().contiguous()
    warn_floored(floored)
    return tensors


def write_scales(stats: CalibStats, path: Path, granularity: str = "tensor") -> Path:
    """The scales as one safetensors file, with the calibration facts in its metadata."""
    tensors = scale_tensors(stats, granularity)
    meta = {
        **stats.metadata(),
        "format": VLLM_FORMAT,
        "format_version": str(FORMAT_VERSION),
        "granularity": granularity,
        "kv_cache_dtype": "fp8_e4m3",
        "fp8_max": str(FP8_E4M3_MAX),
        "num_layers": str(stats.num_layers),
        "num_kv_heads": str(stats.num_kv_heads),
        "exported": now(),
    }
    save_file(tensors, str(path), metadata=meta)
    return path


def export_vllm(stats: CalibStats, out_dir: str | Path, *, granularity: str = "tensor") -> list[Path]:
    """The scales file and a short README (which says how to get a ready model folder instead)."""
    check_granularity(granularity)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = write_scales(stats, out / VLLM_FILE, granularity)
    readme = out / VLLM_README
    readme.write_text(render(
        "README_vllm.md", file=VLLM_FILE, model=stats.meta.get("model", "the calibrated model"),
        num_layers=stats.num_layers, shape=_shape(stats, granularity), work_dir=stats.work_dir or "WORK_DIR",
        granularity=granularity, scheme=json.dumps(kv_cache_scheme(granularity)), doc=VLLM_DOC,
    ), encoding="utf-8")
    return [path, readme]


def kv_cache_scheme(granularity: str = "tensor") -> dict[str, Any]:
    """compressed-tensors ``QuantizationArgs`` for static symmetric FP8 scales, as ``config.json`` holds them."""
    check_granularity(granularity)
    return {"num_bits": 8, "type": "float", "strategy": STRATEGY[granularity], "dynamic": False, "symmetric": True}


def quantization_config(existing: Any, granularity: str = "tensor", where: str = "config.json") -> dict[str, Any]:
    """The ``quantization_config`` to write: a fresh compressed-tensors one, or ``existing`` with the scheme added.

    Refused (ExportError): another quant_method (its loader would be replaced by compressed-tensors'), or a
    compressed-tensors config that already has a different kv_cache_scheme.
    """
    scheme = kv_cache_scheme(granularity)
    if existing is None:
        return {"quant_method": "compressed-tensors", "format": "dense", "config_groups": {}, "kv_cache_scheme": scheme}
    if not isinstance(existing, dict):
        raise ExportError(f"{where}: quantization_config is not a JSON object: fix the model's config.json")
    method = existing.get("quant_method")
    if method != "compressed-tensors":
        raise ExportError(
            f"{where}: the model is already quantized with {method or 'an unnamed method'}; vLLM reads these KV "
            "scales through a compressed-tensors quantization_config, which would replace that one: export for "
            "the unquantized (fp16/bf16) model or a compressed-tensors one"
        )
    have = existing.get("kv_cache_scheme")
    if have is not None and (not isinstance(have, dict) or any(have.get(k) != scheme[k] for k in SCHEME_KEYS)):
        raise ExportError(
            f"{where}: the model already has a different kv_cache_scheme ({json.dumps(have)}, this export's is "
            f"{json.dumps(scheme)}): start from the model without KV-cache quantization"
        )
    return {**existing, "kv_cache_scheme": have or scheme}


def check_with_compressed_tensors(config: dict[str, Any]) -> str | None:
    """Parse ``config`` with the compressed-tensors package when installed; its version, or None when it is not.

    Imported here only: the GPU machine has no compressed-tensors, and nothing else needs it.
    """
    try:
        import compressed_tensors
        from compressed_tensors import QuantizationConfig
        from compressed_tensors.quantization import QuantizationArgs
    except ImportError:
        return None
    try:
        parsed = QuantizationConfig.model_validate(config)
        QuantizationArgs.model_validate(config["kv_cache_scheme"])  # extra="forbid": a misnamed field fails here
    except Exception as exc:  # pydantic's ValidationError, or a ValueError from a validator
        raise ExportError(f"compressed-tensors rejects the quantization_config ({_first_line(exc)})") from None
    if parsed.kv_cache_scheme is None:
        raise ExportError("compressed-tensors read no kv_cache_scheme from the quantization_config")
    return getattr(compressed_tensors, "__version__", "unknown")


def _shape(stats: CalibStats, granularity: str) -> str:
    return "(1,), one scale per layer" if granularity == "tensor" else f"({stats.num_kv_heads},), one scale per KV head"


def _first_line(exc: Exception) -> str:
    return " ".join(str(exc).split())[:300]
