"""Decode-attention benchmark: our paged kernel (fp16 blocks and every codec kind: int8, int8-dynamic, 4-bit, K8/V4, sinks) against torch SDPA.

For each shape (Llama-2-7B MHA: 32 heads x 128; GQA: 32 query / 8 KV heads x 128), context and batch:

- ``sdpa_fp16``: torch SDPA over contiguous fp16 K/V (the baseline every ratio refers to);
- ``deq_sdpa_<mode>``: the peers' approach, gather + dequantize the int8 blocks to fp16, then SDPA;
- ``kvq_<mode>``: our Triton kernel reading the blocks in their stored format.

Bandwidth is the bytes of the stored K/V (+ per-token parameters) the step must read, divided by
its time, shown as a % of this device's measured device-to-device copy bandwidth. Run on a GPU,
from the repository root:

    python -m bench.decode_attention --json out/bench_decode.json
    python -m bench.decode_attention --quick          # a few combos, ~1 min
    python -m bench.decode_attention --quick --sweep  # + 36 launch configs per kernel (compiles first: minutes)

A CPU dry run checks the logic only (the kernels in Triton's interpreter; figures not meaningful):

    TRITON_INTERPRET=1 python -m bench.decode_attention --device cpu --shapes gqa --contexts 128 --batches 2 --rep 1
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from bench.common import (
    GiB,
    QUANT_MODES,
    SHAPES,
    add_bench_timing_flags,
    add_block_size_flag,
    add_device_flag,
    add_json_flag,
    bench_mode,
    int_list,
    median_seconds,
    paged_layer,
    parser,
    release,
    require_device,
    require_triton_interpreter,
    write_json,
)
from kvcache.storage.layout import LayerKV
from kvcache.storage.sizing import free_memory_bytes


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = parser(__doc__)
    p.add_argument("--shapes", default="mha,gqa", help="comma list of: " + ", ".join(SHAPES))
    p.add_argument("--contexts", type=int_list, default=[1024, 4096, 16384, 32768, 65536, 131072])
    p.add_argument("--batches", type=int_list, default=[1, 4, 16, 64])
    add_block_size_flag(p)
    p.add_argument("--methods", default=",".join(["sdpa_fp16", "kvq_fp16", *(f"{p}_{m}" for m in QUANT_MODES
                                                                   for p in ("deq_sdpa", "kvq"))]),
                   help="sdpa_fp16, kvq_fp16, and deq_sdpa_MODE / kvq_MODE for MODE in " + ", ".join(QUANT_MODES))
    p.add_argument("--mem-fraction", type=float, default=0.85, help="skip a method needing more than this share of free memory")
    add_bench_timing_flags(p)
    p.add_argument("--quick", action="store_true", help="only contexts 4K,16K and batches 1,16")
    p.add_argument("--no-check", action="store_true", help="skip comparing outputs between methods")
    # Kernel overrides for tuning sweeps (default: the wrapper's heuristics).
    p.add_argument("--splits", type=int, default=None)
    p.add_argument("--block-n", type=int, default=None)
    p.add_argument("--num-warps", type=int, default=None)
    p.add_argument("--num-stages", type=int, default=3)
    p.add_argument("--use-dot", choices=("auto", "on"), default="auto",
                   help="tensor-core dots: auto = only when a KV head serves several query heads (GQA); on = for MHA too")
    p.add_argument("--sweep", action="store_true",
                   help="also time each kvq method over tile sizes, warps, stages (and dot for MHA); report the best")
    add_device_flag(p, "the kernels in Triton's interpreter; needs TRITON_INTERPRET=1")
    add_json_flag(p)
    args = p.parse_args(argv)
    args.shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    bad = [s for s in args.shapes if s not in SHAPES]
    if bad:
        p.error(f"unknown shape(s) {bad}; choose from {list(SHAPES)}")
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    known = {"sdpa_fp16", "kvq_fp16"} | {f"{p}_{m}" for p in ("deq_sdpa", "kvq") for m in QUANT_MODES}
    if set(args.methods) - known:
        p.error(f"unknown method(s) {sorted(set(args.methods) - known)}; choose from {sorted(known)}")
    if args.quick:
        args.contexts, args.batches = [4096, 16384], [1, 16]
    return args


# --- storage ---------------------------------------------------------------------------------------


def kv_bytes(kv: str, batch: int, kvh: int, ctx: int, d: int) -> int:
    """Bytes a decode step must read: K and V data plus per-token parameters (static ones are negligible)."""
    mode = bench_mode(kv)
    return batch * ctx * kvh * (mode.k.bytes_per_token_per_head(d) + mode.v.bytes_per_token_per_head(d))


# --- timing ---------------------------------------------------------------------------------------


def copy_bandwidth(device: str) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write), measured on this device now (2 GiB; 64 MiB on a CPU)."""
    nbytes = 2 * GiB if device == "cuda" else 64 << 20
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes / median_seconds(lambda: dst.copy_(src), device, warmup_ms=25, rep_ms=200)


