"""What the benchmarks share: their common flags, timing, device memory, the JSON file beside each table,
and the fixtures two of them use (paged blocks for the attention benchmarks, a random Llama-2-7B-shaped
model for the end-to-end ones).

Every benchmark is a module of this package, run from the repository root (no install needed: ``-m``
puts the current directory on the path)::

    python -m bench.decode_attention --help

Scripts share code only through this module; none imports another benchmark.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from kvcache.codebooks import gauss_levels
from kvcache.errors import KVQError
from kvcache.measure.device_memory import read_device_memory
from kvcache.modes import INT2_G32_MODE, INT4_HEAD_MODE, KVMode, get_mode, parse_modes
from kvcache.quant import width_layout
from kvcache.storage.layout import LayerKV, new_blocks
from kvcache.storage.tables import allocated_widths

GiB, MiB = 1 << 30, 1 << 20


# --- arguments ------------------------------------------------------------------------------------


def parser(doc: str) -> argparse.ArgumentParser:
    """A parser whose description is the module docstring's first paragraph and whose epilog is the rest (the usage lines)."""
    head, _, rest = doc.strip().partition("\n\n")
    script = Path(sys.argv[0])
    prog = f"python -m bench.{script.stem}" if script.parent.name == "bench" else None
    return argparse.ArgumentParser(prog=prog, description=head, epilog=rest or None,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def int_list(text: str) -> list[int]:
    """``"1,4,16"`` -> ``[1, 4, 16]`` (an argparse type)."""
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"takes a comma list of integers, e.g. 1,4,16; got {text!r}") from None


def kv_modes(text: str) -> list[KVMode]:
    """``"fp16,int8"`` -> the modes (an argparse type; an unknown mode's message lists the valid ones)."""
    try:
        return parse_modes(text)
    except (KVQError, ValueError) as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_json_flag(p: argparse.ArgumentParser, what: str = "the results") -> None:
    p.add_argument("--json", type=Path, default=None, help=f"also write {what} here")


def add_device_flag(p: argparse.ArgumentParser, cpu: str, default: str | None = "cuda") -> None:
    """``--device cuda|cpu``; ``cpu`` says what the dry run on the CPU does (its figures mean nothing)."""
    p.add_argument("--device", choices=("cuda", "cpu"), default=default, help=f"cpu = a dry run of the logic ({cpu}); its figures mean nothing")


def add_block_size_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--block-size", type=int, default=64, help="tokens per block of the paged cache")


def add_kv_modes_flag(p: argparse.ArgumentParser, default: str = "fp16,int8,int8-dynamic") -> None:
    p.add_argument("--modes", type=kv_modes, default=default, help="comma list of KV modes")


def add_model_flags(p: argparse.ArgumentParser) -> None:
    """The random Llama-2-7B-shaped model of the end-to-end benchmarks (see :func:`build_model`)."""
    p.add_argument("--layers", type=int, default=32, help="decoder layers (32 = Llama-2-7B)")
    p.add_argument("--calib-tokens", type=int, default=512, help="tokens of the DynamicCache prefill for int8 qparams")
    p.add_argument("--seed", type=int, default=0)


def add_range_checks_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--range-checks", action="store_true",
                   help="set KVQ_KERNEL_CHECKS=1: the cache's kernel calls range-check their indices (a host sync each)")


def apply_range_checks(args: argparse.Namespace) -> None:
    if args.range_checks:
        os.environ["KVQ_KERNEL_CHECKS"] = "1"


def add_bench_timing_flags(p: argparse.ArgumentParser) -> None:
    """Warm-up and measuring time of :func:`median_seconds` (triton's do_bench on a GPU)."""
    p.add_argument("--warmup", type=int, default=25, help="do_bench warmup, ms")
    p.add_argument("--rep", type=int, default=100, help="do_bench repetitions, ms")


def require_positive(p: argparse.ArgumentParser, args: argparse.Namespace, *names: str) -> None:
    for name in names:
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")


def require_device(device: str, module: str) -> None:
    """Exit with a sentence when ``device`` is CUDA and there is none (nothing was measured)."""
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit(f"python -m {module} needs a CUDA GPU (torch.cuda.is_available() is False); nothing was measured. "
                 "Pass --device cpu for a dry run of the logic.")


