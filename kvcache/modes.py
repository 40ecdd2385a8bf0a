"""KV modes by name: how K and V are each stored, and how many bytes a token costs.

A mode pairs two :class:`Codec` s, one for K and one for V, chosen separately (keys carry the damage:
outlier channels), plus a number of first tokens kept in fp16 (attention sinks). A codec composes:
bits (16, 8 or 4, two 4-bit codes per byte); parameters static (calibrated per tensor, head or channel)
or per token (per head, or per group of G channels), asymmetric or symmetric; an orthonormal Hadamard
rotation of head_dim; for keys, the calibrated query-aware transform. A *plan* (the bit planner's
output) gives every layer its own pair. Named modes are the table :data:`KV_MODES`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .errors import ModeError

if TYPE_CHECKING:
    from .storage.shape import KVShape

STATIC_PARAM_DTYPE = torch.float32  # static parameters are fp32 so they add no error of their own
TOKEN_PARAM_DTYPE = torch.float16  # per-token parameters are fp16, and used exactly as stored
SEQUENCE_TOKENS = 2048  # the sequence length per-sequence costs (sinks) are spread over in ratios


@dataclass(frozen=True)
class Codec:
    """How one of K or V is stored for every token."""

    bits: int = 16  # 16: floats in the pool's dtype; 8 or 4: integer codes (4: two per byte)
    scaling: str = "none"  # "none" (floats), "static" (calibrated per tensor/head/channel), "token" (at write time)
    group_size: int = 0  # per-token scaling: channels per parameter group (0: the whole head)
    symmetric: bool = False  # per-token scaling: a signed scale only (llama.cpp's q4_0 rule), no zero point
    rotate: bool = False  # an orthonormal Hadamard rotation of head_dim before quantizing
    qk_transform: bool = False  # keys only: the calibrated query-aware transform (the query gets its inverse)

    def __post_init__(self) -> None:
        floats = self.bits == 16 and self.scaling == "none"
        codes = self.bits in (8, 4) and self.scaling in ("static", "token")
        if not (floats or codes) or (self.scaling != "token" and (self.group_size or self.symmetric)):
            raise ValueError(f"not a codec: {self} (16 bits and no scaling, or 8/4 bits static or per token)")

    @property
    def quantized(self) -> bool:
        return self.bits < 16

    @property
    def needs_calibration(self) -> bool:
        return self.scaling == "static" or self.qk_transform

    def groups(self, head_dim: int) -> int:
        """Parameter groups per token and head (0 for floats and static parameters)."""
        return head_dim // (self.group_size or head_dim) if self.scaling == "token" else 0

    def params_per_group(self) -> int:
        return 1 if self.symmetric else 2  # scale (and zero point)

    def code_width(self, head_dim: int) -> int:
        """Stored elements per token and head: head_dim, or head_dim / 2 bytes for 4-bit codes."""
        return head_dim // 2 if self.bits == 4 else head_dim

    def storage_dtype(self, fp_dtype: torch.dtype) -> torch.dtype:
        return {16: fp_dtype, 8: torch.int8, 4: torch.uint8}[self.bits]

    def bytes_per_token_per_head(self, head_dim: int, fp_dtype: torch.dtype = torch.float16) -> int:
        """Codes (or floats) plus per-token parameters of one token in one layer and KV head."""
        data = self.code_width(head_dim) * self.storage_dtype(fp_dtype).itemsize
        return data + self.groups(head_dim) * self.params_per_group() * TOKEN_PARAM_DTYPE.itemsize

    def label(self) -> str:
        """``int4 g16 sym +rot +qk``: the codec in a few words (tables, plans)."""
        if not self.quantized:
            return "fp16"
        parts = [f"int{self.bits}", "static" if self.scaling == "static" else
                 (f"g{self.group_size}" if self.group_size else "per head")]
        parts += ["sym"] if self.symmetric else []
        parts += ["+rot"] if self.rotate else []
        parts += ["+qk"] if self.qk_transform else []
        return " ".join(parts)


FP16 = Codec()
INT8_STATIC = Codec(8, "static")
INT8_TOKEN = Codec(8, "token")


@dataclass(frozen=True)
class KVMode:
    """One way of storing the KV cache: a K codec and a V codec (per layer, for a plan) and fp16 sink tokens."""

    name: str
    description: str
    k: Codec = FP16
    v: Codec = FP16
    sink_tokens: int = 0
    layers: tuple[tuple[Codec, Codec], ...] | None = None  # a plan: (K, V) per layer; None: ``k``/``v`` in all
    engine: str = "kvq"  # whose scheme it is: "kvq" (ours), "vllm", "sglang", "lmdeploy", "llamacpp", "hf"
    serve: str = ""  # what a user pastes to turn it on in that engine (a flag, an environment, a constructor)
    model_hash: str | None = None  # a plan: the config hash of the model it was made for

    def check_model(self, config: object) -> None:
        """A plan made for another model is refused in one line (a named mode fits every model)."""
        from .storage.shape import config_hash

        if self.model_hash is not None and self.model_hash != config_hash(config):
            raise ModeError(f"KV plan {self.name} was made for another model (config hash {self.model_hash}, this "
                            f"model's is {config_hash(config)}): make a plan for this model with `python -m calib plan MODEL --budget-dppl PCT --out plan.json`")

    def layer_codecs(self, num_layers: int) -> list[tuple[Codec, Codec]]:
        if self.layers is None:
            return [(self.k, self.v)] * num_layers
        if len(self.layers) != num_layers:
            raise ModeError(f"KV plan {self.name!r} is for {len(self.layers)} layers, the model has {num_layers}: "
                            "make a plan for this model with `python -m calib plan MODEL --budget-dppl PCT --out plan.json`")
        return list(self.layers)

    def _codecs(self) -> list[Codec]:
        return [c for pair in (self.layers or ((self.k, self.v),)) for c in pair]

    @property
    def quantized(self) -> bool:
        return any(c.quantized for c in self._codecs())

    @property
    def needs_qparams(self) -> bool:
        """Static parameters or a calibrated transform: it needs ``--qparams`` from a calibration."""
        return any(c.needs_calibration for c in self._codecs())

    @property
    def k_bits(self) -> float:
        bits = [k.bits for k, _ in (self.layers or ((self.k, self.v),))]
        return sum(bits) / len(bits)

    @property
    def v_bits(self) -> float:
        bits = [v.bits for _, v in (self.layers or ((self.k, self.v),))]
        return sum(bits) / len(bits)

    def bytes_per_token(self, shape: "KVShape", fp_dtype: torch.dtype = torch.float16) -> int:
        """Marginal bytes one token costs across all layers and KV heads (codes and per-token parameters)."""
        per_layer = [k.bytes_per_token_per_head(shape.head_dim, fp_dtype) + v.bytes_per_token_per_head(shape.head_dim, fp_dtype)
                     for k, v in self.layer_codecs(shape.num_layers)]
        return shape.num_kv_heads * sum(per_layer)

    def sink_bytes(self, shape: "KVShape", fp_dtype: torch.dtype = torch.float16) -> int:
        """Bytes one sequence's sink tokens take in the pool's fp dtype, K and V of all layers (once per sequence)."""
        return self.sink_tokens * shape.float_bytes_per_token(fp_dtype.itemsize)

    def bytes_per_token_at(self, shape: "KVShape", tokens: int = SEQUENCE_TOKENS,
                           fp_dtype: torch.dtype = torch.float16) -> float:
        """Bytes per token of a ``tokens``-long sequence: the marginal bytes plus its sinks spread over it."""
        return self.bytes_per_token(shape, fp_dtype) + self.sink_bytes(shape, fp_dtype) / tokens

    def ratio_to_fp16(self, shape: "KVShape", tokens: int = SEQUENCE_TOKENS) -> float:
        """A ``tokens``-long sequence's bytes over fp16's (what "x fp16" means everywhere), to 4 places."""
        return round(self.bytes_per_token_at(shape, tokens) / shape.float_bytes_per_token(), 4)

    def static_param_bytes(self, shape: "KVShape", granularity: str = "channel") -> int:
        """Bytes held once per pool: static scales and zero points, and the transforms' matrices."""
        per_layer = {"tensor": 1, "head": shape.num_kv_heads, "channel": shape.num_kv_heads * shape.head_dim}[granularity]
        total = 0
        for k, v in self.layer_codecs(shape.num_layers):
            total += sum(2 * per_layer * STATIC_PARAM_DTYPE.itemsize for c in (k, v) if c.scaling == "static")
            if k.qk_transform:  # the key map, and the query's inverse, per KV head
                total += 2 * shape.num_kv_heads * shape.head_dim ** 2 * STATIC_PARAM_DTYPE.itemsize
        if any(c.rotate for c in self._codecs()):  # one Hadamard matrix, shared by every layer (and by K and V)
            total += shape.head_dim ** 2 * STATIC_PARAM_DTYPE.itemsize
        return total

    def describe_codecs(self) -> str:
        if self.layers is not None:
            return f"per-layer plan ({len(self.layers)} layers)"
        sinks = f", first {self.sink_tokens} tokens fp16" if self.sink_tokens else ""
        return f"K {self.k.label()}, V {self.v.label()}{sinks}"


