"""What the LMDeploy recipe never measured: perplexity, KL and greedy agreement of each KV mode vs fp16.

Every window is scored teacher-forced *through the cache*: one prefill writes the window's K/V
into the paged cache (quantized on write) and every position attends to the stored copy, so a
quantized mode's perplexity reflects exactly what its cache holds.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from .cache import PagedKVCache
from .generation import forward_tokens, greedy_generate
from .modes import get_mode
from .qparams import KVQParams

ProgressFn = Callable[[float, str], Any]


class EvalError(ValueError):
    """Bad evaluation input: the message says what to fix."""


@dataclass
class ModeResult:
    kv: str
    ppl: float
    delta_ppl_pct: float
    kl_vs_fp16: float
    greedy_match_pct: float
    kv_bytes_per_token: int


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
        raise EvalError(f"the text has {len(ids)} tokens, fewer than one window of --seqlen {seqlen}; use a longer text or a smaller --seqlen")
    return ids[: n * seqlen].reshape(n, seqlen)


def _window_logprobs(model: Any, kv: str, qparams: KVQParams | None, windows: torch.Tensor) -> torch.Tensor:
    cache = PagedKVCache.for_model(model, kv, qparams=qparams)
    logits = forward_tokens(model, cache, windows.to(model.device), last_only=False)[:, :-1]
    return torch.log_softmax(logits, dim=-1).cpu()


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
    progress: ProgressFn | None = None,
) -> dict[str, Any]:
    """Score ``modes`` (fp16 is always the reference) on windows of ``text``; returns the JSON-ready report."""
    names = list(dict.fromkeys(["fp16", *(get_mode(m).name for m in modes)]))
    if any(get_mode(m).needs_qparams for m in names) and qparams is None:
        raise EvalError("KV mode int8 needs --qparams FILE (made by `python -m calib kv_qparams ... --format kvq`)")
    model = loaded.model
    if qparams is not None:
        from .kv_shape import KVShape

        qparams.check_matches(KVShape.from_config(model.config))
    windows = make_windows(loaded.tokenizer, text, seqlen, samples, getattr(model.config, "max_position_embeddings", None))
    nll = {m: 0.0 for m in names}
    kl = {m: 0.0 for m in names}
    scored = 0
    batches = list(windows.split(batch_size))
    steps = len(batches) + len(names)
    for i, batch in enumerate(batches):
        targets = batch[:, 1:]
        ref = None
        for m in names:
            logp = _window_logprobs(model, m, qparams, batch)
            nll[m] += -logp.gather(-1, targets[..., None]).sum().item()
            if ref is None:
                ref = logp
            else:
                kl[m] += (ref.exp() * (ref - logp)).sum().item()
        scored += targets.numel()
        if progress:
            progress((i + 1) / steps, f"scored {scored} tokens")
    prompts = windows[:greedy_prompts, : min(64, seqlen)]
    greedy = {}
    for j, m in enumerate(names):
        cache = PagedKVCache.for_model(model, m, qparams=qparams)
        greedy[m] = greedy_generate(model, cache, prompts.to(model.device), greedy_tokens).cpu()
        if progress:
            progress((len(batches) + j + 1) / steps, f"greedy generation with {m}")
    ppl_ref = math.exp(nll["fp16"] / scored)
    results = []
    for m in names:
        ppl = math.exp(nll[m] / scored)
        bpt = PagedKVCache.for_model(model, m, qparams=qparams).pool.bytes_per_token
        results.append(ModeResult(
            kv=m, ppl=ppl, delta_ppl_pct=(ppl / ppl_ref - 1) * 100, kl_vs_fp16=kl[m] / scored,
            greedy_match_pct=100 * (greedy[m] == greedy["fp16"]).float().mean().item(), kv_bytes_per_token=bpt,
        ))
    return {
        "model": getattr(loaded, "name", "?"),
        "seqlen": seqlen,
        "samples": int(windows.shape[0]),
        "tokens_scored": scored,
        "greedy_prompts": int(prompts.shape[0]),
        "greedy_tokens": greedy_tokens,
        "results": [asdict(r) for r in results],
    }


def format_table(report: dict[str, Any]) -> str:
    """The report as a fixed-width table for a terminal."""
    rows = [("kv", "ppl", "Δppl %", "KL vs fp16", "greedy match %", "KV bytes/token", "vs fp16")]
    base = report["results"][0]["kv_bytes_per_token"]
    for r in report["results"]:
        rows.append((
            r["kv"], f"{r['ppl']:.4f}", f"{r['delta_ppl_pct']:+.3f}", f"{r['kl_vs_fp16']:.2e}",
            f"{r['greedy_match_pct']:.1f}", str(r["kv_bytes_per_token"]), f"{r['kv_bytes_per_token'] / base:.3f}",
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    head = f"{report['model']}: {report['samples']} windows x {report['seqlen']} tokens ({report['tokens_scored']} scored)"
    return "\n".join([head, *lines])
