"""What the kernel wrappers share: dtypes, the layout checks, each side's pointers, strides and switches.

Every wrapper (store, decode, prefill) checks its inputs with these before launching, and derives the
kernels' compile-time switches from the layer the same way, for K and for V separately
(:func:`side_args`): ``QUANT`` 0 floats, 1 static codes, 2 per-token codes; ``BITS`` 16, 8, 4, 3 or 2;
``GROUP`` channels per per-token parameter group (head_dim: one group per head); ``SYM`` no zero point;
``GRID`` codes are indices into a codebook (the ``lloyd-max-peak`` levels at 4, 3 or 2 bits, per-token signed
scales): the layer's table ``[kv_heads, 2^bits]`` fp32 is read at ``code + 2^(b-1)`` (``TSTRIDE``: its head
stride, 0 for a fixed codebook expanded over the heads), else codes are the integers themselves; ``ALLOC``
(attention kernels only: the store leaves them to the reference) codes of per-channel widths in one bit stream
per head, read by the layer's ``k_layout`` into the levels of every width (``k_grid``, ``[9, 256]``).
A 4-bit side is read in two *parts* of head_dim/2 lanes (the low and high nibbles of each byte,
:func:`kvcache.quant.pack_int4`), every other side in one part of head_dim lanes (3- and 2-bit codes: bit planes, :func:`kvcache.quant.pack_codes`,
unpacked by :func:`kvcache.kernels.codes.unpack_planes`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..codebooks import GAUSS_MAX_BITS, PEAK_GRIDS
from ..modes import Codec
from ..storage.layout import LayerKV

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}
PARAM_DTYPES = (torch.float16, torch.bfloat16)  # per-token parameters; the round-up below works on 16-bit floats
MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 256
MIN_HEAD_DIM_4BIT = 32  # a part of head_dim/2 lanes must be a tensor-core dot's K (>= 16)
KERNEL_BITS = (8, 4, 3, 2)  # code widths the kernels read and write (3 and 2: bit planes)
GRID_BITS = (4, 3, 2)  # widths of codebook indices the kernels take (8-bit indices are stored unsigned, unlike int8)
MAX_SINKS = 64  # sink tokens one tile of the attention kernels holds
# Fused multiply-adds, pinned: Triton's default flips to off in 3.10 (3.9 warns about it), and the
# kernels should compile the same on the GPU image's 3.6 and anything newer. The quantizing paths
# have no multiply-then-add to fuse, so their codes stay bit-identical to the references either way.
FP_FUSION = True


def range_checks_enabled(default: bool = True) -> bool:
    """Whether to run the host-syncing index range checks: ``KVQ_KERNEL_CHECKS`` (1 or 0) if set, else ``default``."""
    value = os.environ.get("KVQ_KERNEL_CHECKS")
    return default if value is None else value != "0"


def group_channels(codec: Codec, head_dim: int) -> int:
    """Channels per per-token parameter group (head_dim for one group per head, and for other scalings)."""
    return head_dim // codec.groups(head_dim) if codec.scaling == "token" else head_dim


def peak_grid(codec: Codec) -> bool:
    """Whether ``codec``'s codes index a peak-scaled codebook the kernels read (:data:`GRID_BITS` wide, per token)."""
    return codec.quantized and codec.grid in PEAK_GRIDS


def _kernel_codes(c: Codec) -> bool:
    """Codes the kernels decode: integers by our rule, the peak grids' indices with signed per-token scales, and
    allocated codes (read only: :func:`unsupported_store`)."""
    if c.rule != "kvq" or c.tensor_scale:
        return False
    if c.allocated:
        return True
    if c.grid == "int":
        return c.bits in KERNEL_BITS
    return peak_grid(c) and c.bits in GRID_BITS and c.scaling == "token" and c.symmetric