def _mode(name: str, description: str, k: Codec, v: Codec, sinks: int = 0, engine: str = "kvq",
          serve: str = "") -> KVMode:
    return KVMode(name, description, k, v, sinks, engine=engine, serve=serve or f"--kv {name}")


INT4_HEAD = Codec(4, "token")
INT4_G16 = Codec(4, "token", group_size=16, symmetric=True, rotate=True)
INT8_ROT = Codec(8, "token", rotate=True)
INT8_SYM_QK = Codec(8, "token", symmetric=True, rotate=True, qk_transform=True)

KV_MODES: dict[str, KVMode] = {
    m.name: m
    for m in (
        _mode("fp16", "fp16 baseline (no quantization)", FP16, FP16),
        _mode("int8", "int8, static parameters from a calibration (--qparams)", INT8_STATIC, INT8_STATIC),
        _mode("int8-dynamic", "int8, per-token per-head parameters computed at write time (no calibration)",
              INT8_TOKEN, INT8_TOKEN),
        _mode("int4-lmdeploy", "int4 per token and head, asymmetric: LMDeploy's --quant-policy 4, for comparison",
              INT4_HEAD, INT4_HEAD, engine="lmdeploy", serve="--quant-policy 4"),
        _mode("int8-rot", "int8 per token and head after a Hadamard rotation, first 4 tokens fp16 (no calibration)",
              INT8_ROT, INT8_ROT, sinks=4),
        _mode("int8-qk", "int8 per token and head after a rotation, K through the calibrated query-aware transform; "
                         "first 4 tokens fp16 (--qparams)",
              replace(INT8_ROT, qk_transform=True), INT8_ROT, sinks=4),
        _mode("k8v4", "K int8 (symmetric, rotated, calibrated query-aware transform); V int4 in groups of 16 "
                      "(symmetric, rotated); first 4 tokens fp16 (--qparams)",
              INT8_SYM_QK, INT4_G16, sinks=4),
        _mode("int4", "K and V int4 in groups of 16 (symmetric, rotated), K through the calibrated query-aware "
                      "transform; first 4 tokens fp16 (--qparams)",
              replace(INT4_G16, qk_transform=True), INT4_G16, sinks=4),
    )
}


