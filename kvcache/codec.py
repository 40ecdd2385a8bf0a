"""How K or V is stored (a :class:`Codec`) and a whole cache's choice of them (a :class:`KVMode`), with their byte counts.

A codec composes pieces, each chosen separately for K and V:

- **bits** of a code (16: floats in the pool's 16-bit dtype, :func:`kv_float_dtype`; 8 down to 1: codes,
  packed below 8 bits into bit planes, :func:`kvcache.quant.pack_codes`);
- a **grid**: what a code stands for before scaling. ``int`` is the uniform grid of signed integers
  ``-2^(b-1) .. 2^(b-1)-1``, ``uint`` the unsigned one ``0 .. 2^b-1``; the others are codebooks
  (:mod:`kvcache.codebooks`): the floating-point formats ``e4m3``, ``e5m2`` (fp8) and ``e2m1`` (fp4),
  llama.cpp's ``iq4nl`` table, ``lloyd-max`` centroids for the coordinates of a rotated unit vector
  (TurboQuant), ``lloyd-max-peak`` centroids for a rotated group divided by its peak (ours), ``gauss``, the
  Lloyd-Max levels of N(0, 1) at each channel's own width (ours, with ``allocated``), and ``table``, one
  calibrated per layer, KV head and side;
- **scaling**: ``none`` (the grid value as it is, times an optional per-tensor scale), ``static`` (calibrated
  per tensor, head or channel) or ``token`` (computed at write time per token, KV head and group of
  ``group_size`` channels), with or without a zero point (``symmetric``), in ``param_dtype`` (ours: the pool's
  16-bit dtype, so a bf16 model's parameters do not overflow fp16; an engine's: what that engine stores);
- an encoder **rule**: whose arithmetic picks the parameters and rounds (ours, ``kvq``, or an engine's:
  :mod:`kvcache.encoding`);
- linear maps around the cache: a Hadamard ``rotate`` and, for keys, the calibrated ``qk_transform``;
- ``allocated`` bits (keys, ours): the query-aware transform followed by the eigenbasis of the transformed key
  covariance, each channel divided by its standard deviation, and a code width per channel (0 to 8 bits, on
  average ``allocated``) chosen from the calibrated score-error weights (:func:`kvcache.quant.allocate_bits`),
  one per-token scale; the codes are packed as one bit stream per head (:func:`kvcache.quant.pack_widths`).

A value is decoded as ``grid[code] * scale + zero_point`` (times the per-tensor scale), whatever the pieces;
that is what the kernels and their references read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .codebooks import GAUSS_MAX_BITS
from .errors import ModeError

if TYPE_CHECKING:
    from .shape import KVShape

STATIC_PARAM_DTYPE = torch.float32  # static parameters are fp32 so they add no error of their own
OUR_ENGINE = "kvq"  # the engine name of this tool's own schemes (KVMode.engine), listed before the others
SEQUENCE_TOKENS = 2048  # the sequence length per-sequence costs (sinks) are spread over in ratios

GRID_BITS = {"int": None, "uint": None, "lloyd-max": None, "lloyd-max-vllm": None, "lloyd-max-peak": None, "table": None,
             "e4m3": 8, "e5m2": 8, "e2m1": 4, "iq4nl": 4, "signmag": 4, "gauss": GAUSS_MAX_BITS}
FLOAT_GRIDS = ("e4m3", "e5m2", "e2m1")  # floating-point formats: meaningful with no parameters at all
# "ue8m0": a power-of-two scale stored as its biased exponent byte (2^(byte - 127), MX formats);
# "pool": the pool's 16-bit float dtype (ours, and an engine's that stores the model's dtype)
PARAM_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "e4m3": torch.float8_e4m3fn,
                "ue8m0": torch.uint8}
SCALINGS = ("none", "static", "token")
GAUSS_LEVELS = (GAUSS_MAX_BITS + 1) << GAUSS_MAX_BITS  # entries of the gauss grid's table (codebooks.gauss_levels)


def kv_float_dtype(model_dtype: torch.dtype) -> torch.dtype:
    """The pool's 16-bit float dtype for a model computing in ``model_dtype``: bf16 for a bf16 model (its K/V may
    exceed fp16's 65504), fp16 for fp16 and fp32 models. Pools, sinks and our per-token parameters use it."""
    return torch.bfloat16 if model_dtype == torch.bfloat16 else torch.float16


