"""The Triton kernels compile for a real GPU (sm_90) on this CPU machine, within their register budget, and fit an SM.

The interpreter tests check what the kernels compute; only the GPU compiler sees register pressure,
shared memory and constructs it cannot lower. bench/kernel_compile.py compiles every variant the
cache launches through Triton's own toolchain, with nothing run (``python -m bench.kernel_compile``, or
``make kernel-compile``); the suite compiles its ``--quick`` subset: every KV mode once in each kernel, and
each dtype, head dim, head layout, split count and prefill chunk kind once.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.common import bench_mode
from bench.kernel_compile import ARCHS, MODES, QUICK_MODE, SPILL_BUDGET, occupancy, quick

ROOT = Path(__file__).resolve().parents[1]  # the benchmarks run as modules from here


def _toolchain_present() -> bool:
    from triton import knobs
    try:
        return Path(knobs.nvidia.cuobjdump.path).exists() and Path(knobs.nvidia.ptxas.path).exists()
    except Exception:  # a Triton build without the NVIDIA backend
        return False


def test_occupancy_by_hand():
    h100 = ARCHS[90]
    # 167 registers -> 5376 per warp (256-register granules) -> 12 warps of 65536 -> 3 CTAs of 4 warps.
    assert occupancy(167, 23 * 1024, 4, h100) == 3
    # Shared memory binds: 100 KB + 1 KB reserved per CTA -> 2 CTAs in 228 KB.
    assert occupancy(32, 100 * 1024, 4, h100) == 2
    # Few registers, no shared memory: the 64-warp cap.
    assert occupancy(16, 0, 8, h100) == 8


needs_toolchain = pytest.mark.skipif(not _toolchain_present(), reason="this Triton build ships no NVIDIA backend (ptxas/cuobjdump)")


def compile_check(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton")  # compile for real, not from an earlier run's cache
    return subprocess.run([sys.executable, "-m", "bench.kernel_compile", "--arch", "90", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@needs_toolchain
def test_every_kernel_compiles_for_sm90_within_budget(tmp_path):
    out = tmp_path / "compile.json"
    proc = compile_check(tmp_path, "--quick", "--json", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "0 variants did not compile" in proc.stdout
    assert f"0 spill over {SPILL_BUDGET} bytes/thread or do not fit an SM" in proc.stdout
    rows = json.loads(out.read_text())["results"]

    decode = {(r["mode"], r["dtype"], r["head_dim"], r["shape"], r["splits"]) for r in rows if r["kernel"] == "_decode_partial_kernel"}
    store = {(r["mode"], r["dtype"], r["head_dim"]) for r in rows if r["kernel"] == "_store_kv_kernel"}
    reduce = {(r["dtype"], r["head_dim"]) for r in rows if r["kernel"] == "_decode_reduce_kernel"}
    dims = [(dt, hd) for dt in ("fp16", "bf16", "fp32") for hd in (64, 128)]
    sinks = {m for m in MODES if bench_mode(m).sink_tokens}  # fp32 queries over sinks decode through the reference
    want = lambda **v: quick({"mode": QUICK_MODE, **v})  # noqa: E731
    assert decode == {(m, dt, hd, shape, s) for m in MODES for dt, hd in dims for shape in ("mha", "gqa4") for s in (1, 64)
                      if not (m in sinks and dt == "fp32") and quick(dict(mode=m, dtype=dt, head_dim=hd, shape=shape, splits=s))}
    stored = [m for m in MODES if not bench_mode(m).k.allocated]  # allocated keys are stored by the reference
    assert store == {(m, dt, hd) for m in stored for dt, hd in dims if quick(dict(mode=m, dtype=dt, head_dim=hd))}
    assert reduce == {(dt, hd) for dt, hd in dims if want(dtype=dt, head_dim=hd)}
    prefill = {(r["mode"], r["dtype"], r["head_dim"], r["chunk"]) for r in rows if r["kernel"] == "_prefill_kernel"}
    chunks = ("causal q=512", "mask q=512", "causal q=8")
    assert prefill == {(m, dt, hd, c) for m in MODES for dt, hd in dims if dt != "fp32" for c in chunks
                       if quick(dict(mode=m, dtype=dt, head_dim=hd, shape="gqa4", chunk=c))}
    # the subset still holds every mode in each kernel, and every dtype, head dim, layout, split count and chunk
    for kernel, modes in (("_store_kv_kernel", stored), ("_decode_partial_kernel", MODES), ("_prefill_kernel", MODES)):
        assert {r["mode"] for r in rows if r["kernel"] == kernel} == set(modes)
    assert [{d[i] for d in decode} for i in (1, 2, 3, 4)] == [{"fp16", "bf16", "fp32"}, {64, 128}, {"mha", "gqa4"}, {1, 64}]
    assert {p[3] for p in prefill} == set(chunks)
    for r in rows:
        assert r["arch"] == "sm_90" and 0 < r["regs"] <= 255
        assert r["spill_bytes"] <= SPILL_BUDGET and r["smem_bytes"] <= ARCHS[90].smem_per_block and r["ctas_per_sm"] >= 1, r


@needs_toolchain
def test_spills_and_compile_failures_are_caught(tmp_path):
    """Capped at 48 registers the decode kernels spill and the prefill kernel's tensor-core code cannot be
    allocated at all: the check must report both and fail."""
    out = tmp_path / "capped.json"
    proc = compile_check(tmp_path, "--modes", "int8", "--head-dims", "64", "--dtypes", "fp16", "--maxnreg", "48",
                         "--json", str(out))
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    rows, failures = report["results"], report["meta"]["failures"]
    assert all(r["regs"] <= 48 for r in rows)
    heavy = {r["mode"] for r in rows if r["kernel"] == "_decode_partial_kernel" and r["spill_bytes"] > SPILL_BUDGET}
    assert heavy == {"int8"}
    assert {f["op"] for f in failures} == {"prefill"} and "Insufficient registers" in failures[0]["error"]
    assert "DID NOT COMPILE for sm_90: int8" in proc.stdout