def bench(fn, args) -> float:
    """Median time of ``fn`` in seconds (on a GPU, L2 flushed between runs by do_bench)."""
    return median_seconds(fn, args.device, warmup_ms=args.warmup, rep_ms=args.rep)


def run_combo(args, shape: str, batch: int, ctx: int, copy_bps: float) -> list[dict]:
    """Every requested method at one (shape, batch, context); methods that cannot fit are reported skipped."""
    import torch.nn.functional as F

    from kvcache.kernels.paged_decode import (
        decode_attention_triton,
        default_block_n,
        default_num_splits,
    )
    from kvcache.kernels.reference import gather_kv_reference

    device = args.device
    hq, kvh, d = SHAPES[shape]
    bs, scale, gqa = args.block_size, d**-0.5, hq != kvh
    methods = set(args.methods)
    q = torch.randn(batch, hq, d, device=device, dtype=torch.float16)
    seq_lens = torch.full((batch,), ctx, dtype=torch.int32, device=device)
    block_n = args.block_n or default_block_n(d)
    use_dot = gqa or args.use_dot == "on"  # GQA always takes the dot path
    config = dict(block_n=block_n, num_splits=args.splits or default_num_splits(batch, kvh, ctx, block_n, q.device),
                  use_dot=use_dot)
    overrides = dict(num_splits=args.splits, block_n=args.block_n, num_warps=args.num_warps,
                     num_stages=args.num_stages, use_dot=use_dot)
    k_elems = batch * kvh * (-(-ctx // bs) * bs) * d  # elements of K alone (blocks are whole)
    rows: list[dict] = []
    sdpa_time: list[float] = []

    def fits(nbytes: int) -> bool:
        return nbytes <= args.mem_fraction * free_memory_bytes(device)

    def record(method: str, kv: str, seconds: float | None = None, note: str = "", **extra) -> None:
        nbytes = kv_bytes(kv, batch, kvh, ctx, d)
        row = dict(shape=shape, num_heads=hq, num_kv_heads=kvh, head_dim=d, batch=batch, context=ctx, method=method,
                   kv=kv, bytes=nbytes, time_us=None if seconds is None else seconds * 1e6, note=note, **extra)
        if seconds is not None:
            if method == "sdpa_fp16":
                sdpa_time.append(seconds)
            row["GBps"] = nbytes / seconds / 1e9
            row["pct_copy_bw"] = 100 * nbytes / seconds / copy_bps
            row["x_sdpa_fp16"] = seconds / sdpa_time[0] if sdpa_time else None
        rows.append(row)
        print_row(row)

    def timed(method: str, kv: str, fn, ref: torch.Tensor | None, sweep=None, **extra) -> torch.Tensor | None:
        """Time ``fn``; compare its output with ``ref`` (same data); return the output."""
        try:
            seconds = bench(fn, args)
            if sweep is not None:
                extra["sweep"] = sweep()
            out = None if args.no_check else fn().float()
            if out is not None and ref is not None:
                extra["max_abs_diff"] = float((out - ref).abs().max())
            record(method, kv, seconds, **extra)
            return out
        except torch.cuda.OutOfMemoryError:
            record(method, kv, note="out of memory")
            return None

    def kernel(layer: LayerKV, tables: torch.Tensor, **config):
        config = {**overrides, **config}
        decode_attention_triton(q, layer, tables, seq_lens, scale, **config)  # checked once; timed calls skip the sync
        return lambda: decode_attention_triton(q, layer, tables, seq_lens, scale, check_ranges=False, **config)

    def sweep(layer: LayerKV, tables: torch.Tensor):
        """Times of the kernel over a grid of launch configurations, fastest first (None: not requested)."""
        if not args.sweep:
            return None

        def run() -> list[dict]:
            out = []
            for bn in (32, 64, 128):
                for warps in (4, 8):
                    for stages in (2, 3, 4):
                        for dot in ((True,) if gqa else (False, True)):
                            cfg = dict(block_n=bn, num_warps=warps, num_stages=stages, use_dot=dot)
                            try:
                                t = bench(kernel(layer, tables, **cfg), args)
                            except Exception as e:  # noqa: BLE001 - a config that fails to compile is a result too
                                out.append(dict(**cfg, error=f"{type(e).__name__}: {str(e)[:200]}"))
                                continue
                            out.append(dict(**cfg, time_us=t * 1e6))
            return sorted(out, key=lambda r: r.get("time_us", float("inf")))

        return run

    def skip(names, nbytes: int) -> None:
        free = free_memory_bytes(device)
        for m in names:
            kv = "fp16" if m.endswith("fp16") else m.split("_")[-1]
            record(m, kv, note=f"skipped: needs ~{nbytes / GiB:.1f} GiB, {free / GiB:.1f} GiB free")

    # fp16: contiguous K/V for SDPA; our kernel over blocks holding the same values.
    fp16_names = [m for m in ("sdpa_fp16", "kvq_fp16") if m in methods]
    if fp16_names and not fits(2 * k_elems * 2):
        skip(fp16_names, 2 * k_elems * 2)
    elif fp16_names:
        k, v = (torch.randn(batch, kvh, ctx, d, device=device, dtype=torch.float16) for _ in range(2))
        ref = None
        if "sdpa_fp16" in methods:
            sdpa = lambda: F.scaled_dot_product_attention(q[:, :, None], k, v, scale=scale, enable_gqa=gqa)[:, :, 0]  # noqa: E731
            ref = timed("sdpa_fp16", "fp16", sdpa, None)
        if "kvq_fp16" in methods:
            if not fits(2 * k_elems * 2):  # no room for a second copy: random blocks, no comparison
                del k, v
                k = v = ref = None
                release(device)
            layer, tables = paged_layer("fp16", batch, kvh, ctx, d, bs, k, v, device=device)
            del k, v
            timed("kvq_fp16", "fp16", kernel(layer, tables), ref, sweep(layer, tables), **config)
            del layer, tables
        release(device)

    # int8: one set of blocks for both the peers' dequantize-then-SDPA and our kernel.
    for kv in QUANT_MODES:
        names = [m for m in (f"deq_sdpa_{kv}", f"kvq_{kv}") if m in methods]
        stored = kv_bytes(kv, batch, kvh, ctx, d)
        if names and not fits(stored):
            skip(names, stored)
            continue
        if not names:
            continue
        layer, tables = paged_layer(kv, batch, kvh, ctx, d, bs, device=device)
        ref = None
        if f"deq_sdpa_{kv}" in methods:
            transient = k_elems * 14  # gathered int8 + its reshaped copy + fp32 temporaries + fp16 K and V
            if fits(transient):
                def deq_sdpa(layer=layer, tables=tables):
                    k, v = gather_kv_reference(layer, tables, ctx, torch.float16)
                    return F.scaled_dot_product_attention(q[:, :, None], k, v, scale=scale, enable_gqa=gqa)[:, :, 0]

                ref = timed(f"deq_sdpa_{kv}", kv, deq_sdpa, None)
                release(device)
            else:
                skip([f"deq_sdpa_{kv}"], stored + transient)
        if f"kvq_{kv}" in methods:
            timed(f"kvq_{kv}", kv, kernel(layer, tables), ref, sweep(layer, tables), **config)
        del layer, tables
        release(device)
    return rows


HEADER = f"{'shape':5} {'batch':>5} {'ctx':>7} {'method':22} {'time_us':>10} {'GB/s':>8} {'%copy':>6} {'x_sdpa':>7}  note"


def print_row(r: dict) -> None:
    if r["time_us"] is None:
        print(f"{r['shape']:5} {r['batch']:>5} {r['context']:>7} {r['method']:22} {'-':>10} {'-':>8} {'-':>6} {'-':>7}  "
              f"{r['note']}", flush=True)
        return
    ratio = "-" if r.get("x_sdpa_fp16") is None else f"{r['x_sdpa_fp16']:.2f}"
    note = r["note"]
    if "num_splits" in r:
        note = f"splits {r['num_splits']} tile {r['block_n']}{' dot' if r['use_dot'] else ''} " + note
    if "max_abs_diff" in r:
        note = f"max|diff| {r['max_abs_diff']:.1e} " + note
    best = (r.get("sweep") or [{}])[0]
    if "time_us" in best:
        note += (f"best {best['time_us']:.1f}us (tile {best['block_n']} warps {best['num_warps']} "
                 f"stages {best['num_stages']}{' dot' if best['use_dot'] else ''})")
    print(f"{r['shape']:5} {r['batch']:>5} {r['context']:>7} {r['method']:22} {r['time_us']:>10.1f} "
          f"{r['GBps']:>8.0f} {r['pct_copy_bw']:>6.1f} {ratio:>7}  {note}", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    require_device(args.device, "bench.decode_attention")
    if args.device == "cpu":
        require_triton_interpreter("bench.decode_attention")
        print("DRY RUN on the CPU: the kernels in Triton's interpreter; the figures below say nothing about a GPU")
    import triton

    torch.manual_seed(0)
    t0 = time.time()
    copy_bps = copy_bandwidth(args.device)
    name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU dry run (interpreter)"
    print(f"{name}: device-to-device copy {copy_bps / 1e9:.0f} GB/s (read + write)")
    print("bytes = stored K/V (+ per-token params) one decode step reads; %copy = GB/s / copy GB/s; "
          "x_sdpa = time / torch SDPA fp16 time\n")
    print(HEADER)
    print("-" * len(HEADER))
    rows: list[dict] = []
    for shape in args.shapes:
        for ctx in args.contexts:
            for batch in args.batches:
                rows += run_combo(args, shape, batch, ctx, copy_bps)
    bad = [r for r in rows if r.get("max_abs_diff", 0) > 1e-2]
    if bad:
        print(f"\nWARNING: {len(bad)} results differ from their reference by > 1e-2: "
              + ", ".join(f"{r['shape']}/{r['batch']}/{r['context']}/{r['method']}" for r in bad))
    if args.json:
        props = torch.cuda.get_device_properties(0) if args.device == "cuda" else None
        meta = dict(device=props.name if props else name, sm_count=props.multi_processor_count if props else None,
                    dry_run=args.device == "cpu", torch=torch.__version__,
                    triton=triton.__version__, copy_GBps=copy_bps / 1e9, block_size=args.block_size,
                    overrides=dict(splits=args.splits, block_n=args.block_n, num_warps=args.num_warps,
                                   num_stages=args.num_stages, use_dot=args.use_dot))
        write_json(args.json, meta, rows, t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
