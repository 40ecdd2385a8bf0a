"""Serving realism (issue #6): capacity, saturated throughput and device memory, fp16 vs int8 KV caches.

A randomly initialised Llama-2-7B-shaped model (fp16 weights, loaded once) serves every KV mode in
turn through a :class:`kvcache.Engine`, as the app serves a chat: the engine sizes the mode's one fixed
pool from ``EngineConfig(cache_max_entry_count=...)`` (LMDeploy's meaning: a fraction of the memory
free after the weights load, or a whole number of fp16 blocks) and its batch worker runs the requests:

1. ``capacity``: the pool the engine really allocated per mode: blocks, tokens, and concurrent sessions of
   ``--session-tokens`` (blocks // ceil(session_tokens / block_size)); target int8 >= 1.95x fp16.
2. ``throughput``: ``--requests`` requests of seeded random lengths and token ids, all queued at once,
   through the engine's worker (continuous batching, :class:`kvcache.engine.scheduler.BatchScheduler`;
   no EOS, so every mode generates exactly the same number of tokens): generated tokens/s, requests/s,
   mean decode batch, steps. Target int8 >= 1.3x fp16 (LMDeploy publishes 1.27x for llama2-7b).
3. ``memory``: device memory (NVML, what nvidia-smi shows, read by ``kvcache.measure.device_memory``)
   before the model loads, after it loads, and after each mode's pool is allocated (each mode gets its
   own engine; the previous one and its pool are freed first).

The int8 (static) mode uses stand-in per-channel parameters from one random prefill, as in
``bench.generate``. On a GPU, from the repository root (one command; a few minutes on an H100 by
estimate, not yet timed):

    python -m bench.serving --json out/bench_serving.json
    # quick: 8 layers, 64 requests; a block count, not a fraction, keeps the smaller model's pool saturated
    python -m bench.serving --layers 8 --requests 64 --cache-max-entry-count 600 --json out/bench_serving_quick.json

A CPU dry run checks the logic only (float32 weights, fp16 pools, figures not meaningful):

    python -m bench.serving --device cpu --layers 2 --requests 8 --prompt-len 16,64 --new-tokens 4,16 \\
        --cache-max-entry-count 12 --block-size 16 --session-tokens 64 --calib-tokens 32 --warmup-batch 2

4. ``--long-prompt N``, on its own: ``--sessions`` chat sessions decode while one N-token prompt arrives,
   once with chunked prefill (``--prefill-chunk`` tokens per step) and once with whole prompts: the gaps
   between the sessions' tokens (``max_gap_ms``, ``median_gap_ms``, top-level in the JSON for the chunked
   run; target max <= 3x median), see :mod:`bench.token_gaps`. By default on the CPU with the embedded model
   (a growing pool, ``--modes fp16``); ``--device cuda`` serves the random Llama-2-7B shape instead:

    python -m bench.serving --long-prompt 4000 --json out/bench_long_prompt.json
    python -m bench.serving --long-prompt 4000 --device cuda --cache-max-entry-count 0.5 --json out/bench_long_prompt_gpu.json
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from bench.common import (
    GiB,
    LLAMA2_7B,
    MiB,
    add_block_size_flag,
    add_device_flag,
    add_json_flag,
    add_kv_modes_flag,
    add_model_flags,
    add_range_checks_flag,
    apply_range_checks,
    build_model,
    kv_modes,
    memory_now,
    model_config,
    needs_qparams,
    parser,
    peak_torch_bytes,
    release,
    require_device,
    require_positive,
    reset_peak_memory,
    stand_in_qparams,
    sync,
    versions,
    write_json,
)
from bench.token_gaps import measure_gaps
from kvcache import Engine, EngineConfig, KVCacheFull, KVMode, LoadedModel
from kvcache.codec import kv_float_dtype
from kvcache.config import PREFILL_CHUNK, parse_cache_max_entry_count
from kvcache.engine.sequence import Sequence
from kvcache.engine.worker import Request as Reply
from kvcache.errors import ConfigError
from kvcache.storage.block_pool import BlockPool
from kvcache.storage.sizing import free_memory_bytes

PARTS = ("capacity", "throughput", "memory")
Request = tuple[list[int], int]  # prompt token ids, max_new_tokens


def _int_range(p: argparse.ArgumentParser, flag: str, text: str, low: int) -> tuple[int, int]:
    """``"128,2048"`` -> (128, 2048); ``"64"`` -> (64, 64); errors name the flag."""
    try:
        bounds = [int(x) for x in text.split(",")]
    except ValueError:
        p.error(f"{flag} takes MIN,MAX integers, e.g. 128,2048; got {text!r}")
    if len(bounds) == 1:
        bounds *= 2
    if len(bounds) != 2 or not low <= bounds[0] <= bounds[1]:
        p.error(f"{flag} takes MIN,MAX with {low} <= MIN <= MAX; got {text!r}")
    return bounds[0], bounds[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = parser(__doc__)
    add_kv_modes_flag(p, default=None)
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma list of {', '.join(PARTS)}")
    add_model_flags(p)
    p.add_argument("--cache-max-entry-count", default=None,
                   help="KV pool: a fraction in (0, 1] of the memory free after the weights load, or a whole number of fp16 blocks "
                        "(default 0.5; with --long-prompt a pool that grows)")
    p.add_argument("--long-prompt", type=int, default=0, metavar="N",
                   help="instead of parts 1-3: the token gaps of sessions decoding while an N-token prompt arrives")
    p.add_argument("--sessions", type=int, default=3, help="--long-prompt: sessions decoding meanwhile")
    p.add_argument("--prefill-chunk", type=int, default=PREFILL_CHUNK, help="--long-prompt: prompt tokens per step, chunked run")
    p.add_argument("--threads", type=int, default=None,
                   help="--long-prompt on the CPU: torch's intra-op threads (1 on a busy machine: oversubscribed threads stall)")
    p.add_argument("--lead-tokens", type=int, default=16,
                   help="--long-prompt: tokens each session decodes before the prompt arrives, and after its first token")
    add_block_size_flag(p)
    p.add_argument("--session-tokens", type=int, default=2048, help="tokens per session for the capacity count")
    p.add_argument("--requests", type=int, default=256, help="requests in the throughput run, all queued at once")
    p.add_argument("--prompt-len", default="128,2048", help="MIN,MAX prompt tokens (uniform, seeded)")
    p.add_argument("--new-tokens", default="64,512", help="MIN,MAX generated tokens (uniform, seeded; no EOS)")
    p.add_argument("--warmup-batch", type=int, default=32,
                   help="rows of the largest untimed warm-up run per mode (Triton compiles there); 0 skips the warm-up")
    add_range_checks_flag(p)
    add_device_flag(p, "float32 weights, the reference kernels; --long-prompt's default, the embedded model", default=None)
    add_json_flag(p)
    args = p.parse_args(argv)
    args.device = args.device or ("cpu" if args.long_prompt else "cuda")
    args.modes = args.modes or kv_modes("fp16" if args.long_prompt else "fp16,int8,int8-dynamic")
    if args.long_prompt:
        return _long_prompt_args(p, args)
    try:
        args.cache_max_entry_count = parse_cache_max_entry_count(args.cache_max_entry_count or "0.5")
    except ConfigError as e:
        p.error(str(e))
    if args.cache_max_entry_count is None:
        p.error("--cache-max-entry-count takes a fraction in (0, 1] or a whole number of blocks: the benchmark needs a fixed pool")
    args.parts = [s.strip() for s in args.parts.split(",") if s.strip()]
    if not args.parts or set(args.parts) - set(PARTS):
        p.error(f"--parts takes a comma list of {', '.join(PARTS)}; got {','.join(args.parts)!r}")
    require_positive(p, args, "layers", "block_size", "session_tokens", "requests", "calib_tokens")
    if args.warmup_batch < 0:
        p.error("--warmup-batch must be >= 0")
    args.prompt_len = _int_range(p, "--prompt-len", args.prompt_len, 1)
    args.new_tokens = _int_range(p, "--new-tokens", args.new_tokens, 1)
    if args.prompt_len[1] + args.new_tokens[1] > LLAMA2_7B["max_position_embeddings"]:
        p.error(f"prompt + new tokens must fit in {LLAMA2_7B['max_position_embeddings']} positions")
    if args.device == "cpu" and isinstance(args.cache_max_entry_count, float):
        p.error("--device cpu takes a whole number of blocks for --cache-max-entry-count (e.g. 64): "
                "a fraction would allocate that share of the free RAM")
    return args


def _long_prompt_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    require_positive(p, args, "long_prompt", "sessions", "prefill_chunk", "lead_tokens", "block_size", "layers")
    try:
        args.cache_max_entry_count = parse_cache_max_entry_count(args.cache_max_entry_count)
    except ConfigError as e:
        p.error(str(e))
    if args.device == "cpu" and isinstance(args.cache_max_entry_count, float):
        p.error("--device cpu takes a whole number of blocks for --cache-max-entry-count, or none (a pool that grows)")
    if needs_qparams(args.modes):
        p.error("--long-prompt serves modes without calibrated parameters: pick them with --modes (e.g. fp16,int8-dynamic)")
    return args


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / GiB:.2f} GiB" if abs(n) >= GiB else f"{n / MiB:.1f} MiB"


def ratio(value: float | None, base: float | None) -> str:
    return "-" if not value or not base else f"{value / base:.2f}x"


def print_table(title: str, head: list[str], rows: list[list[Any]]) -> None:
    """A plain right-aligned text table under a title."""
    cells = [[str(c) for c in r] for r in [head, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(head))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    print(f"\n{title}\n{lines[0]}\n{'-' * len(lines[0])}")
    print("\n".join(lines[1:]))


def snapshot(stage: str, kv: str | None, device: str) -> dict[str, Any]:
    """One row of part 3: NVML used + torch's view on CUDA; the process RSS on the CPU dry run."""
    sync(device)
    return dict(part="memory", stage=stage, kv=kv, free_bytes=free_memory_bytes(device), **memory_now(device))