def require_triton_interpreter(module: str) -> None:
    """Exit with the command to use unless Triton runs kernels in its interpreter (the CPU dry runs of the kernels).

    TRITON_INTERPRET=1 must be in the environment before torch loads (importing torch imports triton,
    whose own helpers are compiled or interpreted from then on), so a flag cannot set it.
    """
    if os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit(f"--device cpu runs the kernels in Triton's interpreter, chosen before torch loads: "
                 f"TRITON_INTERPRET=1 python -m {module} --device cpu ...")


# --- timing ---------------------------------------------------------------------------------------


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def release(device: str) -> None:
    """Give freed tensors back, so the next measurement starts from the same memory."""
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def median_seconds(fn: Callable[[], Any], device: str = "cuda", warmup_ms: int = 25, rep_ms: int = 100) -> float:
    """Median time of ``fn`` in seconds: triton's ``do_bench`` on a GPU (L2 flushed between runs), else perf_counter.

    On the CPU ``fn`` runs once untimed, then until ``rep_ms`` have passed (at least 3 times).
    """
    if device == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median") * 1e-3
    fn()
    times: list[float] = []
    deadline = time.perf_counter() + rep_ms * 1e-3
    while len(times) < 3 or time.perf_counter() < deadline:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


class Stopwatch:
    """Times the work inside ``with``: ``seconds`` from CUDA events on a GPU (device time), ``wall`` from perf_counter.

    The device is synchronised on entry and exit, so ``wall`` covers all the work queued inside; on the
    CPU ``seconds`` is ``wall``.
    """

    def __init__(self, device: str = "cuda"):
        self.device = device
        self.seconds = self.wall = 0.0

    def __enter__(self) -> "Stopwatch":
        sync(self.device)
        self._events = None
        if self.device == "cuda":
            self._events = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        self._t0 = time.perf_counter()
        if self._events:
            self._events[0].record()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._events:
            self._events[1].record()
        sync(self.device)
        self.wall = time.perf_counter() - self._t0
        self.seconds = self._events[0].elapsed_time(self._events[1]) * 1e-3 if self._events else self.wall


# --- device memory --------------------------------------------------------------------------------

_noted: set[str] = set()


def _nvml_index() -> int:
    """NVML's index of the GPU torch uses (NVML ignores CUDA_VISIBLE_DEVICES; a list of indices is mapped)."""
    current = torch.cuda.current_device()
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    if current < len(visible) and visible[current].isdigit():
        return int(visible[current])
    return current


def memory_now(device: str) -> dict[str, int | None]:
    """Memory now, read by ``kvcache.measure.device_memory.read_device_memory`` (never raises).

    On a GPU: ``nvml_used_bytes`` (the device's used memory, what nvidia-smi shows; None without NVML),
    ``torch_allocated_bytes`` and ``torch_reserved_bytes``; on the CPU: ``nvml_used_bytes`` None and
    ``process_rss_bytes``.
    """
    reading = read_device_memory()
    if device != "cuda":
        return dict(nvml_used_bytes=None, process_rss_bytes=reading.process_rss)
    gpu = next((g for g in reading.gpus if g.index == _nvml_index()), None)
    if gpu is None and reading.nvml_error and reading.nvml_error not in _noted:
        _noted.add(reading.nvml_error)
        print(f"note: no NVML device memory ({reading.nvml_error})")
    torch_cuda = reading.torch_cuda
    return dict(nvml_used_bytes=None if gpu is None else gpu.used,
                torch_allocated_bytes=None if torch_cuda is None else torch_cuda.allocated,
                torch_reserved_bytes=None if torch_cuda is None else torch_cuda.reserved)


def reset_peak_memory(device: str) -> None:
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_torch_bytes(device: str) -> int | None:
    """The most torch has held since :func:`reset_peak_memory` (None on the CPU: no allocator statistics)."""
    return torch.cuda.max_memory_allocated() if device == "cuda" else None


# --- results --------------------------------------------------------------------------------------


