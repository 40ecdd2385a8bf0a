"""End-to-end decode throughput: a randomly initialised Llama-2-7B-shaped model, fp16 vs int8 KV caches.

Prefills ``--batch`` rows of ``--context`` random tokens into a :class:`kvcache.PagedKVCache`
(chunked, through ``kvcache.hf.forward.forward_tokens``), then times ``--steps`` greedy decode steps,
for each KV mode:

- ``fp16``: blocks in fp16;
- ``int8``: static per-channel parameters, from the min/max of K/V of one short prefill through a
  transformers ``DynamicCache`` (a calibration-free stand-in: the timing does not depend on them);
- ``int8-dynamic``: per-token parameters computed at write time.

Reports tokens/s, ms/step, peak torch memory, device memory (NVML, read by
``kvcache.measure.device_memory``), and KV bytes (``cache.memory()``).
Modes whose cache cannot fit next to the weights are reported skipped, not run: fp16 at batch 16 x 8K
needs ~64.5 GiB of KV next to 12.6 GiB of weights, more than an 80 GB card has; ``--batch 8,16``
adds a batch where every mode fits. On a GPU, from the repository root:

    python -m bench.generate --batch 8,16 --json out/bench_generate.json
    python -m bench.generate --layers 4 --batch 4 --context 2048 --steps 16    # quick

A CPU dry run checks the logic only (float32 weights, fp16 caches, reference kernels; figures not meaningful):

    python -m bench.generate --device cpu --layers 1 --batch 2 --context 48 --steps 2 --warmup 1 \\
        --prefill-chunk 16 --calib-tokens 16 --block-size 16
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from bench.common import (
    GiB,
    LLAMA2_7B,
    Stopwatch,
    add_block_size_flag,
    add_device_flag,
    add_json_flag,
    add_kv_modes_flag,
    add_model_flags,
    add_range_checks_flag,
    apply_range_checks,
    build_model,
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
    versions,
    write_json,
)
from kvcache import PagedKVCache
from kvcache.engine.sampling import next_token
from kvcache.hf.forward import forward_tokens
from kvcache.modes import KVMode
from kvcache.shape import KVShape
from kvcache.storage.sizing import free_memory_bytes


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = parser(__doc__)
    add_kv_modes_flag(p)
    add_model_flags(p)
    p.add_argument("--batch", default="16", help="rows per step; a comma list runs each")
    p.add_argument("--context", type=int, default=8192, help="prompt tokens per row before the timed steps")
    p.add_argument("--steps", type=int, default=64, help="timed decode steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed decode steps first (Triton compiles here)")
    p.add_argument("--prefill-chunk", type=int, default=1024, help="prompt tokens per prefill forward")
    add_block_size_flag(p)
    p.add_argument("--mem-fraction", type=float, default=0.9, help="skip a mode whose cache needs more of the free memory")
    add_range_checks_flag(p)
    add_device_flag(p, "float32 weights, the reference kernels")
    add_json_flag(p)
    args = p.parse_args(argv)
    try:
        args.batch = [int(b) for b in args.batch.split(",") if b.strip()]
    except ValueError:
        p.error(f"--batch takes integers, e.g. 16 or 8,16; got {args.batch!r}")
    if not args.batch or min(args.batch) < 1:
        p.error("--batch must be >= 1")
    require_positive(p, args, "layers", "context", "steps", "prefill_chunk", "block_size", "calib_tokens")
    if args.context + args.warmup + args.steps > LLAMA2_7B["max_position_embeddings"]:
        p.error(f"context + warmup + steps must fit in {LLAMA2_7B['max_position_embeddings']} positions")
    return args


def cache_bytes(model: torch.nn.Module, mode: KVMode, rows: int, tokens: int, block_size: int) -> int:
    """Bytes the cache's blocks take for ``rows`` x ``tokens`` (whole blocks)."""
    shape = KVShape.from_config(model.config)
    per_token = shape.num_layers * shape.num_kv_heads * mode.bytes_per_token_per_head(shape.head_dim)
    return rows * -(-tokens // block_size) * block_size * per_token


@torch.inference_mode()
def run_mode(model: torch.nn.Module, mode: KVMode, batch: int, qparams, args: argparse.Namespace) -> dict:
    """Prefill, warm up, then time ``args.steps`` decode steps of ``batch`` rows with a cache of ``mode``."""
    device = args.device
    row: dict = dict(kv=mode.name, batch=batch, context=args.context, steps=args.steps)
    tokens = args.context + args.warmup + args.steps
    need = cache_bytes(model, mode, batch, tokens, args.block_size)
    free = free_memory_bytes(device)
    row["cache_bytes_planned"] = need
    if need > args.mem_fraction * free:
        row["skipped"] = f"the cache needs {need / GiB:.1f} GiB, {free / GiB:.1f} GiB free next to the weights"
        return row
    cache = None
    try:
        reset_peak_memory(device)
        num_blocks = batch * -(-tokens // args.block_size)
        cache = PagedKVCache.for_model(model, mode.name, qparams=qparams, block_size=args.block_size,
                                       num_blocks=num_blocks, growable=False)
        g = torch.Generator(device="cpu").manual_seed(args.seed + 2)
        ids = torch.randint(0, model.config.vocab_size, (batch, args.context), generator=g).to(device)

        with Stopwatch(device) as prefill:
            for start in range(0, args.context, args.prefill_chunk):
                logits = forward_tokens(model, cache, ids[:, start:start + args.prefill_chunk])
            tok = next_token(logits[:, -1])
        row["prefill_s"] = prefill.wall

        for _ in range(args.warmup):
            tok = next_token(forward_tokens(model, cache, tok[:, None])[:, -1])
        row["prefill_peak_torch_bytes"] = peak_torch_bytes(device)  # weights + cache + prefill activations
        reset_peak_memory(device)
        with Stopwatch(device) as decode:
            for _ in range(args.steps):
                tok = next_token(forward_tokens(model, cache, tok[:, None])[:, -1])
        mem = memory_now(device)
        row.update(
            tokens_per_s=batch * args.steps / decode.seconds,
            ms_per_step=1e3 * decode.seconds / args.steps,
            wall_tokens_per_s=batch * args.steps / decode.wall,
            decode_peak_torch_bytes=peak_torch_bytes(device),
            torch_reserved_bytes=mem.get("torch_reserved_bytes"),
            nvml_used_bytes=mem["nvml_used_bytes"],
            memory=cache.memory().as_dict(),
            final_tokens=cache.num_tokens,
        )
    except torch.cuda.OutOfMemoryError as e:
        row["error"] = f"out of memory: {str(e).splitlines()[0]}"
    finally:
        del cache
        release(device)
    return row


def gib(n: int | None) -> str:
    return "-" if n is None else f"{n / GiB:.1f}"


def print_rows(rows: list[dict]) -> None:
    head = (f"{'batch':>5} {'kv':14} {'tok/s':>9} {'ms/step':>8} {'prefill s*':>10} {'decode peak GiB':>15} "
            f"{'nvml GiB':>9} {'KV GiB':>7}  note")
    print(head)
    print("-" * len(head))
    for r in rows:
        if "tokens_per_s" not in r:
            print(f"{r['batch']:>5} {r['kv']:14} {'-':>9} {'-':>8} {'-':>10} {'-':>15} {'-':>9} "
                  f"{gib(r['cache_bytes_planned']):>7}  "
                  f"{r.get('skipped') or r.get('error')}")
            continue
        print(f"{r['batch']:>5} {r['kv']:14} {r['tokens_per_s']:>9.1f} {r['ms_per_step']:>8.2f} {r['prefill_s']:>10.1f} "
              f"{gib(r['decode_peak_torch_bytes']):>15} {gib(r['nvml_used_bytes']):>9} {gib(r['memory']['bytes_used']):>7}")
    print("* the prefill is each mode's first use of its store and prefill kernels: it includes their Triton compile")
    for r in rows:
        base = next((b for b in rows if b["kv"] == "fp16" and b["batch"] == r["batch"] and "tokens_per_s" in b), None)
        if base and r is not base and "tokens_per_s" in r:
            print(f"batch {r['batch']} {r['kv']}: {r['tokens_per_s'] / base['tokens_per_s']:.2f}x fp16 tokens/s, "
                  f"{r['memory']['bytes_used'] / base['memory']['bytes_used']:.2f}x its KV bytes")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    require_device(args.device, "bench.generate")
    apply_range_checks(args)
    if args.device == "cpu":
        print("DRY RUN on the CPU: float32 weights, reference kernels; the figures below say nothing about a GPU")
    t0 = time.time()
    memory_now(args.device)  # says once, up front, when there is no NVML
    model = build_model(args.layers, args.seed, args.device)
    if args.device == "cpu":
        model = model.float()  # fp16 matmuls crawl on CPUs; the caches stay fp16
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu (dry run)"
    print(f"{device_name}: {args.layers}-layer Llama-2-7B-shaped model, {weight_bytes / GiB:.1f} GiB "
          f"of {str(next(model.parameters()).dtype).removeprefix('torch.')} weights; batch "
          f"{','.join(map(str, args.batch))}, context {args.context}, {args.steps} timed steps")
    qparams = stand_in_qparams(model, args.calib_tokens, args.seed) if needs_qparams(args.modes) else None
    release(args.device)
    rows = []
    for batch in args.batch:
        for mode in args.modes:
            rows.append(run_mode(model, mode, batch, qparams if mode.reads_qparams else None, args))
            r = rows[-1]
            status = f"{r['tokens_per_s']:.1f} tok/s" if "tokens_per_s" in r else (r.get("skipped") or r.get("error"))
            print(f"  batch {batch} {mode.name}: {status}", flush=True)
    print()
    print_rows(rows)
    if args.json:
        from kvcache.kernels.common import range_checks_enabled

        meta = dict(device=device_name, dry_run=args.device == "cpu", **versions("torch", "triton", "transformers"),
                    config=model_config(args.layers), weight_bytes=weight_bytes, block_size=args.block_size,
                    prefill_chunk=args.prefill_chunk, warmup=args.warmup, calib_tokens=args.calib_tokens,
                    range_checks=range_checks_enabled(default=False))
        write_json(args.json, meta, rows, t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