def unsupported(layer: LayerKV) -> str | None:
    """Why the Triton kernels cannot take this layer's codecs (the dispatch then runs the reference), or None."""
    d = layer.head_dim
    if not MIN_HEAD_DIM <= d <= MAX_HEAD_DIM:
        return f"head_dim {d} is not supported by the Triton kernels (supported: {MIN_HEAD_DIM}..{MAX_HEAD_DIM}, e.g. 64 or 128)"
    for side in ("k", "v"):
        c, scale = layer.codec(side), layer.params(side)[0]
        if c.quantized and not _kernel_codes(c):
            return (f"{side.upper()} codec {c.label()}: the Triton kernels take 8-, 4-, 3- and 2-bit integer codes, "
                    "4-, 3- and 2-bit lloyd-max-peak codes and allocated codes by our rule (other widths, codebooks and "
                    "engine rules run through the references)")
        if (c.bits < 4 or c.allocated) and d & (d - 1):
            return (f"{side.upper()} codec {c.label()}: 3- and 2-bit and allocated codes need a power-of-two head_dim "
                    f"in the Triton kernels (they unpack in power-of-two tiles), this layer's is {d}")
        if c.scaling == "token" and scale is not None and scale.dtype not in PARAM_DTYPES:
            return (f"{side}_scale must be {' or '.join(map(str, PARAM_DTYPES))} for the Triton kernels, got "
                    f"{scale.dtype} (a pool of another dtype runs through the references)")
        g = group_channels(c, d)
        if c.bits == 4 and d < MIN_HEAD_DIM_4BIT:
            return f"4-bit codes need head_dim >= {MIN_HEAD_DIM_4BIT} in the Triton kernels, this layer's is {d}"
        if g < d and (g & (g - 1) or d % g):
            return f"{side.upper()} groups of {g} channels: the Triton kernels take power-of-two groups that divide head_dim {d}"
        if g < d and c.bits == 4 and (d // 2) % g:
            return (f"{side.upper()} is 4-bit in groups of {g}: the Triton kernels need head_dim/2 ({d // 2}) to be a "
                    "multiple of the group size (each byte's two nibbles come from the two halves)")
    if layer.sink_tokens > MAX_SINKS:
        return f"{layer.sink_tokens} sink tokens: the Triton kernels take at most {MAX_SINKS}"
    return None


def unsupported_store(layer: LayerKV) -> str | None:
    """Why the Triton store kernel cannot take this layer (the reference stores it), or None: it does not write
    allocated bit streams (the attention kernels read them)."""
    reason = unsupported(layer)
    if reason is None and (layer.k_codec.allocated or layer.v_codec.allocated):
        return "the Triton store kernel does not write allocated bit streams (the reference codes them)"
    return reason


def _check_params(layer: LayerKV, side: str, want_dtype: tuple[torch.dtype, ...], shape: tuple[int, ...]) -> None:
    c = layer.codec(side)
    names = [f"{side}_scale"] + ([] if c.symmetric else [f"{side}_zp"])
    for name in names:
        t = getattr(layer, name)
        if t is None:
            raise ValueError(f"{side.upper()} codec {c.label()} needs {name}, but the layer has none")
        if tuple(t.shape) != shape or not t.is_contiguous() or t.device != layer.k.device:
            raise ValueError(f"{name} must be a contiguous {shape} tensor on {layer.k.device}, got {tuple(t.shape)} "
                             f"(contiguous={t.is_contiguous()}) on {t.device}")
        if t.dtype not in want_dtype:
            raise ValueError(f"{name} must be {' or '.join(map(str, want_dtype))} for {c.label()}, got {t.dtype}")


def check_storage(layer: LayerKV) -> None:
    """Raise ValueError unless ``layer``'s tensors have the layout and dtypes the kernels assume."""
    reason = unsupported(layer)
    if reason:
        raise ValueError(reason)
    k, v, d = layer.k, layer.v, layer.head_dim
    if k.dim() != 4 or v.dim() != 4 or k.shape[:3] != v.shape[:3] or k.device != v.device:
        raise ValueError(f"K/V storage must be two [num_blocks, kv_heads, block_size, width] tensors on one device, "
                         f"got {tuple(k.shape)} {k.dtype} and {tuple(v.shape)} {v.dtype}")
    if not (k.is_contiguous() and v.is_contiguous()):
        raise ValueError("K/V storage must be contiguous")
    nb, kvh, bs = k.shape[:3]
    for side, data in (("k", k), ("v", v)):
        c = layer.codec(side)
        if data.shape[3] != c.code_width(d):
            raise ValueError(f"{side.upper()} storage is {data.shape[3]} wide; {c.label()} at head_dim {d} needs {c.code_width(d)}")
        want = (c.storage_dtype(torch.float16),) if c.quantized else FLOAT_DTYPES
        if data.dtype not in want:
            raise ValueError(f"{side.upper()} codec {c.label()} stores {' or '.join(map(str, want))}, got {data.dtype}")
        if c.scaling == "static":
            _check_params(layer, side, (torch.float32,), (kvh, d))
        elif c.scaling == "token":
            _check_params(layer, side, PARAM_DTYPES, (nb, kvh, bs, c.groups(d)))
        if peak_grid(c):
            _check_grid(layer, side)
        if c.allocated:
            _check_allocated(layer, side)
    if layer.sink_tokens:
        _check_sinks(layer)


def _check_grid(layer: LayerKV, side: str) -> None:
    t, c = getattr(layer, f"{side}_grid"), layer.codec(side)
    want = (layer.num_kv_heads, c.grid_size())
    if (t is None or tuple(t.shape) != want or t.dtype != torch.float32 or t.stride(1) != 1
            or t.stride(0) not in (0, want[1]) or t.device != layer.k.device):
        raise ValueError(f"{side}_grid must be a {list(want)} fp32 table on {layer.k.device} (rows contiguous, or one "
                         f"row expanded over the heads) for {c.label()}, got "
                         f"{None if t is None else (tuple(t.shape), t.dtype, t.stride(), str(t.device))}")


def _check_allocated(layer: LayerKV, side: str) -> None:
    t, lay = getattr(layer, f"{side}_grid"), getattr(layer, f"{side}_layout", None)
    want = (GAUSS_MAX_BITS + 1, 1 << GAUSS_MAX_BITS)
    if t is None or tuple(t.shape) != want or t.dtype != torch.float32 or not t.is_contiguous() or t.device != layer.k.device:
        raise ValueError(f"{side}_grid must be the contiguous {list(want)} fp32 levels per width on {layer.k.device}, "
                         f"got {None if t is None else (tuple(t.shape), t.dtype, str(t.device))}")
    shape = (layer.num_kv_heads, layer.head_dim)
    if lay is None or tuple(lay.shape) != shape or lay.dtype != torch.int32 or not lay.is_contiguous() or lay.device != layer.k.device:
        raise ValueError(f"{side}_layout must be a contiguous int32 {list(shape)} tensor on {layer.k.device} "
                         "(kvcache.quant.width_layout of the widths)")


def _check_sinks(layer: LayerKV) -> None:
    n, kvh, d = layer.sink_tokens, layer.num_kv_heads, layer.head_dim
    slot = layer.sink_slot
    if slot is None or slot.shape != (layer.num_blocks,) or slot.dtype != torch.int32 or not slot.is_contiguous():
        raise ValueError(f"{n} sink tokens need sink_slot, a contiguous int32 [{layer.num_blocks}] tensor")
    for name in ("k_sink", "v_sink"):
        t = getattr(layer, name)
        if t is None or t.dim() != 4 or tuple(t.shape[1:]) != (kvh, n, d) or not t.is_contiguous() or t.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{name} must be a contiguous float [slots, {kvh}, {n}, {d}] tensor, got "
                             f"{None if t is None else (tuple(t.shape), t.dtype)}")
    if slot.device != layer.k.device or layer.k_sink.device != layer.k.device or layer.v_sink.device != layer.k.device:
        raise ValueError("sink_slot, k_sink and v_sink must be on the storage's device")


