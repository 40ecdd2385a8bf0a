"""Turn calibration stats into KV quantization parameters for an engine: TurboMind, KVQ Studio or vLLM.

Each writer returns the list of files it wrote. Scales are computed in fp32 from the stats (LMDeploy
computes in the stats' own dtype, fp16 for its observers; from fp32 stats the bytes are the same).

* ``turbomind``: LMDeploy TurboMind's raw files ``layers.{i}.past_kv_scale.{tp}.weight``, float32
  little-endian, one per layer and tensor-parallel shard (the KV heads chunked over ``num_tp``).
  Asymmetric: ``[k_scale, k_zp, v_scale, v_zp]`` with ``zp = (min+max)/2``,
  ``scale = (max-min)/(2^bits-1)`` over the shard. Symmetric: ``[k_scale, v_scale]`` with
  ``scale = absmax/(2^(bits-1)-1)``. Layout as written by LMDeploy's
  ``lmdeploy/lite/apis/kv_qparams.py`` (``_export_asym`` / ``_export_sym``).
* ``kvq``: our ``kv_qparams.safetensors`` (:class:`kvcache.qparams.KVQParams`), for the ``int8`` KV mode.
* ``vllm``: ``k_scale``/``v_scale`` for vLLM's FP8 (e4m3) KV cache, ``scale = absmax/448``, named
  ``model.layers.{i}.self_attn.k_scale`` as vLLM reads them from a checkpoint, plus ``README_vllm.md``.
"""

from __future__ import annotations

import json
import warnings
from datetime import datetime, timezone
from pathlib import Path

import torch
from safetensors.torch import save_file

from kvcache.qparams import KVQParams
from kvcache.quant import SCALE_EPS, reduce_to_granularity

from .stats_io import CalibStats

FORMATS = ("turbomind", "kvq", "vllm")
GRANULARITIES = ("tensor", "head", "channel")
DEFAULT_GRANULARITY = {"turbomind": "tensor", "kvq": "channel", "vllm": "tensor"}

TURBOMIND_SIDECAR = "kv_qparams_turbomind.json"
KVQ_FILE = "kv_qparams.safetensors"
VLLM_FILE = "kv_cache_scales.safetensors"
VLLM_README = "README_vllm.md"
VLLM_FORMAT = "kvq-vllm-kv-scales"
FORMAT_VERSION = 1
# Largest finite float8 e4m3fn value (NVIDIA); ROCm's e4m3fnuz tops out at 240.
FP8_E4M3_MAX = 448.0

VLLM_DOC = "https://docs.vllm.ai/en/latest/features/quantization/quantized_kvcache/"


class ExportError(ValueError):
    """Options that no engine format can honour (shown to the user as one line)."""


