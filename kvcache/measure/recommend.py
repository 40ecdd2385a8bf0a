"""Which KV cache option to turn on: one engine's schemes, ours beside them, ranked by quality measured at a context.

For ``--engine E`` the options are the modes whose ``engine`` is E (every entry of
:data:`kvcache.modes.KV_MODES`, so a scheme added there shows up here unchanged) and, beside them, our best
mode per byte class (:data:`OUR_BEST`). Each is measured through the cache on windows of exactly the
context's length (KL vs fp16, top-1, Δppl, as ``evaluate`` does) and, where measured, by retrieval at that
context (the ``needle`` grid's cells, or ``--needle-trials``). The ranking puts options that lose pass keys
fp16 finds after those that do not, then orders by KL. Each row has bytes per token at the context (every
per-sequence cost counted, sinks included), the tokens and sessions of that length a KV budget holds
(:func:`kvcache.storage.sizing.capacity_report`, the pools' own rule), and the exact flag that turns it on.

Measurements are kept (:mod:`kvcache.measure.results_cache`): a second call at the same context is instant.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict
from typing import Any

from ..codec import OUR_ENGINE, kv_float_dtype
from ..config import BASELINE_MODE, BLOCK_SIZE
from ..engines import engine_order
from ..errors import ConfigError, EvalError
from ..models.variants import check_window, context_limit
from ..modes import KV_MODES, KVMode, get_mode
from ..qparams import KVQParams
from ..shape import KVShape, config_hash
from ..storage.sizing import capacity_report
from .evaluate import ProgressFn, by_position, context_notes, make_windows, score_windows
from .needle import NeedleDesign, needle
from .results_cache import ResultsCache, mode_fingerprint, qparams_hash, text_hash

# Our modes per byte class, best first (KL on both texts of the README's quality table): the first whose
# needs are met stands for its class. Without --qparams, int8-qk gives way to int8-rot (KL 1.4e-4 vs int8-dynamic's
# 4.0e-4 at the same bytes); k8v4 and int4 need calibrated parameters and are skipped with a note.
OUR_BEST: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("16-bit", ("fp16",)),
    ("8-bit", ("int8-qk", "int8-rot", "int8-dynamic")),
    ("K 8-bit, V 4-bit", ("k8v4",)),
    ("4-bit", ("int4",)),
)
NEEDLE_DEPTHS = (0.0, 0.5, 1.0)  # recommend --needle-trials: retrieval at the context, needle first, middle, last


def engines() -> list[str]:
    """The engines ``--engine`` takes: ours and the serving engines in their listing order, and any a mode of the table names."""
    return engine_order(m.engine for m in KV_MODES.values())


def check_engine(engine: str) -> None:
    if engine not in engines():
        raise ConfigError(f"unknown engine {engine!r}; known engines: {', '.join(engines())}")


def candidates(engine: str, has_qparams: bool, every_mode: bool = False) -> tuple[list[KVMode], list[str]]:
    """The options to measure for ``engine`` (fp16 first) and notes on those skipped."""
    check_engine(engine)
    notes: list[str] = []
    theirs = [m for m in KV_MODES.values() if m.engine == engine and m.engine != OUR_ENGINE]
    ours: list[KVMode] = []
    if engine == OUR_ENGINE or every_mode:
        ours = [m for m in KV_MODES.values() if m.engine == OUR_ENGINE]
    else:
        for label, names in OUR_BEST:
            usable = [n for n in names if n in KV_MODES and (has_qparams or not KV_MODES[n].needs_qparams)]
            if usable:
                ours.append(KV_MODES[usable[0]])
                passed = names[:names.index(usable[0])]
                if passed:
                    notes.append(f"{', '.join(passed)} ({label}, better) need --qparams: {usable[0]} stands in")
            elif names:
                notes.append(f"{', '.join(names)} ({label}) need --qparams: skipped")
    keep = []
    for m in theirs + ours:
        if m.needs_qparams and not has_qparams:
            if m.engine != OUR_ENGINE or engine == OUR_ENGINE or every_mode:
                notes.append(f"{m.name} needs --qparams: skipped")
            continue
        keep.append(m)
    keep = list({m.name: m for m in [KV_MODES[BASELINE_MODE], *keep]}.values())
    if not theirs and engine != OUR_ENGINE:
        notes.append(f"no {engine} schemes are in the mode table of this build: only ours are ranked")
    return keep, notes


def _design_hash(design: NeedleDesign) -> str:
    return hashlib.sha256(json.dumps(asdict(design), sort_keys=True).encode()).hexdigest()[:16]


def _model_key(model: Any) -> str:
    """The model as its figures depend on it: its config hash and the dtype it computes in (``--dtype``)."""
    return f"{config_hash(model.config)}/{str(model.dtype).removeprefix('torch.')}"


def _needle_key(model_hash: str, context: int, mode: KVMode, qparams: KVQParams | None, design: NeedleDesign) -> dict:
    return dict(kind="needle", model=model_hash, context=context, mode=mode.name, codecs=mode_fingerprint(mode),
                qparams=qparams_hash(qparams if mode.reads_qparams else None), design=_design_hash(design))


def remember_needle(report: dict[str, Any], model: Any, qparams: KVQParams | None,
                    store: ResultsCache | None = None) -> None:
    """Keep a ``needle`` report's cells per mode and context, so ``recommend`` shows retrieval where measured."""
    store = store or ResultsCache()
    design = NeedleDesign(**report["design"])
    totals: dict[tuple[str, int], list[int]] = {}
    for c in report["cells"]:
        t = totals.setdefault((c["kv"], c["context"]), [0, 0])
        t[0], t[1] = t[0] + c["correct"], t[1] + c["trials"]
    for (kv, context), (correct, trials) in totals.items():
        store.put(_needle_key(_model_key(model), context, get_mode(kv), qparams, design),
                  dict(correct=correct, trials=trials, depths=report["depths"]))


