"""Turn calibration stats into KV quantization parameters for an engine: TurboMind, KVQ Studio or vLLM.

One module per format: :mod:`.turbomind` (LMDeploy <= 0.3.x ``past_kv_scale`` files), :mod:`.kvq` (our
``kv_qparams.safetensors``), :mod:`.vllm` (FP8 ``k_scale``/``v_scale`` and their compressed-tensors config) and
:mod:`.vllm_folder` (a model folder vLLM serves as is). Scales are computed in fp32 from the stats (LMDeploy
computes in the stats' own dtype, fp16 for its observers; from fp32 stats the bytes are the same).
"""

from __future__ import annotations

from pathlib import Path

from ..workdir import CalibStats
from .common import FORMAT_VERSION, GRANULARITIES, ExportError, writing
from .kvq import KVQ_FILE, export_kvq
from .turbomind import TURBOMIND_SIDECAR, export_turbomind
from .vllm import (
    FP8_E4M3_MAX,
    VLLM_DOC,
    VLLM_FILE,
    VLLM_FORMAT,
    VLLM_README,
    export_vllm,
    kv_cache_scheme,
)
from .vllm_folder import READY_README, VLLMFolder, export_vllm_model

FORMATS = ("turbomind", "kvq", "vllm")
DEFAULT_GRANULARITY = {"turbomind": "tensor", "kvq": "channel", "vllm": "tensor"}

__all__ = [
    "DEFAULT_GRANULARITY", "FORMATS", "FORMAT_VERSION", "FP8_E4M3_MAX", "GRANULARITIES", "KVQ_FILE", "READY_README",
    "TURBOMIND_SIDECAR", "VLLM_DOC", "VLLM_FILE", "VLLM_FORMAT", "VLLM_README", "ExportError", "VLLMFolder",
    "check_options", "export", "export_kvq", "export_turbomind", "export_vllm", "export_vllm_model",
    "kv_cache_scheme",
]


def check_options(fmt: str, *, num_tp: int = 1, kv_bits: int = 8, granularity: str | None = None) -> str:
    """Refuse options format ``fmt`` cannot honour; returns the granularity to use (the format's default if None)."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}: use one of {', '.join(FORMATS)}")
    if granularity is not None and granularity not in GRANULARITIES:
        raise ExportError(f"unknown granularity {granularity!r}: use one of {', '.join(GRANULARITIES)}")
    if num_tp < 1:
        raise ExportError(f"--num-tp must be at least 1, got {num_tp}")
    if fmt != "turbomind" and num_tp != 1:
        raise ExportError(f"--num-tp is for the turbomind format only ({fmt} files hold every KV head; the engine shards them)")
    granularity = granularity or DEFAULT_GRANULARITY[fmt]
    if fmt == "turbomind" and granularity != "tensor":
        raise ExportError(
            f"TurboMind takes one set of parameters per layer and TP shard: --granularity must be tensor, not {granularity}"
        )
    if fmt == "vllm" and kv_bits != 8:
        raise ExportError(f"vLLM's FP8 KV cache is 8-bit: --kv-bits must be 8, not {kv_bits}")
    return granularity


def export(
    stats: CalibStats,
    out_dir: str | Path,
    fmt: str,
    *,
    kv_sym: bool = False,
    num_tp: int = 1,
    kv_bits: int = 8,
    granularity: str | None = None,
    model_dir: str | Path | None = None,
    qk_context: int | None = None,
) -> list[Path]:
    """Write ``stats`` as parameters in format ``fmt`` under ``out_dir``; returns the files written.

    ``model_dir`` (vllm only): build a copy of that model folder at ``out_dir`` that vLLM serves as is
    (:func:`export_vllm_model`); the files returned are the ones that differ from the model's.
    ``qk_context`` (kvq only): fit the key transform to every position of a context of that many tokens.
    """
    granularity = check_options(fmt, num_tp=num_tp, kv_bits=kv_bits, granularity=granularity)
    if qk_context is not None and fmt != "kvq":
        raise ExportError(f"--qk-context fits our key transform, which only the kvq format holds, not {fmt}")
    if qk_context is not None and qk_context < 1:
        raise ExportError(f"--qk-context must be a positive number of tokens, got {qk_context}")
    if model_dir is not None and fmt != "vllm":
        raise ExportError(f"a model folder is built for the vllm format only, not {fmt}")
    if model_dir is not None:
        return export_vllm_model(stats, model_dir, out_dir, granularity=granularity).written
    with writing(out_dir):
        if fmt == "turbomind":
            return export_turbomind(stats, out_dir, kv_sym=kv_sym, num_tp=num_tp, kv_bits=kv_bits)
        if fmt == "kvq":
            return export_kvq(stats, out_dir, granularity=granularity, kv_sym=kv_sym, kv_bits=kv_bits,
                              qk_context=qk_context)
        return export_vllm(stats, out_dir, granularity=granularity)