class _NoTokenizer:
    """The random model has no tokenizer; the engine asks one only for its end-of-reply tokens (none here)."""

    eos_token_id = None

    def get_vocab(self) -> dict[str, int]:
        return {}


def as_loaded(model: torch.nn.Module, layers: int) -> LoadedModel:
    """The random model as an engine takes it, with no EOS: every request generates its max_new_tokens."""
    model.generation_config.eos_token_id = None
    return LoadedModel(model=model, tokenizer=_NoTokenizer(), name=f"random Llama-2-7B shape, {layers} layers",
                       source="bench.common.build_model", device=model.device, dtype=next(model.parameters()).dtype)


class StepMeter:
    """The engine's device lock, which its worker holds for exactly one scheduler step: it counts what each step did.

    ``watch(sequences, pool)`` starts counting the steps over those sequences (from zero), ``unwatch()`` stops
    (the counts stay); ``held()`` keeps the worker waiting (requests queued inside start together at the next step).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.watch([], None)
        self.unwatch()

    def watch(self, seqs: list[Sequence], pool: BlockPool | None) -> None:
        self._live, self.pool = list(seqs), pool
        self.steps = self.decode_steps = self.decode_rows = self.peak_batch = self.saturated = self.peak_blocks = 0

    def unwatch(self) -> None:
        self._live, self.pool = [], None

    @contextmanager
    def held(self) -> Iterator[None]:
        with self._lock:
            yield

    def __enter__(self) -> "StepMeter":
        self._lock.acquire()
        self._live = [s for s in self._live if not s.finished]
        self._decoding = sum(1 for s in self._live if s.num_pending == 1)  # prefilled and not finished: this step decodes them
        self._tokens = sum(len(s.token_ids) for s in self._live)
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            if self.pool is not None and exc[0] is None:
                self.steps += 1
                self.decode_steps += self._decoding > 0
                self.decode_rows += self._decoding
                self.peak_batch = max(self.peak_batch, sum(len(s.token_ids) for s in self._live) - self._tokens)
                self.peak_blocks = max(self.peak_blocks, self.pool.num_used)
                self.saturated += any(not s.num_cached and not s.finished for s in self._live)  # left waiting: the pool is the limit
        finally:
            self._lock.release()


def make_requests(args: argparse.Namespace, vocab: int) -> list[Request]:
    """Seeded mixed lengths and random token ids; the same list for every mode."""
    rng = random.Random(args.seed)
    return [([rng.randrange(vocab) for _ in range(rng.randint(*args.prompt_len))], rng.randint(*args.new_tokens))
            for _ in range(args.requests)]


def warmup_runs(args: argparse.Namespace, tokens: list[int]) -> list[list[Request]]:
    """Short untimed runs whose shapes hit the kernel variants Triton compiles separately.

    The decode kernel splits long rows of small batches (its reduce path) and keeps big batches whole, and
    Triton specializes integer arguments that are 1 or multiples of 16 (a block table 16 blocks wide).
    """
    if not args.warmup_batch:
        return []
    lo, hi = args.prompt_len
    wide = 16 * args.block_size - 1  # 16 blocks once the first token is generated; not a multiple of 16 tokens
    shapes = [(1, lo), (1, hi), (1, wide), (3, lo + 1), (args.warmup_batch, lo), (args.warmup_batch, wide)]
    runs: list[list[Request]] = []
    for rows, n in dict.fromkeys((rows, min(max(n, lo), hi)) for rows, n in shapes):
        runs.append([((tokens * -(-n // len(tokens)))[:n], 3)] * rows)
    return runs


def capacity_row(pool: BlockPool, planned: int, session_tokens: int, free_after_load: int) -> dict[str, Any]:
    """Part 1 from the pool the engine really allocated (not from the plan)."""
    per_session = -(-session_tokens // pool.block_size)
    return dict(part="capacity", kv=pool.mode.name, planned_blocks=planned, blocks=pool.num_blocks,
                tokens=pool.num_blocks * pool.block_size, sessions=pool.num_blocks // per_session,
                blocks_per_session=per_session, bytes_per_token=pool.bytes_per_token, pool_bytes=pool.capacity_bytes,
                free_bytes_after_load=free_after_load)


def serve(engine: Engine, pool: BlockPool, requests: list[Request], meter: StepMeter,
          device: str) -> tuple[list[Reply], float, str | None]:
    """Queue every request while the worker waits, then let it run them all: (replies, seconds, refusal).

    The seconds run from the first step to the last token, prefills included; the meter watches these steps.
    """
    replies: list[Reply] = []
    refusal = None
    with meter.held():  # all queued at once: the worker's first step sees every request
        for prompt, new in requests:
            try:
                replies.append(engine.submit(pool, prompt, new))  # no eos: every request generates max_new_tokens
            except KVCacheFull as e:  # a request longer than the whole pool
                refusal = str(e)
                break
        if refusal is None:
            meter.watch([r.seq for r in replies], pool)
            reset_peak_memory(device)
            sync(device)
            t0 = time.perf_counter()
    if refusal is not None:
        for r in replies:
            r.cancel()
        return replies, 0.0, refusal
    for r in replies:
        r.done.wait()
    sync(device)
    seconds = time.perf_counter() - t0
    meter.unwatch()
    failed = [r.error for r in replies if r.error is not None and not isinstance(r.error, KVCacheFull)]
    if failed:  # a step failed (out of memory, a bug): the worker ended every request with it
        raise failed[0]
    return replies, seconds, None


def run_throughput(engine: Engine, pool: BlockPool, meter: StepMeter, requests: list[Request],
                   warmup: list[list[Request]], device: str) -> dict[str, Any]:
    """All requests queued at once, run by the engine's worker until done; tokens/s over the whole run (prefills included)."""
    row: dict[str, Any] = dict(part="throughput", kv=pool.mode.name, requests=len(requests))
    for run in warmup:
        _, _, refusal = serve(engine, pool, run, meter, device)
        if refusal:
            row["error"] = refusal
            return row
    replies, seconds, refusal = serve(engine, pool, requests, meter, device)
    if refusal:
        row["error"] = refusal
        return row
    seqs = [r.seq for r in replies]
    prompt_tokens = sum(len(p) for p, _ in requests)
    generated = sum(len(s.generated_ids) for s in seqs)
    row.update(
        seconds=seconds, steps=meter.steps, decode_steps=meter.decode_steps, prompt_tokens=prompt_tokens,
        generated_tokens=generated, complete=generated == sum(n for _, n in requests) and all(s.finished for s in seqs),
        tokens_per_s=generated / seconds, requests_per_s=len(requests) / seconds,
        total_tokens_per_s=(generated + prompt_tokens) / seconds,
        mean_decode_batch=meter.decode_rows / max(meter.decode_steps, 1), peak_concurrent=meter.peak_batch,
        saturated_steps=meter.saturated, peak_blocks_used=meter.peak_blocks, pool_blocks=pool.num_blocks,
        refused=sum(1 for s in seqs if s.error),  # a pool others hold
        preemptions=sum(s.preemptions for s in seqs),  # blocks taken back from the newest, recomputed later
        peak_torch_bytes=peak_torch_bytes(device),
    )
    return row