@dataclass(frozen=True)
class SideArgs:
    """One side's (K or V) tensors, strides and compile-time switches, as every kernel takes them."""

    data: torch.Tensor
    scale: torch.Tensor  # the data tensor where the codec has none (never read)
    zp: torch.Tensor
    strides: tuple[int, int, int]  # data: block, head, token
    param_strides: tuple[int, int, int]  # per-token: block, head, token; static: 0, head, 0
    quant: int  # 0 floats, 1 static, 2 per token
    bits: int
    group: int  # channels per per-token group; head_dim for one group (and for floats, static codes)
    sym: bool
    part: int  # real lanes of a part: head_dim, or head_dim/2 for 4-bit codes
    lanes: int  # a part's lanes in a tile: part rounded up to a power of two
    table: torch.Tensor  # the codebook [kv_heads, 2^bits] fp32 for a grid side; else the data tensor (never read)
    grid: bool  # codes index ``table`` (a peak grid)
    table_stride: int  # the table's head stride: 0 for one table expanded over the heads
    layout: torch.Tensor  # allocated codes: each channel's start_bit << 4 | width [kv_heads, head_dim]; else the data
    alloc: bool  # per-channel widths in one bit stream per head; ``table`` holds the levels of every width
    width: int  # bytes one token's vector takes in one head (the stream's length)

    @property
    def grouped(self) -> bool:
        return self.quant == 2 and self.group < self.part * (2 if self.bits == 4 else 1)

    def consts(self, prefix: str) -> dict[str, int | bool]:
        """``PREFIX_{QUANT, BITS, GROUP, SYM, PART, LANES, GP, GRID, TSTRIDE}`` for a launch; GP: lanes per group in
        a tile. TSTRIDE is compile-time: it is 0 or 2^bits, and the table lookups index with it per head."""
        return {f"{prefix}_QUANT": self.quant, f"{prefix}_BITS": self.bits, f"{prefix}_GROUP": self.group,
                f"{prefix}_SYM": self.sym, f"{prefix}_PART": self.part, f"{prefix}_LANES": self.lanes,
                f"{prefix}_GP": self.group if self.grouped else self.lanes, f"{prefix}_GRID": self.grid,
                f"{prefix}_TSTRIDE": self.table_stride}

    def read_consts(self, prefix: str) -> dict[str, int | bool]:
        """:meth:`consts` and what the attention kernels alone take: ``PREFIX_{ALLOC, WIDTH, LEVELS}`` (LEVELS: the
        level table's row length)."""
        return {**self.consts(prefix), f"{prefix}_ALLOC": self.alloc, f"{prefix}_WIDTH": self.width,
                f"{prefix}_LEVELS": 1 << GAUSS_MAX_BITS}


