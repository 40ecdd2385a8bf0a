"""Compile every Triton kernel variant the cache launches (store, decode, prefill) for a CUDA architecture, with no GPU, and report ptxas' resource use.

The CPU tests run the kernels in Triton's interpreter, which checks what they compute but never
lowers them: a construct the GPU compiler rejects, a tile that spills registers to local memory or
asks for more shared memory than an SM has, only shows on a GPU. This script calls the real
wrappers (so each specialisation is exactly the one the cache launches) with a stand-in driver that
names the target architecture; every launch is compiled by Triton's own toolchain (LLVM, then the
ptxas bundled with Triton) into a cubin and never run. Registers, spills and shared memory come
from ``cuobjdump -res-usage`` of that cubin (a spill shows as stack bytes); the occupancy column is an estimate from them.

    python -m bench.kernel_compile                               # sm_90 (H100/H200), a table: every variant
    python -m bench.kernel_compile --quick                       # each KV mode once per kernel (the test suite's)
    python -m bench.kernel_compile --arch 80,90 --json out/kernel_compile.json
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.runtime import driver

from bench.common import add_json_flag, parser, stand_in_layer, write_json
from kvcache.codec import kv_float_dtype
from kvcache.kernels.common import unsupported_store
from kvcache.kernels.paged_decode import decode_attention_triton
from kvcache.kernels.paged_prefill import prefill_attention_triton
from kvcache.kernels.paged_store import store_kv_triton
from kvcache.storage.layout import LayerKV


@dataclass(frozen=True)
class SMLimits:
    """Per-SM limits from CUDA's compute-capability table."""
    name: str
    smem_per_sm: int
    smem_per_block: int
    max_warps: int
    max_blocks: int
    regs: int = 65536


ARCHS = {
    80: SMLimits("A100", 164 * 1024, 163 * 1024, 64, 32),
    89: SMLimits("L40S / RTX 4090", 100 * 1024, 99 * 1024, 48, 24),
    90: SMLimits("H100 / H200", 228 * 1024, 227 * 1024, 64, 32),
}
MODES = ("fp16", "int8", "int8-dynamic", "int4-head", "int8-rot", "k8v4", "int4",  # every codec kind, sinks,
         "int3", "int3-compact", "int2-g32",  # bit planes: 3-bit in groups and per head, 2-bit in groups,
         "k8v4-lm", "int3-lm",  # the lloyd-max-peak codebook: 4-bit groups, 3-bit groups on both sides,
         "int3-klt")  # and keys allocated per channel (read only: the reference stores them)
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}  # the model's; its pools': kv_float_dtype
SHAPES = {"mha": (32, 32), "gqa4": (32, 8)}  # (query heads, KV heads), as in bench.common.SHAPES
BLOCK_SIZE = 64  # the cache's default
# A few words of spill per thread stay in L1 and cost little (ptxas makes that trade itself at times);
# beyond this many bytes a change of tile or warps has pushed a kernel off its register budget.
SPILL_BUDGET = 32


class _StandInDriver:
    """Just enough of a Triton driver for the JIT to pick a target and compile; it can launch nothing."""

    def __init__(self, target: GPUTarget):
        self.target = target

    def get_current_target(self) -> GPUTarget:
        return self.target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0


@contextmanager
def compile_only(target: GPUTarget, maxnreg: int | None = None) -> Iterator[list[Any]]:
    """While inside, every kernel launch is compiled for ``target`` (appended to the yielded list) instead of run."""
    compiled: list[Any] = []

    def hook(*, fn, compile, **_: Any) -> bool:
        src = triton.compiler.ASTSource(fn.jit_function, compile["signature"], compile["constants"], compile["configs"][0])
        options = {k: compile[k] for k in ("num_warps", "num_ctas", "num_stages", "enable_fp_fusion", "extern_libs")}
        if maxnreg:
            options["maxnreg"] = maxnreg
        compiled.append(triton.compile(src, target=target, options=options))
        return True  # "handled": the JIT returns without launching

    old_hook, old_driver = knobs.runtime.jit_cache_hook, driver._active  # reset_active() would look for a GPU
    driver.set_active(_StandInDriver(target))
    knobs.runtime.jit_cache_hook = hook
    try:
        yield compiled
    finally:
        knobs.runtime.jit_cache_hook = old_hook
        driver._active = old_driver