def new_engine(loaded: LoadedModel, args: argparse.Namespace) -> tuple[Engine, StepMeter]:
    """An engine sized by ``--cache-max-entry-count`` (its fraction applies to the memory free now), with a step meter."""
    meter = StepMeter()
    engine = Engine(loaded, EngineConfig(block_size=args.block_size, cache_max_entry_count=args.cache_max_entry_count),
                    device_lock=meter)
    assert not engine.eos_ids, engine.eos_ids  # every request must run to its max_new_tokens
    return engine, meter


def run_mode(engine: Engine, meter: StepMeter, mode: KVMode, qparams, args: argparse.Namespace, planned: int,
             requests: list[Request]) -> list[dict[str, Any]]:
    """This mode's pool from ``engine``, then what ``args.parts`` asks for (the caller closes and frees the engine)."""
    device = args.device
    rows: list[dict[str, Any]] = []
    try:
        pool = engine.pool(mode, qparams if mode.reads_qparams else None)
        rows.append(snapshot("after pool", mode.name, device))
        rows.append(capacity_row(pool, planned, args.session_tokens, engine.free_after_load))
        if "throughput" in args.parts:
            rows.append(run_throughput(engine, pool, meter, requests, warmup_runs(args, requests[0][0]), device))
    except ConfigError as e:  # the budget holds no block of this mode
        rows.append(dict(part="capacity", kv=mode.name, planned_blocks=planned, error=str(e)))
    except torch.cuda.OutOfMemoryError as e:
        rows.append(dict(part="throughput" if rows else "capacity", kv=mode.name, planned_blocks=planned,
                         error=f"out of memory: {str(e).splitlines()[0]}"))
    return rows


