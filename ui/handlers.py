"""What the page's buttons do, as plain functions over :class:`AppState` and :class:`SessionState`.

No gradio here: each function takes plain values and returns plain values (text, pandas frames,
matplotlib figures, file paths), so it can be tested without a browser. Every step is a call into
the library (``kvcache``, ``calib``); this module only arranges the results for the page. Errors a
person can fix are raised as :class:`UserError` (or the library's own one-line errors).
"""

from __future__ import annotations

import json
import logging
import warnings
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from kvcache.block_pool import KVCacheFull
from kvcache.capacity import free_memory_bytes, parse_cache_max_entry_count, plan
from kvcache.cli import DEFAULT_SYSTEM_PROMPT_FILE
from kvcache.device_memory import read_device_memory
from kvcache.engine import ChatSession, GenerationConfig
from kvcache.kv_shape import KVShape
from kvcache.modes import KV_MODES, get_mode
from kvcache.qparams import KVQParams

from . import charts
from .state import LEFT_MODE, MEMORY_HISTORY_S, AppState, SessionState, UserError

logger = logging.getLogger(__name__)

ProgressFn = Callable[[float, str], Any]
EXAMPLES_FILE = DEFAULT_SYSTEM_PROMPT_FILE.parent / "examples.json"
CALIB_DATASETS = ("builtin", "self", "c4", "wikitext2", "ptb", "pileval", "upload")
EXPORT_FORMATS = ("turbomind", "kvq", "vllm")


# --- assets ---------------------------------------------------------------------------------------------


def default_system_prompt() -> str:
    try:
        return DEFAULT_SYSTEM_PROMPT_FILE.read_text(encoding="utf-8").strip()
    except OSError:
        logger.warning("system prompt %s not found; starting with an empty one", DEFAULT_SYSTEM_PROMPT_FILE)
        return ""


def example_questions() -> list[str]:
    """The clickable example questions (Chinese and English) from ``assets/prompts/examples.json``."""
    try:
        items = json.loads(EXAMPLES_FILE.read_text(encoding="utf-8"))
        return [str(item["text"]) for item in items if str(item.get("text", "")).strip()]
    except (OSError, ValueError, TypeError, KeyError) as exc:
        logger.warning("example questions unavailable (%s)", exc)
        return []


def quantized_modes() -> list[str]:
    """Every KV mode the library has, but the fp16 baseline (it is the left pane)."""
    return [name for name in KV_MODES if name != LEFT_MODE]


def default_quantized_mode(app: AppState) -> str:
    """The right pane's first mode: the static one when the app started with --qparams, else a dynamic one."""
    modes = quantized_modes()
    if app.default_qparams is not None:
        return next((m for m in modes if KV_MODES[m].needs_qparams), modes[0])
    return next((m for m in modes if not KV_MODES[m].needs_qparams), modes[0])


def check_upload(path: str | Path | None, app: AppState, what: str) -> Path:
    """An uploaded file, checked for presence and size; it is only ever read as data."""
    if not path:
        raise UserError(f"Upload a {what} first.")
    path = Path(path)
    if not path.is_file():
        raise UserError(f"The uploaded {what} is gone; upload it again.")
    size = path.stat().st_size
    if size > app.max_upload_bytes:
        raise UserError(
            f"The uploaded {what} is {charts.fmt_bytes(size)}, over the {charts.fmt_bytes(app.max_upload_bytes)} limit."
        )
    return path


# --- model ----------------------------------------------------------------------------------------------


def model_status(app: AppState) -> str:
    m = app.loaded
    if m is None:
        why = f" Last attempt: {app.load_error}" if app.load_error else ""
        return f"**No model loaded.**{why}"
    text = (
        f"**{m.name}** on `{m.device}` ({str(m.dtype).removeprefix('torch.')}) · {m.num_layers} layers · "
        f"{m.num_kv_heads} KV heads · head_dim {m.head_dim}"
    )
    if app.load_error:
        text = f"⚠️ {app.load_error} — still serving the previous model.\n\n{text}"
    return f"{text} · {pool_status(app)}"


