"""End-to-end decode throughput: a randomly initialised Llama-2-7B-shaped model, fp16 vs int8 KV caches.

Prefills ``--batch`` rows of ``--context`` random tokens into a :class:`kvcache.cache.PagedKVCache`
(chunked), then times ``--steps`` greedy decode steps, for each KV mode:

- ``fp16``: blocks in fp16;
- ``int8``: static per-channel parameters, from the min/max of K/V of one short prefill through a
  transformers ``DynamicCache`` (a calibration-free stand-in: the timing does not depend on them);
- ``int8-dynamic``: per-token parameters computed at write time.

Reports tokens/s, ms/step, peak torch memory, device memory (NVML), and KV bytes (``cache.memory()``).
Modes whose cache cannot fit next to the weights are reported skipped, not run: fp16 at batch 16 x 8K
needs ~64.5 GiB of KV next to 12.6 GiB of weights, more than an 80 GB card has; ``--batch 8,16``
adds a batch where every mode fits. On a GPU:

    python bench/generate.py --batch 8,16 --json out/bench_generate.json
    python bench/generate.py --layers 4 --batch 4 --context 2048 --steps 16    # quick
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
from kvcache.modes import get_mode, parse_modes  # noqa: E402

GiB = 1 << 30
DEVICE = "cuda"  # in one place, so a dry run can point the logic at the CPU
# Llama-2-7B's shape; --layers overrides the depth.
LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32, vocab_size=32000, max_position_embeddings=16384)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modes", default="fp16,int8,int8-dynamic", help="comma list of KV modes")
    p.add_argument("--layers", type=int, default=32, help="decoder layers (32 = Llama-2-7B)")
    p.add_argument("--batch", default="16", help="rows per step; a comma list runs each")
    p.add_argument("--context", type=int, default=8192, help="prompt tokens per row before the timed steps")
    p.add_argument("--steps", type=int, default=64, help="timed decode steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed decode steps first (Triton compiles here)")
    p.add_argument("--prefill-chunk", type=int, default=1024, help="prompt tokens per prefill forward")
    p.add_argument("--calib-tokens", type=int, default=512, help="tokens of the DynamicCache prefill for int8 qparams")
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--mem-fraction", type=float, default=0.9, help="skip a mode whose cache needs more of the free memory")
    p.add_argument("--range-checks", action="store_true",
                   help="set KVQ_KERNEL_CHECKS=1: the cache's kernel calls range-check their indices (a host sync each)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)
    try:
        args.modes = [m.name for m in parse_modes(args.modes)]
    except ValueError as e:
        p.error(str(e))
    try:
        args.batch = [int(b) for b in args.batch.split(",") if b.strip()]
    except ValueError:
        p.error(f"--batch takes integers, e.g. 16 or 8,16; got {args.batch!r}")
    if not args.batch or min(args.batch) < 1:
        p.error("--batch must be >= 1")
    for name in ("layers", "context", "steps", "prefill_chunk", "block_size", "calib_tokens"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.context + args.warmup + args.steps > LLAMA2_7B["max_position_embeddings"]:
        p.error(f"context + warmup + steps must fit in {LLAMA2_7B['max_position_embeddings']} positions")
    return args


def build_model(layers: int, seed: int) -> torch.nn.Module:
    """Random fp16 weights with Llama-2-7B's shape, built directly on the device, using the kvq attention."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from kvcache.attention import register_attention

    torch.manual_seed(seed)
    cfg = LlamaConfig(**{**LLAMA2_7B, "num_hidden_layers": layers}, attn_implementation=register_attention())
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16)
    try:
        with torch.device(DEVICE):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(default)
    return model.eval()


@torch.inference_mode()
def stand_in_qparams(model: torch.nn.Module, tokens: int, seed: int):
    """Per-channel static qparams from the K/V min/max of one random-token prefill (DynamicCache)."""
    from transformers import DynamicCache

    from kvcache.compat import cache_kwargs
    from kvcache.qparams import KVQParams

    g = torch.Generator(device="cpu").manual_seed(seed + 1)
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), generator=g).to(DEVICE)
    cache = DynamicCache(config=model.config)
    model(input_ids=ids, use_cache=True, logits_to_keep=1, **cache_kwargs(cache))
    stats = {"k": {"min": [], "max": [], "absmax": []}, "v": {"min": [], "max": [], "absmax": []}}
    for layer in cache.layers:
        for name, t in (("k", layer.keys), ("v", layer.values)):  # [1, kv_heads, tokens, head_dim]
            t = t.float()
            stats[name]["min"].append(t.amin(dim=(0, 2)).cpu())
            stats[name]["max"].append(t.amax(dim=(0, 2)).cpu())
            stats[name]["absmax"].append(t.abs().amax(dim=(0, 2)).cpu())
    del cache
    return KVQParams.from_stats(stats["k"], stats["v"], granularity="channel",
                                metadata={"source": f"bench/generate.py: {tokens} random tokens, random weights"})


