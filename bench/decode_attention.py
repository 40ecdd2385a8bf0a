"""Decode-attention benchmark: our paged kernel (fp16 / int8 / int8-dynamic blocks) against torch SDPA.

For each shape (Llama-2-7B MHA: 32 heads x 128; GQA: 32 query / 8 KV heads x 128), context and batch:

- ``sdpa_fp16``: torch SDPA over contiguous fp16 K/V (the baseline every ratio refers to);
- ``deq_sdpa_<mode>``: the peers' approach, gather + dequantize the int8 blocks to fp16, then SDPA;
- ``kvq_<mode>``: our Triton kernel reading the blocks in their stored format.

Bandwidth is the bytes of the stored K/V (+ per-token parameters) the step must read, divided by
its time, shown as a % of this device's measured device-to-device copy bandwidth. Run on a GPU:

    python bench/decode_attention.py --json out/bench_decode.json
    python bench/decode_attention.py --quick          # a few combos, ~1 min
    python bench/decode_attention.py --quick --sweep  # + 36 launch configs per kernel (compiles first: minutes)
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from report import write_json  # noqa: E402  (bench/ is on sys.path when run as a script)
from kvcache.layout import LayerKV, new_blocks  # noqa: E402
from kvcache.modes import get_mode  # noqa: E402

SHAPES = {"mha": (32, 32, 128), "gqa": (32, 8, 128)}  # (query heads, KV heads, head_dim)
QUANT_MODES = ("int8", "int8-dynamic")
GiB = 1 << 30
DEVICE = "cuda"  # in one place, so a dry run can point the logic at the CPU (Triton interpreter)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    p.add_argument("--shapes", default="mha,gqa", help="comma list of: " + ", ".join(SHAPES))
    p.add_argument("--contexts", type=ints, default=[1024, 4096, 16384, 32768, 65536, 131072])
    p.add_argument("--batches", type=ints, default=[1, 4, 16, 64])
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--methods", default="sdpa_fp16,deq_sdpa_int8,deq_sdpa_int8-dynamic,kvq_fp16,kvq_int8,kvq_int8-dynamic")
    p.add_argument("--mem-fraction", type=float, default=0.85, help="skip a method needing more than this share of free memory")
    p.add_argument("--warmup", type=int, default=25, help="do_bench warmup, ms")
    p.add_argument("--rep", type=int, default=100, help="do_bench repetitions, ms")
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
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
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


# --- storage --------------------------------------------------------------------------------------


def paged_layer(kv: str, batch: int, kvh: int, ctx: int, d: int, bs: int, k: torch.Tensor | None = None,
                v: torch.Tensor | None = None) -> tuple[LayerKV, torch.Tensor]:
    """Blocks for ``batch`` rows of ``ctx`` tokens at shuffled block ids, like a pool after some churn.

    fp16 blocks copy ``k``/``v`` (``[batch, kvh, ctx, d]``) when given; int8 blocks hold random
    codes and plausible parameters (the timing does not depend on the values).
    """
    mode = get_mode(kv)
    n = -(-ctx // bs)
    num_blocks = batch * n
    layer = LayerKV(mode, **new_blocks(mode, num_blocks, kvh, bs, d, DEVICE, torch.float16))
    tables = torch.randperm(num_blocks, device=DEVICE).to(torch.int32).reshape(batch, n)
    if not mode.quantized:
        for dst, src in ((layer.k, k), (layer.v, v)):
            if src is None:
                dst.normal_()
            else:  # row by row (small temporaries): [kvh, n*bs, d] -> [n, kvh, bs, d] at the row's block ids
                for i in range(batch):
                    row = torch.nn.functional.pad(src[i], (0, 0, 0, n * bs - ctx))
                    dst[tables[i].long()] = row.reshape(kvh, n, bs, d).transpose(0, 1)
        return layer, tables
    for t in (layer.k, layer.v):
        t.random_(-128, 128)
    if mode.dynamic:
        for s, z in ((layer.k_scale, layer.k_zp), (layer.v_scale, layer.v_zp)):
            s.uniform_(0.005, 0.03)
            z.normal_(0, 0.2)
    else:
        layer.k_scale, layer.v_scale = (torch.empty(kvh, d, device=DEVICE).uniform_(0.005, 0.03) for _ in range(2))
        layer.k_zp, layer.v_zp = (torch.randn(kvh, d, device=DEVICE) * 0.2 for _ in range(2))
    return layer, tables


def kv_bytes(kv: str, batch: int, kvh: int, ctx: int, d: int) -> int:
    """Bytes a decode step must read: K and V data plus per-token parameters (static ones are negligible)."""
    return batch * ctx * kvh * get_mode(kv).bytes_per_token_per_head(d)


# --- timing ---------------------------------------------------------------------------------------


def copy_bandwidth(nbytes: int = 2 * GiB) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write), measured on this device now."""
    import triton.testing

    src = torch.empty(nbytes, dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median")
    return 2 * nbytes / (ms * 1e-3)


def bench(fn, args) -> float:
    """Median time of ``fn`` in seconds (L2 flushed between runs by do_bench)."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=args.warmup, rep=args.rep, return_mode="median") * 1e-3


def run_combo(args, shape: str, batch: int, ctx: int, copy_bps: float) -> list[dict]:
    """Every requested method at one (shape, batch, context); methods that cannot fit are reported skipped."""
    import torch.nn.functional as F

    from kvcache.kernels.paged_decode import decode_attention_triton, default_block_n, default_num_splits
    from kvcache.kernels.reference import gather_kv_reference

    hq, kvh, d = SHAPES[shape]
    bs, scale, gqa = args.block_size, d**-0.5, hq != kvh
    methods = set(args.methods)
    q = torch.randn(batch, hq, d, device=DEVICE, dtype=torch.float16)
    seq_lens = torch.full((batch,), ctx, dtype=torch.int32, device=DEVICE)
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
        return nbytes <= args.mem_fraction * torch.cuda.mem_get_info()[0]

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
        free = torch.cuda.mem_get_info()[0]
        for m in names:
            kv = "fp16" if m.endswith("fp16") else m.split("_")[-1]
            record(m, kv, note=f"skipped: needs ~{nbytes / GiB:.1f} GiB, {free / GiB:.1f} GiB free")

    # fp16: contiguous K/V for SDPA; our kernel over blocks holding the same values.
    fp16_names = [m for m in ("sdpa_fp16", "kvq_fp16") if m in methods]
    if fp16_names and not fits(2 * k_elems * 2):
        skip(fp16_names, 2 * k_elems * 2)
    elif fp16_names:
        k, v = (torch.randn(batch, kvh, ctx, d, device=DEVICE, dtype=torch.float16) for _ in range(2))
        ref = None
        if "sdpa_fp16" in methods:
            sdpa = lambda: F.scaled_dot_product_attention(q[:, :, None], k, v, scale=scale, enable_gqa=gqa)[:, :, 0]  # noqa: E731
            ref = timed("sdpa_fp16", "fp16", sdpa, None)
        if "kvq_fp16" in methods:
            if not fits(2 * k_elems * 2):  # no room for a second copy: random blocks, no comparison
                del k, v
                k = v = ref = None
                gc.collect()
                torch.cuda.empty_cache()
            layer, tables = paged_layer("fp16", batch, kvh, ctx, d, bs, k, v)
            del k, v
            timed("kvq_fp16", "fp16", kernel(layer, tables), ref, sweep(layer, tables), **config)
            del layer, tables
        gc.collect()
        torch.cuda.empty_cache()

    # int8: one set of blocks for both the peers' dequantize-then-SDPA and our kernel.
    for kv in QUANT_MODES:
        names = [m for m in (f"deq_sdpa_{kv}", f"kvq_{kv}") if m in methods]
        stored = kv_bytes(kv, batch, kvh, ctx, d)
        if names and not fits(stored):
            skip(names, stored)
            continue
        if not names:
            continue
        layer, tables = paged_layer(kv, batch, kvh, ctx, d, bs)
        ref = None
        if f"deq_sdpa_{kv}" in methods:
            transient = k_elems * 14  # gathered int8 + its reshaped copy + fp32 temporaries + fp16 K and V
            if fits(transient):
                def deq_sdpa(layer=layer, tables=tables):
                    k, v = gather_kv_reference(layer, tables, ctx, torch.float16)
                    return F.scaled_dot_product_attention(q[:, :, None], k, v, scale=scale, enable_gqa=gqa)[:, :, 0]

                ref = timed(f"deq_sdpa_{kv}", kv, deq_sdpa, None)
                gc.collect()
                torch.cuda.empty_cache()
            else:
                skip([f"deq_sdpa_{kv}"], stored + transient)
        if f"kvq_{kv}" in methods:
            timed(f"kvq_{kv}", kv, kernel(layer, tables), ref, sweep(layer, tables), **config)
        del layer, tables
        gc.collect()
        torch.cuda.empty_cache()
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
    if not torch.cuda.is_available():
        sys.exit("bench/decode_attention.py needs a CUDA GPU (torch.cuda.is_available() is False); nothing was measured")
    import triton

    torch.manual_seed(0)
    t0 = time.time()
    copy_bps = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}: device-to-device copy {copy_bps / 1e9:.0f} GB/s (read + write)")
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
        props = torch.cuda.get_device_properties(0)
        meta = dict(device=props.name, sm_count=props.multi_processor_count, torch=torch.__version__,
                    triton=triton.__version__, copy_GBps=copy_bps / 1e9, block_size=args.block_size,
                    overrides=dict(splits=args.splits, block_n=args.block_n, num_warps=args.num_warps,
                                   num_stages=args.num_stages, use_dot=args.use_dot))
        write_json(args.json, meta, rows, t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