def load_model(app: AppState, path: str, cache_max_entry_count: float | int | None = None) -> str:
    """Load ``path`` ('default', a local HF folder or a .gguf) for everyone; on failure the old model stays.

    ``cache_max_entry_count``: the KV pools' size, applied after the weights load (0 or None: grow on demand).
    """
    from kvcache.model_loader import ModelLoadError
    from kvcache.model_loader import load_model as _load

    path = (path or "").strip() or "default"
    pool = cache_max_entry_count or None
    if pool is not None:
        pool = parse_cache_max_entry_count(str(pool))
    with app.load_lock:
        try:
            loaded = _load(path, device=app.device)
        except ModelLoadError as exc:
            app.load_error = str(exc)
            raise UserError(f"Could not load {path}: {exc}. The previous model stays loaded.") from None
        except torch.OutOfMemoryError:
            app.load_error = f"out of memory loading {path}"
            _empty_cuda_cache()
            raise UserError(f"Out of memory loading {path}: the previous model stays loaded.") from None
        except Exception as exc:  # a broken checkpoint must not take the app down
            logger.exception("loading %s failed", path)
            app.load_error = f"{type(exc).__name__}: {_one_line(exc)}"
            raise UserError(f"Could not load {path} ({app.load_error}). The previous model stays loaded.") from None
        app.replace_model(loaded, pool)
        app.model_path = path
    return model_status(app)


# --- chat -----------------------------------------------------------------------------------------------


def divergence(left: ChatSession | None, right: ChatSession | None) -> str:
    """Where the two replies of the current turn first differ, by token index."""
    if left is None or right is None:
        return ""
    a, b = left.last.token_ids, right.last.token_ids
    if not a and not b:
        return ""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            tok = left.loaded.tokenizer
            return f"first differs at token {i}: {tok.decode([x])!r} vs {tok.decode([y])!r}"
    if len(a) == len(b):
        return f"identical so far ({len(a)} tokens)"
    return f"identical for the first {min(len(a), len(b))} tokens"


def pane_stats(engine: ChatSession | None, diverge: str, running: bool = False) -> str:
    """The line under a pane: tokens, decode tokens/s (this engine's own compute), prefill, KV bytes, divergence."""
    if engine is None:
        return ""
    s = engine.last
    kv = engine.cache.memory()
    parts = [
        f"**{s.new_tokens}** tokens",
        f"**{s.decode_tokens_per_s:.1f}** tokens/s",
        f"prefill {s.prompt_tokens} tokens in {s.prefill_s:.2f} s",
        f"KV **{charts.fmt_bytes(kv.bytes_used)}** held ({kv.bytes_used:,} B, {kv.tokens_stored} tokens)",
    ]
    if s.stopped:
        parts.append("stopped")
    if s.cache_full:
        parts.append(f"⚠️ {s.cache_full}")
    if diverge:
        parts.append(diverge)
    return ("generating… · " if running else "") + " · ".join(parts)


def _history(prior: list[dict[str, str]], user: str, reply: str) -> list[dict[str, str]]:
    return [*prior, {"role": "user", "content": user}, {"role": "assistant", "content": reply}]


def chat(
    app: AppState,
    sess: SessionState,
    message: str,
    mode: str,
    system_prompt: str,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
) -> Iterator[tuple[list[dict[str, str]], list[dict[str, str]], str, str]]:
    """Send ``message`` to both engines and stream both replies at once, token by token.

    Yields ``(left_history, right_history, left_stats, right_stats)``. With the app's batch worker the
    two replies (and every other session's) are computed there, batched per KV pool; tokens/s counts
    each engine's own compute time. ``sess.stop`` (the Stop button) ends both replies.
    """
    message = (message or "").strip()
    if not message:
        raise UserError("Type a message first.")
    if sess.submitted:  # the page cleared the flag at Send: a Stop since then stops this turn before it starts
        sess.submitted = False
        if sess.stop.is_set():
            yield chat_view(sess)
            return
    else:
        sess.stop.clear()
    with sess.turn_lock:  # Clear, a mode switch or new parameters wait for this turn to end
        yield from _turn(app, sess, message, mode, system_prompt, max_new_tokens, temperature, top_p)