@dataclass(frozen=True)
class Codec:
    """How one of K or V is stored for every token (see the module docstring for each piece)."""

    bits: int = 16
    scaling: str = "none"
    group_size: int = 0  # per-token scaling: channels per parameter group (0: the whole head)
    symmetric: bool = False  # per-token scaling: a scale only, no zero point
    rotate: bool = False  # an orthonormal Hadamard rotation of head_dim before quantizing
    qk_transform: bool = False  # keys only: the calibrated query-aware transform (the query gets its inverse)
    grid: str = "int"
    rule: str = "kvq"
    param_dtype: str = "pool"  # per-token parameters' storage dtype ("pool": the pool's 16-bit dtype)
    tensor_scale: bool = False  # one more fp32 scale per layer and side (1.0 unless calibrated): fp8/fp4 per tensor
    norm_correction: bool = False  # decode divides by the norm of the decoded unit vector (TurboQuant's "nc")
    residual_sign: bool = False  # the top bit of a code is the sign of the residual, times a per-token magnitude (LMDeploy's QJL bit)
    rotation_block: int = 0  # rotate in blocks of this many channels (block-diagonal Hadamard; 0: the whole head)
    rotation_min: int = 0  # rotate only heads whose head_dim this divides (llama.cpp: 64), others stay unrotated
    allocated: float = 0.0  # keys: mean bits per channel, allocated per channel in the calibrated eigenbasis (gauss grid)

    def __post_init__(self) -> None:
        reason = self._invalid()
        if reason:
            raise ValueError(f"not a codec: {self} ({reason})")

    def _invalid(self) -> str | None:
        if self.bits == 16:
            plain = (self.scaling == "none" and not (self.group_size or self.symmetric or self.tensor_scale
                     or self.norm_correction) and self.grid == "int")
            return None if plain else "16-bit floats take no scaling, grid or parameters"
        if not 1 <= self.bits <= 8:
            return "codes are 1 to 8 bits (16: floats)"
        if self.grid not in GRID_BITS:
            return f"grid must be one of {', '.join(GRID_BITS)}"
        if GRID_BITS[self.grid] not in (None, self.bits):
            return f"the {self.grid} grid has {GRID_BITS[self.grid]}-bit codes"
        if self.scaling not in SCALINGS:
            return f"scaling must be one of {', '.join(SCALINGS)}"
        if self.scaling == "none" and self.grid not in FLOAT_GRIDS:
            return "only floating-point grids (e4m3, e5m2, e2m1) are read without parameters"
        if self.scaling == "static" and self.grid != "int":
            return "static (calibrated) parameters are for the int grid"
        if self.scaling != "token" and (self.group_size or self.symmetric or self.norm_correction):
            return "groups, symmetric scales and norm correction are per-token parameters"
        if self.param_dtype not in (*PARAM_DTYPES, "pool"):
            return f"param_dtype must be one of {', '.join(PARAM_DTYPES)} or pool"
        if self.residual_sign and (self.scaling != "token" or self.symmetric or self.bits < 2):
            return "a residual sign bit needs per-token scale and magnitude (not symmetric) and >= 2 bits"
        if (self.rotation_block or self.rotation_min) and not self.rotate:
            return "rotation_block and rotation_min are for rotated codecs"
        if (self.grid == "gauss") != (self.allocated > 0):
            return "the gauss grid is the allocated codes' and they take it"
        if self.allocated and not (0 < self.allocated < self.bits and self.scaling == "token" and self.symmetric
                                   and not self.group_size and not self.rotate and self.qk_transform):
            return ("allocated bits are keys through the query-aware transform, one symmetric scale per token and head, "
                    "no rotation, fewer on average than the widest code")
        return None

    @property
    def quantized(self) -> bool:
        return self.bits < 16

    @property
    def needs_calibration(self) -> bool:
        return self.scaling == "static" or self.qk_transform or self.grid == "table"

    @property
    def mean_bits(self) -> float:
        """Code bits per channel on average: ``allocated`` when bits are allocated per channel, else ``bits``."""
        return self.allocated or self.bits

    def param_dtype_in(self, fp_dtype: torch.dtype) -> torch.dtype:
        """The per-token parameters' dtype in a pool of 16-bit dtype ``fp_dtype``."""
        return fp_dtype if self.param_dtype == "pool" else PARAM_DTYPES[self.param_dtype]

    def groups(self, head_dim: int) -> int:
        """Parameter groups per token and head (0 for floats, static parameters and parameter-free grids)."""
        return head_dim // (self.group_size or head_dim) if self.scaling == "token" else 0

    def params_per_group(self) -> int:
        return 1 if self.symmetric else 2  # scale (and zero point)

    def planes(self) -> tuple[int, ...]:
        """Bit widths of the planes a code is stored in, lowest bits first: 8, or 4/2/1-bit planes below 8 bits."""
        if self.bits in (8, 16):
            return (self.bits,)
        return tuple(w for w in (4, 2, 1) if self.bits & w)

    def packs_in_bytes(self, head_dim: int) -> bool:
        """Allocated codes: whether ``allocated * head_dim`` bits are a whole number of bytes (other codecs: True)."""
        return (self.allocated * head_dim) % 8 == 0

    def code_width(self, head_dim: int) -> int:
        """Stored elements per token and head: head_dim (floats, 8-bit codes), or head_dim * bits / 8 bytes."""
        if self.allocated:
            if not self.packs_in_bytes(head_dim):
                raise ModeError(f"{self.allocated:g} bits per channel over head_dim {head_dim} is not a whole number of "
                                "bytes: pick another KV mode")
            return int(self.allocated * head_dim) // 8
        if self.bits in (8, 16):
            return head_dim
        if head_dim % 8:
            raise ModeError(f"{self.bits}-bit codes pack in bytes: head_dim {head_dim} is not a multiple of 8")
        return head_dim * self.bits // 8

    def storage_dtype(self, fp_dtype: torch.dtype) -> torch.dtype:
        if self.bits == 16:
            return fp_dtype
        return torch.int8 if self.bits == 8 and self.grid == "int" else torch.uint8

    def bytes_per_token_per_head(self, head_dim: int, fp_dtype: torch.dtype = torch.float16) -> int:
        """Codes (or floats) plus per-token parameters of one token in one layer and KV head."""
        data = self.code_width(head_dim) * self.storage_dtype(fp_dtype).itemsize
        return data + self.groups(head_dim) * self.params_per_group() * self.param_dtype_in(fp_dtype).itemsize

    def rotation_for(self, head_dim: int) -> int:
        """Channels per Hadamard block this codec rotates at ``head_dim`` (0: not rotated there)."""
        if not self.rotate or (self.rotation_min and head_dim % self.rotation_min):
            return 0
        return min(self.rotation_block or head_dim, head_dim)

    def grid_size(self) -> int:
        """Entries of the codebook: 2^bits (2^(bits-1) when the top bit is a residual sign)."""
        return 1 << (self.bits - 1 if self.residual_sign else self.bits)

    def label(self) -> str:
        """``int4 g16 sym +rot +qk``: the codec in a few words (tables, plans)."""
        if not self.quantized:
            return "fp16"
        kind = f"int{self.bits}" if self.grid == "int" else f"{self.grid}{'' if GRID_BITS[self.grid] else self.bits}"
        if self.allocated:
            kind = f"gauss {self.allocated:g}b allocated"
        if self.grid == "uint":
            kind = f"uint{self.bits}"
        scale = {"static": ["static"], "none": [], "token": [f"g{self.group_size}" if self.group_size else "per head"]}
        parts = [kind, *scale[self.scaling]]
        parts += ["sym"] if self.symmetric else []
        parts += [self.param_dtype] if self.scaling == "token" and self.param_dtype != "pool" else []
        parts += ["x tensor"] if self.tensor_scale else []
        parts += ["+nc"] if self.norm_correction else []
        parts += ["+sign"] if self.residual_sign else []
        parts += [f"+rot{self.rotation_block or ''}"] if self.rotate else []
        parts += ["+qk"] if self.qk_transform else []
        parts += [f"({self.rule})"] if self.rule != "kvq" else []
        return " ".join(parts)