def resource_usage(cubin: bytes) -> dict[str, int]:
    """REG / STACK / LOCAL / SHARED (static) of a cubin, as cuobjdump prints them.

    Registers that do not fit spill to the thread's stack frame (STACK); these kernels call nothing,
    so any stack at all is a spill.
    """
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([knobs.nvidia.cuobjdump.path, "-res-usage", f.name],
                             capture_output=True, text=True, check=True).stdout
    found = dict(re.findall(r"\b(REG|LOCAL|SHARED|STACK):(\d+)", out))
    return {k.lower(): int(v) for k, v in found.items()}


def occupancy(regs: int, smem: int, num_warps: int, lim: SMLimits) -> int:
    """Resident CTAs per SM allowed by registers (256-per-warp granules), shared memory and the warp/block caps."""
    regs_per_warp = -(-regs * 32 // 256) * 256
    by_regs = (lim.regs // regs_per_warp) // num_warps
    by_smem = lim.smem_per_sm // (smem + 1024) if smem else lim.max_blocks  # 1 KB reserved per resident CTA
    return min(by_regs, by_smem, lim.max_warps // num_warps, lim.max_blocks)


# --quick: every mode (codec kind) once in each kernel, at head_dim 128, GQA, fp16, one split count and chunk;
# the dtypes, MHA, head_dim 64, split counts and chunk kinds once each, on int8-dynamic.
QUICK_MODE = "int8-dynamic"


def quick(v: dict[str, Any]) -> bool:
    """Whether a variant is in the quick subset (see :data:`QUICK_MODE`)."""
    usual = dict(dtype="fp16", head_dim=128, shape="gqa4", splits=64, chunk="causal q=512")
    off = [k for k, want in usual.items() if k in v and v[k] != want]
    return not off or (v["mode"] == QUICK_MODE and len(off) == 1)


def _layer(mode_name: str, kv_heads: int, head_dim: int, dtype: torch.dtype) -> LayerKV:
    """A two-block layer on the CPU, as a pool for a model computing in ``dtype`` holds it (16-bit floats and
    parameters: bf16 for bf16, else fp16): nothing runs, so only dtypes, shapes and strides matter."""
    return stand_in_layer(mode_name, 2, kv_heads, BLOCK_SIZE, head_dim, "cpu", kv_float_dtype(dtype))


def launches(head_dims: list[int], modes: tuple[str, ...] = MODES,
             dtypes: tuple[str, ...] = tuple(DTYPES)) -> Iterator[tuple[dict[str, Any], Any]]:
    """(variant, launch) for every store, decode and prefill specialisation the cache uses on a GPU."""
    for mode in modes:
        for dname in dtypes:
            dtype = DTYPES[dname]
            for head_dim in head_dims:
                for shape, (hq, kvh) in SHAPES.items():
                    layer = _layer(mode, kvh, head_dim, dtype)
                    if shape == "gqa4" and unsupported_store(layer) is None:  # the store kernel depends on the KV heads only
                        kv = torch.zeros(3, kvh, head_dim, dtype=dtype)
                        yield (dict(op="store", mode=mode, dtype=dname, head_dim=head_dim, kv_heads=kvh),
                               lambda layer=layer, kv=kv: store_kv_triton(layer, kv, kv, torch.arange(3), check_ranges=False))
                    q = torch.zeros(1, hq, head_dim, dtype=dtype)
                    seq_lens = torch.ones(1, dtype=torch.int32)
                    # 128 blocks x 64 = 8K tokens: room for the most splits (64) at every tile size.
                    table = torch.zeros(1, 128, dtype=torch.int32)
                    if dtype == torch.float32 and layer.sink_tokens:  # fp32 over sinks decodes through the reference
                        continue
                    for splits in (1, 64):
                        yield (dict(op="decode", mode=mode, dtype=dname, head_dim=head_dim, shape=shape, splits=splits),
                               lambda q=q, layer=layer, table=table, s=seq_lens, n=splits:
                               decode_attention_triton(q, layer, table, s, 1.0, num_splits=n, check_ranges=False))
                    if shape != "gqa4" or dtype == torch.float32:  # GQA covers the head layout; fp32 takes the reference
                        continue
                    # A prompt or new turn of 512 tokens (causal, or transformers' boolean mask), and a short one.
                    for chunk, q_len, masked in (("causal", 512, False), ("mask", 512, True), ("causal", 8, False)):
                        qc = torch.zeros(1, hq, q_len, head_dim, dtype=dtype)
                        mask = torch.ones(1, 1, q_len, 8192, dtype=torch.bool) if masked else None
                        yield (dict(op="prefill", mode=mode, dtype=dname, head_dim=head_dim, shape=shape, chunk=f"{chunk} q={q_len}"),
                               lambda q=qc, layer=layer, table=table, mask=mask:
                               prefill_attention_triton(q, layer, table, 8192, 1.0, mask, check_ranges=False))


def compile_all(arch: int, head_dims: list[int], maxnreg: int | None = None, modes: tuple[str, ...] = MODES,
                only_quick: bool = False, dtypes: tuple[str, ...] = tuple(DTYPES)) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(rows, failures): a row per distinct compiled kernel (variant, launch config, ptxas resources), a failure per variant that did not compile."""
    lim = ARCHS[arch]
    rows, failures, seen = [], [], set()
    with compile_only(GPUTarget("cuda", arch, 32), maxnreg) as compiled:
        for variant, launch in launches(head_dims, modes, dtypes):
            if only_quick and not quick(variant):
                continue
            before, t0 = len(compiled), time.perf_counter()
            try:
                launch()
            except Exception as e:  # a compiler error: report it with its variant, go on with the others
                failures.append(dict(variant, arch=f"sm_{arch}", error=f"{type(e).__name__}: {e}"))
                continue
            seconds = time.perf_counter() - t0
            for kernel in compiled[before:]:
                if kernel.hash in seen:  # the reduce kernel does not depend on the KV mode or head layout
                    continue
                seen.add(kernel.hash)
                if kernel.name == "_decode_reduce_kernel":
                    variant = {**variant, "mode": "any", "shape": "any"}
                md = kernel.metadata
                res = resource_usage(kernel.asm["cubin"])
                smem = md.shared + res.get("shared", 0)
                rows.append(dict(
                    variant, arch=f"sm_{arch}", kernel=kernel.name, num_warps=md.num_warps, num_stages=md.num_stages,
                    regs=res["reg"], spill_bytes=res.get("stack", 0) + res.get("local", 0),
                    smem_bytes=smem, smem_ok=smem <= lim.smem_per_block,
                    ctas_per_sm=occupancy(res["reg"], smem, md.num_warps, lim), compile_s=round(seconds, 2),
                ))
    return rows, failures


def _variant(r: dict[str, Any]) -> str:
    extra = {"decode": lambda: f" {r['shape']} splits={r['splits']}", "prefill": lambda: f" {r['shape']} {r['chunk']}",
             "store": lambda: f" kvh={r['kv_heads']}"}[r["op"]]()
    return f"{r['mode']} {r['dtype']} d{r['head_dim']}{extra}"


def print_rows(rows: list[dict[str, Any]]) -> None:
    head = f"{'arch':6} {'kernel':24} {'variant':40} {'warps':>5} {'stg':>3} {'regs':>4} {'spill':>5} {'smem KB':>7} {'CTA/SM':>6}"
    print(head + "\n" + "-" * len(head))
    for r in rows:
        print(f"{r['arch']:6} {r['kernel']:24} {_variant(r):40} {r['num_warps']:>5} {r['num_stages']:>3} {r['regs']:>4} "
              f"{r['spill_bytes']:>5} {r['smem_bytes'] / 1024:>7.1f} {r['ctas_per_sm']:>6}")


def print_summary(rows: list[dict[str, Any]]) -> None:
    """Ranges over dtypes, head dims and split counts, per (arch, kernel, KV mode, head layout): the README's table."""
    groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for r in rows:
        layout = r.get("shape", "-")
        groups.setdefault((r["arch"], r["kernel"].removesuffix("_kernel").lstrip("_"), r["mode"], layout), []).append(r)
    span = lambda vals, fmt="{}": fmt.format(min(vals)) + ("" if min(vals) == max(vals) else "-" + fmt.format(max(vals)))  # noqa: E731
    print("| arch | kernel | KV mode | heads | variants | registers/thread | spill bytes | shared KB | warps/SM (est.) |")
    print("|---|---|---|---|--:|--:|--:|--:|--:|")
    for (arch, kernel, mode, layout), rs in groups.items():
        print(f"| {arch} | {kernel} | {mode} | {layout} | {len(rs)} | {span([r['regs'] for r in rs])} | "
              f"{max(r['spill_bytes'] for r in rs)} | {span([r['smem_bytes'] / 1024 for r in rs], '{:.1f}')} | "
              f"{span([r['ctas_per_sm'] * r['num_warps'] for r in rs])} |")


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__)
    p.add_argument("--arch", default="90", help=f"comma list of compute capabilities x10: {', '.join(map(str, ARCHS))}")
    p.add_argument("--head-dims", default="64,128", help="comma list of head dims")
    add_json_flag(p, "the rows")
    p.add_argument("--maxnreg", type=int, default=None, help="cap registers per thread (what-if: occupancy vs spills)")
    p.add_argument("--rows", action="store_true", help="print every kernel, not only the summary")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma list of KV modes (default: {','.join(MODES)})")
    p.add_argument("--dtypes", default=",".join(DTYPES), help=f"comma list of {', '.join(DTYPES)}")
    p.add_argument("--quick", action="store_true",
                   help="each mode once per kernel, plus each dtype, head dim, head layout, split count and chunk once")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        p.error("unset TRITON_INTERPRET: the interpreter never compiles the kernels")
    try:
        archs = [int(a) for a in args.arch.split(",") if a]
        head_dims = [int(d) for d in args.head_dims.split(",") if d]
    except ValueError:
        p.error("--arch and --head-dims take comma lists of integers, e.g. --arch 80,90")
    unknown = [a for a in archs if a not in ARCHS]
    if unknown:
        p.error(f"unknown --arch {unknown}: choose from {', '.join(map(str, ARCHS))}")
    modes = tuple(m for m in args.modes.split(",") if m)
    if not modes or any(m not in MODES for m in modes):
        p.error(f"--modes takes a comma list of {', '.join(MODES)}")
    dtypes = tuple(d for d in args.dtypes.split(",") if d)
    if not dtypes or any(d not in DTYPES for d in dtypes):
        p.error(f"--dtypes takes a comma list of {', '.join(DTYPES)}")

    started = time.time()
    rows, failures = [], []
    for arch in archs:
        r, f = compile_all(arch, head_dims, args.maxnreg, modes, args.quick, dtypes)
        rows, failures = rows + r, failures + f
    if args.rows:
        print_rows(rows)
    print_summary(rows)
    for f in failures:
        print(f"\nDID NOT COMPILE for {f['arch']}: {_variant(f)}\n  " + "\n  ".join(f["error"].strip().splitlines()[:4]))
    bad = [r for r in rows if r["spill_bytes"] > SPILL_BUDGET or not r["smem_ok"] or r["ctas_per_sm"] < 1]
    spilling = sum(1 for r in rows if r["spill_bytes"])
    print(f"\n{len(rows)} kernels compiled with triton {triton.__version__} in {time.time() - started:.0f} s, "
          f"{len(failures)} variants did not compile; {spilling} spill, {len(bad)} spill over {SPILL_BUDGET} "
          f"bytes/thread or do not fit an SM")
    if args.json:
        meta = dict(triton=triton.__version__, maxnreg=args.maxnreg, quick=args.quick, modes=list(modes), torch=torch.__version__, archs=[f"sm_{a}" for a in archs],
                    limits={f"sm_{a}": ARCHS[a].__dict__ for a in archs})
        write_json(args.json, {**meta, "failures": failures}, rows, started)
    return 1 if bad or failures else 0


if __name__ == "__main__":
    sys.exit(main())