def _turn(
    app: AppState, sess: SessionState, message: str, mode: str, system_prompt: str, max_new_tokens: int,
    temperature: float, top_p: float,
) -> Iterator[tuple[list[dict[str, str]], list[dict[str, str]], str, str]]:
    left, right = sess.engines(app, mode)
    app.sessions.add(sess)
    system = (system_prompt or "").strip() or None
    left.system_prompt = right.system_prompt = system
    config = GenerationConfig(
        max_new_tokens=max(1, int(max_new_tokens)), temperature=float(temperature), top_p=float(top_p)
    )
    engines = (left, right)
    priors = [list(e.messages) for e in engines]
    replies = ["", ""]
    streams: list[Iterator[str] | None] = [e.stream_reply(message, config, sess.stop) for e in engines]

    def frame() -> tuple[list[dict[str, str]], list[dict[str, str]], str, str]:
        div = divergence(left, right)
        return (
            _history(priors[0], message, replies[0]),
            _history(priors[1], message, replies[1]),
            pane_stats(left, div, running=streams[0] is not None),
            pane_stats(right, div, running=streams[1] is not None),
        )

    yield _history(priors[0], message, ""), _history(priors[1], message, ""), "", ""
    try:
        while any(s is not None for s in streams):
            for i, stream in enumerate(streams):
                if stream is None:
                    continue
                try:
                    replies[i] += next(stream)
                except StopIteration:
                    streams[i] = None
                except KVCacheFull as exc:  # the shared pool is full: this pane's turn is undone, the other goes on
                    streams[i] = None
                    replies[i] = f"⚠️ Not answered: {exc}."
            yield frame()
    except torch.OutOfMemoryError:
        for s in streams:
            if s is not None:
                s.close()
        sess.reset_chat()
        _empty_cuda_cache()
        raise UserError(
            "Out of GPU memory during the reply: the conversation was cleared to free its KV cache. "
            "Try fewer max new tokens or a shorter conversation."
        ) from None
    finally:
        for s in streams:
            if s is not None:
                s.close()


def submit(sess: SessionState) -> None:
    """The page's Send: a new turn is queued; Stop from now on applies to it, even before it starts."""
    sess.stop.clear()
    sess.submitted = True


def stop(sess: SessionState) -> None:
    """Stop this session's running replies: the worker stops after its current token."""
    sess.stop.set()


def reset_chat(sess: SessionState) -> tuple[list, list, str, str]:
    """Forget both conversations (a running turn is stopped first) and give their blocks back."""
    sess.stop.set()
    with sess.turn_lock:
        sess.reset_chat()
    return [], [], "", ""


def chat_view(sess: SessionState) -> tuple[list, list, str, str]:
    """Both panes as the engines hold them now (e.g. after a Stop)."""
    engines = (sess.left, sess.right)
    div = divergence(*engines)
    return (
        [dict(m) for m in sess.left.messages] if sess.left else [],
        [dict(m) for m in sess.right.messages] if sess.right else [],
        pane_stats(sess.left, div),
        pane_stats(sess.right, div),
    )


def set_mode(app: AppState, sess: SessionState, mode: str) -> tuple[list, list, str, str, str]:
    """Switch the right pane's KV mode; both conversations start fresh so they stay comparable."""
    kv = get_mode(mode)
    reset_chat(sess)
    if sess.right is not None and sess.right.kv != kv.name:
        sess.right = None
    qparams, label = sess.current_qparams(app)
    if kv.needs_qparams and qparams is None:
        note = f"⚠️ {kv.name} needs calibrated parameters: calibrate in the Calibrate tab, then press 'Use in chat'."
    elif kv.needs_qparams:
        note = f"{kv.name} with parameters from {label}."
    else:
        note = f"{kv.name}: {kv.description}."
    return [], [], "", "", note


# --- memory ---------------------------------------------------------------------------------------------