FP16 = Codec()
INT8_STATIC = Codec(8, "static")
INT8_TOKEN = Codec(8, "token")


@dataclass(frozen=True)
class KVMode:
    """One way of storing the KV cache: a K codec and a V codec (per layer, for a plan) and 16-bit sink tokens."""

    name: str
    description: str
    k: Codec = FP16
    v: Codec = FP16
    sink_tokens: int = 0
    layers: tuple[tuple[Codec, Codec], ...] | None = None  # a plan: (K, V) per layer; None: ``k``/``v`` in all
    engine: str = OUR_ENGINE  # whose scheme it is: "kvq" (ours), "vllm", "sglang", "lmdeploy", "llamacpp", "hf"
    serve: str = ""  # what a user pastes to turn it on in that engine (a flag, an environment, a constructor)
    model_hash: str | None = None  # a plan: the config hash of the model it was made for
    skip_layers: int = 0  # the first and last N layers stay in 16 bits (vLLM TurboQuant's boundary layers)
    residual: int = 0  # transformers' residual_length: the newest tokens in 16 bits, everything re-quantized when they fill
    source: str = ""  # an engine scheme: the engine's files and functions it reproduces

    def check_model(self, config: object) -> None:
        """A plan made for another model, or a 16-bit window as long as its context, is refused in one line."""
        from .models.variants import context_limit
        from .shape import config_hash

        limit = context_limit(config)
        if self.residual and self.engine != "hf" and limit is not None and self.residual >= limit:  # a +recentN window
            raise ModeError(f"{self.name}: its 16-bit window of {self.residual} tokens is as long as this model's whole "
                            f"context ({limit} tokens), so nothing would be quantized; use a window under {limit}")
        if self.model_hash is not None and self.model_hash != config_hash(config):
            raise ModeError(f"KV plan {self.name} was made for another model (config hash {self.model_hash}, this "
                            f"model's is {config_hash(config)}): make a plan for this model with `python -m calib plan MODEL --budget-dppl PCT --out plan.json`")

    def check_shape(self, shape: "KVShape") -> None:
        """A scheme that needs what this model lacks is refused in one line naming it and the reason."""
        d = shape.head_dim
        for pair in set(self.layer_codecs(shape.num_layers)):
            for side, c in zip("KV", pair):
                if not c.quantized:
                    continue
                if c.group_size and d % c.group_size:
                    raise ModeError(f"{self.name}: {side} is quantized in blocks of {c.group_size} channels, which do "
                                    f"not divide this model's head_dim {d}; pick another KV mode")
                if not c.packs_in_bytes(d):
                    raise ModeError(f"{self.name}: {side} takes {c.allocated:g} bits per channel, over this model's "
                                    f"head_dim {d} not a whole number of bytes; pick another KV mode")
                if c.bits < 8 and d % 8:
                    raise ModeError(f"{self.name}: {c.bits}-bit codes pack in bytes, this model's head_dim {d} is not "
                                    "a multiple of 8; pick another KV mode")
                block = c.rotation_for(d)
                if block and not c.rotation_block and d & (d - 1):
                    raise ModeError(f"{self.name}: a Hadamard rotation needs a power-of-two head_dim, this model's is "
                                    f"{d}: pick a mode without rotation (e.g. int8-dynamic)")
                if block and (d % block or block & (block - 1)):
                    raise ModeError(f"{self.name}: {side} is Hadamard-rotated in blocks of {block} channels, which do "
                                    f"not divide head_dim {d}; pick a mode without rotation (llama.cpp stores such "
                                    "heads unrotated: its -norot variant)")

    def layer_codecs(self, num_layers: int) -> list[tuple[Codec, Codec]]:
        if self.layers is None:
            skip = min(self.skip_layers, num_layers // 2)
            return [(FP16, FP16) if i < skip or i >= num_layers - skip else (self.k, self.v) for i in range(num_layers)]
        if len(self.layers) != num_layers:
            raise ModeError(f"KV plan {self.name!r} is for {len(self.layers)} layers, the model has {num_layers}: "
                            "make a plan for this model with `python -m calib plan MODEL --budget-dppl PCT --out plan.json`")
        return list(self.layers)

    def _pairs(self) -> tuple[tuple[Codec, Codec], ...]:
        """The distinct (K, V) codec pairs as declared: the plan's layers, or the one pair of a uniform mode."""
        return self.layers or ((self.k, self.v),)

    def _codecs(self) -> list[Codec]:
        return [c for pair in self._pairs() for c in pair]

    @property
    def quantized(self) -> bool:
        return any(c.quantized for c in self._codecs())

    @property
    def needs_qparams(self) -> bool:
        """Static parameters or a calibrated transform or table: it needs ``--qparams`` from a calibration."""
        return any(c.needs_calibration for c in self._codecs())

    @property
    def uses_qk_transform(self) -> bool:
        """Some layer's keys go through the calibrated query-aware transform (fitted to a context length)."""
        return any(c.qk_transform for c in self._codecs())

    @property
    def uses_static_keys(self) -> bool:
        """Some layer's keys use static calibrated ranges: post-RoPE, those hold only for positions calibrated."""
        return any(k.scaling == "static" for k, _ in self._pairs())

    @property
    def reads_qparams(self) -> bool:
        """It takes calibrated parameters when given: it needs them, or its per-tensor scales are 1.0 without."""
        return self.needs_qparams or self.uses_tensor_scales

    @property
    def uses_tensor_scales(self) -> bool:
        """Per-tensor scales: 1.0 without ``--qparams``, the calibrated ones with them (fp8 per tensor)."""
        return any(c.tensor_scale for c in self._codecs())

    def _mean_bits(self, side: int, num_layers: int | None) -> float:
        pairs = self.layer_codecs(num_layers) if num_layers else self._pairs()
        bits = [pair[side].mean_bits for pair in pairs]
        return sum(bits) / len(bits)

    @property
    def k_bits(self) -> float:
        return self._mean_bits(0, None)

    @property
    def v_bits(self) -> float:
        return self._mean_bits(1, None)

    def bits_for(self, num_layers: int) -> tuple[float, float]:
        """Mean K and V bits over a model's layers (boundary layers left in 16 bits counted)."""
        return self._mean_bits(0, num_layers), self._mean_bits(1, num_layers)

    def bytes_per_token(self, shape: "KVShape", fp_dtype: torch.dtype = torch.float16) -> int:
        """Marginal bytes one token costs across all layers and KV heads (codes and per-token parameters)."""
        per_layer = [k.bytes_per_token_per_head(shape.head_dim, fp_dtype) + v.bytes_per_token_per_head(shape.head_dim, fp_dtype)
                     for k, v in self.layer_codecs(shape.num_layers)]
        return shape.num_kv_heads * sum(per_layer)

    def sink_bytes(self, shape: "KVShape", fp_dtype: torch.dtype = torch.float16) -> int:
        """Bytes one sequence's sink tokens take in the pool's float dtype, K and V of all layers (once per sequence)."""
        return self.sink_tokens * shape.float_bytes_per_token(fp_dtype.itemsize)

    def residual_bytes(self, shape: "KVShape", fp_dtype: torch.dtype = torch.float16) -> int:
        """Bytes a sequence's full residual window costs beyond its codes (its tokens held in 16 bits instead)."""
        extra = shape.float_bytes_per_token(fp_dtype.itemsize) - self.bytes_per_token(shape, fp_dtype)
        return self.residual * max(extra, 0)

    def sequence_bytes(self, shape: "KVShape", fp_dtype: torch.dtype = torch.float16) -> int:
        """Bytes every sequence costs once beyond its tokens' codes: its sink slot and a full residual window."""
        return self.sink_bytes(shape, fp_dtype) + self.residual_bytes(shape, fp_dtype)

    @property
    def emulated(self) -> bool:
        """The pool holds decoded 16-bit values, re-quantized in place (transformers' residual window)."""
        return self.residual > 0

    @property
    def shares_prefix(self) -> bool:
        """Sequences that start with the same tokens may share the blocks storing them (prefix caching): a stored
        token never changes. Not so for an emulated residual window, which re-quantizes old tokens in place."""
        return not self.emulated

    def pool_bytes_per_token(self, shape: "KVShape", fp_dtype: torch.dtype = torch.float16) -> int:
        """Bytes per token a KVQ Studio pool of this mode allocates: :meth:`bytes_per_token`, except an emulated
        scheme, whose pool holds 16-bit values (the engine's own bytes stay :meth:`bytes_per_token`)."""
        if self.emulated:
            return shape.float_bytes_per_token(fp_dtype.itemsize)
        return self.bytes_per_token(shape, fp_dtype)

    def bytes_per_token_at(self, shape: "KVShape", tokens: int = SEQUENCE_TOKENS,
                           fp_dtype: torch.dtype = torch.float16) -> float:
        """Bytes per token of a ``tokens``-long sequence: the marginal bytes plus its sinks (and a full residual
        window) spread over it."""
        return self.bytes_per_token(shape, fp_dtype) + self.sequence_bytes(shape, fp_dtype) / tokens

    def ratio_to_fp16(self, shape: "KVShape", tokens: int = SEQUENCE_TOKENS) -> float:
        """A ``tokens``-long sequence's bytes over fp16's (what "x fp16" means everywhere), to 4 places."""
        return round(self.bytes_per_token_at(shape, tokens) / shape.float_bytes_per_token(), 4)

    def static_param_bytes(self, shape: "KVShape", granularity: str = "channel") -> int:
        """Bytes held once per pool: static scales and zero points, per-tensor scales, tables, the transforms' matrices."""
        per_layer = {"tensor": 1, "head": shape.num_kv_heads, "channel": shape.num_kv_heads * shape.head_dim}[granularity]
        f32 = STATIC_PARAM_DTYPE.itemsize
        total = 0
        shared_grids: dict[tuple[str, int], int] = {}  # (grid, bits): its entries, one table per pool
        for k, v in self.layer_codecs(shape.num_layers):
            for c in (k, v):
                total += 2 * per_layer * f32 if c.scaling == "static" else 0
                total += f32 if c.tensor_scale else 0
                if c.grid == "table":  # calibrated per layer and KV head
                    total += shape.num_kv_heads * c.grid_size() * f32
                elif c.quantized and c.grid not in ("int", "uint"):  # a fixed codebook, one per pool
                    shared_grids[(c.grid, c.bits)] = GAUSS_LEVELS if c.allocated else 1 << c.bits
                if c.allocated:  # every channel's width and its place in the stream (int32 each)
                    total += 2 * shape.num_kv_heads * shape.head_dim * 4
            if k.qk_transform:  # the key map, and the query's inverse, per KV head
                total += 2 * shape.num_kv_heads * shape.head_dim ** 2 * f32
        total += sum(shared_grids.values()) * f32
        rotations = {c.rotation_for(shape.head_dim) for c in self._codecs()} - {0}
        total += len(rotations) * shape.head_dim ** 2 * f32  # one Hadamard matrix per block size, shared by every layer
        return total

    def describe_codecs(self) -> str:
        if self.layers is not None:
            return f"per-layer plan ({len(self.layers)} layers)"
        sinks = f", first {self.sink_tokens} tokens 16-bit" if self.sink_tokens else ""
        skip = f", first and last {self.skip_layers} layers 16-bit" if self.skip_layers else ""
        redo = "re-quantized" if self.engine == "hf" else "coded"
        window = f", last {self.residual} tokens 16-bit then {redo}" if self.residual else ""
        return f"K {self.k.label()}, V {self.v.label()}{sinks}{skip}{window}"