def recommend(
    loaded: Any,
    engine: str,
    context: int,
    *,
    text: str,
    text_name: str = "text",
    qparams: KVQParams | None = None,
    qparams_path: str | None = None,
    budget_mib: float | None = None,
    windows: int = 1,
    needle_trials: int = 0,
    max_kl: float = 1e-3,
    every_mode: bool = False,
    store: ResultsCache | None = None,
    progress: ProgressFn | None = None,
) -> dict[str, Any]:
    """Rank ``engine``'s options (ours beside them) at ``context`` tokens; returns the JSON-ready report (``options``)."""
    model = loaded.model
    check_window(model.config, context, "--context", loaded.name)
    max_positions = context_limit(model.config)
    if max_positions and context > max_positions:
        raise EvalError(f"--context {context} is beyond the model's {max_positions}-token context; use {max_positions} or less")
    if context < 2 or windows < 1:
        raise EvalError(f"--context must be at least 2 and --windows at least 1, got {context} and {windows}")
    modes, notes = candidates(engine, qparams is not None, every_mode)
    notes += context_notes(qparams, [m.name for m in modes], context)
    store = store or ResultsCache()
    shape, model_hash = KVShape.from_config(model.config), _model_key(model)
    wins = make_windows(loaded.tokenizer, text, context, windows, max_positions)
    base = dict(kind="kl", model=model_hash, text=text_hash(text), context=context, windows=wins.shape[0])
    key = lambda m: dict(base, mode=m.name, codecs=mode_fingerprint(m),  # noqa: E731
                         qparams=qparams_hash(qparams if m.reads_qparams else None))
    figures = {m.name: store.get(key(m)) for m in modes}
    missing = [m.name for m in modes if figures[m.name] is None]
    measured_now = set(missing)
    needle_share = 0.5 if needle_trials else 1.0
    t0 = time.perf_counter()
    if missing:
        names = list(dict.fromkeys([BASELINE_MODE, *missing]))
        scores = score_windows(model, wins, names, qparams, batch_size=1, progress=progress,
                               progress_span=(0.0, needle_share))
        ref = scores[BASELINE_MODE]
        for name in names:
            s = scores[name]
            fig = dict(kl=float(s.kl.mean()), top1_match_pct=float(100 * s.top1.double().mean()),
                       delta_ppl_pct=float(math.expm1(s.nll.mean() - ref.nll.mean()) * 100),
                       ppl=float(math.exp(s.nll.mean())), by_position=by_position(s, ref, context))
            store.put(key(get_mode(name)), fig)
            figures[name] = fig
    design = NeedleDesign()
    retrieval = {m.name: store.get(_needle_key(model_hash, context, m, qparams, design)) for m in modes}
    if needle_trials:
        todo = [m.name for m in modes if retrieval[m.name] is None or retrieval[m.name]["trials"] < needle_trials * len(NEEDLE_DEPTHS)]
        if todo:
            span = lambda f, msg: progress(needle_share + (1 - needle_share) * f, msg) if progress else None  # noqa: E731
            rep = needle(loaded, todo, qparams=qparams, lengths=[context], depths=list(NEEDLE_DEPTHS),
                         trials=needle_trials, design=design, progress=span)
            remember_needle(rep, model, qparams, store)
            retrieval = {m.name: store.get(_needle_key(model_hash, context, m, qparams, design)) for m in modes}
    seconds = round(time.perf_counter() - t0, 1)
    budget = int(budget_mib * 2**20) if budget_mib else None
    fits = {r["kv"]: r for r in capacity_report(modes, shape, budget, block_size=BLOCK_SIZE, session_tokens=context,
                                                fp_dtype=kv_float_dtype(model.dtype))["results"]} \
        if budget else {}
    fp16_found = (retrieval.get(BASELINE_MODE) or {}).get("correct")
    options = []
    for m in modes:
        fig, ret = figures[m.name], retrieval[m.name]
        lost = max(0, fp16_found - ret["correct"]) if ret and fp16_found is not None else 0
        command = m.serve + (f" --qparams {qparams_path or 'QPARAMS'}" if m.engine == OUR_ENGINE and m.needs_qparams else "")
        options.append(dict(
            name=m.name, engine=m.engine, ours=m.engine == OUR_ENGINE, command=command, description=m.description,
            kl=fig["kl"], top1_match_pct=fig["top1_match_pct"], delta_ppl_pct=fig["delta_ppl_pct"],
            by_position=fig["by_position"],
            retrieval=None if ret is None else dict(correct=ret["correct"], trials=ret["trials"], lost_vs_fp16=lost),
            bytes_per_token=round(m.bytes_per_token_at(shape, context), 1),
            ratio_to_fp16=m.ratio_to_fp16(shape, context),
            tokens_in_budget=fits[m.name]["tokens"] if fits else None,
            sessions_in_budget=fits[m.name]["sessions"] if fits else None,
            measured="now" if m.name in measured_now else "cached",
        ))
    options.sort(key=lambda o: ((o["retrieval"] or {}).get("lost_vs_fp16", 0), o["kl"], o["bytes_per_token"]))
    for rank, o in enumerate(options, 1):
        o["rank"] = rank

    def pick(rows: list[dict]) -> str | None:
        good = [o for o in rows if o["kl"] <= max_kl and not (o["retrieval"] or {}).get("lost_vs_fp16")]
        return min(good, key=lambda o: o["bytes_per_token"])["name"] if good else None

    return {
        "model": getattr(loaded, "name", "?"), "engine": engine, "context": context, "text": text_name,
        "windows": int(wins.shape[0]), "budget_mib": budget_mib, "max_kl": max_kl,
        "options": options,
        "pick": pick([o for o in options if o["engine"] == engine]),
        "pick_with_ours": pick(options),
        "notes": notes, "seconds": seconds, "measured_now": sorted(measured_now),
    }