def print_results(rows: list[dict[str, Any]], parts: list[str]) -> None:
    """One table per part, ratios against the fp16 row."""
    def base(part: str) -> dict[str, Any]:
        return next((r for r in rows if r["part"] == part and r["kv"] == "fp16" and "error" not in r), {})

    if "capacity" in parts:
        b = base("capacity")
        cap = [r for r in rows if r["part"] == "capacity"]
        print_table(
            "1. capacity: the pool allocated per mode (target int8 >= 1.95x fp16 sessions)",
            ["kv", "bytes/token", "blocks", "tokens", "sessions", "x fp16", "pool"],
            [[r["kv"], "-", "-", "-", "-", "-", r["error"]] if "error" in r else
             [r["kv"], r["bytes_per_token"], r["blocks"], r["tokens"], r["sessions"],
              ratio(r["sessions"], b.get("sessions")), fmt_bytes(r["pool_bytes"])] for r in cap])
    if "throughput" in parts:
        b = base("throughput")
        tp = [r for r in rows if r["part"] == "throughput"]
        print_table(
            "2. throughput: all requests queued at once (target int8 >= 1.3x fp16 tok/s; LMDeploy: 1.27x)",
            ["kv", "gen tok/s", "x fp16", "req/s", "mean batch", "peak batch", "steps", "saturated", "gen tokens",
             "seconds", "peak torch", "complete"],
            [[r["kv"], *["-"] * 10, r["error"]] if "error" in r else
             [r["kv"], f"{r['tokens_per_s']:.1f}", ratio(r["tokens_per_s"], b.get("tokens_per_s")),
              f"{r['requests_per_s']:.2f}", f"{r['mean_decode_batch']:.1f}", r["peak_concurrent"], r["steps"],
              r["saturated_steps"], r["generated_tokens"], f"{r['seconds']:.1f}", fmt_bytes(r["peak_torch_bytes"]),
              r["complete"]] for r in tp])
        counts = {r["generated_tokens"] for r in tp if "generated_tokens" in r}
        if len(counts) > 1:
            print(f"WARNING: the modes generated different token counts {sorted(counts)}: the runs are not comparable")
    if "memory" in parts:
        mem = [r for r in rows if r["part"] == "memory"]
        loaded = next((r for r in mem if r["stage"] == "after load"), {})
        used = "nvml_used_bytes" if any(r.get("nvml_used_bytes") is not None for r in mem) else "process_rss_bytes"
        print_table(
            f"3. memory ({'NVML device used' if used == 'nvml_used_bytes' else 'process RSS: CPU dry run'})",
            ["stage", "kv", "used", "vs after load", "torch allocated", "free"],
            [[r["stage"], r["kv"] or "-", fmt_bytes(r.get(used)),
              fmt_bytes(r[used] - loaded[used]) if r.get(used) is not None and loaded.get(used) is not None else "-",
              fmt_bytes(r.get("torch_allocated_bytes")), fmt_bytes(r["free_bytes"])] for r in mem])