def _kv_figures(engine: ChatSession | None, free: int | None) -> dict[str, Any] | None:
    if engine is None:
        return None
    mem = engine.cache.memory()
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
        except Exception:
            free = None
    figures["kv"] = {
        f"{LEFT_MODE} (left)": _kv_figures(sess.left, free),
        f"{sess.right.kv if sess.right else 'quantized'} (right)": _kv_figures(sess.right, free),
    }
    pools = {id(e.cache.pool): e.cache.pool for s in list(app.sessions) for e in (s.left, s.right) if e is not None}
    figures["kv_all_sessions_bytes"] = sum(p.capacity_bytes for p in pools.values())  # a shared pool counts once
    figures["kv_pools"] = [
        dict(kv=kv, blocks_used=p.num_used, blocks=p.num_blocks, block_size=p.block_size, bytes=p.capacity_bytes,
             bytes_used=p.used_bytes, growable=p.growable)
        for (kv, _), p in list(app.pools.items())
    ]
    figures["batching"] = app.worker.status() if app.worker is not None else None
    banner = ""
    if reading.nvml_error:
        banner = f"**No GPU figures.** {reading.nvml_error} Showing this process's memory and the exact KV bytes instead."

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
    mem_frame, kv_frame = charts.memory_frames(list(sess.memory_log))
    return figures, banner, charts.gauges_html(figures), mem_frame, kv_frame


def pool_status(app: AppState) -> str:
    """The KV pools' size setting, in a few words (their use is on the Memory tab's gauges)."""
    if app.cache_max_entry_count is None:
        return "KV pools: shared, growing on demand"
    return f"KV pools: shared, cache_max_entry_count={app.cache_max_entry_count}"


def capacity(
    app: AppState, sess: SessionState, cache_max_entry_count: float | int, session_tokens: int = 2048
) -> tuple[dict[str, Any], Any, Any]:
    """Both views of the KV budget for the loaded model, every mode: ``(report, same_memory, same_conversation)``.

    Same memory: blocks, tokens and sessions of ``session_tokens`` that ``cache_max_entry_count`` of
    the memory free after the weights loaded holds. Same conversation: the bytes one conversation of
    ``session_tokens`` (or this session's own chat, when it is longer) takes.
    """
    loaded = app.require_model()
    count = parse_cache_max_entry_count(str(cache_max_entry_count))
    held = sess.left.cache.num_tokens if sess.left is not None else 0
    tokens = max(int(session_tokens), held, 1)
    free = app.free_after_load if app.free_after_load is not None else free_memory_bytes(loaded.device)
    report = plan([get_mode(m) for m in KV_MODES], KVShape.from_config(loaded.model.config),
                  cache_max_entry_count=count, free_bytes=free, session_tokens=tokens)
    same_memory, same_conversation = charts.capacity_tables(report)
    return report, same_memory, same_conversation


# --- calibration ----------------------------------------------------------------------------------------


def calibrate(
    app: AppState,
    sess: SessionState,
    dataset: str,
    upload: str | None,
    samples: int,
    seqlen: int,
    granularity: str,
    symmetric: bool,
    num_tp: int,
    layer: int = 0,
    progress: ProgressFn | None = None,
) -> tuple[Any, ...]:
    """Calibrate the loaded model, then export every format. Returns :func:`calibration_view`'s tuple."""
    from calib.calibrate import calibrate as _calibrate
    from calib.stats_io import load_work_dir

    loaded = app.require_model()
    if dataset not in CALIB_DATASETS:
        raise UserError(f"Unknown dataset {dataset!r}: pick one of {', '.join(CALIB_DATASETS)}.")
    if dataset == "upload":  # the library reads a data file by path (.txt/.jsonl/.json/.parquet), as data only
        dataset = str(check_upload(upload, app, "calibration file"))
    if sess.calib_submitted:  # the page cleared the flag at Calibrate: a Cancel since then counts
        sess.calib_submitted = False
    else:
        sess.cancel.clear()

    def on_progress(fraction: float, message: str = "") -> bool:
        if progress is not None:
            progress(fraction, message)
        return not sess.cancel.is_set()

    work_dir = sess.work_dir(app, "calib")
    try:
        with app.device_lock:  # chat steps wait until the calibration is done
            out = _calibrate(
                loaded, dataset=dataset, samples=int(samples), seqlen=int(seqlen), work_dir=work_dir,
                data_dir=app.calib_data_dir, device=app.device, progress=on_progress, bar=False,
            )
    except torch.OutOfMemoryError:
        _empty_cuda_cache()
        raise UserError("Out of GPU memory during calibration: use fewer samples or a shorter sequence length.") from None
    sess.calib_stats = load_work_dir(out)
    sess.calib_dir = Path(out)
    sess.exports = {}
    _try_export(app, sess, granularity, symmetric, num_tp)
    return calibration_view(sess, layer)


