"""What the LMDeploy recipe never measured: how far each KV mode moves the model from its 16-bit cache.

Every window is scored teacher-forced *through the cache*: the window is prefilled in chunks, each
chunk's K/V written into the paged cache (quantized on write) and its queries attending the stored copy
of everything before them and of the chunk itself, so a quantized mode's figures are what decoding over
its cache sees (vLLM, by contrast, attends a fresh prefill chunk unquantized). Per mode, against the fp16
cache on the same windows:

- perplexity and Δppl, with a 95% interval from a paired bootstrap over windows (is +0.05% real?);
- KL(fp16 || mode) per scored position and teacher-forced top-1 agreement (the share of positions
  whose argmax is the fp16 cache's): stable figures over thousands of positions;
- first divergence of free generation: per prompt, the index of the first greedy token that differs
  from fp16's (after it the two continuations drift, so counting matches later says little);
- the same KL, Δppl and top-1 per position bucket (0-512, 512-1K, 1-2K, 2-4K, 4-8K), so errors that grow
  with the attended context show.

Windows up to the model's context fit a small machine: the modes run in lockstep chunk by chunk, so only
one chunk's fp16 log-probabilities are held, and each position's NLL, KL and top-1 are reduced as soon as
its chunk is scored (three numbers per position, never a [positions x vocab] tensor per mode).

When static parameters are used, the report names the data they were calibrated on and warns when
the evaluation text overlaps it (:mod:`kvcache.measure.overlap`): in-distribution figures flatter them.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ..codec import kv_float_dtype
from ..config import BASELINE_MODE, BLOCK_SIZE, CHUNK_TOKENS, EVAL_DIR
from ..engine.scheduler import BatchScheduler
from ..errors import EvalError, MeasureCancelled
from ..hf.cache import PagedKVCache
from ..hf.forward import output_logits, prefill_chunks
from ..models.variants import check_window, context_limit
from ..modes import get_mode, require_qparams
from ..qparams import KVQParams
from ..storage.block_pool import BlockPool
from ..shape import KVShape
from .overlap import containment, sketch_from_text

ProgressFn = Callable[[float, str], Any]  # returning False cancels (MeasureCancelled)

BUILTIN_TEXTS = {
    "builtin-en": EVAL_DIR / "technical_en.txt",  # English technical prose (computer systems)
    "builtin-zh": EVAL_DIR / "politics_zh.txt",  # Chinese prose of the politics-exam domain
    "builtin-en-long": EVAL_DIR / "lighthouse_en.txt",  # one long English narrative (2+ windows of 8K tokens)
}
BOOTSTRAP_RESAMPLES = 2000
POSITION_EDGES = (0, 512, 1024, 2048, 4096, 8192)  # by_position buckets; doubled on past 8K for longer windows
LOGIT_ROWS = 256  # positions whose logits are formed at once while a chunk is reduced
SCORING = ("teacher-forced through the cache, in chunks: every position attends the stored (quantized) copy of "
           "everything before it and of itself, what decoding sees (vLLM attends a fresh prefill chunk unquantized)")
OVERLAP_WARN = 0.01  # warn when more than 1% of the text's n-grams were in the calibration text


@dataclass
class ModeResult:
    kv: str
    ppl: float
    delta_ppl_pct: float
    delta_ppl_ci95: list[float] | None  # [lo, hi] in %, paired bootstrap over windows; None for one window
    kl_vs_fp16: float
    top1_match_pct: float
    first_divergence: list[int]  # per prompt; == greedy_tokens means identical throughout
    first_divergence_median: float | None
    kv_bytes_per_token: int  # codes and per-token parameters of one token, all layers and KV heads
    kv_ratio_to_fp16: float  # a 2,048-token sequence's bytes (sinks included) over fp16's, as `kvcache modes` gives
    by_position: list[dict[str, float]]  # per bucket of positions: start, end (exclusive), positions, kl, dppl_pct, top1_match_pct
    tensor_scales: str | None = None  # per-tensor scales (fp8/fp4 schemes): "calibrated" (from --qparams) or "1.0"


def resolve_text(spec: str) -> tuple[str, Path]:
    """``builtin-en``, ``builtin-zh``, ``builtin-en-long`` or a file path -> (name shown in reports, path)."""
    if spec in BUILTIN_TEXTS:
        return spec, BUILTIN_TEXTS[spec]
    if spec.startswith("builtin"):
        raise EvalError(f"unknown built-in text {spec!r}: use {', '.join(BUILTIN_TEXTS)}, or a file path")
    return Path(spec).name, Path(spec)


def read_text(path: str | Path) -> str:
    path = Path(path)
    if not path.is_file():
        raise EvalError(f"text file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise EvalError(f"{path} is not UTF-8 text (byte {e.start}); convert it with `iconv -t UTF-8`") from None
    if not text.strip():
        raise EvalError(f"{path} is empty; give a text file with at least a few thousand words")
    return text


def make_windows(tokenizer: Any, text: str, seqlen: int, samples: int, max_positions: int | None) -> torch.Tensor:
    """Up to ``samples`` consecutive, non-overlapping windows of ``seqlen`` tokens."""
    if seqlen < 2:
        raise EvalError(f"--seqlen must be at least 2, got {seqlen}")
    if max_positions and seqlen > max_positions:
        raise EvalError(f"--seqlen {seqlen} is beyond the model's {max_positions} positions; use --seqlen {max_positions} or less")
    if samples < 1:
        raise EvalError(f"--samples must be at least 1, got {samples}")
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    n = min(samples, len(ids) // seqlen)
    if n == 0:
        raise EvalError(f"the text has {len(ids)} tokens, fewer than one window of {seqlen} tokens; use a longer text or a smaller window (--seqlen, --context)")
    return ids[: n * seqlen].reshape(n, seqlen)


def _greedy(model: Any, kv: str, qparams: KVQParams | None, prompts: torch.Tensor, tokens: int) -> torch.Tensor:
    """``tokens`` greedy tokens after each prompt, through the scheduler (the path chat replies take)."""
    mode = get_mode(kv)
    pool = BlockPool(mode, KVShape.from_config(model.config), device=model.device,
                     fp_dtype=kv_float_dtype(model.dtype), qparams=qparams if mode.reads_qparams else None)
    sched = BatchScheduler(model, pool)
    ids = [sched.add(p.tolist(), tokens) for p in prompts]
    out = sched.run_until_done()
    return torch.tensor([out[i] for i in ids])


def report_progress(progress: ProgressFn | None, fraction: float, message: str) -> None:
    """Tell ``progress`` (if any); it returning False (the app's Cancel) stops the measurement here."""
    if progress is not None and progress(min(fraction, 1.0), message) is False:
        raise MeasureCancelled(f"cancelled ({message}); nothing was reported")


@dataclass
class PositionScores:
    """Per scored position of every window (``[windows, seqlen - 1]``): what a mode's report is reduced from.

    Position ``p`` is the window's token ``p``: its logits predict token ``p + 1`` after attending ``p + 1``
    stored tokens.
    """

    nll: torch.Tensor  # float64, -log p(next token)
    kl: torch.Tensor  # float64, KL(fp16 || mode) of the next-token distribution (0 for fp16)
    top1: torch.Tensor  # bool, the argmax is fp16's


class _Reference:
    """One chunk's fp16 next-token distributions, held while every mode's chunk is scored against them."""

    def __init__(self, logp: torch.Tensor):
        self.logp, self.p = logp, logp.exp()
        self.top = logp.argmax(dim=-1)


def _reduce_chunk(model: Any, hidden: torch.Tensor, targets: torch.Tensor,
                  ref: list[_Reference] | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[_Reference]]:
    """NLL, KL vs ``ref`` and top-1 of one chunk's positions (``hidden`` ``[b, n, h]``), LOGIT_ROWS at a time.

    ``ref`` None: this is the fp16 chunk; its log-probs are returned as the reference for the other modes.
    """
    nll, kl, top1, made = [], [], [], []
    for i, start in enumerate(range(0, hidden.shape[1], LOGIT_ROWS)):
        rows = slice(start, start + LOGIT_ROWS)
        logp = torch.log_softmax(output_logits(model, hidden[:, rows]), dim=-1)
        nll.append(-logp.gather(-1, targets[:, rows, None].to(logp.device))[..., 0].double())
        if ref is None:
            made.append(_Reference(logp))
            kl.append(torch.zeros_like(nll[-1]))
            top1.append(torch.ones_like(nll[-1], dtype=torch.bool))
        else:
            r = ref[i]
            kl.append((r.p * (r.logp - logp)).sum(dim=-1).double())
            top1.append(logp.argmax(dim=-1) == r.top)
    cat = lambda xs: torch.cat(xs, dim=1).cpu()  # noqa: E731
    return cat(nll), cat(kl), cat(top1), made or ref


@torch.inference_mode()
def score_windows(model: Any, windows: torch.Tensor, modes: list[str], qparams: KVQParams | None = None, *,
                  batch_size: int = 2, chunk_tokens: int = CHUNK_TOKENS,
                  progress: ProgressFn | None = None, progress_span: tuple[float, float] = (0.0, 1.0)
                  ) -> dict[str, PositionScores]:
    """Every position of ``windows`` (``[n, seqlen]``) scored through each mode's cache; ``modes[0]`` is the reference.

    The modes run in lockstep, chunk by chunk: the reference's chunk first (its log-probs are kept for
    that chunk only), then each mode's same chunk over its own cache. Up to ``batch_size`` windows go
    through together, at most ``chunk_tokens`` tokens per forward.
    """
    if chunk_tokens < 1:
        raise EvalError(f"--chunk-tokens must be at least 1, got {chunk_tokens}")
    n_win, seqlen = windows.shape
    rows = max(1, min(batch_size, chunk_tokens // min(seqlen, chunk_tokens)))
    scores = {m: PositionScores(torch.zeros(n_win, seqlen - 1, dtype=torch.float64),
                                torch.zeros(n_win, seqlen - 1, dtype=torch.float64),
                                torch.zeros(n_win, seqlen - 1, dtype=torch.bool)) for m in modes}
    chunk = min(chunk_tokens, seqlen)
    units = -(-n_win // rows) * -(-seqlen // chunk) * len(modes)
    lo, hi = progress_span
    done = 0
    shape = KVShape.from_config(model.config)
    for row in range(0, n_win, rows):
        batch = windows[row:row + rows].to(model.device)
        blocks = len(batch) * -(-seqlen // BLOCK_SIZE)  # preallocated: a growing pool copies itself per growth
        caches = {m: PagedKVCache.for_model(model, m, qparams=qparams if get_mode(m).reads_qparams else None,
                                            num_blocks=blocks) for m in modes}
        feeds = {m: prefill_chunks(model, caches[m], batch, chunk) for m in modes}
        for start in range(0, seqlen, chunk):
            targets = batch[:, start + 1:start + chunk + 1]
            ref = None
            for m in modes:
                _, hidden = next(feeds[m])
                nll, kl, top1, ref = _reduce_chunk(model, hidden[:, :targets.shape[1]], targets, ref)
                at = (slice(row, row + len(batch)), slice(start, start + targets.shape[1]))
                scores[m].nll[at], scores[m].kl[at], scores[m].top1[at] = nll, kl, top1
                done += 1
                report_progress(progress, lo + (hi - lo) * done / units,
                                f"windows {row + 1}-{row + len(batch)} of {n_win}, tokens {start}-"
                                f"{start + targets.shape[1]} of {seqlen}: {get_mode(m).name} ({shape})")
            del ref
        for cache in caches.values():
            cache.reset()
    return scores


def position_buckets(seqlen: int) -> list[tuple[int, int]]:
    """``[start, end)`` position buckets of a ``seqlen``-token window: POSITION_EDGES cut at its length."""
    edges = list(POSITION_EDGES)
    while edges[-1] < seqlen:
        edges.append(edges[-1] * 2)
    cut = [e for e in edges if e < seqlen] + [seqlen]
    return list(zip(cut[:-1], cut[1:]))


def by_position(ours: PositionScores, ref: PositionScores, seqlen: int) -> list[dict[str, float]]:
    """KL, Δppl and top-1 of each position bucket (positions ``start <= p < end`` of every window)."""
    out = []
    for start, end in position_buckets(seqlen):
        cols = slice(start, min(end, seqlen - 1))
        n = ours.nll[:, cols].numel()
        if n == 0:
            continue
        dnll = (ours.nll[:, cols].sum() - ref.nll[:, cols].sum()) / n
        out.append(dict(start=start, end=end, positions=n, kl=float(ours.kl[:, cols].mean()),
                        dppl_pct=float(math.expm1(dnll) * 100),
                        top1_match_pct=float(100 * ours.top1[:, cols].double().mean())))
    return out


def delta_ppl_interval(window_nll: torch.Tensor, window_nll_ref: torch.Tensor,
                       resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> list[float] | None:
    """95% interval of Δppl (%) from per-window mean NLLs, resampling windows with replacement (paired).

    Windows hold equal token counts, so a resample's log perplexity ratio is its mean NLL difference.
    """
    n = window_nll.numel()
    if n < 2:
        return None
    idx = torch.randint(n, (resamples, n), generator=torch.Generator().manual_seed(seed))
    log_ratio = (window_nll.double() - window_nll_ref.double())[idx].mean(dim=1)
    lo, hi = log_ratio.quantile(torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return [(math.exp(lo) - 1) * 100, (math.exp(hi) - 1) * 100]


def first_divergence(ours: torch.Tensor, ref: torch.Tensor) -> list[int]:
    """Per row of ``[prompts, tokens]`` greedy continuations, the first index that differs (``tokens`` if none)."""
    differs = ours != ref
    width = ref.shape[1]
    return [int(row.nonzero()[0]) if row.any() else width for row in differs]


@torch.inference_mode()
def evaluate(
    loaded: Any,
    text: str,
    modes: list[str],
    *,
    qparams: KVQParams | None = None,
    seqlen: int = 512,
    samples: int = 16,
    batch_size: int = 2,
    greedy_prompts: int = 4,
    greedy_tokens: int = 32,
    chunk_tokens: int = CHUNK_TOKENS,
    progress: ProgressFn | None = None,
) -> dict[str, Any]:
    """Score ``modes`` (fp16 is always the reference) on windows of ``text``; returns the JSON-ready report."""
    names = list(dict.fromkeys([BASELINE_MODE, *(get_mode(m).name for m in modes)]))
    for m in names:
        require_qparams(m, qparams)
        get_mode(m).check_model(loaded.model.config)
    model = loaded.model
    if qparams is not None:
        qparams.check_matches(KVShape.from_config(model.config))
    if greedy_prompts < 0 or greedy_tokens < 1:
        raise EvalError(f"--greedy-prompts must be >= 0 and --greedy-tokens >= 1, got {greedy_prompts} and {greedy_tokens}")
    check_window(model.config, seqlen, "--seqlen", loaded.name)
    windows = make_windows(loaded.tokenizer, text, seqlen, samples, context_limit(model.config))
    n_win = windows.shape[0]
    scoring_share = 0.9 if greedy_prompts else 1.0  # of the progress bar
    scores = score_windows(model, windows, names, qparams, batch_size=batch_size, chunk_tokens=chunk_tokens,
                           progress=progress, progress_span=(0.0, scoring_share))
    scored = n_win * (seqlen - 1)
    prompts = windows[:greedy_prompts, : min(64, seqlen)]
    greedy = {}
    for j, m in enumerate(names):
        if len(prompts):
            greedy[m] = _greedy(model, m, qparams, prompts, greedy_tokens)
            report_progress(progress, scoring_share + (1 - scoring_share) * (j + 1) / len(names),
                            f"greedy generation with {m}")
    shape, fp_dtype = KVShape.from_config(model.config), kv_float_dtype(model.dtype)
    results = [_mode_result(m, scores, greedy, seqlen, shape, fp_dtype, qparams) for m in names]
    report = {
        "model": getattr(loaded, "name", "?"),
        "dtype": str(model.dtype).removeprefix("torch."),  # what the model computed in
        "kv_float_dtype": str(fp_dtype).removeprefix("torch."),  # the pools' 16-bit floats (the fp16 mode's)
        "seqlen": seqlen,
        "samples": n_win,
        "chunk_tokens": min(chunk_tokens, seqlen),
        "scoring": SCORING,
        "tokens_scored": scored,
        "greedy_prompts": int(prompts.shape[0]),
        "greedy_tokens": greedy_tokens,
        "results": [asdict(r) for r in results],
        "calibration": None,
        "warnings": [],
    }
    if qparams is not None and any(get_mode(m).needs_qparams for m in names):
        report["calibration"] = calibration_source(qparams, windows)
        report["warnings"] += report["calibration"].pop("warnings")
    report["warnings"] += context_notes(qparams, names, seqlen)
    return report


def context_notes(qparams: KVQParams | None, modes: list[str], context: int) -> list[str]:
    """The warnings, once each, when a mode reads a key transform fitted to, or static key ranges calibrated on,
    fewer positions than ``context``."""
    if qparams is None:
        return []
    notes = []
    if any(get_mode(m).uses_qk_transform for m in modes):
        notes.append(qparams.qk_context_warning(context))
    if any(get_mode(m).uses_static_keys for m in modes):
        notes.append(qparams.static_context_warning(context))
    return [n for n in notes if n]


def _mode_result(m: str, scores: dict[str, PositionScores], greedy: dict, seqlen: int, shape: KVShape,
                 fp_dtype: torch.dtype, qparams: KVQParams | None = None) -> ModeResult:
    """One mode's row of the report, against the fp16 reference."""
    mode = get_mode(m)
    tensor_scales = None
    if mode.uses_tensor_scales:  # what the pool read: the calibrated absmax with --qparams, else the engines' 1.0
        tensor_scales = "calibrated" if qparams is not None else "1.0"
    ours, ref = scores[m], scores[BASELINE_MODE]
    ppl, ppl_ref = math.exp(ours.nll.mean()), math.exp(ref.nll.mean())
    ci = delta_ppl_interval(ours.nll.mean(dim=1), ref.nll.mean(dim=1))
    div = first_divergence(greedy[m], greedy[BASELINE_MODE]) if greedy else []
    return ModeResult(
        kv=m, ppl=ppl, delta_ppl_pct=(ppl / ppl_ref - 1) * 100,
        delta_ppl_ci95=ci,
        kl_vs_fp16=float(ours.kl.mean()), top1_match_pct=float(100 * ours.top1.double().mean()),
        first_divergence=div, first_divergence_median=float(statistics.median(div)) if div else None,
        kv_bytes_per_token=get_mode(m).bytes_per_token(shape, fp_dtype),
        kv_ratio_to_fp16=get_mode(m).ratio_to_fp16(shape),
        by_position=by_position(ours, ref, seqlen), tensor_scales=tensor_scales,
    )


def calibration_source(qparams: KVQParams, windows: torch.Tensor) -> dict[str, Any]:
    """What the static parameters were calibrated on (from their metadata) and how much of the text it shares."""
    meta = qparams.metadata
    out: dict[str, Any] = {k: meta.get(k) for k in ("model", "dataset", "samples", "seqlen", "date")}
    out.update(granularity=qparams.granularity, symmetric=qparams.symmetric, overlap_pct=None, warnings=[])
    sketch = sketch_from_text(meta.get("text_sketch"))
    if sketch is None:
        out["overlap"] = "unknown: these parameters carry no sketch of their calibration text (re-export them)"
        return out
    overlap = containment(sketch, windows)
    if overlap is None:
        out["overlap"] = "unknown: the text is too short to sample"
        return out
    out["overlap_pct"], out["overlap"] = 100 * overlap.share, overlap.describe()
    if overlap.share > OVERLAP_WARN:
        out["warnings"].append(
            f"the evaluation text overlaps the calibration text ({overlap.describe()}): static parameters look "
            "better on text they were calibrated on; evaluate on other text for figures users will see"
        )
    return out


def calibration_label(cal: dict[str, Any] | None) -> str:
    """``builtin, 64 x 512`` (the calibration data of static parameters), or '' when none were used."""
    if not cal:
        return ""
    size = f", {cal['samples']} x {cal['seqlen']}" if cal.get("samples") and cal.get("seqlen") else ""
    return f"{cal.get('dataset') or 'unknown data'}{size}"


def _fmt_ci(ci: list[float] | None) -> str:
    return f"[{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else "n/a"


def _fmt_div(r: dict[str, Any], tokens: int) -> str:
    med = r["first_divergence_median"]
    if not r["first_divergence"]:
        return "n/a"
    return f"≥{tokens}" if med >= tokens else f"{med:g}"


def format_table(report: dict[str, Any]) -> str:
    """The report as a fixed-width table for a terminal."""
    rows = [("kv", "ppl", "Δppl %", "95% CI", "KL vs fp16", "top-1 %", "1st diff", "KV bytes/token", "x fp16 @2K")]
    for r in report["results"]:  # bytes per token: the codes; x fp16: a 2,048-token sequence's, sinks and windows too
        rows.append((
            r["kv"], f"{r['ppl']:.4f}", f"{r['delta_ppl_pct']:+.3f}", _fmt_ci(r["delta_ppl_ci95"]),
            f"{r['kl_vs_fp16']:.2e}", f"{r['top1_match_pct']:.2f}", _fmt_div(r, report["greedy_tokens"]),
            str(r["kv_bytes_per_token"]), f"{r['kv_ratio_to_fp16']:.3f}",
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    text = report.get("text", "the text")
    head = (f"{report['model']} on {text}: {report['samples']} windows x {report['seqlen']} tokens "
            f"({report['tokens_scored']} scored); 1st diff: median index of the first greedy token that differs "
            f"from fp16 over {report['greedy_prompts']} prompts x {report['greedy_tokens']} tokens")
    out = [head, *lines]
    scaled = {r["tensor_scales"] for r in report["results"] if r.get("tensor_scales")}
    if scaled:
        out.append("per-tensor scales (fp8/fp4 schemes): " + (
            "the calibrated ones of --qparams (what the vLLM export writes)" if scaled == {"calibrated"} else
            "1.0, the engines' default without calibrated scales (pass --qparams for calibrated ones)"))
    cal = report.get("calibration")
    if cal:
        out.append(f"static parameters calibrated on {calibration_label(cal)} ({cal.get('model') or '?'}, "
                   f"{cal['granularity']}); overlap with this text: {cal['overlap']}")
    return "\n".join(out)