SESSION_QUESTIONS = ("What is the capital of France?", "Name three primary colours.", "Why is the sky blue?",
                     "How do bees make honey?")


def long_prompt_inputs(args: argparse.Namespace) -> tuple[LoadedModel, list[list[int]], list[int]]:
    """The served model (no EOS: sessions decode until cancelled), the sessions' prompts and the long prompt.

    On the CPU the embedded model with chat-templated questions; on a GPU the random 7B shape with random ids.
    """
    rng = random.Random(args.seed)
    if args.device == "cpu":
        from kvcache.models.loader import load_model

        real = load_model("default", device="cpu")
        tok = real.tokenizer
        texts = [tok.apply_chat_template([{"role": "user", "content": SESSION_QUESTIONS[i % len(SESSION_QUESTIONS)]}],
                                         add_generation_prompt=True, tokenize=False) for i in range(args.sessions)]
        sessions = [tok(t, add_special_tokens=False).input_ids for t in texts]
        real.model.generation_config.eos_token_id = None
        loaded = dataclasses.replace(real, tokenizer=_NoTokenizer())
    else:
        loaded = as_loaded(build_model(args.layers, args.seed, args.device), args.layers)
        sessions = [[rng.randrange(loaded.model.config.vocab_size) for _ in range(64)] for _ in range(args.sessions)]
    vocab, context = loaded.model.config.vocab_size, loaded.model.config.max_position_embeddings
    if args.long_prompt + 2 > context:
        sys.exit(f"--long-prompt {args.long_prompt} does not fit {loaded.name}'s {context} positions: give at most {context - 2}")
    return loaded, sessions, [rng.randrange(vocab) for _ in range(args.long_prompt)]