def export(
    stats: CalibStats,
    out_dir: str | Path,
    fmt: str,
    *,
    kv_sym: bool = False,
    num_tp: int = 1,
    kv_bits: int = 8,
    granularity: str | None = None,
) -> list[Path]:
    """Write ``stats`` as parameters in format ``fmt`` under ``out_dir``; returns the files written."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}: use one of {', '.join(FORMATS)}")
    if granularity is not None and granularity not in GRANULARITIES:
        raise ExportError(f"unknown granularity {granularity!r}: use one of {', '.join(GRANULARITIES)}")
    if num_tp < 1:
        raise ExportError(f"--num-tp must be at least 1, got {num_tp}")
    if fmt != "turbomind" and num_tp != 1:
        raise ExportError(f"--num-tp is for the turbomind format only ({fmt} files hold every KV head; the engine shards them)")
    granularity = granularity or DEFAULT_GRANULARITY[fmt]
    if fmt == "turbomind":
        if granularity != "tensor":
            raise ExportError(
                f"TurboMind takes one set of parameters per layer and TP shard: --granularity must be tensor, not {granularity}"
            )
        return export_turbomind(stats, out_dir, kv_sym=kv_sym, num_tp=num_tp, kv_bits=kv_bits)
    if fmt == "kvq":
        return export_kvq(stats, out_dir, granularity=granularity, kv_sym=kv_sym, kv_bits=kv_bits)
    if kv_bits != 8:
        raise ExportError(f"vLLM's FP8 KV cache is 8-bit: --kv-bits must be 8, not {kv_bits}")
    return export_vllm(stats, out_dir, granularity=granularity)


# --- TurboMind -------------------------------------------------------------------------------------------


def export_turbomind(
    stats: CalibStats, out_dir: str | Path, *, kv_sym: bool = False, num_tp: int = 1, kv_bits: int = 8
) -> list[Path]:
    """``layers.{i}.past_kv_scale.{tp}.weight`` per layer and TP shard (see the module docstring)."""
    if kv_bits != 8:
        raise ExportError(f"TurboMind's KV cache int8 mode (quant_policy=4) takes 8-bit parameters only: --kv-bits must be 8, not {kv_bits}")
    heads = stats.num_kv_heads
    if num_tp < 1 or heads % num_tp:
        divisors = ", ".join(str(d) for d in range(1, heads + 1) if heads % d == 0)
        raise ExportError(
            f"--num-tp {num_tp} does not divide the model's {heads} KV heads: use one of {divisors}"
        )
    if kv_sym:
        warnings.warn(
            "the symmetric TurboMind layout [k_scale, v_scale] is read only by TurboMind from before LMDeploy "
            "PR #218 (mid 2023); later TurboMind (to LMDeploy 0.3.x) reads [k_scale, k_zp, v_scale, v_zp]: "
            "leave out --kv-sym for those",
            stacklevel=3,
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    floored: list[str] = []
    written: list[Path] = []
    for i in range(stats.num_layers):
        for tp in range(num_tp):
            values: list[torch.Tensor] = []
            for prefix, st in (("K", stats.key_stats), ("V", stats.value_stats)):
                if kv_sym:
                    absmax = torch.chunk(st["absmax"][i], num_tp)[tp].max()
                    scale = absmax / ((1 << (kv_bits - 1)) - 1)
                    values.append(_floor(scale, floored, f"layer {i} {prefix} (TP shard {tp})"))
                else:
                    lo = torch.chunk(st["min"][i], num_tp)[tp].min()
                    hi = torch.chunk(st["max"][i], num_tp)[tp].max()
                    scale = (hi - lo) / ((1 << kv_bits) - 1)
                    values.append(_floor(scale, floored, f"layer {i} {prefix} (TP shard {tp})"))
                    values.append((hi + lo) / 2)
            path = out / f"layers.{i}.past_kv_scale.{tp}.weight"
            path.write_bytes(_f32_le(values))
            written.append(path)
    _warn_floored(floored)
    sidecar = out / TURBOMIND_SIDECAR
    info = {
        "format": "turbomind-past-kv-scale",
        "format_version": FORMAT_VERSION,
        "files": "layers.{i}.past_kv_scale.{tp}.weight, raw float32 little-endian",
        "layout": ["k_scale", "v_scale"] if kv_sym else ["k_scale", "k_zp", "v_scale", "v_zp"],
        "granularity": "tensor (per layer and TP shard)",
        "symmetric": kv_sym,
        "bits": kv_bits,
        "num_tp": num_tp,
        "num_layers": stats.num_layers,
        "num_kv_heads": heads,
        "head_dim": stats.head_dim,
        "reader": (
            "TurboMind with quant_policy=4 (LMDeploy <= 0.3.x); the 2-value symmetric layout only in TurboMind "
            "from before LMDeploy PR #218 (mid 2023)" if kv_sym else
            "TurboMind with quant_policy=4 (LMDeploy from PR #218, Aug 2023, to 0.3.x)"
        ),
        "exported": _now(),
        "metadata": stats.metadata(),
    }
    sidecar.write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return [*written, sidecar]


def _f32_le(values: list[torch.Tensor]) -> bytes:
    return torch.stack([v.float().reshape(()) for v in values]).numpy().astype("<f4").tobytes()


# --- KVQ Studio ------------------------------------------------------------------------------------------


def export_kvq(
    stats: CalibStats, out_dir: str | Path, *, granularity: str = "channel", kv_sym: bool = False, kv_bits: int = 8
) -> list[Path]:
    """``kv_qparams.safetensors`` for the ``int8`` KV mode (``--qparams``)."""
    if kv_bits not in (4, 8):
        raise ExportError(f"the kvq format takes 4 or 8 bits: --kv-bits must be 4 or 8, not {kv_bits}")
    if granularity not in GRANULARITIES:
        raise ExportError(f"unknown granularity {granularity!r}: use one of {', '.join(GRANULARITIES)}")
    qp = KVQParams.from_stats(
        stats.key_stats, stats.value_stats, granularity=granularity, symmetric=kv_sym, bits=kv_bits,
        metadata={**stats.metadata(), "exported": _now()},
    )
    floored = [
        f"layer {i} {prefix}"
        for i in range(qp.num_layers)
        for prefix, scales in (("K", qp.k_scale), ("V", qp.v_scale))
        if (scales[i] <= SCALE_EPS).any()
    ]
    _warn_floored(floored)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return [qp.save(out / KVQ_FILE)]


# --- vLLM ------------------------------------------------------------------------------------------------


def export_vllm(stats: CalibStats, out_dir: str | Path, *, granularity: str = "tensor") -> list[Path]:
    """FP8 e4m3 ``k_scale``/``v_scale`` per layer: shape (1,) per tensor or (num_kv_heads,) per head."""
    if granularity not in ("tensor", "head"):
        raise ExportError(
            f"vLLM's FP8 KV cache takes per-tensor or per-KV-head scales: --granularity must be tensor or head, not {granularity}"
        )
    floored: list[str] = []
    tensors: dict[str, torch.Tensor] = {}
    for i in range(stats.num_layers):
        for prefix, st in (("k", stats.key_stats), ("v", stats.value_stats)):
            absmax = reduce_to_granularity(st["absmax"][i], granularity, "max").reshape(-1)
            scale = absmax / FP8_E4M3_MAX
            if (scale < SCALE_EPS).any():
                floored.append(f"layer {i} {prefix.upper()}")
                scale = scale.clamp_min(SCALE_EPS)
            tensors[f"model.layers.{i}.self_attn.{prefix}_scale"] = scale.float().contiguous()
    _warn_floored(floored)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / VLLM_FILE
    meta = {
        **stats.metadata(),
        "format": VLLM_FORMAT,
        "format_version": str(FORMAT_VERSION),
        "granularity": granularity,
        "kv_cache_dtype": "fp8_e4m3",
        "fp8_max": str(FP8_E4M3_MAX),
        "num_layers": str(stats.num_layers),
        "num_kv_heads": str(stats.num_kv_heads),
        "exported": _now(),
    }
    save_file(tensors, str(path), metadata=meta)
    readme = out / VLLM_README
    readme.write_text(_vllm_readme(stats, granularity), encoding="utf-8")
    return [path, readme]


def _vllm_readme(stats: CalibStats, granularity: str) -> str:
    strategy = "tensor" if granularity == "tensor" else "attn_head"
    shape = "(1,)" if granularity == "tensor" else f"({stats.num_kv_heads},)"
    model = stats.meta.get("model", "the calibrated model")
    scheme = json.dumps(
        {"num_bits": 8, "type": "float", "strategy": strategy, "dynamic": False, "symmetric": True}, indent=2
    ).replace("\n", "\n     ")
    return f"""# FP8 KV-cache scales for vLLM