def _try_export(app: AppState, sess: SessionState, granularity: str, symmetric: bool, num_tp: int) -> None:
    """Export; options no format can honour (e.g. a num_tp that does not divide the KV heads) become a note."""
    from calib.export import ExportError

    try:
        export_all(app, sess, granularity, symmetric, num_tp)
    except ExportError as exc:
        sess.exports = {"error": str(exc)}


def submit_calibration(sess: SessionState) -> None:
    """The page's Calibrate: a run is queued; Cancel from now on applies to it, even before it starts."""
    sess.cancel.clear()
    sess.calib_submitted = True


def cancel_calibration(sess: SessionState) -> str:
    sess.cancel.set()
    return "Cancelling… (the run stops at its next step; nothing is written)"


def export_all(app: AppState, sess: SessionState, granularity: str, symmetric: bool, num_tp: int) -> dict[str, Any]:
    """Write the turbomind / kvq / vllm files for the last calibration; one download file per format."""
    from calib.export import export

    if sess.calib_stats is None:
        raise UserError("Run a calibration first.")
    root = sess.work_dir(app, "export")
    files: dict[str, list[Path]] = {}
    notes: list[str] = []
    for fmt in EXPORT_FORMATS:
        fmt_granularity = _format_granularity(fmt, granularity)
        if fmt_granularity != granularity:
            notes.append(f"{fmt}: {fmt_granularity} granularity (its only choice)" if fmt == "turbomind"
                         else f"{fmt}: {fmt_granularity} granularity (it takes tensor or head)")
        with warnings.catch_warnings(record=True) as caught:  # the exporter's advice goes into the page
            warnings.simplefilter("always")
            files[fmt] = export(
                sess.calib_stats, root / fmt, fmt, kv_sym=bool(symmetric),
                num_tp=int(num_tp) if fmt == "turbomind" else 1, granularity=fmt_granularity,
            )
        notes.extend(f"{fmt}: {_one_line(w.message)}" for w in caught if issubclass(w.category, UserWarning))
    downloads = {
        "turbomind": _zip(files["turbomind"], root / "kv_qparams_turbomind.zip"),
        "kvq": files["kvq"][0],
        "vllm": _zip(files["vllm"], root / "kv_qparams_vllm.zip"),
    }
    sess.exports = {"files": files, "downloads": downloads, "notes": notes,
                    "granularity": granularity, "symmetric": bool(symmetric), "num_tp": int(num_tp)}
    return sess.exports


def _format_granularity(fmt: str, granularity: str) -> str:
    from calib.export import DEFAULT_GRANULARITY

    if fmt == "turbomind" or (fmt == "vllm" and granularity not in ("tensor", "head")):
        return DEFAULT_GRANULARITY[fmt]
    return granularity


def _zip(files: list[Path], dest: Path) -> Path:
    with zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED) as z:
        for f in files:
            z.write(f, f.name)
    return dest


