"""How much KV cache fits, as tables: the report of :func:`kvcache.storage.sizing.capacity_report`.

Two views of the same numbers, because users misread one for the other: in the *same memory*
an int8 cache holds about twice the tokens; for the *same conversation* it takes about half
the bytes.
"""

from __future__ import annotations

from typing import Any

from ..modes import SEQUENCE_TOKENS, KVMode
from ..storage.shape import KVShape


def format_capacity(report: dict[str, Any]) -> str:
    """Both views as a table: same memory -> tokens; same conversation -> bytes."""
    mib = 1024 * 1024
    head = (f"budget {report['budget_bytes'] / mib:.1f} MiB, block_size {report['block_size']}, "
            f"sessions of {report['session_tokens']} tokens")
    rows = [("kv", "bytes/token", "blocks", "tokens", "x fp16", "sessions", "MiB per session", "x fp16")]
    for r in report["results"]:
        rows.append((r["kv"], str(r["bytes_per_token"]), str(r["blocks"]), str(r["tokens"]), f"{r['tokens_vs_fp16']:.3f}",
                     str(r["sessions"]), f"{r['session_bytes'] / mib:.2f}", f"{r['session_bytes_vs_fp16']:.3f}"))
    return "\n".join([head, _table(rows)])


def _table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)


def _bits(x: float) -> int | float:
    return int(x) if x == int(x) else round(x, 3)


def mode_facts(modes: list[KVMode], config: Any, tokens: int = SEQUENCE_TOKENS) -> list[dict[str, Any]]:
    """What ``python -m kvcache modes --json`` prints, one object per mode, for the model of ``config``.

    ``bytes_per_token``: codes and per-token parameters of one token, all layers and KV heads;
    ``ratio_to_fp16``: a ``tokens``-long sequence's bytes (its fp16 sink tokens included) over fp16's.
    """
    shape = KVShape.from_config(config)
    return [dict(name=m.name, k_bits=_bits(m.k_bits), v_bits=_bits(m.v_bits), needs_calibration=m.needs_qparams,
                 bytes_per_token=m.bytes_per_token(shape), sink_tokens=m.sink_tokens,
                 sink_bytes_per_sequence=m.sink_bytes(shape), pool_bytes=m.static_param_bytes(shape),
                 ratio_to_fp16=m.ratio_to_fp16(shape, tokens), codecs=m.describe_codecs(),
                 engine=m.engine, serve=m.serve, description=m.description)
            for m in modes]
