"""How much KV cache fits, as tables: the report of :func:`kvcache.storage.sizing.capacity_report`.

Two views of the same numbers, because users misread one for the other: in the *same memory*
an int8 cache holds about twice the tokens; for the *same conversation* it takes about half
the bytes.
"""

from __future__ import annotations

from typing import Any

from .text_table import text_table


def format_capacity(report: dict[str, Any]) -> str:
    """Both views as a table: same memory -> tokens; same conversation -> bytes."""
    mib = 1024 * 1024
    head = (f"budget {report['budget_bytes'] / mib:.1f} MiB, block_size {report['block_size']}, "
            f"sessions of {report['session_tokens']} tokens")
    rows = [("kv", "bytes/token", "blocks", "tokens", "x fp16", "sessions", "MiB per session", "x fp16")]
    for r in report["results"]:
        rows.append((r["kv"], str(r["bytes_per_token"]), str(r["blocks"]), str(r["tokens"]), f"{r['tokens_vs_fp16']:.3f}",
                     str(r["sessions"]), f"{r['session_bytes'] / mib:.2f}", f"{r['session_bytes_vs_fp16']:.3f}"))
    return "\n".join([head, text_table(rows)])

