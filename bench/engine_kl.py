"""The real engines' KV-cache schemes on the embedded model: each engine's own KL(16-bit || scheme) per position,
top-1 agreement and Δppl, against *that engine's own* 16-bit cache, on the windows `python -m kvcache evaluate`
scores (`make_windows` of the same text, seqlen and samples).

Two engines run on a CPU here, neither a dependency of KVQ Studio (`make engines` builds `.venv-engines` from
bench/engines/requirements.txt):
- transformers' `QuantizedCache` (quanto / HQQ backends, class defaults: residual 128, axis 0, group 64). A
  one-shot prefill would attend the unquantized prompt, so every window is fed token by token (teacher-forced):
  each position attends the cache as decoding sees it (quantized part + full-precision residual + itself). The
  16-bit reference is transformers' `DynamicCache`, fed the same way.
- llama.cpp through llama-cpp-python (`type_k`/`type_v`, flash attention on, as a quantized V cache needs). A
  window is one batch: llama.cpp writes a batch's K/V into its cache (`cpy_k`/`cpy_v`, set_rows) before the
  attention reads the cache back, so every position attends the stored copy. Rotation on (its default) and off
  (`LLAMA_ATTN_ROT_DISABLE=1`, read when a context is made). The reference is llama.cpp's own f16 cache; its
  distance to our exact baseline (`--kv fp16` through KVQ Studio's cache) is the noise floor of any comparison
  between llama.cpp and a reproduction of it, reported as the `llamacpp:f16` rows.

    .venv-engines/bin/python -m bench.engine_kl --json out/engine_kl.json
    .venv-engines/bin/python -m bench.engine_kl --engines llamacpp --text builtin-en --samples 2
    .venv-engines/bin/python -m bench.engine_kl --engines hf --schemes hf:quanto-int4 --hf-samples 2
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from bench.common import add_json_flag, parser, versions, write_json
from kvcache import PagedKVCache
from kvcache.hf.attention import register_attention
from kvcache.hf.compat import cache_kwargs
from kvcache.hf.forward import forward_tokens
from kvcache.measure.evaluate import delta_ppl_interval, make_windows, read_text, resolve_text
from kvcache.models.loader import default_model_file, load_model

HF_SCHEMES = {  # name -> (backend, nbits); every other QuantizedCache argument is left to the class default
    "hf:quanto-int4": ("quanto", 4), "hf:quanto-int2": ("quanto", 2),
    "hf:hqq-int4": ("hqq", 4), "hf:hqq-int2": ("hqq", 2),
}
LLAMACPP_TYPES = ("q8_0", "q5_0", "q5_1", "q4_0", "q4_1", "iq4_nl")
LLAMACPP_SCHEMES = {  # name -> (type_k, type_v, rotation)
    **{f"llamacpp:{t}{suffix}": (t, t, rot) for t in LLAMACPP_TYPES for suffix, rot in (("", True), ("-norot", False))},
    "llamacpp:q8_0-q4_0": ("q8_0", "q4_0", True), "llamacpp:q8_0-q4_0-norot": ("q8_0", "q4_0", False),
}
ROT_ENV = "LLAMA_ATTN_ROT_DISABLE"


@dataclass
class Scores:
    """Sums over a text's windows of one scheme against one reference."""
    kl: float = 0.0
    top1: int = 0
    positions: int = 0
    window_nll: list[float] = field(default_factory=list)  # mean NLL per window
    seconds: float = 0.0

    def add(self, logp: torch.Tensor, ref: torch.Tensor, targets: torch.Tensor, seconds: float) -> None:
        self.kl += float((ref.exp() * (ref - logp)).sum())
        self.top1 += int((logp.argmax(-1) == ref.argmax(-1)).sum())
        self.positions += len(targets)
        self.window_nll.append(mean_nll(logp, targets))
        self.seconds += seconds


def mean_nll(logp: torch.Tensor, targets: torch.Tensor) -> float:
    """Mean NLL of a window's next tokens (``targets`` = the window from its second token on)."""
    return float(-logp.gather(-1, targets[:, None]).double().mean())