def calibration_view(sess: SessionState, layer: int = 0) -> tuple[Any, ...]:
    """``(status, k_heatmap, v_heatmap, ranges, outliers, files, turbomind_zip, kvq_file, vllm_zip)``."""
    stats = sess.calib_stats
    if stats is None:
        raise UserError("Run a calibration first.")
    layer = max(0, min(int(layer), stats.num_layers - 1))
    meta = stats.meta
    status = (
        f"Calibrated **{meta.get('model', '?')}** on **{meta.get('dataset', '?')}**: "
        f"{meta.get('samples', '?')} samples x {meta.get('seqlen', '?')} tokens · {stats.shape_str()}."
    )
    ex = sess.exports
    if ex.get("error"):
        status += f" ⚠️ Not exported: {ex['error']}."
    if ex.get("notes"):
        status += " Export: " + "; ".join(ex["notes"]) + "."
    files = [str(p) for fmt in EXPORT_FORMATS for p in ex.get("files", {}).get(fmt, [])]
    downloads = ex.get("downloads", {})
    return (
        status,
        charts.heatmap(stats.key_stats["absmax"][layer], f"K absmax, layer {layer} (KV head x channel)"),
        charts.heatmap(stats.value_stats["absmax"][layer], f"V absmax, layer {layer} (KV head x channel)"),
        charts.layer_ranges(stats.key_stats, stats.value_stats),
        charts.outlier_channels(stats.key_stats, stats.value_stats),
        files,
        str(downloads["turbomind"]) if "turbomind" in downloads else None,
        str(downloads["kvq"]) if "kvq" in downloads else None,
        str(downloads["vllm"]) if "vllm" in downloads else None,
    )


def heatmaps(sess: SessionState, layer: int) -> tuple[Any, Any] | None:
    """The K and V heatmaps of ``layer``; None before any calibration."""
    if sess.calib_stats is None:
        return None
    view = calibration_view(sess, layer)
    return view[1], view[2]


def reexport(
    app: AppState, sess: SessionState, granularity: str, symmetric: bool, num_tp: int, layer: int
) -> tuple[Any, ...] | None:
    """New export options for the same statistics (no recalibration); None before any calibration."""
    if sess.calib_stats is None:
        return None
    _try_export(app, sess, granularity, symmetric, num_tp)
    return calibration_view(sess, layer)


def use_in_chat(app: AppState, sess: SessionState) -> tuple[str, str]:
    """Load the last calibration's kvq parameters into this session's quantized engine (mode int8)."""
    kvq = sess.exports.get("downloads", {}).get("kvq")
    if kvq is None:
        error = sess.exports.get("error")
        raise UserError(f"Nothing exported yet ({error}): change the export options." if error else "Run a calibration first.")
    ex = sess.exports
    label = (f"this session's calibration ({ex['granularity']}, "
             f"{'symmetric' if ex['symmetric'] else 'asymmetric'})")
    return _use_qparams(app, sess, KVQParams.load(kvq), label)


def upload_qparams(app: AppState, sess: SessionState, paths: list[str] | str | None) -> tuple[str, str]:
    """Use an uploaded ``kv_qparams.safetensors``, or the files of the folder ``kv_qparams`` wrote, in chat."""
    from kvcache.qparams import FILE_NAME

    files = [check_upload(p, app, "parameters file") for p in ([paths] if isinstance(paths, str) else paths or [])]
    if not files:
        raise UserError(f"Upload {FILE_NAME} (made by `python -m calib kv_qparams WORK_DIR OUT_DIR --format kvq`).")
    chosen = files[0] if len(files) == 1 else next((f for f in files if f.name == FILE_NAME), None)
    if chosen is None:
        names = ", ".join(sorted(f.name for f in files)[:5])
        raise UserError(f"The upload holds no {FILE_NAME} (it holds {names}): upload the file "
                        "`python -m calib kv_qparams WORK_DIR OUT_DIR --format kvq` wrote.")
    return _use_qparams(app, sess, KVQParams.load(chosen), f"uploaded {chosen.name}")


def _use_qparams(app: AppState, sess: SessionState, qparams: KVQParams, label: str) -> tuple[str, str]:
    """Switch this session's quantized pane to the static mode with ``qparams`` (checked against the model)."""
    qparams.check_matches(KVShape.from_config(app.require_model().model.config))
    cal = qparams.metadata
    if cal.get("dataset"):
        label += f", calibrated on {cal['dataset']}"
    with sess.turn_lock:
        sess.use_qparams(qparams, label)
    mode = next((m.name for m in KV_MODES.values() if m.needs_qparams), "int8")
    return mode, f"The quantized pane now uses {mode} with {label}. Both conversations start fresh."


