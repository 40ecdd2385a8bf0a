"""Evaluate tab: `python -m kvcache evaluate` (windows up to the model's context), `needle` and `recommend`.

The three are long jobs: each reports progress per unit (a chunk of a window, a trial of a cell) and stops
at the next unit after Cancel (:func:`cancel_evaluation`), with nothing reported or cached.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from kvcache.config import BASELINE_MODE
from kvcache.modes import get_mode

from .. import charts
from ..state import AppState, SessionState, UserError, kv_label
from .common import ProgressFn, check_upload, empty_cuda_cache, taking_turns


def cancel_evaluation(sess: SessionState) -> str:
    sess.eval_cancel.set()
    return "Cancelling… (the measurement stops at its next unit; nothing is reported)"


def _cancellable(app: AppState, sess: SessionState, progress: ProgressFn | None) -> ProgressFn:
    """The library's progress callback: shows progress, lets waiting chat steps run (the job holds the device
    lock), and says no once Cancel was pressed."""
    sess.eval_cancel.clear()
    shown = taking_turns(app, progress)

    def report(fraction: float, message: str = "") -> bool:
        shown(fraction, message)
        return not sess.eval_cancel.is_set()

    return report


def _text(app: AppState, source: str, upload: str | None) -> tuple[str, str, Path]:
    """(name, text, file) of a built-in text (:data:`kvcache.measure.evaluate.BUILTIN_TEXTS`) or of an upload."""
    from kvcache.measure.evaluate import read_text, resolve_text

    if source == "upload":
        path = check_upload(upload, app, "text file")
        return path.name, read_text(path), path
    name, path = resolve_text(source)
    return name, read_text(path), path


def _modes_and_qparams(app: AppState, sess: SessionState, modes: list[str]) -> tuple[list[str], Any]:
    """The chosen modes as the library takes them, and the parameters the calibrated ones need."""
    modes = [sess.resolve_mode(m) for m in (modes or []) if m]
    qparams, _ = sess.current_qparams(app)
    needs = [kv_label(m) for m in modes if get_mode(m).needs_qparams]
    if needs and qparams is None:
        raise UserError(f"{', '.join(needs)} needs calibrated parameters: calibrate first and press 'Use in chat'.")
    return modes, qparams if needs else None


def needle_grid(
    app: AppState, sess: SessionState, modes: list[str], lengths: list[Any], depths: list[Any], trials: int,
    progress: ProgressFn | None = None,
) -> tuple[str, Any]:
    """The pass-key grid of the chosen modes beside fp16's: ``(summary, heatmaps figure)``."""
    from kvcache.measure.needle import needle
    from kvcache.measure.recommend import remember_needle

    loaded = app.require_model()
    modes, qparams = _modes_and_qparams(app, sess, modes)
    if not lengths or not depths:
        raise UserError("Pick at least one context length and one depth.")
    with app.device_lock:  # chat steps run between its trials (take_turns)
        report = needle(loaded, modes, qparams=qparams, lengths=[int(n) for n in lengths],
                        depths=[float(d) for d in depths], trials=int(trials), progress=_cancellable(app, sess, progress))
    remember_needle(report, loaded.model, qparams)
    sess.needle_report = report
    totals = {}
    for c in report["cells"]:
        t = totals.setdefault(c["kv"], [0, 0])
        t[0], t[1] = t[0] + c["correct"], t[1] + c["trials"]
    summary = (f"**{report['model']}**: a 5-digit pass key hidden at each depth of each context, asked for at the end "
               f"and answered greedily through the cache ({report['trials']} keys per cell, the same for every mode). "
               + "; ".join(f"`{kv_label(kv)}` {c}/{n}" for kv, (c, n) in totals.items())
               + f". The haystack was prefilled once per mode: {report['prefill_tokens'][BASELINE_MODE]:,} tokens "
                 f"instead of {report['prompt_tokens']:,}.")
    return summary, charts.needle_heatmaps(report)