PLAN_FORMAT = "kvq-kv-plan"
PLAN_VERSION = 1


def plan_to_json(mode: KVMode, **facts: object) -> dict:
    """A plan as the JSON a spec file holds: every layer's K and V codec, the sinks, and ``facts`` (model, budget...)."""
    from dataclasses import asdict

    layers = [{"k": asdict(k), "v": asdict(v)} for k, v in (mode.layers or ())]
    return {"format": PLAN_FORMAT, "format_version": PLAN_VERSION, "description": mode.description,
            "sink_tokens": mode.sink_tokens, "config_hash": mode.model_hash, **facts, "layers": layers}


@functools.lru_cache(maxsize=32)
def _load_plan(path: str, mtime_ns: int) -> KVMode:
    import json

    try:
        spec = json.loads(Path(path).read_text(encoding="utf-8"))
        if spec.get("format") != PLAN_FORMAT:
            raise ModeError(f"{path} is not a KV plan (format {spec.get('format')!r}); make one with `python -m calib plan MODEL --budget-dppl PCT --out plan.json`")
        if int(spec.get("format_version", 0)) > PLAN_VERSION:
            raise ModeError(f"{path} is a newer KV plan than this KVQ Studio reads: upgrade it")
        layers = tuple((Codec(**d["k"]), Codec(**d["v"])) for d in spec["layers"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ModeError(f"{path} is not a readable KV plan ({' '.join(str(exc).split())}): make one with "
                        "`python -m calib plan MODEL --budget-dppl PCT --out plan.json`") from None
    if not layers:
        raise ModeError(f"{path} holds no layers: make one with `python -m calib plan MODEL --budget-dppl PCT --out plan.json`")
    return KVMode(path, spec.get("description", "a per-layer plan"), layers[0][0], layers[0][1],
                  int(spec.get("sink_tokens", 0)), layers=layers, serve=f"--kv {path}", model_hash=spec.get("config_hash"))


def get_mode(name: "str | KVMode") -> KVMode:
    """The mode called ``name``, or the plan in the ``.json`` file ``name`` (a mode is returned as it is)."""
    if isinstance(name, KVMode):
        return name
    name = name.strip()
    if name.endswith(".json"):
        path = Path(name).expanduser()
        if not path.is_file():
            raise ModeError(f"KV plan file not found: {name}; make one with `python -m calib plan MODEL --budget-dppl PCT --out plan.json`")
        return _load_plan(str(path), path.stat().st_mtime_ns)
    try:
        return KV_MODES[name]
    except KeyError:
        raise ModeError(f"unknown KV mode {name!r}; valid modes: {', '.join(KV_MODES)} (or a plan's .json file)") from None


def parse_modes(spec: str) -> list[KVMode]:
    """Modes from a comma-separated list such as ``fp16,int8-dynamic``."""
    names = [n for n in (s.strip() for s in spec.split(",")) if n]
    if not names:
        raise ModeError(f"no KV mode given; valid modes: {', '.join(KV_MODES)}")
    return [get_mode(n) for n in names]


QPARAMS_HINT = "pass --qparams FILE_OR_DIR, made by `python -m calib calibrate` then `python -m calib kv_qparams WORK_DIR OUT_DIR --format kvq`"


def require_qparams(mode: "str | KVMode", qparams: object | None, hint: str = QPARAMS_HINT) -> None:
    """The one rule for calibrated modes: they need calibrated parameters; ``hint`` says how to get them."""
    mode = get_mode(mode)
    if mode.needs_qparams and qparams is None:
        raise ModeError(f"KV mode {mode.name} needs calibrated parameters: {hint}")
