"""Serving realism (issue #6): capacity, saturated throughput and device memory, fp16 vs int8 KV caches.

A randomly initialised Llama-2-7B-shaped model (fp16 weights, loaded once) serves every KV mode in
turn from one fixed :class:`kvcache.BlockPool` sized like LMDeploy's ``cache_max_entry_count``
(a fraction of the memory free after the weights load, or a whole number of fp16 blocks):

1. ``capacity``: the pool really allocated per mode: blocks, tokens, and concurrent sessions of
   ``--session-tokens`` (blocks // ceil(session_tokens / block_size)); target int8 >= 1.95x fp16.
2. ``throughput``: ``--requests`` requests of seeded random lengths and token ids, all queued at once,
   through :class:`kvcache.batching.BatchScheduler` (continuous batching; no EOS, so every mode
   generates exactly the same number of tokens): generated tokens/s, requests/s, mean decode batch,
   steps. Target int8 >= 1.3x fp16 (LMDeploy publishes 1.27x for llama2-7b).
3. ``memory``: device memory (NVML, what nvidia-smi shows) before the model loads, after it loads,
   and after each mode's pool is allocated (each pool is freed before the next mode).

The int8 (static) mode uses stand-in per-channel parameters from one random prefill, as in
bench/generate.py. On a GPU (one command; a few minutes on an H100 by estimate, not yet timed):

    python bench/serving.py --json out/bench_serving.json
    # quick: 8 layers, 64 requests; a block count, not a fraction, keeps the smaller model's pool saturated
    python bench/serving.py --layers 8 --requests 64 --cache-max-entry-count 600 --json out/bench_serving_quick.json

A CPU dry run checks the logic only (float32 weights, fp16 pools, figures not meaningful):

    python bench/serving.py --device cpu --layers 2 --requests 8 --prompt-len 16,64 --new-tokens 4,16 \\
        --cache-max-entry-count 12 --block-size 16 --session-tokens 64 --calib-tokens 32 --warmup-batch 2
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import generate  # noqa: E402  (bench/ is on sys.path when run as a script)
from generate import LLAMA2_7B, DeviceMemory, build_model, stand_in_qparams  # noqa: E402
from report import write_json  # noqa: E402
from kvcache.batching import BatchScheduler  # noqa: E402
from kvcache.block_pool import BlockPool, KVCacheFull  # noqa: E402
from kvcache.capacity import free_memory_bytes, parse_cache_max_entry_count, plan, pool_blocks  # noqa: E402
from kvcache.kv_shape import KVShape  # noqa: E402
from kvcache.modes import KVMode, parse_modes  # noqa: E402

GiB, MiB = 1 << 30, 1 << 20
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
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modes", default="fp16,int8,int8-dynamic", help="comma list of KV modes")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma list of {', '.join(PARTS)}")
    p.add_argument("--layers", type=int, default=32, help="decoder layers (32 = Llama-2-7B)")
    p.add_argument("--cache-max-entry-count", default="0.5",
                   help="KV pool: a fraction in (0, 1] of the memory free after the weights load, or a whole number of fp16 blocks")
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--session-tokens", type=int, default=2048, help="tokens per session for the capacity count")
    p.add_argument("--requests", type=int, default=256, help="requests in the throughput run, all queued at once")
    p.add_argument("--prompt-len", default="128,2048", help="MIN,MAX prompt tokens (uniform, seeded)")
    p.add_argument("--new-tokens", default="64,512", help="MIN,MAX generated tokens (uniform, seeded; no EOS)")
    p.add_argument("--warmup-batch", type=int, default=32,
                   help="rows of the largest untimed warm-up run per mode (Triton compiles there); 0 skips the warm-up")
    p.add_argument("--range-checks", action="store_true",
                   help="set KVQ_KERNEL_CHECKS=1: the cache's kernel calls range-check their indices (a host sync each)")
    p.add_argument("--calib-tokens", type=int, default=512, help="tokens of the DynamicCache prefill for int8 qparams")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cpu = a dry run of the logic (float32 weights); its figures mean nothing")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)
    try:
        args.modes = parse_modes(args.modes)
        args.cache_max_entry_count = parse_cache_max_entry_count(args.cache_max_entry_count)
    except ValueError as e:
        p.error(str(e))
    args.parts = [s.strip() for s in args.parts.split(",") if s.strip()]
    if not args.parts or set(args.parts) - set(PARTS):
        p.error(f"--parts takes a comma list of {', '.join(PARTS)}; got {','.join(args.parts)!r}")
    for name in ("layers", "block_size", "session_tokens", "requests", "calib_tokens"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
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


def sync() -> None:
    if generate.DEVICE == "cuda":
        torch.cuda.synchronize()


def release() -> None:
    """Give freed tensors back, so the next mode starts from the same device memory."""
    gc.collect()
    if generate.DEVICE == "cuda":
        torch.cuda.empty_cache()


def snapshot(stage: str, kv: str | None, nvml: DeviceMemory | None) -> dict[str, Any]:
    """One row of part 3: NVML used + torch's view on CUDA; the process RSS on the CPU dry run."""
    sync()
    row: dict[str, Any] = dict(part="memory", stage=stage, kv=kv, free_bytes=free_memory_bytes(generate.DEVICE))
    if generate.DEVICE == "cuda":
        row.update(nvml_used_bytes=nvml.used() if nvml else None, torch_allocated_bytes=torch.cuda.memory_allocated(),
                   torch_reserved_bytes=torch.cuda.memory_reserved())
    else:
        import psutil

        row.update(nvml_used_bytes=None, process_rss_bytes=psutil.Process().memory_info().rss)
    return row


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