def cache_bytes(model: torch.nn.Module, kv: str, rows: int, tokens: int, block_size: int) -> int:
    """Bytes the cache's blocks take for ``rows`` x ``tokens`` (whole blocks)."""
    from kvcache.kv_shape import KVShape

    shape = KVShape.from_config(model.config)
    per_token = shape.num_layers * shape.num_kv_heads * get_mode(kv).bytes_per_token_per_head(shape.head_dim)
    return rows * -(-tokens // block_size) * block_size * per_token


class DeviceMemory:
    """Device-wide used memory from NVML (what nvidia-smi shows), or None without pynvml."""

    def __init__(self) -> None:
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
        except Exception as e:  # noqa: BLE001 - no NVML is a reportable condition, not a failure
            print(f"note: no NVML device memory ({e.__class__.__name__}: {e})")
            self._nvml = None

    def used(self) -> int | None:
        return None if self._nvml is None else int(self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used)


@torch.inference_mode()
def run_mode(model: torch.nn.Module, kv: str, batch: int, qparams, args, nvml: DeviceMemory) -> dict:
    """Prefill, warm up, then time ``args.steps`` decode steps of ``batch`` rows with a cache of mode ``kv``."""
    from kvcache.cache import PagedKVCache
    from kvcache.generation import forward_tokens, next_token

    row: dict = dict(kv=kv, batch=batch, context=args.context, steps=args.steps)
    tokens = args.context + args.warmup + args.steps
    need = cache_bytes(model, kv, batch, tokens, args.block_size)
    free = torch.cuda.mem_get_info()[0]
    row["cache_bytes_planned"] = need
    if need > args.mem_fraction * free:
        row["skipped"] = f"the cache needs {need / GiB:.1f} GiB, {free / GiB:.1f} GiB free next to the weights"
        return row
    cache = None
    try:
        torch.cuda.reset_peak_memory_stats()
        num_blocks = batch * -(-tokens // args.block_size)
        cache = PagedKVCache.for_model(model, kv, qparams=qparams, block_size=args.block_size,
                                       num_blocks=num_blocks, growable=False)
        g = torch.Generator(device="cpu").manual_seed(args.seed + 2)
        ids = torch.randint(0, model.config.vocab_size, (batch, args.context), generator=g).to(DEVICE)

        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for start in range(0, args.context, args.prefill_chunk):
            logits = forward_tokens(model, cache, ids[:, start:start + args.prefill_chunk])
        tok = next_token(logits[:, -1])
        torch.cuda.synchronize()
        row["prefill_s"] = time.perf_counter() - t0

        for _ in range(args.warmup):
            tok = next_token(forward_tokens(model, cache, tok[:, None])[:, -1])
        torch.cuda.synchronize()
        row["prefill_peak_torch_bytes"] = torch.cuda.max_memory_allocated()  # weights + cache + prefill activations
        torch.cuda.reset_peak_memory_stats()
        start_ev, end_ev = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0 = time.perf_counter()
        start_ev.record()
        for _ in range(args.steps):
            tok = next_token(forward_tokens(model, cache, tok[:, None])[:, -1])
        end_ev.record()
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
        seconds = start_ev.elapsed_time(end_ev) * 1e-3
        row.update(
            tokens_per_s=batch * args.steps / seconds,
            ms_per_step=1e3 * seconds / args.steps,
            wall_tokens_per_s=batch * args.steps / wall,
            decode_peak_torch_bytes=torch.cuda.max_memory_allocated(),
            torch_reserved_bytes=torch.cuda.memory_reserved(),
            nvml_used_bytes=nvml.used(),
            memory=cache.memory().as_dict(),
            final_tokens=cache.num_tokens,
        )
    except torch.cuda.OutOfMemoryError as e:
        row["error"] = f"out of memory: {str(e).splitlines()[0]}"
    finally:
        del cache
        gc.collect()
        torch.cuda.empty_cache()
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
    if not torch.cuda.is_available():
        sys.exit("bench/generate.py needs a CUDA GPU (torch.cuda.is_available() is False); nothing was measured")
    import os

    import transformers
    import triton

    if args.range_checks:
        os.environ["KVQ_KERNEL_CHECKS"] = "1"
    t0 = time.time()
    nvml = DeviceMemory()
    model = build_model(args.layers, args.seed)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    print(f"{torch.cuda.get_device_name()}: {args.layers}-layer Llama-2-7B-shaped model, {weight_bytes / GiB:.1f} GiB "
          f"of fp16 weights; batch {','.join(map(str, args.batch))}, context {args.context}, {args.steps} timed steps")
    qparams = stand_in_qparams(model, args.calib_tokens, args.seed) if "int8" in args.modes else None
    gc.collect()
    torch.cuda.empty_cache()
    rows = []
    for batch in args.batch:
        for kv in args.modes:
            rows.append(run_mode(model, kv, batch, qparams if get_mode(kv).needs_qparams else None, args, nvml))
            r = rows[-1]
            status = f"{r['tokens_per_s']:.1f} tok/s" if "tokens_per_s" in r else (r.get("skipped") or r.get("error"))
            print(f"  batch {batch} {kv}: {status}", flush=True)
    print()
    print_rows(rows)
    if args.json:
        from kvcache.kernels.store import range_checks_enabled

        meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                    transformers=transformers.__version__, config={**LLAMA2_7B, "num_hidden_layers": args.layers},
                    weight_bytes=weight_bytes, block_size=args.block_size, prefill_chunk=args.prefill_chunk,
                    warmup=args.warmup, calib_tokens=args.calib_tokens, range_checks=range_checks_enabled(default=False))
        write_json(args.json, meta, rows, t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
