"""Evaluate tab: the `python -m kvcache evaluate` report on a built-in or uploaded text."""

from __future__ import annotations

from typing import Any

import torch

from kvcache.modes import get_mode

from .. import charts
from ..state import AppState, SessionState, UserError, kv_label
from .common import ProgressFn, check_upload, empty_cuda_cache


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
    """Score the chosen modes against fp16: ``(summary, table, quality_bars, cost_bars, quality_vs_bytes)``.

    ``source``: ``builtin-en``, ``builtin-zh`` (see :data:`kvcache.measure.evaluate.BUILTIN_TEXTS`) or ``upload``.
    """
    from kvcache.measure.evaluate import calibration_label, read_text, resolve_text
    from kvcache.measure.evaluate import evaluate as _evaluate

    loaded = app.require_model()
    modes = [sess.resolve_mode(m) for m in (modes or []) if m]
    if not modes:
        raise UserError("Pick at least one KV mode to compare with fp16.")
    if source == "upload":
        path = check_upload(upload, app, "text file")
        name = path.name
    else:
        name, path = resolve_text(source)
    text = read_text(path)
    qparams, label = sess.current_qparams(app)
    needs = [kv_label(m) for m in modes if get_mode(m).needs_qparams]
    if needs and qparams is None:
        raise UserError(f"{', '.join(needs)} needs calibrated parameters: calibrate first and press 'Use in chat'.")
    try:
        with app.device_lock:  # chat steps wait until the evaluation is done
            report = _evaluate(
                loaded, text, modes, qparams=qparams if needs else None, seqlen=int(seqlen), samples=int(samples),
                greedy_prompts=int(greedy_prompts), greedy_tokens=int(greedy_tokens), progress=progress,
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
        f"({report['greedy_prompts']} prompts x {report['greedy_tokens']} tokens)."
    )
    cal = report["calibration"]
    if cal:
        summary += (f"\n\nStatic parameters: {label}, calibrated on **{calibration_label(cal)}** "
                    f"({cal['granularity']}); overlap with this text: {cal['overlap']}.")
    for warning in report["warnings"]:
        summary += f"\n\n⚠️ {warning}"
    quality, cost = charts.eval_bars(report)
    return summary, charts.eval_table(report), quality, cost, charts.eval_scatter(report)