def capacity_row(pool: BlockPool, planned: int, session_tokens: int) -> dict[str, Any]:
    """Part 1 from the pool that was really allocated (not from the plan)."""
    per_session = -(-session_tokens // pool.block_size)
    return dict(part="capacity", kv=pool.mode.name, planned_blocks=planned, blocks=pool.num_blocks,
                tokens=pool.num_blocks * pool.block_size, sessions=pool.num_blocks // per_session,
                blocks_per_session=per_session, bytes_per_token=pool.bytes_per_token, pool_bytes=pool.capacity_bytes)


@torch.inference_mode()
def run_throughput(model: torch.nn.Module, pool: BlockPool, requests: list[Request],
                   warmup: list[list[Request]]) -> dict[str, Any]:
    """All requests queued at once, stepped until done; tokens/s over the whole run (prefills included)."""
    row: dict[str, Any] = dict(part="throughput", kv=pool.mode.name, requests=len(requests))
    try:
        for run in warmup:
            sched = BatchScheduler(model, pool)
            for prompt, new in run:
                sched.add(prompt, new)
            sched.run_until_done()
        sched = BatchScheduler(model, pool)  # no eos_ids: every request generates its max_new_tokens
        for prompt, new in requests:
            sched.add(prompt, new)
    except KVCacheFull as e:  # a request longer than the whole pool
        row["error"] = str(e)
        return row
    if generate.DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
    steps = decode_steps = decode_rows = peak_batch = saturated = peak_blocks = 0
    sync()
    t0 = time.perf_counter()
    while sched.waiting or sched.running:
        decoding = len(sched.running)  # step() decodes these and prefills what it admits
        new = sched.step()
        steps += 1
        decode_steps += decoding > 0
        decode_rows += decoding
        peak_batch = max(peak_batch, len(new))
        peak_blocks = max(peak_blocks, pool.num_used)
        saturated += bool(sched.waiting)  # requests left waiting: the pool is the limit
    sync()
    seconds = time.perf_counter() - t0
    generated = sum(len(s.generated_ids) for s in sched.sequences.values())
    row.update(
        seconds=seconds, steps=steps, decode_steps=decode_steps, prompt_tokens=sum(len(p) for p, _ in requests),
        generated_tokens=generated, complete=generated == sum(n for _, n in requests)
        and all(s.finished for s in sched.sequences.values()),
        tokens_per_s=generated / seconds, requests_per_s=len(requests) / seconds,
        total_tokens_per_s=(generated + sum(len(p) for p, _ in requests)) / seconds,
        mean_decode_batch=decode_rows / max(decode_steps, 1), peak_concurrent=peak_batch,
        saturated_steps=saturated, peak_blocks_used=peak_blocks, pool_blocks=pool.num_blocks,
        refused=sum(1 for s in sched.sequences.values() if getattr(s, "error", None)),  # a pool others hold
        peak_torch_bytes=torch.cuda.max_memory_allocated() if generate.DEVICE == "cuda" else None,
    )
    return row


def run_mode(model: torch.nn.Module, mode: KVMode, qparams, args: argparse.Namespace, free_after_load: int,
             requests: list[Request], nvml: DeviceMemory | None) -> list[dict[str, Any]]:
    """Allocate this mode's pool, measure what ``args.parts`` asks for, then free it."""
    shape = KVShape.from_config(model.config)
    planned = pool_blocks(mode, shape, args.cache_max_entry_count, generate.DEVICE, args.block_size, free_bytes=free_after_load)
    rows: list[dict[str, Any]] = []
    pool = None
    try:
        pool = BlockPool(mode, shape, block_size=args.block_size, num_blocks=planned, growable=False, device=generate.DEVICE,
                         fp_dtype=torch.float16, qparams=qparams if mode.needs_qparams else None)
        rows.append(snapshot("after pool", mode.name, nvml))
        rows.append(capacity_row(pool, planned, args.session_tokens))
        if "throughput" in args.parts:
            rows.append(run_throughput(model, pool, requests, warmup_runs(args, requests[0][0])))
    except torch.cuda.OutOfMemoryError as e:
        rows.append(dict(part="throughput" if rows else "capacity", kv=mode.name, planned_blocks=planned,
                         error=f"out of memory: {str(e).splitlines()[0]}"))
    finally:
        del pool
        release()
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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench/serving.py needs a CUDA GPU (torch.cuda.is_available() is False); nothing was measured. "
                 "Pass --device cpu for a dry run of the logic.")
    generate.DEVICE = args.device
    if args.range_checks:
        os.environ["KVQ_KERNEL_CHECKS"] = "1"
    if args.device == "cpu":
        print("DRY RUN on the CPU: float32 weights, reference kernels; the figures below say nothing about a GPU")
    t0 = time.time()
    nvml = DeviceMemory() if args.device == "cuda" else None
    rows = [snapshot("before load", None, nvml)]
    model = build_model(args.layers, args.seed)
    if args.device == "cpu":
        model = model.float()  # fp16 matmuls crawl on CPUs; the pools stay fp16
    release()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    rows.append(snapshot("after load", None, nvml))
    modes = args.modes
    qparams = stand_in_qparams(model, args.calib_tokens, args.seed) if any(m.needs_qparams for m in modes) else None
    release()
    free_after_load = free_memory_bytes(generate.DEVICE)
    shape = KVShape.from_config(model.config)
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu (dry run)"
    report = plan(modes, shape, cache_max_entry_count=args.cache_max_entry_count, free_bytes=free_after_load,
                  block_size=args.block_size, session_tokens=args.session_tokens)
    print(f"{device_name}: {args.layers}-layer Llama-2-7B-shaped model, {fmt_bytes(weight_bytes)} of weights; "
          f"cache_max_entry_count {args.cache_max_entry_count} -> {fmt_bytes(report['budget_bytes'])} KV budget "
          f"({fmt_bytes(free_after_load)} free after load), block_size {args.block_size}")
    requests = make_requests(args, model.config.vocab_size) if "throughput" in args.parts else []
    if requests:
        print(f"{len(requests)} requests: prompts {args.prompt_len[0]}..{args.prompt_len[1]}, "
              f"new tokens {args.new_tokens[0]}..{args.new_tokens[1]} (seed {args.seed}); "
              f"{sum(len(p) for p, _ in requests)} prompt + {sum(n for _, n in requests)} generated tokens")
    for mode in modes:
        out = run_mode(model, mode, qparams, args, free_after_load, requests, nvml)
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
        from kvcache.kernels.store import range_checks_enabled

        import transformers

        try:
            import triton

            triton_version = triton.__version__
        except ImportError:
            triton_version = None
        meta = dict(device=device_name, dry_run=args.device == "cpu", torch=torch.__version__, triton=triton_version,
                    transformers=transformers.__version__, config={**LLAMA2_7B, "num_hidden_layers": args.layers},
                    weight_bytes=weight_bytes, weight_dtype=str(next(model.parameters()).dtype), kv_fp_dtype="float16",
                    modes=[m.name for m in modes], parts=args.parts, cache_max_entry_count=args.cache_max_entry_count,
                    free_bytes_after_load=free_after_load, budget_bytes=report["budget_bytes"], plan=report["results"],
                    block_size=args.block_size, session_tokens=args.session_tokens, requests=args.requests,
                    prompt_len=list(args.prompt_len), new_tokens=list(args.new_tokens), seed=args.seed,
                    warmup_batch=args.warmup_batch, calib_tokens=args.calib_tokens,
                    range_checks=range_checks_enabled(default=False))
        write_json(args.json, meta, rows, t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
