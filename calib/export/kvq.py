"""Our own ``kv_qparams.safetensors`` (:class:`kvcache.qparams.KVQParams`): one file for every calibrated KV mode.

It holds the static scales and zero points (the ``int8`` mode, any granularity) and, when the work dir
has the query and key second moments (ours since they were added), the query-aware key transform of
every layer (:func:`kvcache.transforms.qk_transform`), which the calibrated sub-8-bit modes use, and the key
eigenbasis after it with its per-channel weights (:func:`kvcache.transforms.key_eigenbasis`), where the
allocated-bit modes code keys.
``qk_context=N`` fits that transform to every position of an N-token context rather than to the
calibration windows' (the moments averaged over the RoPE turns in between, :func:`rope_averaged`):
keys late in a long context then lose no more than early ones, at some cost within the first windows.
"""

from __future__ import annotations

from pathlib import Path

from kvcache.qparams import FILE_NAME as KVQ_FILE
from kvcache.qparams import KVQParams
from kvcache.quant import SCALE_EPS
from kvcache.transforms import key_eigenbasis, qk_transform, rope_averaged

from ..workdir import CalibStats
from .common import GRANULARITIES, ExportError, now, warn_floored


def export_kvq(
    stats: CalibStats, out_dir: str | Path, *, granularity: str = "channel", kv_sym: bool = False, kv_bits: int = 8,
    qk_context: int | None = None,
) -> list[Path]:
    """``kv_qparams.safetensors`` for ``python -m kvcache chat --kv MODE --qparams FILE`` (every calibrated mode).

    ``qk_context``: the context length the key transform is fitted to (default: the calibration windows').
    """
    if kv_bits not in (4, 8):
        raise ExportError(f"the kvq format takes 4 or 8 bits: --kv-bits must be 4 or 8, not {kv_bits}")
    if granularity not in GRANULARITIES:
        raise ExportError(f"unknown granularity {granularity!r}: use one of {', '.join(GRANULARITIES)}")
    transforms, bases, fitted = None, None, {}
    if stats.key_moments is not None:
        key_moments, query_moments, fitted = _fitted_moments(stats, qk_context)
        transforms = [qk_transform(k, q) for k, q in zip(key_moments, query_moments)]
        bases = [key_eigenbasis(k, q, a) for k, q, a in zip(key_moments, query_moments, transforms)]
    elif qk_context is not None:
        raise ExportError(f"{stats.work_dir or 'the work dir'} has no qk_moments.pth, so no key transform to fit to "
                          "--qk-context: recalibrate with `python -m calib calibrate`, or drop --qk-context")
    qp = KVQParams.from_stats(
        stats.key_stats, stats.value_stats, granularity=granularity, symmetric=kv_sym, bits=kv_bits,
        metadata={**stats.metadata(), **stats.text_sketch(), **fitted, "exported": now()}, k_transform=transforms,
        k_basis=[b for b, _ in bases] if bases else None, k_weight=[w for _, w in bases] if bases else None,
    )
    floored = [
        f"layer {i} {prefix}"
        for i in range(qp.num_layers)
        for prefix, scales in (("K", qp.k_scale), ("V", qp.v_scale))
        if (scales[i] <= SCALE_EPS).any()
    ]
    warn_floored(floored)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return [qp.save(out / KVQ_FILE)]


def _fitted_moments(stats: CalibStats, qk_context: int | None) -> tuple[list, list, dict[str, str]]:
    """The key and query moments the transform is fitted to, and ``{"qk_context": N}`` when averaged for N tokens."""
    seqlen = int(stats.meta.get("seqlen") or 0)
    if qk_context is None or qk_context <= seqlen:
        return stats.key_moments, stats.query_moments, {}
    if stats.rope_inv_freq is None:
        raise ExportError(f"{stats.work_dir or 'the work dir'} was calibrated before the RoPE frequencies were recorded, "
                          "so --qk-context cannot fit the key transform to a longer context: recalibrate "
                          "(`python -m calib calibrate`), or drop --qk-context")
    offsets = qk_context - seqlen + 1  # windows at positions 0..seqlen-1, turned on by up to qk_context - seqlen
    try:
        keys = [rope_averaged(m, stats.rope_inv_freq, offsets) for m in stats.key_moments]
        queries = [rope_averaged(m, stats.rope_inv_freq, offsets) for m in stats.query_moments]
    except ValueError as e:
        raise ExportError(f"--qk-context: {e}; drop --qk-context for this model") from None
    return keys, queries, {"qk_context": str(qk_context)}
