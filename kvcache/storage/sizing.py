"""How the engine sizes its KV pools: LMDeploy's ``cache_max_entry_count`` made explicit, per KV mode.

``cache_max_entry_count`` in (0, 1] is a fraction of the memory free after the weights load (LMDeploy's
meaning since 0.2.2); ``cache_blocks`` N is the memory of N fp16 blocks. The engine sizes its pools with these
functions and the capacity views (:func:`capacity_report`) use the same ones, so what a page promises is
what the engine allocates. Two views of the same numbers, because users misread one for the other: in the
*same memory* an int8 cache holds about twice the tokens; for the *same conversation* it takes about half
the bytes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from ..config import BASELINE_MODE, BLOCK_SIZE, MAX_NUM_SEQS
from ..modes import KVMode, get_mode
from ..shape import KVShape
from .sinks import fixed_pool_slots


def free_memory_bytes(device: Any) -> int:
    """Memory free for the KV pools on ``device`` (a torch device or its name) now: CUDA's free memory, or available RAM."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    import psutil

    return psutil.virtual_memory().available


@dataclass
class ModeCapacity:
    kv: str
    bytes_per_token: int
    block_bytes: int
    blocks: int
    tokens: int
    sessions: int  # concurrent sessions of ``session_tokens`` that fit
    session_bytes: int  # bytes one session of ``session_tokens`` holds (whole blocks, its sink slot, the pool's maps)
    tokens_vs_fp16: float
    session_bytes_vs_fp16: float


def budget_bytes(
    shape: KVShape,
    *,
    cache_max_entry_count: float | None = None,
    cache_blocks: int | None = None,
    free_bytes: int | None = None,
    pools_sharing: int = 1,
    block_size: int = BLOCK_SIZE,
    fp_dtype: torch.dtype = torch.float16,
) -> int:
    """The memory one pool gets: a fraction of ``free_bytes`` split over ``pools_sharing`` pools, or N fp16 blocks."""
    if cache_blocks is not None:
        return cache_blocks * block_size * get_mode(BASELINE_MODE).bytes_per_token(shape, fp_dtype)
    if cache_max_entry_count is None:
        raise ValueError("a pool that grows on demand has no budget: give cache_max_entry_count or cache_blocks")
    if free_bytes is None:
        raise ValueError("a fractional cache_max_entry_count needs the free memory after the weights load")
    return int(cache_max_entry_count * free_bytes) // pools_sharing


def pool_blocks(mode: KVMode, shape: KVShape, budget: int, block_size: int = BLOCK_SIZE,
                fp_dtype: torch.dtype = torch.float16, stored: bool = False, max_num_seqs: int = MAX_NUM_SEQS) -> int:
    """Blocks of ``mode`` that ``budget`` bytes hold, after the mode's static parameters and maps, counting the
    sink slots a fixed pool of that many blocks holds (:func:`fixed_pool_slots`: one per sequence run at once).

    By the scheme's own bytes (what its engine stores); ``stored``: by what this tool's pool allocates (an
    emulated transformers scheme holds 16-bit values), as the engine sizes its pools."""
    room = budget - mode.static_param_bytes(shape)
    per_token = mode.pool_bytes_per_token(shape, fp_dtype) if stored else mode.bytes_per_token(shape, fp_dtype)
    block = per_token * block_size
    slot = mode.sink_bytes(shape, fp_dtype)
    n = room // (block + slot)  # up to max_num_seqs blocks, each brings a slot; past it, slots are all there
    if n >= max_num_seqs:
        n = (room - fixed_pool_slots(n, max_num_seqs) * slot) // block
    return max(0, int(n))


def pool_sessions(mode: KVMode, shape: KVShape, blocks: int, session_blocks: int, block_size: int = BLOCK_SIZE,
                  fp_dtype: torch.dtype = torch.float16, max_num_seqs: int = MAX_NUM_SEQS) -> int:
    """Sessions of ``session_blocks`` blocks a fixed pool of ``blocks`` holds at once: at most ``max_num_seqs``
    (what its scheduler runs; each takes one of the pool's sink slots, counted in :func:`pool_blocks`) and,
    with a residual window, each takes that window's 16-bit bytes out of the blocks' bytes."""
    block = mode.bytes_per_token(shape, fp_dtype) * block_size
    sessions = min(blocks // session_blocks,
                   blocks * block // (session_blocks * block + mode.residual_bytes(shape, fp_dtype)))
    return min(sessions, max_num_seqs)


def capacity_report(
    modes: list[KVMode],
    shape: KVShape,
    budget: int,
    *,
    block_size: int = BLOCK_SIZE,
    session_tokens: int = 2048,
    fp_dtype: torch.dtype = torch.float16,
    max_num_seqs: int = MAX_NUM_SEQS,
    **facts: Any,
) -> dict[str, Any]:
    """Blocks, tokens and sessions per mode in the same ``budget`` bytes, as each scheme stores them (a
    transformers scheme: its codes, plus each session's 16-bit residual window); ``facts`` are recorded in the report."""
    rows = []
    per_session = -(-session_tokens // block_size)
    for mode in modes:
        bpt = mode.bytes_per_token(shape, fp_dtype)
        blocks = pool_blocks(mode, shape, budget, block_size, fp_dtype, max_num_seqs=max_num_seqs)
        sessions = pool_sessions(mode, shape, blocks, per_session, block_size, fp_dtype, max_num_seqs)
        rows.append(dict(kv=mode.name, bytes_per_token=bpt, block_bytes=bpt * block_size, blocks=blocks,
                         tokens=blocks * block_size, sessions=sessions,
                         session_bytes=per_session * bpt * block_size + mode.sequence_bytes(shape, fp_dtype)
                         + mode.static_param_bytes(shape)))
    base = next((r for r in rows if r["kv"] == BASELINE_MODE), rows[0])
    results = [
        ModeCapacity(**r, tokens_vs_fp16=r["tokens"] / max(base["tokens"], 1),
                     session_bytes_vs_fp16=r["session_bytes"] / base["session_bytes"])
        for r in rows
    ]
    return {
        "shape": asdict(shape),
        "block_size": block_size,
        "budget_bytes": budget,
        **facts,
        "session_tokens": session_tokens,
        "max_num_seqs": max_num_seqs,
        "results": [asdict(r) for r in results],
    }