def main_long_prompt(args: argparse.Namespace) -> int:
    """Part 4: token gaps with chunked prefill, then with whole prompts, per mode."""
    t0 = time.time()
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded, sessions, long_prompt = long_prompt_inputs(args)
    print(f"{loaded.name} on {args.device}: {args.sessions} sessions decoding, then one {args.long_prompt}-token prompt "
          f"({args.lead_tokens} tokens per session before it and after its first token), block_size {args.block_size}")
    rows = []
    for mode in args.modes:
        for chunk in (args.prefill_chunk, None):
            rows.append(measure_gaps(loaded, mode, sessions, long_prompt, prefill_chunk=chunk, block_size=args.block_size,
                                     lead=args.lead_tokens, cache_max_entry_count=args.cache_max_entry_count))
            release(args.device)
    print_table(f"4. token gaps of the decoding sessions while a {args.long_prompt}-token prompt arrives "
                "(target: chunked max <= 3x median)",
                ["kv", "prefill", "max gap ms", "median gap ms", "max / median", "decode gap ms", "gaps",
                 "prompt's first token s", "tokens meanwhile"],
                [[r["kv"], f"chunks of {r['prefill_chunk']}" if r["prefill_chunk"] else "whole", f"{r['max_gap_ms']:.1f}",
                  f"{r['median_gap_ms']:.1f}", f"{r['max_gap_ms'] / r['median_gap_ms']:.1f}x",
                  f"{r['decode_gap_ms']:.1f}" if r["decode_gap_ms"] is not None else "-", r["gaps"],
                  f"{r['first_token_s']:.2f}", r["tokens_during_prefill"]] for r in rows])
    if args.json:
        first = rows[0]  # the first mode, chunked: the engine's default
        meta = dict(device=torch.cuda.get_device_name() if args.device == "cuda" else "cpu", model=loaded.name,
                    **versions("torch", "transformers"), modes=[m.name for m in args.modes],
                    long_prompt=args.long_prompt, sessions=args.sessions, prefill_chunk=args.prefill_chunk,
                    lead_tokens=args.lead_tokens, block_size=args.block_size, threads=torch.get_num_threads(),
                    cache_max_entry_count=args.cache_max_entry_count, seed=args.seed)
        write_json(args.json, meta, rows, t0, summary=dict(kv=first["kv"], prefill_chunk=first["prefill_chunk"],
                                                           max_gap_ms=first["max_gap_ms"], median_gap_ms=first["median_gap_ms"]))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = args.device
    require_device(device, "bench.serving")
    if args.long_prompt:
        return main_long_prompt(args)
    apply_range_checks(args)
    if device == "cpu":
        print("DRY RUN on the CPU: float32 weights, reference kernels; the figures below say nothing about a GPU")
    t0 = time.time()
    rows = [snapshot("before load", None, device)]
    model = build_model(args.layers, args.seed, device)
    if device == "cpu":
        model = model.float()  # fp16 matmuls crawl on CPUs; the pools stay fp16
    release(device)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    rows.append(snapshot("after load", None, device))
    modes = args.modes
    qparams = stand_in_qparams(model, args.calib_tokens, args.seed) if needs_qparams(modes) else None
    release(device)
    loaded = as_loaded(model, args.layers)
    device_name = torch.cuda.get_device_name() if device == "cuda" else "cpu (dry run)"
    requests = make_requests(args, model.config.vocab_size) if "throughput" in args.parts else []
    plan = None
    for mode in modes:  # a fresh engine per mode, as a server started with that mode: one pool in memory at a time
        engine, meter = new_engine(loaded, args)
        if plan is None:  # the budget and blocks of every mode, sized as the engine sizes its pools
            plan = engine.capacity(args.cache_max_entry_count, args.session_tokens, modes)
            print(f"{device_name}: {args.layers}-layer Llama-2-7B-shaped model, {fmt_bytes(weight_bytes)} of weights; "
                  f"cache_max_entry_count {args.cache_max_entry_count} -> {fmt_bytes(plan['budget_bytes'])} KV budget "
                  f"({fmt_bytes(plan['free_bytes'])} free after load), block_size {args.block_size}")
            if requests:
                print(f"{len(requests)} requests: prompts {args.prompt_len[0]}..{args.prompt_len[1]}, "
                      f"new tokens {args.new_tokens[0]}..{args.new_tokens[1]} (seed {args.seed}); "
                      f"{sum(len(p) for p, _ in requests)} prompt + {sum(n for _, n in requests)} generated tokens")
        planned = next(r["blocks"] for r in plan["results"] if r["kv"] == mode.name)
        try:
            out = run_mode(engine, meter, mode, qparams, args, planned, requests)
        finally:
            engine.close()
            del engine, meter
            release(device)
        rows.extend(out)
        got = {r["part"]: r for r in out}
        status = [f"{got['capacity'].get('blocks', '-')} blocks"]
        if "tokens_per_s" in got.get("throughput", {}):
            status.append(f"{got['throughput']['tokens_per_s']:.1f} generated tok/s")
        status += [f"ERROR {r['error']}" for r in out if "error" in r]
        print(f"  {mode.name}: {', '.join(status)}", flush=True)
    rows = [r for r in rows if r["part"] in args.parts]
    print_results(rows, args.parts)
    if args.json:
        from kvcache.kernels.common import range_checks_enabled

        meta = dict(device=device_name, dry_run=device == "cpu", **versions("torch", "triton", "transformers"),
                    config=model_config(args.layers), weight_bytes=weight_bytes,
                    weight_dtype=str(next(model.parameters()).dtype),
                    kv_fp_dtype=str(kv_float_dtype(next(model.parameters()).dtype)).removeprefix("torch."),
                    modes=[m.name for m in modes], parts=args.parts, cache_max_entry_count=args.cache_max_entry_count,
                    free_bytes_after_load=plan["free_bytes"], budget_bytes=plan["budget_bytes"], plan=plan["results"],
                    block_size=args.block_size, session_tokens=args.session_tokens, requests=args.requests,
                    prompt_len=list(args.prompt_len), new_tokens=list(args.new_tokens), seed=args.seed,
                    warmup_batch=args.warmup_batch, calib_tokens=args.calib_tokens,
                    range_checks=range_checks_enabled(default=False))
        write_json(args.json, meta, rows, t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