`{VLLM_FILE}` holds, for each of the {stats.num_layers} layers of {model},
`model.layers.{{i}}.self_attn.k_scale` and `model.layers.{{i}}.self_attn.v_scale`: float32, shape {shape}
({"one scale per layer" if granularity == "tensor" else "one scale per KV head"}), `scale = absmax / 448`
(float8 e4m3fn's largest value), so that vLLM stores `k / k_scale` in FP8. Made by `python -m calib kv_qparams`.

Checked against vLLM's docs page "Quantized KV Cache" ({VLLM_DOC}): per-tensor scales are
`k/v_scale = [1]`, per-attention-head scales `k/v_scale = [num_kv_heads]` (FlashAttention backend only); and
against vLLM's source: `maybe_remap_kv_scale_name` (vllm/model_executor/model_loader/weight_utils.py) maps
`...self_attn.k_scale` to the attention layer's `...self_attn.attn.k_scale`, and
`CompressedTensorsKVCacheMethod` (vllm/model_executor/layers/quantization/compressed_tensors/compressed_tensors.py)
creates those parameters (1 or num_kv_heads values; per-head scales are split over tensor parallelism by vLLM).

## Merge into the model

1. Copy the model folder (keep the original untouched).
2. Add the tensors to the checkpoint, either
   - copy `{VLLM_FILE}` into the folder; if it has `model.safetensors.index.json`, add every tensor
     name of the file to its `weight_map` with the value `"{VLLM_FILE}"` (vLLM loads only the files the
     index lists), or
   - load one shard with `safetensors.torch.load_file`, add the tensors, and save it back (and list them in
     the index as above).
3. vLLM creates `k_scale`/`v_scale` parameters only when the model has a quantization config. For an fp16/bf16
   model, add to `config.json` (the `config_groups` stay empty, so the weights are not touched):

   ```json
   "quantization_config": {{
     "quant_method": "compressed-tensors",
     "format": "dense",
     "config_groups": {{}},
     "kv_cache_scheme": {scheme}
   }}
   ```

   If the model already has a `compressed-tensors` quantization config, add just the `kv_cache_scheme` to it.
   Without such a config vLLM skips these tensors with a warning and uses scale 1.0. (The merged copy is for
   vLLM: transformers would now want the `compressed-tensors` package to load it.)
4. Serve with the FP8 KV cache and without on-the-fly scales:

   ```python
   LLM(model="path/to/merged", kv_cache_dtype="fp8", calculate_kv_scales=False)
   ```
   or `vllm serve path/to/merged --kv-cache-dtype fp8`.

Notes:
- The scales assume float8 e4m3fn (max 448), vLLM's `fp8` KV cache on NVIDIA GPUs.
- Queries are not calibrated here; where vLLM's FlashAttention 3 backend also quantizes queries to FP8,
  their scale stays 1.0.
- This layout was checked against vLLM's docs and source, not yet by serving a merged model with vLLM.
"""


# --- shared ----------------------------------------------------------------------------------------------


def _floor(scale: torch.Tensor, floored: list[str], where: str) -> torch.Tensor:
    if scale.item() < SCALE_EPS:
        floored.append(where)
        return torch.tensor(SCALE_EPS)
    return scale


def _warn_floored(floored: list[str]) -> None:
    if floored:
        shown = ", ".join(floored[:12]) + (f" and {len(floored) - 12} more" if len(floored) > 12 else "")
        warnings.warn(
            f"zero range (a constant K/V) in {shown}: scale floored at {SCALE_EPS:g}; "
            "check the calibration saw enough tokens",
            stacklevel=3,
        )


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