def row(engine: str, scheme: str, text: str, s: Scores, ref: Scores, reference: str, attends: str) -> dict[str, Any]:
    """One scheme's figures against its reference (``ref`` holds the reference's own NLL on the same windows)."""
    nll, nll_ref = torch.tensor(s.window_nll), torch.tensor(ref.window_nll)
    ppl, ppl_ref = math.exp(nll.mean()), math.exp(nll_ref.mean())
    return dict(engine=engine, scheme=scheme, text=text, reference=reference, attends=attends,
                windows=len(s.window_nll), positions=s.positions, kl=s.kl / s.positions,
                top1_pct=100 * s.top1 / s.positions, ppl=ppl, ppl_ref=ppl_ref, delta_ppl_pct=(ppl / ppl_ref - 1) * 100,
                delta_ppl_ci95=delta_ppl_interval(nll, nll_ref), seconds_per_window=s.seconds / len(s.window_nll))


# --- our exact baseline (KVQ Studio's fp16 cache, one prefill through it) ------------------------------------------


@contextlib.contextmanager
def attention(model: Any, name: str) -> Iterator[None]:
    """Run the model with attention ``name``: our ``kvq`` reads only our cache, transformers' caches need ``sdpa``."""
    old = model.config._attn_implementation
    model.set_attn_implementation(name)
    try:
        yield
    finally:
        model.set_attn_implementation(old)


def kvq_fp16_logprobs(model: Any, window: torch.Tensor) -> torch.Tensor:
    """[n-1, vocab] log-probabilities of ``window`` through KVQ Studio's fp16 cache (what `evaluate` calls fp16)."""
    cache = PagedKVCache.for_model(model, "fp16")
    with torch.inference_mode(), attention(model, register_attention()):
        logits = forward_tokens(model, cache, window[None].to(model.device), last_only=False)[0, :-1]
    return torch.log_softmax(logits.float(), -1)


# --- transformers' QuantizedCache ---------------------------------------------------------------------------------


def hf_logprobs(model: Any, window: torch.Tensor, make_cache: Callable[[], Any]) -> torch.Tensor:
    """[n-1, vocab] log-probabilities, the window fed one token at a time through ``make_cache()``."""
    cache, out = make_cache(), []
    with torch.inference_mode(), attention(model, "sdpa"):
        for t in range(len(window) - 1):
            logits = model(input_ids=window[None, t:t + 1], use_cache=True, **cache_kwargs(cache)).logits
            out.append(torch.log_softmax(logits[0, -1].float(), -1))
    return torch.stack(out)


def run_hf(model: Any, texts: dict[str, torch.Tensor], schemes: list[str], emit: Callable[[dict], None]) -> None:
    """Every text's 16-bit references first, then one scheme at a time over every text (a row as each finishes)."""
    from transformers import DynamicCache, QuantizedCache

    attends = "token by token: quantized part + full-precision residual (<128 tokens) + itself"
    refs: dict[str, tuple[list[torch.Tensor], Scores]] = {}
    for text, windows in texts.items():
        ref, base, exact_nll, logps = Scores(), Scores(), Scores(), []
        for window in windows:
            targets = window[1:]
            exact = kvq_fp16_logprobs(model, window)
            exact_nll.window_nll.append(mean_nll(exact, targets))
            t0 = time.perf_counter()
            logps.append(hf_logprobs(model, window, lambda: DynamicCache(config=model.config)))
            seconds = time.perf_counter() - t0
            ref.add(logps[-1], logps[-1], targets, seconds)
            base.add(logps[-1], exact, targets, seconds)
        refs[text] = logps, ref
        emit(row("hf", "hf:dynamic", text, base, exact_nll, "kvq fp16 (one prefill through our cache)", attends))
    for s in schemes:
        backend, nbits = HF_SCHEMES[s]
        for text, windows in texts.items():
            logps, ref = refs[text]
            scores = Scores()
            for i, window in enumerate(windows):
                t0 = time.perf_counter()
                logp = hf_logprobs(model, window, lambda: QuantizedCache(backend, model.config, nbits=nbits))
                scores.add(logp, logps[i], window[1:], time.perf_counter() - t0)
            emit(row("hf", s, text, scores, ref, "hf DynamicCache, fed token by token", attends))


