"""Our own ``kv_qparams.safetensors`` (:class:`kvcache.qparams.KVQParams`): one file for every calibrated KV mode.

It holds the static scales and zero points (the ``int8`` mode, any granularity) and, when the work dir
has the query and key second moments (ours since they were added), the query-aware key transform of
every layer (:func:`kvcache.transforms.qk_transform`), which the calibrated sub-8-bit modes use.
"""

from __future__ import annotations

from pathlib import Path

from kvcache.qparams import FILE_NAME as KVQ_FILE
from kvcache.qparams import KVQParams
from kvcache.quant import SCALE_EPS
from kvcache.transforms import qk_transform

from ..workdir import CalibStats
from .common import GRANULARITIES, ExportError, now, warn_floored


def export_kvq(
    stats: CalibStats, out_dir: str | Path, *, granularity: str = "channel", kv_sym: bool = False, kv_bits: int = 8
) -> list[Path]:
    """``kv_qparams.safetensors`` for ``python -m kvcache chat --kv MODE --qparams FILE`` (every calibrated mode)."""
    if kv_bits not in (4, 8):
        raise ExportError(f"the kvq format takes 4 or 8 bits: --kv-bits must be 4 or 8, not {kv_bits}")
    if granularity not in GRANULARITIES:
        raise ExportError(f"unknown granularity {granularity!r}: use one of {', '.join(GRANULARITIES)}")
    transforms = None
    if stats.key_moments is not None:
        transforms = [qk_transform(k, q) for k, q in zip(stats.key_moments, stats.query_moments)]
    qp = KVQParams.from_stats(
        stats.key_stats, stats.value_stats, granularity=granularity, symmetric=kv_sym, bits=kv_bits,
        metadata={**stats.metadata(), **stats.text_sketch(), "exported": now()}, k_transform=transforms,
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
