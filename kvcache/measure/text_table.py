"""Plain-text tables for the terminal: columns padded to their widest cell, so figures line up by eye."""

from __future__ import annotations


def text_table(rows: list[tuple[str, ...]]) -> str:
    """``rows`` (the header first) as left-aligned columns two spaces apart, trailing spaces trimmed."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)