def serving_commands(app: AppState, mode: str) -> str:
    """Where the chosen KV mode goes next: the LMDeploy >= 0.4 equivalent (or why there is none), and vLLM's export."""
    from calib.lmdeploy import lmdeploy_equivalent

    path = app.model_path if app.model_path not in ("", "default") and not app.model_path.endswith(".gguf") else "MODEL_DIR"
    lmd = lmdeploy_equivalent(mode, path)
    head = (f"**LMDeploy ≥ 0.4** runs `{mode}` as `--quant-policy {lmd.quant_policy}`:" if lmd.exact else
            f"**LMDeploy ≥ 0.4** has no equivalent of `{mode}`: {lmd.reason}. Closest: `--quant-policy {lmd.quant_policy}`:")
    return (
        f"{head}\n```\n{lmd.serve}\n```\n"
        "LMDeploy ≤ 0.3 (the seed recipe's `quant_policy=4`, int8 with TurboMind `past_kv_scale` files): the turbomind "
        "download above.\n\n"
        f"**vLLM** (FP8 KV cache, calibrated scales) in one step: "
        f"`python -m calib kv_qparams WORK_DIR OUT_DIR --format vllm --model {path}`, then "
        "`vllm serve OUT_DIR --kv-cache-dtype fp8` (the folder's layout was checked against vLLM's source; vLLM itself "
        "was not run here)."
    )


# --- evaluation -----------------------------------------------------------------------------------------


def evaluate(
    app: AppState,
    sess: SessionState,
    source: str,
    upload: str | None,
    modes: list[str],
    seqlen: int,
    samples: int,
    greedy_prompts: int = 4,
    greedy_tokens: int = 32,
    progress: ProgressFn | None = None,
) -> tuple[str, Any, Any, Any]:
    """Score the chosen modes against fp16: ``(summary, table, quality_bars, cost_bars)``.

    ``source``: ``builtin-en``, ``builtin-zh`` (see :data:`kvcache.evaluate.BUILTIN_TEXTS`) or ``upload``.
    """
    from kvcache.evaluate import calibration_label, read_text, resolve_text
    from kvcache.evaluate import evaluate as _evaluate

    loaded = app.require_model()
    modes = [m for m in (modes or []) if m]
    if not modes:
        raise UserError("Pick at least one KV mode to compare with fp16.")
    if source == "upload":
        path = check_upload(upload, app, "text file")
        name = path.name
    else:
        name, path = resolve_text(source)
    text = read_text(path)
    qparams, label = sess.current_qparams(app)
    needs = [m for m in modes if get_mode(m).needs_qparams]
    if needs and qparams is None:
        raise UserError(f"{', '.join(needs)} needs calibrated parameters: calibrate first and press 'Use in chat'.")
    try:
        with app.device_lock:  # chat steps wait until the evaluation is done
            report = _evaluate(
                loaded, text, modes, qparams=qparams if needs else None, seqlen=int(seqlen), samples=int(samples),
                greedy_prompts=int(greedy_prompts), greedy_tokens=int(greedy_tokens), progress=progress,
            )
    except torch.OutOfMemoryError:
        _empty_cuda_cache()
        raise UserError("Out of GPU memory during evaluation: use a shorter sequence length or fewer samples.") from None
    report.update(text=name, text_file=path.name)
    sess.eval_report = report
    summary = (
        f"**{report['model']}** on `{name}`: {report['samples']} windows x {report['seqlen']} tokens "
        f"({report['tokens_scored']:,} positions scored teacher-forced through the cache). *top-1*: share of "
        "positions whose most likely next token is the fp16 cache's; *95% CI*: Δppl's interval from resampling "
        f"the windows; *first divergence*: median index of the first greedy token that differs from fp16 "
        f"({report['greedy_prompts']} prompts x {report['greedy_tokens']} tokens)."
    )
    cal = report["calibration"]
    if cal:
        summary += (f"\n\nStatic parameters: {label}, calibrated on **{calibration_label(cal)}** "
                    f"({cal['granularity']}); overlap with this text: {cal['overlap']}.")
    for warning in report["warnings"]:
        summary += f"\n\n⚠️ {warning}"
    quality, cost = charts.eval_bars(report)
    return summary, charts.eval_table(report), quality, cost


# --- helpers --------------------------------------------------------------------------------------------


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _empty_cuda_cache() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
