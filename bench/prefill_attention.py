"""Prefill / multi-turn attention benchmark: a chunk of new tokens over a paged history, our kernel vs SDPA.

For each shape (Llama-2-7B MHA: 32 heads x 128; GQA: 32 query / 8 KV heads x 128), history and chunk:

- ``sdpa_fp16``: torch SDPA over contiguous fp16 K/V with the causal mask for the chunk's offset
  (what transformers runs with a DynamicCache; the baseline every ratio refers to);
- ``deq_sdpa_<mode>``: the peers' approach and our CPU reference: dequantize the blocks, then SDPA;
- ``kvq_<mode>``: our Triton prefill kernel reading the blocks in their stored format.

Prefill is compute-bound: the table gives TFLOP/s of the causal attention (4 * heads * head_dim
multiply-adds per (query, visible key) pair). Run on a GPU, from the repository root:

    python -m bench.prefill_attention --json out/bench_prefill.json
    python -m bench.prefill_attention --quick

A CPU dry run checks the logic only (the kernels in Triton's interpreter; figures not meaningful):

    TRITON_INTERPRET=1 python -m bench.prefill_attention --device cpu --shapes gqa --histories 64 --chunks 16 --rep 1
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from bench.common import (
    QUANT_MODES,
    SHAPES,
    add_bench_timing_flags,
    add_block_size_flag,
    add_device_flag,
    add_json_flag,
    int_list,
    median_seconds,
    paged_layer,
    parser,
    release,
    require_device,
    require_triton_interpreter,
    write_json,
)

METHODS = ["sdpa_fp16", *(f"deq_sdpa_{m}" for m in QUANT_MODES), "kvq_fp16", *(f"kvq_{m}" for m in QUANT_MODES)]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = parser(__doc__)
    p.add_argument("--shapes", default="mha,gqa", help="comma list of: " + ", ".join(SHAPES))
    p.add_argument("--histories", type=int_list, default=[4096, 16384, 32768], help="tokens cached before the chunk")
    p.add_argument("--chunks", type=int_list, default=[512, 2048], help="new tokens per prefill call")
    p.add_argument("--batch", type=int, default=1)
    add_block_size_flag(p)
    p.add_argument("--methods", default=",".join(METHODS))
    add_bench_timing_flags(p)
    p.add_argument("--quick", action="store_true", help="only history 16K, chunk 2K")
    add_device_flag(p, "the kernels in Triton's interpreter; needs TRITON_INTERPRET=1")
    add_json_flag(p)
    args = p.parse_args(argv)
    args.shapes = [s for s in args.shapes.split(",") if s]
    args.methods = [m for m in args.methods.split(",") if m]
    if set(args.shapes) - set(SHAPES) or set(args.methods) - set(METHODS):
        p.error(f"--shapes from {list(SHAPES)}, --methods from {METHODS}")
    if args.quick:
        args.histories, args.chunks = [16384], [2048]
    return args


def causal_flops(batch: int, heads: int, d: int, history: int, chunk: int) -> float:
    """Multiply-adds x 2 of QK^T and PV over the visible (query, key) pairs of a chunk after ``history`` tokens."""
    pairs = chunk * history + chunk * (chunk + 1) // 2
    return 4.0 * batch * heads * d * pairs


def run_combo(args, shape: str, history: int, chunk: int) -> list[dict]:
    """Every requested method at one (shape, history, chunk), sharing data where the method allows a comparison."""
    import torch.nn.functional as F

    from kvcache.kernels.paged_prefill import prefill_attention_triton
    from kvcache.kernels.reference import prefill_attention_reference

    device = args.device
    hq, kvh, d = SHAPES[shape]
    b, kv_len, scale = args.batch, history + chunk, d**-0.5
    q = torch.randn(b, hq, chunk, d, device=device, dtype=torch.float16)
    mask = torch.arange(kv_len, device=device)[None, :] <= (history + torch.arange(chunk, device=device))[:, None]
    flops = causal_flops(b, hq, d, history, chunk)
    rows: list[dict] = []
    base: list[float] = []

    def timed(method: str, fn, ref: torch.Tensor | None = None) -> torch.Tensor | None:
        row = dict(shape=shape, batch=b, history=history, chunk=chunk, method=method)
        try:
            seconds = median_seconds(fn, device, warmup_ms=args.warmup, rep_ms=args.rep)
        except torch.cuda.OutOfMemoryError:
            row.update(time_us=None, note="out of memory")
            rows.append(row)
            print_row(row)
            return None
        if method == "sdpa_fp16":
            base.append(seconds)
        out = fn().float()
        row.update(time_us=seconds * 1e6, TFLOPs=flops / seconds / 1e12, x_sdpa_fp16=seconds / base[0] if base else None,
                   max_abs_diff=None if ref is None else float((out - ref).abs().max()), note="")
        rows.append(row)
        print_row(row)
        return out

    k, v = (torch.randn(b, kvh, kv_len, d, device=device, dtype=torch.float16) for _ in range(2))
    ref = None
    if "sdpa_fp16" in args.methods:
        ref = timed("sdpa_fp16", lambda: F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, scale=scale, enable_gqa=hq != kvh).transpose(1, 2))
    if "kvq_fp16" in args.methods:
        layer, tables = paged_layer("fp16", b, kvh, kv_len, d, args.block_size, k, v, device=device)
        timed("kvq_fp16", lambda: prefill_attention_triton(q, layer, tables, kv_len, scale, check_ranges=False), ref)
        del layer, tables
    del k, v
    for kv in QUANT_MODES:
        names = [m for m in (f"deq_sdpa_{kv}", f"kvq_{kv}") if m in args.methods]
        if not names:
            continue
        layer, tables = paged_layer(kv, b, kvh, kv_len, d, args.block_size, device=device)
        ref = None
        if f"deq_sdpa_{kv}" in names:
            ref = timed(f"deq_sdpa_{kv}", lambda: prefill_attention_reference(q, layer, tables, kv_len, scale))
        if f"kvq_{kv}" in names:
            timed(f"kvq_{kv}", lambda: prefill_attention_triton(q, layer, tables, kv_len, scale, check_ranges=False), ref)
        del layer, tables
        release(device)
    return rows


HEADER = f"{'shape':5} {'history':>7} {'chunk':>6} {'method':22} {'time_us':>10} {'TFLOP/s':>8} {'x_sdpa':>7}  note"


def print_row(r: dict) -> None:
    if r["time_us"] is None:
        print(f"{r['shape']:5} {r['history']:>7} {r['chunk']:>6} {r['method']:22} {'-':>10} {'-':>8} {'-':>7}  {r['note']}")
        return
    ratio = "-" if r["x_sdpa_fp16"] is None else f"{r['x_sdpa_fp16']:.2f}"
    note = "" if r["max_abs_diff"] is None else f"max|diff| {r['max_abs_diff']:.1e}"
    print(f"{r['shape']:5} {r['history']:>7} {r['chunk']:>6} {r['method']:22} {r['time_us']:>10.1f} "
          f"{r['TFLOPs']:>8.1f} {ratio:>7}  {note}", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    require_device(args.device, "bench.prefill_attention")
    if args.device == "cpu":
        require_triton_interpreter("bench.prefill_attention")
        print("DRY RUN on the CPU: the kernels in Triton's interpreter; the figures below say nothing about a GPU")
    import triton

    torch.manual_seed(0)
    t0 = time.time()
    name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU dry run (interpreter)"
    print(f"{name}: batch {args.batch}, blocks of {args.block_size}; x_sdpa = time / torch SDPA fp16 time; "
          "max|diff| against the same data through SDPA (fp16) or dequantize + SDPA (int8)\n")
    print(HEADER)
    print("-" * len(HEADER))
    rows = [r for shape in args.shapes for history in args.histories for chunk in args.chunks
            for r in run_combo(args, shape, history, chunk)]
    if args.json:
        meta = dict(device=name, dry_run=args.device == "cpu", torch=torch.__version__, triton=triton.__version__, block_size=args.block_size,
                    batch=args.batch)
        write_json(args.json, meta, rows, t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
