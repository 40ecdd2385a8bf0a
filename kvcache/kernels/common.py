"""What the kernel wrappers share: dtypes, the layout checks, the parameter pointers, the range-check switch.

Every wrapper (store, decode, prefill) checks its inputs with these before launching, and derives the
kernels' ``QUANT`` switch and parameter strides from the layer the same way.
"""

from __future__ import annotations

import os

import torch
import triton.language as tl

from ..storage.layout import LayerKV

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}
PARAM_DTYPES = (torch.float16, torch.bfloat16)  # per-token parameters; the round-up below works on 16-bit floats
MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 256
# Fused multiply-adds, pinned: Triton's default flips to off in 3.10 (3.9 warns about it), and the
# kernels should compile the same on the GPU image's 3.6 and anything newer. The quantizing paths
# have no multiply-then-add to fuse, so their codes stay bit-identical to the references either way.
FP_FUSION = True


def range_checks_enabled(default: bool = True) -> bool:
    """Whether to run the host-syncing index range checks: ``KVQ_KERNEL_CHECKS`` (1 or 0) if set, else ``default``."""
    value = os.environ.get("KVQ_KERNEL_CHECKS")
    return default if value is None else value != "0"


def check_storage(layer: LayerKV) -> None:
    """Raise ValueError unless ``layer``'s tensors have the layout and dtypes the kernels assume."""
    mode, k, v = layer.mode, layer.k, layer.v
    if k.dim() != 4 or k.shape != v.shape or k.dtype != v.dtype or k.device != v.device:
        raise ValueError(f"K/V storage must be two equal [num_blocks, kv_heads, block_size, head_dim] tensors, "
                         f"got {tuple(k.shape)} {k.dtype} and {tuple(v.shape)} {v.dtype}")
    if not (k.is_contiguous() and v.is_contiguous()):
        raise ValueError("K/V storage must be contiguous")
    if not MIN_HEAD_DIM <= layer.head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim {layer.head_dim} is not supported by the Triton kernels "
                         f"(supported: {MIN_HEAD_DIM}..{MAX_HEAD_DIM}, e.g. 64 or 128)")
    if mode.quantized:
        if k.dtype != torch.int8 or mode.bits != 8:
            raise ValueError(f"mode {mode.name!r} needs int8 storage with 8-bit codes, got {k.dtype}, {mode.bits} bits")
        want = (layer.num_blocks, layer.num_kv_heads, layer.block_size) if mode.dynamic else (layer.num_kv_heads, layer.head_dim)
        for name in ("k_scale", "k_zp", "v_scale", "v_zp"):
            t = getattr(layer, name)
            if t is None:
                raise ValueError(f"mode {mode.name!r} needs {name}, but the layer has none")
            if tuple(t.shape) != want or not t.is_contiguous() or t.device != k.device:
                raise ValueError(f"{name} must be a contiguous {want} tensor on {k.device}, got {tuple(t.shape)} "
                                 f"(contiguous={t.is_contiguous()}) on {t.device}")
            ok = PARAM_DTYPES if mode.dynamic else (torch.float32,)
            if t.dtype not in ok:
                raise ValueError(f"{name} must be {' or '.join(map(str, ok))} in mode {mode.name!r}, got {t.dtype}")
    elif k.dtype not in FLOAT_DTYPES:
        raise ValueError(f"mode {mode.name!r} stores floats (fp16/bf16/fp32), got {k.dtype}")


def kernel_params(layer: LayerKV) -> tuple[torch.Tensor, ...]:
    """(k_scale, k_zp, v_scale, v_zp), or the data tensor four times where the mode has none (never read)."""
    if not layer.mode.quantized:
        return (layer.k,) * 4
    return layer.k_scale, layer.k_zp, layer.v_scale, layer.v_zp


def runnable_dot_dtype(dtype: torch.dtype) -> torch.dtype:
    """``dtype`` for ``tl.dot`` operands, except bf16 in the interpreter (its tl.dot multiplies bf16 bit patterns as integers): fp32."""
    if dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1":
        return torch.float32
    return dtype


def check_block_ids(lo: int, hi: int, layer: LayerKV) -> None:
    """Raise unless the smallest and largest block id of a table index the storage (else: an illegal memory access)."""
    if lo < 0 or hi >= layer.num_blocks:
        raise ValueError(f"block_tables entries must be in [0, {layer.num_blocks}) (the storage's num_blocks), "
                         f"got [{lo}, {hi}]")


def param_strides(layer: LayerKV) -> tuple[int, int]:
    """(block, head) strides of the parameter tensors: per-token ones are indexed by both, static ones by head."""
    t = layer.k_scale
    if not layer.mode.quantized:
        return 0, 0
    return (t.stride(0), t.stride(1)) if layer.mode.dynamic else (0, t.stride(0))


def quant_code(layer: LayerKV) -> int:
    """The kernels' QUANT switch: 0 float storage, 1 static int8, 2 dynamic int8."""
    return 0 if not layer.mode.quantized else (2 if layer.mode.dynamic else 1)
