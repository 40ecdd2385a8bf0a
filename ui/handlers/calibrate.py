"""Calibrate tab: record K/V statistics, export every format, feed the parameters (or uploaded ones) to chat."""

from __future__ import annotations


import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from kvcache.errors import one_line
from kvcache.modes import KV_MODES, best_calibrated_mode
from kvcache.qparams import KVQParams
from kvcache.shape import KVShape

from .. import charts
from ..state import AppState, SessionState, UserError, kv_label
from .common import ProgressFn, check_upload, empty_cuda_cache, taking_turns

CALIB_DATASETS = ("builtin", "self", "c4", "wikitext2", "ptb", "pileval", "upload")
EXPORT_FORMATS = ("turbomind", "kvq", "vllm")


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
    from calib.workdir import load_work_dir

    from calib.calibrate import calibrate as _calibrate

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
        with app.device_lock:  # chat steps run between batches; the observers see only this thread's forwards
            out = _calibrate(
                loaded, dataset=dataset, samples=int(samples), seqlen=int(seqlen), work_dir=work_dir,
                data_dir=app.calib_data_dir, device=app.device, progress=taking_turns(app, on_progress), bar=False,
            )
    except torch.OutOfMemoryError:
        empty_cuda_cache()
        raise UserError("Out of GPU memory during calibration: use fewer samples or a shorter sequence length.") from None
    sess.calib_stats = load_work_dir(out)
    sess.calib_dir = Path(out)
    sess.exports = {}
    _try_export(app, sess, granularity, symmetric, num_tp)
    return calibration_view(sess, layer)


def _try_export(app: AppState, sess: SessionState, granularity: str, symmetric: bool, num_tp: int) -> None:
    """Export; options no format can honour (e.g. a num_tp that does not divide the KV heads) become a note."""
    from calib.errors import ExportError

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
        notes.extend(f"{fmt}: {one_line(w.message)}" for w in caught if issubclass(w.category, UserWarning))
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
    """Load the last calibration's kvq parameters into this session's quantized engine, in the best calibrated mode
    they serve (``int8-qk`` with key transforms, else ``int8``)."""
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
    mode = best_calibrated_mode(qparams)
    return mode, f"The quantized pane now uses {mode} with {label}. Both conversations start fresh."


def serving_commands(app: AppState, mode: str, sess: SessionState | None = None) -> str:
    """Where the chosen KV mode goes next: the LMDeploy >= 0.4 equivalent (or why there is none), and vLLM's export."""
    from calib.lmdeploy import lmdeploy_equivalent

    path = app.model_path if app.model_path not in ("", "default") and not app.model_path.endswith(".gguf") else "MODEL_DIR"
    lmd = lmdeploy_equivalent(sess.resolve_mode(mode) if sess is not None else mode, path)
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


def plan_bits(
    app: AppState,
    sess: SessionState,
    budget_dppl_pct: float,
    samples: int = 8,
    seqlen: int = 256,
    progress: ProgressFn | None = None,
) -> tuple[str, Any, str, str]:
    """Bits per layer for K and V within a Δppl budget: ``(summary, bits_table, plan_file, plan_label)``.

    Runs the bit planner (:func:`calib.plan.plan_bits`) on the loaded model with this session's parameters
    (calibrated key transforms make the calibrated candidates available; without, the calibration-free ones),
    writes the plan file under the session's work folder and offers it in the KV-mode lists as ``plan_label``.
    A budget no plan meets is the planner's :class:`~kvcache.errors.ConfigError` (a one-line page message).
    """
    from calib.plan import plan_bits as _plan_bits
    from calib.plan import write_plan
    from kvcache.config import BASELINE_MODE
    from kvcache.measure.planner import plan_table
    from kvcache.modes import SEQUENCE_TOKENS, get_mode

    loaded = app.require_model()
    budget = float(budget_dppl_pct)
    qparams, label = sess.current_qparams(app)
    calibrated = qparams is not None and qparams.k_transform is not None
    stem = f"kv_plan_dppl{budget:g}"
    stem = next(s for s in (f"{stem}{f'_{n}' if n else ''}" for n in range(len(sess.plans) + 1))
                if kv_label(f"{s}.json") not in sess.plans)
    try:
        with app.device_lock:  # chat steps run between its measurements (take_turns)
            plan, spec = _plan_bits(loaded, budget, qparams=qparams if calibrated else None, samples=int(samples),
                                    seqlen=int(seqlen), data_dir=app.calib_data_dir, progress=taking_turns(app, progress),
                                    name=stem)
    except torch.OutOfMemoryError:
        empty_cuda_cache()
        raise UserError("Out of GPU memory while planning: use fewer samples or a shorter sequence length.") from None
    path = write_plan(spec, sess.work_dir(app, "plan") / f"{stem}.json")
    plan_label = sess.add_plan(path)

    mode, shape = plan.mode, KVShape.from_config(loaded.model.config)
    fp16_bytes = get_mode(BASELINE_MODE).bytes_per_token(shape)
    per_token, at_sequence = mode.bytes_per_token(shape), mode.bytes_per_token_at(shape)
    saved = (fp16_bytes - at_sequence) * SEQUENCE_TOKENS
    ver = plan.verified
    hi = (ver.get("dppl_interval") or [ver["dppl_pct"]])[-1]
    source = (f"calibrated key transforms from {label}" if calibrated else
              "calibration-free candidates (calibrate or upload parameters for the query-aware keys)")
    summary = (
        f"**Plan within Δppl ≤ {budget:g}%** on planning text ({spec.get('planning_text', '?')}), "
        f"{source}: K {mode.k_bits:.1f} / V {mode.v_bits:.1f} bits on average.\n\n"
        f"KV bytes per token: **{per_token:,} B** vs fp16's {fp16_bytes:,} B ({per_token / fp16_bytes:.3f}); "
        f"a {SEQUENCE_TOKENS:,}-token sequence, its {mode.sink_tokens} fp16 sink tokens included: "
        f"**{plan.bytes_ratio:.3f}** of fp16, **{saved / charts.MiB:.2f} MiB saved** across all {shape.num_layers} layers.\n\n"
        f"Δppl predicted {plan.predicted_dppl_pct:+.3f}%; verified through the cache on held-out windows: measured "
        f"Δppl {ver['dppl_pct']:+.3f}% (95% interval up to **{hi:+.3f}%**, what decides), KL {ver['kl']:.2e}, "
        f"top-1 {ver['top1_pct']:.2f}%. {plan.note + '. ' if plan.note else ''}"
        f"Pick **{plan_label}** in the Chat tab's quantized pane or in the Evaluate tab."
    )
    return summary, charts.plan_table(plan_table(mode)), str(path), plan_label