def side_args(layer: LayerKV, side: str) -> SideArgs:
    c, data = layer.codec(side), getattr(layer, side)
    scale, zp = layer.params(side)
    quant = {"none": 0, "static": 1, "token": 2}[c.scaling]
    scale = data if scale is None else scale
    zp = scale if zp is None or c.symmetric else zp
    if quant == 2:
        pstrides = (scale.stride(0), scale.stride(1), scale.stride(2))
    elif quant == 1:
        pstrides = (0, scale.stride(0), 0)
    else:
        pstrides = (0, 0, 0)
    part = layer.head_dim // 2 if c.bits == 4 else layer.head_dim
    grid = peak_grid(c)
    table = getattr(layer, f"{side}_grid") if grid or c.allocated else data
    layout = getattr(layer, f"{side}_layout", None) if c.allocated else None
    return SideArgs(data, scale, zp, (data.stride(0), data.stride(1), data.stride(2)), pstrides, quant,
                    c.bits, group_channels(c, layer.head_dim), c.symmetric and quant == 2, part,
                    triton.next_power_of_2(part), table, grid, table.stride(0) if grid else 0,
                    data if layout is None else layout, bool(c.allocated), data.shape[-1])


def sink_args(layer: LayerKV) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[int, int, int]]:
    """(sink_slot, k_sink, v_sink, (slot, head, token) strides); dummies that are never read without sinks."""
    if not layer.sink_tokens:
        return layer.k, layer.k, layer.k, (0, 0, 0)
    t = layer.k_sink
    return layer.sink_slot, layer.k_sink, layer.v_sink, (t.stride(0), t.stride(1), t.stride(2))


def sink_block(layer: LayerKV) -> int:
    """Positions of the attention kernels' sink tile (a dot needs >= 16)."""
    return max(16, triton.next_power_of_2(layer.sink_tokens)) if layer.sink_tokens else 16


def dot_dtype_for(codec: Codec, stored: torch.dtype, query: torch.dtype, fp32_dots: bool) -> torch.dtype:
    """A side's ``tl.dot`` operand dtype: codes (and tiles dequantized in registers) in fp16, in bf16 for a bf16
    query (a bf16 model's values may exceed fp16's range); floats as stored (decode) or as the query (prefill,
    ``stored`` = the query dtype); fp32 where the caller keeps fp32 accuracy."""
    if fp32_dots and (query == torch.float32 or stored == torch.float32):
        return runnable_dot_dtype(torch.float32)
    codes = torch.bfloat16 if query == torch.bfloat16 else torch.float16
    return runnable_dot_dtype(codes if codec.quantized else stored)


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