def write_json(path: Path, meta: dict[str, Any], rows: list[dict[str, Any]], started: float,
               summary: dict[str, Any] | None = None) -> None:
    """Write ``{**summary, "meta": ..., "results": rows}`` to ``path``, stamping the run's duration and date."""
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {**meta, "seconds": round(time.time() - started, 1), "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    path.write_text(json.dumps(dict(**(summary or {}), meta=meta, results=rows), indent=1))
    print(f"wrote {path}")


def versions(*names: str) -> dict[str, str | None]:
    """``{name: version}`` of the named modules (None where one is missing), for a run's metadata."""
    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            out[name] = None
    return out


# --- fixtures: paged blocks (decode_attention, prefill_attention) ----------------------------------

SHAPES = {"mha": (32, 32, 128), "gqa": (32, 8, 128)}  # (query heads, KV heads, head_dim): Llama-2-7B, and GQA
QUANT_MODES = ("int8", "int8-dynamic", "int4-head", "k8v4", "int4")  # the 4-bit ones: per head; K8/V4 g16 sym; g16 sym


UNLISTED_MODES = {m.name: m for m in (INT4_HEAD_MODE, INT2_G32_MODE)}  # the kernels' test layouts, by name


def bench_mode(kv: str | KVMode) -> KVMode:
    """A listed mode, or an unlisted layout the kernels take: ``int4-head`` (:data:`kvcache.modes.INT4_HEAD_MODE`),
    ``int2-g32`` (:data:`kvcache.modes.INT2_G32_MODE`)."""
    return UNLISTED_MODES[kv] if isinstance(kv, str) and kv in UNLISTED_MODES else get_mode(kv)


def stand_in_layer(kv: str | KVMode, num_blocks: int, kvh: int, bs: int, d: int, device: str = "cuda",
                   fp_dtype: torch.dtype = torch.float16, sink_slots: int = 1) -> LayerKV:
    """Zeroed blocks of ``kv``'s codecs with stand-in static parameters (ones), codebooks (uniform levels from -1: the
    solved ones take a while, :func:`kvcache.codebooks.lloyd_max_peak`) and ``sink_slots`` zeroed sink slots
    (every block's ``sink_slot`` -1): the layout a pool builds, for benchmarks and compile checks (no calibration)."""
    mode = bench_mode(kv)
    layer = LayerKV(mode.k, mode.v, d, **new_blocks(mode.k, mode.v, num_blocks, kvh, bs, d, device, fp_dtype))
    for side, codec in (("k", mode.k), ("v", mode.v)):
        if codec.scaling == "static":
            setattr(layer, f"{side}_scale", torch.ones(kvh, d, device=device))
            setattr(layer, f"{side}_zp", torch.zeros(kvh, d, device=device))
        if codec.allocated:  # keys allocated per channel: the mean width in every channel, the levels of every width
            layer.k_widths = allocated_widths(torch.ones(d), codec, d).expand(kvh, d).contiguous().to(device)
            layer.k_layout = width_layout(layer.k_widths)
            layer.k_grid = gauss_levels().to(device)
        elif codec.quantized and codec.grid not in ("int", "uint"):  # a codebook: stand-in levels, laid out as a fixed one's
            levels = torch.linspace(-1.0, 1.0, codec.grid_size() + 1, device=device)[:-1]
            setattr(layer, f"{side}_grid", levels.expand(kvh, codec.grid_size()))
    if mode.sink_tokens:
        layer.sink_tokens = mode.sink_tokens
        layer.k_sink, layer.v_sink = (torch.zeros(sink_slots, kvh, mode.sink_tokens, d, dtype=fp_dtype, device=device)
                                      for _ in range(2))
        layer.sink_slot = torch.full((num_blocks,), -1, dtype=torch.int32, device=device)
    return layer


def paged_layer(kv: str, batch: int, kvh: int, ctx: int, d: int, bs: int, k: torch.Tensor | None = None,
                v: torch.Tensor | None = None, device: str = "cuda") -> tuple[LayerKV, torch.Tensor]:
    """Blocks for ``batch`` rows of ``ctx`` tokens at shuffled block ids, like a pool after some churn.

    fp16 blocks copy ``k``/``v`` (``[batch, kvh, ctx, d]``) when given; code blocks hold random codes and
    plausible parameters (the timing does not depend on the values); a mode with sinks gives each row's
    first block a sink slot of random fp16 values.
    """
    mode = bench_mode(kv)
    n = -(-ctx // bs)
    num_blocks = batch * n
    layer = stand_in_layer(mode, num_blocks, kvh, bs, d, device, sink_slots=batch)
    tables = torch.randperm(num_blocks, device=device).to(torch.int32).reshape(batch, n)
    if not mode.quantized:
        for dst, src in ((layer.k, k), (layer.v, v)):
            if src is None:
                dst.normal_()
            else:  # row by row (small temporaries): [kvh, n*bs, d] -> [n, kvh, bs, d] at the row's block ids
                for i in range(batch):
                    row = torch.nn.functional.pad(src[i], (0, 0, 0, n * bs - ctx))
                    dst[tables[i].long()] = row.reshape(kvh, n, bs, d).transpose(0, 1)
        return layer, tables
    for side, codec in (("k", mode.k), ("v", mode.v)):
        data = getattr(layer, side)
        if codec.bits == 4:
            data.random_(0, 256)
        elif codec.bits == 8:
            data.random_(-128, 128)
        else:
            data.normal_()
        scale, zp = layer.params(side)
        if codec.scaling == "token":
            scale.uniform_(0.005, 0.03 if codec.bits == 8 else 0.4)
            if zp is not None:
                zp.normal_(0, 0.2)
        elif codec.scaling == "static":
            scale.uniform_(0.005, 0.03)
            zp.normal_(0, 0.2)
    if mode.sink_tokens:
        layer.k_sink.normal_()
        layer.v_sink.normal_()
        layer.sink_slot[tables[:, 0].long()] = torch.arange(batch, dtype=torch.int32, device=device)
    return layer, tables


# --- fixtures: a random Llama-2-7B-shaped model (generate, serving) --------------------------------

# Llama-2-7B's shape; --layers overrides the depth.
LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32, vocab_size=32000, max_position_embeddings=16384)


def model_config(layers: int) -> dict[str, Any]:
    """The model's config as the JSON records it."""
    return {**LLAMA2_7B, "num_hidden_layers": layers}


def build_model(layers: int, seed: int, device: str = "cuda") -> torch.nn.Module:
    """Random fp16 weights with Llama-2-7B's shape, built directly on ``device``, using the kvq attention."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from kvcache.hf.attention import register_attention

    torch.manual_seed(seed)
    cfg = LlamaConfig(**model_config(layers), attn_implementation=register_attention())
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(default)
    return model.eval()


@torch.inference_mode()
def stand_in_qparams(model: torch.nn.Module, tokens: int, seed: int):
    """Per-channel static qparams from the K/V min/max of one random-token prefill (DynamicCache).

    A calibration-free stand-in for the int8 (static) mode: the timing does not depend on the values.
    """
    from transformers import DynamicCache

    from kvcache.hf.compat import cache_kwargs
    from kvcache.qparams import KVQParams

    g = torch.Generator(device="cpu").manual_seed(seed + 1)
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), generator=g).to(model.device)
    cache = DynamicCache(config=model.config)
    model(input_ids=ids, use_cache=True, logits_to_keep=1, **cache_kwargs(cache))
    stats: dict[str, dict[str, list[torch.Tensor]]] = {n: {"min": [], "max": [], "absmax": []} for n in ("k", "v")}
    for layer in cache.layers:
        for name, t in (("k", layer.keys), ("v", layer.values)):  # [1, kv_heads, tokens, head_dim]
            t = t.float()
            stats[name]["min"].append(t.amin(dim=(0, 2)).cpu())
            stats[name]["max"].append(t.amax(dim=(0, 2)).cpu())
            stats[name]["absmax"].append(t.abs().amax(dim=(0, 2)).cpu())
    del cache
    return KVQParams.from_stats(stats["k"], stats["v"], granularity="channel",
                                metadata={"source": f"bench: {tokens} random tokens, random weights"})


def needs_qparams(modes: Iterable[KVMode]) -> bool:
    return any(m.needs_qparams for m in modes)