def format_recommendation(report: dict[str, Any]) -> str:
    """The ranking as a terminal table, then the pick."""
    budget = report["budget_mib"]
    head = ["#", "option", "engine", f"KL @{report['context']}", "top-1 %", "Δppl %", "retrieval", "bytes/token",
            "x fp16"] + ([f"tokens in {budget:g} MiB", f"sessions of {report['context']}"] if budget else []) + ["turn it on"]
    rows = [head]
    for o in report["options"]:
        ret = o["retrieval"]
        rows.append([str(o["rank"]), o["name"], o["engine"], f"{o['kl']:.2e}", f"{o['top1_match_pct']:.2f}",
                     f"{o['delta_ppl_pct']:+.3f}", f"{ret['correct']}/{ret['trials']}" if ret else "-",
                     f"{o['bytes_per_token']:,.0f}", f"{o['ratio_to_fp16']:.3f}"]
                    + ([f"{o['tokens_in_budget']:,}", str(o["sessions_in_budget"])] if budget else []) + [o["command"]])
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = [f"{report['model']}, {report['engine']} options and ours at {report['context']} tokens: KL vs fp16 over "
             f"{report['windows']} window(s) of {report['text']}, scored through the cache; retrieval: pass keys found "
             f"at this context (where measured)"]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    limit = f"KL ≤ {report['max_kl']:g} and no pass key lost"
    theirs = report["pick"]
    lines.append(f"pick ({limit}, fewest bytes): {theirs or 'none of the ' + report['engine'] + ' options'}"
                 + (f"; with ours: {report['pick_with_ours']}" if report["pick_with_ours"] != theirs else ""))
    lines += [f"note: {n}" for n in report["notes"]]
    cached = len(report["options"]) - len(report["measured_now"])
    lines.append(f"measured now: {', '.join(report['measured_now']) or 'nothing'} ({report['seconds']:.0f} s); "
                 f"{cached} from the cache")
    return "\n".join(lines)
