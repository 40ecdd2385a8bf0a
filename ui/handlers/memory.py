"""Memory tab: one reading of device, allocator, process and exact KV bytes; the two capacity views."""

from __future__ import annotations

from typing import Any

from kvcache.config import PoolSize, parse_pool_setting
from kvcache.engine.chat import ChatSession
from kvcache.measure.device_memory import read_device_memory
from kvcache.storage.sizing import free_memory_bytes

from .. import charts
from ..state import (
    LEFT_MODE,
    MEMORY_HISTORY_S,
    AppState,
    SessionState,
    UserError,
    kv_label,
)


def _kv_figures(session: ChatSession | None, free: int | None) -> dict[str, Any] | None:
    if session is None:
        return None
    mem = session.memory()
    out = mem.as_dict()
    out["capacity_tokens"] = (mem.bytes_held - mem.param_bytes) // mem.bytes_per_token if mem.bytes_per_token else 0
    out["fits_tokens"] = free // mem.bytes_per_token if free is not None and mem.bytes_per_token else None
    return out


def memory(app: AppState, sess: SessionState) -> tuple[dict[str, Any], str, str, Any, Any]:
    """One reading: ``(figures, banner, gauges_html, memory_frame, kv_frame)``. Never raises for NVML."""
    reading = read_device_memory()
    figures = reading.as_dict()
    free = None
    if app.loaded is not None:
        try:
            free = free_memory_bytes(app.loaded.device)
        except Exception:  # the page must not fail over a free-memory figure
            free = None
    figures["kv"] = {
        f"{LEFT_MODE} (left)": _kv_figures(sess.left, free),
        f"{kv_label(sess.right.kv) if sess.right else 'quantized'} (right)": _kv_figures(sess.right, free),
    }
    status = app.engine.status() if app.engine is not None else dict(pools=[], kv_bytes=0, batching=None)
    figures["kv_all_sessions_bytes"] = status["kv_bytes"]  # every shared pool, counted once
    figures["kv_pools"] = status["pools"]
    figures["batching"] = status["batching"]
    banner = ""
    if reading.nvml_error:
        banner = f"**No GPU figures.** {reading.nvml_error} Showing this process's memory and the exact KV bytes instead."
    _log_point(sess, reading, figures)
    mem_frame, kv_frame = charts.memory_frames(list(sess.memory_log))
    return figures, banner, charts.gauges_html(figures), mem_frame, kv_frame


def _log_point(sess: SessionState, reading: Any, figures: dict[str, Any]) -> None:
    """One point of the rolling plots; the last ``MEMORY_HISTORY_S`` seconds are kept."""
    point_mem: dict[str, float] = {}
    for g in reading.gpus:
        point_mem[f"GPU{g.index} used"] = g.used
        if g.process_used is not None:
            point_mem[f"GPU{g.index} this process"] = g.process_used
    if reading.torch_cuda:
        point_mem["torch allocated"] = reading.torch_cuda.allocated
        point_mem["torch reserved"] = reading.torch_cuda.reserved
    if reading.process_rss is not None:
        point_mem["process RSS"] = reading.process_rss
    point_kv = {name: kv["bytes_used"] for name, kv in figures["kv"].items() if kv is not None}
    sess.memory_log.append({"t": reading.timestamp, "memory": point_mem, "kv": point_kv})
    while sess.memory_log and reading.timestamp - sess.memory_log[0]["t"] > MEMORY_HISTORY_S:
        sess.memory_log.popleft()


def capacity(
    app: AppState, sess: SessionState, cache_max_entry_count: str | float, session_tokens: int = 2048
) -> tuple[dict[str, Any], Any, Any]:
    """Both views of the KV budget for the loaded model, every mode: ``(report, same_memory, same_conversation)``.

    Same memory: blocks, tokens and sessions of ``session_tokens`` that ``cache_max_entry_count`` gives ONE
    pool, sized exactly as the engine sizes the app's pools (a fraction of the memory free after the weights
    loaded, split between the two panes). Same conversation: the bytes one conversation of ``session_tokens``
    (or this session's own chat, when it is longer) takes.
    """
    engine = app.require_engine()
    size = parse_pool_setting(str(cache_max_entry_count))
    if size == PoolSize():
        raise UserError("Give cache_max_entry_count as a fraction of free memory (e.g. 0.5) or a number of blocks (e.g. 400 blocks).")
    held = len(sess.left.cached_ids) if sess.left is not None else 0
    report = engine.capacity(size.cache_max_entry_count, max(int(session_tokens), held, 1),
                             cache_blocks=size.cache_blocks)
    same_memory, same_conversation = charts.capacity_tables(report)
    return report, same_memory, same_conversation
