"""How much KV cache fits: LMDeploy's ``cache_max_entry_count`` made explicit, per KV mode.

Two views of the same numbers, because users misread one for the other: in the *same memory*
an int8 cache holds about twice the tokens; for the *same conversation* it takes about half
the bytes. ``cache_max_entry_count`` in (0, 1] is a fraction of the memory free after the
weights load (LMDeploy's meaning since 0.2.2); an integer >= 1 is a number of blocks.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from .kv_shape import KVShape
from .modes import KVMode


def parse_cache_max_entry_count(text: str) -> float | int:
    """``"0.5"`` -> 0.5 (a fraction), ``"400"`` -> 400 (blocks); rejects everything else clearly."""
    try:
        value = int(text) if text.strip().isdigit() else float(text)
    except ValueError:
        raise ValueError(f"--cache-max-entry-count must be a fraction in (0, 1] or a whole number of blocks, got {text!r}") from None
    if isinstance(value, float) and not 0 < value <= 1:
        raise ValueError(f"--cache-max-entry-count {value} is not a fraction in (0, 1]; for a number of blocks give a whole number")
    if isinstance(value, int) and value < 1:
        raise ValueError("--cache-max-entry-count must be at least 1 block")
    return value


def free_memory_bytes(device: torch.device | str) -> int:
    """Memory free for the KV pool now: CUDA's free memory, or available RAM on a CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    import psutil

    return psutil.virtual_memory().available


def static_param_bytes(mode: KVMode, shape: KVShape, granularity: str = "channel") -> int:
    """Bytes of a static mode's per-layer parameters (fp32 scale and zp for K and V)."""
    if not mode.quantized or mode.dynamic:
        return 0
    per_layer = {"tensor": 1, "head": shape.num_kv_heads, "channel": shape.num_kv_heads * shape.head_dim}[granularity]
    return shape.num_layers * 4 * per_layer * 4


@dataclass
class ModeCapacity:
    kv: str
    bytes_per_token: int
    block_bytes: int
    blocks: int
    tokens: int
    sessions: int  # concurrent sessions of ``session_tokens`` that fit
    session_bytes: int  # bytes one session of ``session_tokens`` holds (whole blocks)
    tokens_vs_fp16: float
    session_bytes_vs_fp16: float


def plan(
    modes: list[KVMode],
    shape: KVShape,
    *,
    cache_max_entry_count: float | int | None = None,
    budget_bytes: int | None = None,
    free_bytes: int | None = None,
    block_size: int = 64,
    session_tokens: int = 2048,
    fp_dtype: torch.dtype = torch.float16,
) -> dict[str, Any]:
    """Blocks, tokens and sessions per mode for one budget; the budget is the same memory for every mode."""
    if (cache_max_entry_count is None) == (budget_bytes is None):
        raise ValueError("give exactly one of --cache-max-entry-count or --budget-mib")
    fp16_block = shape.num_layers * shape.num_kv_heads * block_size * 2 * shape.head_dim * fp_dtype.itemsize
    if budget_bytes is None:
        if isinstance(cache_max_entry_count, int):
            budget_bytes = cache_max_entry_count * fp16_block  # blocks are counted in fp16 blocks' memory
        else:
            if free_bytes is None:
                raise ValueError("a fractional cache_max_entry_count needs the free memory after the weights load")
            budget_bytes = int(cache_max_entry_count * free_bytes)
    rows = []
    for mode in modes:
        bpt = shape.num_layers * shape.num_kv_heads * mode.bytes_per_token_per_head(shape.head_dim, fp_dtype)
        block_bytes = bpt * block_size
        blocks = max(0, (budget_bytes - static_param_bytes(mode, shape)) // block_bytes)
        per_session = -(-session_tokens // block_size)
        rows.append(dict(kv=mode.name, bytes_per_token=bpt, block_bytes=block_bytes, blocks=blocks,
                         tokens=blocks * block_size, sessions=blocks // per_session,
                         session_bytes=per_session * block_bytes + static_param_bytes(mode, shape)))
    base = next((r for r in rows if r["kv"] == "fp16"), rows[0])
    results = [
        ModeCapacity(**r, tokens_vs_fp16=r["tokens"] / max(base["tokens"], 1),
                     session_bytes_vs_fp16=r["session_bytes"] / base["session_bytes"])
        for r in rows
    ]
    return {
        "shape": asdict(shape),
        "block_size": block_size,
        "budget_bytes": budget_bytes,
        "cache_max_entry_count": cache_max_entry_count,
        "free_bytes": free_bytes,
        "session_tokens": session_tokens,
        "results": [asdict(r) for r in results],
    }


def format_plan(report: dict[str, Any]) -> str:
    """Both views as a table: same memory -> tokens; same conversation -> bytes."""
    mib = 1024 * 1024
    head = (f"budget {report['budget_bytes'] / mib:.1f} MiB, block_size {report['block_size']}, "
            f"sessions of {report['session_tokens']} tokens")
    rows = [("kv", "bytes/token", "blocks", "tokens", "x fp16", "sessions", "MiB per session", "x fp16")]
    for r in report["results"]:
        rows.append((r["kv"], str(r["bytes_per_token"]), str(r["blocks"]), str(r["tokens"]), f"{r['tokens_vs_fp16']:.3f}",
                     str(r["sessions"]), f"{r['session_bytes'] / mib:.2f}", f"{r['session_bytes_vs_fp16']:.3f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join([head, *("  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows)])


def pool_blocks(
    mode: KVMode,
    shape: KVShape,
    cache_max_entry_count: float | int,
    device: torch.device | str,
    block_size: int = 64,
    free_bytes: int | None = None,
) -> int:
    """Blocks of ``mode`` a fixed pool gets for ``cache_max_entry_count`` on ``device``.

    ``free_bytes``: the memory a fraction applies to (default: what is free on ``device`` now, so call
    this after the weights load).
    """
    free = None
    if isinstance(cache_max_entry_count, float):
        free = free_memory_bytes(device) if free_bytes is None else free_bytes
    report = plan([mode], shape, cache_max_entry_count=cache_max_entry_count, free_bytes=free, block_size=block_size)
    return report["results"][0]["blocks"]