# --- llama.cpp ----------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def rotation(enabled: bool) -> Iterator[None]:
    """llama.cpp reads LLAMA_ATTN_ROT_DISABLE when a context's KV cache is made."""
    old = os.environ.pop(ROT_ENV, None)
    if not enabled:
        os.environ[ROT_ENV] = "1"
    try:
        yield
    finally:
        os.environ.pop(ROT_ENV, None)
        if old is not None:
            os.environ[ROT_ENV] = old


def llamacpp_context(gguf: Path, seqlen: int, threads: int, type_k: str, type_v: str, rot: bool,
                     flash_attn: bool = True) -> Any:
    import llama_cpp

    with rotation(rot):
        return llama_cpp.Llama(
            model_path=str(gguf), n_ctx=seqlen, n_batch=seqlen, n_ubatch=seqlen, n_threads=threads,
            n_threads_batch=threads, logits_all=True, flash_attn=flash_attn, verbose=False,
            type_k=getattr(llama_cpp, f"GGML_TYPE_{type_k.upper()}"),
            type_v=getattr(llama_cpp, f"GGML_TYPE_{type_v.upper()}"))


def llamacpp_logprobs(llm: Any, window: torch.Tensor) -> torch.Tensor:
    """[n-1, vocab] log-probabilities of ``window``, evaluated as one batch from an empty cache."""
    llm.reset()  # eval() then drops every cached position from 0 on
    llm.eval(window.tolist())
    logits = torch.from_numpy(llm.scores[: len(window) - 1].copy())
    return torch.log_softmax(logits.float(), -1)


def run_llamacpp(model: Any, texts: dict[str, torch.Tensor], schemes: list[str], seqlen: int, threads: int,
                 emit: Callable[[dict], None]) -> None:
    gguf = default_model_file()
    attends = "one batch per window: every position attends the stored (quantized) copy"
    for text, windows in texts.items():
        exact = [kvq_fp16_logprobs(model, w) for w in windows]
        exact_scores = Scores(window_nll=[mean_nll(e, w[1:]) for e, w in zip(exact, windows)])
        refs: list[torch.Tensor] = []
        for fa in (True, False):  # the f16 cache itself, against our exact baseline: the noise floor
            llm, s = llamacpp_context(gguf, seqlen, threads, "f16", "f16", True, flash_attn=fa), Scores()
            for i, w in enumerate(windows):
                t0 = time.perf_counter()
                logp = llamacpp_logprobs(llm, w)
                s.add(logp, exact[i], w[1:], time.perf_counter() - t0)
                if fa:
                    refs.append(logp)
            del llm
            emit(row("llamacpp", f"llamacpp:f16{'' if fa else '-fa-off'}", text, s, exact_scores,
                     "kvq fp16 (one prefill through our cache)", attends))
        ref_scores = Scores(window_nll=[mean_nll(r, w[1:]) for r, w in zip(refs, windows)])
        for name in schemes:
            type_k, type_v, rot = LLAMACPP_SCHEMES[name]
            llm, s = llamacpp_context(gguf, seqlen, threads, type_k, type_v, rot), Scores()
            for i, w in enumerate(windows):
                t0 = time.perf_counter()
                s.add(llamacpp_logprobs(llm, w), refs[i], w[1:], time.perf_counter() - t0)
            del llm
            emit(row("llamacpp", name, text, s, ref_scores, "llama.cpp f16 cache, flash attention on", attends))


# --- the run ------------------------------------------------------------------------------------------------------