def recommend_options(
    app: AppState, sess: SessionState, engine: str, context: int, budget_mib: float | None, source: str,
    upload: str | None, progress: ProgressFn | None = None,
) -> tuple[str, Any]:
    """One engine's options and ours, ranked at ``context``: ``(summary, table)``."""
    from kvcache.measure.recommend import check_engine, recommend

    loaded = app.require_model()
    check_engine(engine)
    name, text, _ = _text(app, source, upload)
    qparams, label = sess.current_qparams(app)
    with app.device_lock:
        report = recommend(loaded, engine, int(context), text=text, text_name=name, qparams=qparams,
                           qparams_path=label, budget_mib=float(budget_mib) if budget_mib else None,
                           progress=_cancellable(app, sess, progress))
    sess.recommend_report = report
    pick = report["pick"] or f"none of the {engine} options"
    summary = (f"**{report['model']}** at **{context:,} tokens**, {engine} options and ours: KL vs fp16 over "
               f"{report['windows']} window(s) of `{name}` of exactly that length, scored through the cache. "
               f"**Pick** (KL ≤ {report['max_kl']:g}, no pass key lost, fewest bytes): **{pick}**"
               + (f"; with ours: **{report['pick_with_ours']}**" if report["pick_with_ours"] != report["pick"] else "")
               + ". " + " ".join(f"Note: {n}." for n in report["notes"])
               + f" Measured now: {', '.join(report['measured_now']) or 'nothing (all from the cache)'}.")
    return summary, charts.recommend_table(report)


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
) -> tuple[str, Any, Any, Any, Any]:
    """Score the chosen modes against fp16: ``(summary, table, quality_bars, cost_bars, quality_vs_bytes,
    by_position_table, by_position_frame)``.

    ``source``: ``builtin-en``, ``builtin-zh`` (see :data:`kvcache.measure.evaluate.BUILTIN_TEXTS`) or ``upload``.
    """
    from kvcache.measure.evaluate import calibration_label
    from kvcache.measure.evaluate import evaluate as _evaluate

    loaded = app.require_model()
    if not [m for m in (modes or []) if m]:
        raise UserError("Pick at least one KV mode to compare with fp16.")
    name, text, path = _text(app, source, upload)
    modes, qparams = _modes_and_qparams(app, sess, modes)
    label = sess.current_qparams(app)[1]
    try:
        with app.device_lock:  # chat steps run between its chunks (take_turns)
            report = _evaluate(
                loaded, text, modes, qparams=qparams, seqlen=int(seqlen), samples=int(samples),
                greedy_prompts=int(greedy_prompts), greedy_tokens=int(greedy_tokens),
                progress=_cancellable(app, sess, progress),
            )
    except torch.OutOfMemoryError:
        empty_cuda_cache()
        raise UserError("Out of GPU memory during evaluation: use a shorter sequence length or fewer samples.") from None
    report.update(text=name, text_file=path.name)
    sess.eval_report = report
    summary = (
        f"**{report['model']}** on `{name}`: {report['samples']} windows x {report['seqlen']} tokens "
        f"({report['tokens_scored']:,} positions scored teacher-forced through the cache). *top-1*: share of "
        "positions whose most likely next token is the fp16 cache's; *95% CI*: Δppl's interval from resampling "
        f"the windows; *first divergence*: median index of the first greedy token that differs from fp16 "
        f"({report['greedy_prompts']} prompts x {report['greedy_tokens']} tokens). Every position is "
        f"{report['scoring']}; *by position*: the same figures per bucket of positions in the window."
    )
    cal = report["calibration"]
    if cal:
        summary += (f"\n\nStatic parameters: {label}, calibrated on **{calibration_label(cal)}** "
                    f"({cal['granularity']}); overlap with this text: {cal['overlap']}.")
    for warning in report["warnings"]:
        summary += f"\n\n⚠️ {warning}"
    quality, cost = charts.eval_bars(report)
    return (summary, charts.eval_table(report), quality, cost, charts.eval_scatter(report),
            charts.position_table(report), charts.position_frame(report))