def print_table(rows: list[dict[str, Any]]) -> None:
    print("| text | scheme | vs | windows | KL | top-1 % | Δppl % [95% CI] | s/window |")
    print("|---|---|---|--:|--:|--:|--:|--:|")
    for r in rows:
        ci = r["delta_ppl_ci95"]
        ci_text = f" [{ci[0]:+.2f}, {ci[1]:+.2f}]" if ci else ""
        vs = "kvq fp16" if r["reference"].startswith("kvq") else "own 16-bit"
        print(f"| {r['text']} | {r['scheme']} | {vs} | {r['windows']} | {r['kl']:.2e} | {r['top1_pct']:.2f} | "
              f"{r['delta_ppl_pct']:+.3f}{ci_text} | {r['seconds_per_window']:.1f} |")


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--engines", default="llamacpp,hf", help="comma list: llamacpp, hf")
    p.add_argument("--schemes", default=None, help="comma list of ENGINE:FLAG (default: every scheme of the engines)")
    p.add_argument("--text", default="builtin-en,builtin-zh", help="comma list: builtin-en, builtin-zh or files")
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--samples", type=int, default=8, help="windows per text for llama.cpp")
    p.add_argument("--hf-samples", type=int, default=None,
                   help="windows per text for transformers' QuantizedCache (token by token: slow); default --samples")
    p.add_argument("--threads", type=int, default=2)
    add_json_flag(p)
    args = p.parse_args()
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    known = {"hf": HF_SCHEMES, "llamacpp": LLAMACPP_SCHEMES}
    if unknown := [e for e in engines if e not in known]:
        p.error(f"unknown engine(s) {', '.join(unknown)}: use llamacpp, hf")
    schemes = [s.strip() for s in args.schemes.split(",")] if args.schemes else [s for e in engines for s in known[e]]
    for s in schemes:
        engine = s.partition(":")[0]
        if engine not in engines or s not in known[engine]:
            p.error(f"unknown scheme {s!r} for --engines {args.engines}: known: "
                    + ", ".join(n for e in engines for n in known[e]))
    if "llamacpp" in engines:
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            p.error("llama_cpp is not installed in this Python: run `make engines`, then use .venv-engines/bin/python")
    if "hf" in engines:
        try:
            import hqq  # noqa: F401
            import optimum.quanto  # noqa: F401
        except ImportError:
            p.error("optimum-quanto and hqq are not installed in this Python: run `make engines`, then use .venv-engines/bin/python")
    torch.set_num_threads(args.threads)
    started = time.time()
    loaded = load_model("default", device="cpu")
    model, tok = loaded.model, loaded.tokenizer
    max_pos = getattr(model.config, "max_position_embeddings", None)
    texts = {name: make_windows(tok, read_text(path), args.seqlen, args.samples, max_pos)
             for name, path in (resolve_text(t.strip()) for t in args.text.split(","))}
    rows: list[dict[str, Any]] = []
    meta = dict(model=loaded.name, seqlen=args.seqlen, samples=args.samples, hf_samples=args.hf_samples or args.samples,
                threads=args.threads, machine=f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
                load_average=os.getloadavg(), versions=versions("torch", "transformers", "llama_cpp", "hqq"),
                quanto=_version("optimum-quanto"), model_dtype=str(model.dtype).removeprefix("torch."))

    def emit(r: dict[str, Any]) -> None:
        rows.append(r)
        print(f"{r['text']} {r['scheme']}: KL {r['kl']:.3e}, top-1 {r['top1_pct']:.2f}%, Δppl {r['delta_ppl_pct']:+.3f}%"
              f" ({r['windows']} windows, {r['seconds_per_window']:.1f} s each)", flush=True)
        if args.json:  # after every scheme, so a long run leaves what it measured
            write_json(args.json, {**meta, "load_average_end": os.getloadavg()}, rows, started)

    if "llamacpp" in engines and (names := [s for s in schemes if s.startswith("llamacpp:")]):
        run_llamacpp(model, texts, names, args.seqlen, args.threads, emit)
    if "hf" in engines and (names := [s for s in schemes if s.startswith("hf:")]):
        hf_texts = {t: w[: args.hf_samples or args.samples] for t, w in texts.items()}
        run_hf(model, hf_texts, names, emit)
    print_table(rows)


def _version(dist: str) -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


if __name__ == "__main__":
    main()
