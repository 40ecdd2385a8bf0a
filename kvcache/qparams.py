"""Static KV quantization parameters (the ``int8`` mode) and their safetensors file.

One (scale, zp) pair per layer for K and for V, each shaped to its granularity:
``tensor`` (1, 1), ``head`` (num_kv_heads, 1) or ``channel`` (num_kv_heads, head_dim).
Kept in fp32 so the parameters add no error of their own.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .errors import QParamsError
from .quant import asym_qparams, granularity_shape, reduce_to_granularity, sym_qparams
from .shape import KVShape

FORMAT = "kvq-qparams"
FILE_NAME = "kv_qparams.safetensors"  # what `python -m calib kv_qparams ... --format kvq` writes in OUT_DIR
FORMAT_VERSION = 3  # 2: optional per-layer key transforms (k_transform); 3: optional eigenbases (k_basis, k_weight)
_OPTIONAL = ("k_transform", "k_basis", "k_weight")  # per-layer tensors a file may carry
_NAMES = ("k_scale", "k_zp", "v_scale", "v_zp")


@dataclass
class KVQParams:
    k_scale: list[torch.Tensor]
    k_zp: list[torch.Tensor]
    v_scale: list[torch.Tensor]
    v_zp: list[torch.Tensor]
    granularity: str = "channel"
    symmetric: bool = False
    bits: int = 8
    metadata: dict[str, str] = field(default_factory=dict)
    k_transform: list[torch.Tensor] | None = None  # per layer [kv_heads, d, d]: the query-aware key map A (k' = k @ A)
    k_basis: list[torch.Tensor] | None = None  # per layer [kv_heads, d, d]: A, then the eigenbasis, per-channel unit variance
    k_weight: list[torch.Tensor] | None = None  # per layer [kv_heads, d]: score error of unit noise per channel of k_basis

    @property
    def num_layers(self) -> int:
        return len(self.k_scale)

    @property
    def shape(self) -> tuple[int, int]:
        """(num_kv_heads, head_dim) as far as the granularity tells (1 where it does not)."""
        return tuple(self.k_scale[0].shape)

    @classmethod
    def from_stats(
        cls,
        key_stats: dict[str, list[torch.Tensor]],
        value_stats: dict[str, list[torch.Tensor]],
        granularity: str = "channel",
        symmetric: bool = False,
        bits: int = 8,
        metadata: dict[str, str] | None = None,
        k_transform: list[torch.Tensor] | None = None,
        k_basis: list[torch.Tensor] | None = None,
        k_weight: list[torch.Tensor] | None = None,
    ) -> "KVQParams":
        """Parameters from per-layer ``min``/``max``/``absmax`` stats, each (num_kv_heads, head_dim)."""
        granularity_shape(granularity, 1, 1)  # validates the name
        out: dict[str, list[torch.Tensor]] = {n: [] for n in _NAMES}
        for prefix, stats in (("k", key_stats), ("v", value_stats)):
            for i in range(len(stats["absmax" if symmetric else "max"])):
                if symmetric:
                    scale, zp = sym_qparams(reduce_to_granularity(stats["absmax"][i].float(), granularity, "max"), bits)
                else:
                    lo = reduce_to_granularity(stats["min"][i].float(), granularity, "min")
                    hi = reduce_to_granularity(stats["max"][i].float(), granularity, "max")
                    scale, zp = asym_qparams(lo, hi, bits)
                out[f"{prefix}_scale"].append(scale)
                out[f"{prefix}_zp"].append(zp)
        return cls(**out, granularity=granularity, symmetric=symmetric, bits=bits, metadata=dict(metadata or {}),
                   k_transform=k_transform, k_basis=k_basis, k_weight=k_weight)

    def layer(self, i: int, num_kv_heads: int, head_dim: int) -> tuple[torch.Tensor, ...]:
        """Layer ``i``'s (k_scale, k_zp, v_scale, v_zp), each expanded to (num_kv_heads, head_dim) fp32."""
        return tuple(
            getattr(self, n)[i].float().expand(num_kv_heads, head_dim).contiguous() for n in _NAMES
        )

    def side(self, side: str, i: int, num_kv_heads: int, head_dim: int, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``i``'s (scale, zp) of ``side`` ('k'/'v') for ``bits``-bit codes, ``(num_kv_heads, head_dim)`` fp32.

        The file's scales are for its own ``bits``; the calibrated range is the same for any width, so the
        scale is rescaled by the ratio of code steps (asymmetric: 2^b - 1, symmetric: 2^(b-1) - 1).
        """
        steps = (lambda b: (1 << (b - 1)) - 1) if self.symmetric else (lambda b: (1 << b) - 1)
        scale = getattr(self, f"{side}_scale")[i].float() * (steps(self.bits) / steps(bits))
        zp = getattr(self, f"{side}_zp")[i].float()
        return scale.expand(num_kv_heads, head_dim).contiguous(), zp.expand(num_kv_heads, head_dim).contiguous()

    def absmax(self, side: str, i: int) -> float:
        """Layer ``i``'s largest calibrated magnitude of ``side`` over every head and channel (per-tensor scales).

        Symmetric files hold ``absmax / (2^(b-1) - 1)``; asymmetric ones ``zp = (min+max)/2`` and
        ``scale = (max-min)/(2^b - 1)``, so ``max |x| = |zp| + scale * (2^b - 1) / 2`` per channel.
        """
        scale = getattr(self, f"{side}_scale")[i].float()
        if self.symmetric:
            return float((scale * ((1 << (self.bits - 1)) - 1)).max())
        zp = getattr(self, f"{side}_zp")[i].float()
        return float((zp.abs() + scale * ((1 << self.bits) - 1) / 2).max())

    @property
    def qk_context(self) -> int | None:
        """The context length the key transform was fitted to (``--qk-context``, else the calibration windows'), or
        None when there is no transform or it is unknown."""
        if self.k_transform is None:
            return None
        return _positions(self.metadata.get("qk_context") or self.metadata.get("seqlen"))

    @property
    def calib_seqlen(self) -> int | None:
        """The length of the calibration windows (what static key ranges saw), or None when unknown."""
        return _positions(self.metadata.get("seqlen"))

    def qk_context_warning(self, context: int) -> str | None:
        """Why keys of a ``context``-token sequence may lose more late in it than early, with what to do, or None."""
        fitted = self.qk_context
        if fitted is None or context <= fitted:
            return None
        return (f"the key transform was fitted to {fitted} positions and this measures {context}: keys lose more late "
                f"in a longer context; export with `python -m calib kv_qparams WORK_DIR OUT --format kvq --qk-context "
                f"{context}` for figures (and a cache) fitted to it")

    def static_context_warning(self, context: int) -> str | None:
        """Why static key ranges calibrated on shorter windows clip keys of a ``context``-token sequence, or None."""
        seqlen = self.calib_seqlen
        if seqlen is None or context <= seqlen:
            return None
        return (f"static key ranges were calibrated on {seqlen}-token windows and this measures {context}: post-RoPE "
                f"keys past position {seqlen} leave the calibrated min/max and are clipped (static int8: +119% Δppl over "
                f"8K windows of the built-in model, see the README); calibrate with `--calib-seqlen {context}` or use "
                f"a per-token mode (int8-qk, int8-dynamic)")

    def check_matches(self, shape: KVShape, needs_transform: bool = False, needs_basis: bool = False) -> None:
        """Raise a readable error when these parameters were made for another model (or lack a needed transform)."""
        want_layers = shape.num_layers
        kvh, d = granularity_shape(self.granularity, shape.num_kv_heads, shape.head_dim)
        have = (self.num_layers, *self.shape)
        want = (want_layers, kvh, d)
        if have != want:
            raise QParamsError(
                f"qparams do not match the model: qparams have {have[0]} layers x {have[1:]} per layer "
                f"({self.granularity}), the model needs {want[0]} layers x {want[1:]} ({shape}); "
                "calibrate this model with `python -m calib calibrate` and export with `python -m calib kv_qparams`"
            )
        if needs_transform and self.k_transform is None:
            raise QParamsError(
                "these qparams carry no query-aware key transform (made by an older KVQ Studio, or from a work dir "
                "without query statistics): recalibrate with `python -m calib calibrate` and re-export with "
                "`python -m calib kv_qparams WORK_DIR OUT_DIR --format kvq`"
            )
        if needs_basis and self.k_basis is None:
            raise QParamsError(
                "these qparams carry no key eigenbasis for allocated bits (made by an older KVQ Studio): re-export "
                "them with `python -m calib kv_qparams WORK_DIR OUT_DIR --format kvq`"
            )
        want_t = (shape.num_kv_heads, shape.head_dim, shape.head_dim)
        for name, want_shape in (("k_transform", want_t), ("k_basis", want_t), ("k_weight", want_t[:2])):
            got = getattr(self, name)
            if got is not None and tuple(got[0].shape) != want_shape:
                raise QParamsError(f"the {name} tensors are {tuple(got[0].shape)} per layer, the model needs "
                                   f"{want_shape} ({shape}); recalibrate this model")

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        tensors = {f"layers.{i}.{n}": getattr(self, n)[i].float().contiguous() for n in _NAMES for i in range(self.num_layers)}
        for name in _OPTIONAL:
            for i, t in enumerate(getattr(self, name) or []):
                tensors[f"layers.{i}.{name}"] = t.float().contiguous()
        meta = {
            **{k: str(v) for k, v in self.metadata.items()},
            "format": FORMAT,
            "format_version": str(FORMAT_VERSION),
            "granularity": self.granularity,
            "symmetric": json.dumps(self.symmetric),
            "bits": str(self.bits),
            "num_layers": str(self.num_layers),
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path), metadata=meta)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "KVQParams":
        """Read a qparams file, or the folder ``kv_qparams --format kvq`` wrote it into."""
        path = resolve_path(path)
        try:
            with safe_open(str(path), "pt") as f:
                meta = dict(f.metadata() or {})
            tensors = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise QParamsError(f"{path} is not a readable safetensors qparams file ({e})") from None
        if meta.get("format") != FORMAT:
            raise QParamsError(f"{path} is not a KVQ qparams file (format={meta.get('format')!r}); export one with `--format kvq`")
        version = int(meta.get("format_version", "0"))
        if version > FORMAT_VERSION:
            raise QParamsError(f"{path} has format version {version}, newer than this tool reads ({FORMAT_VERSION}); upgrade KVQ Studio")
        n = int(meta["num_layers"])
        try:
            lists = {name: [tensors[f"layers.{i}.{name}"] for i in range(n)] for name in _NAMES}
        except KeyError as e:
            raise QParamsError(f"{path} is missing tensor {e.args[0]}; re-export it") from None
        for name in _OPTIONAL:
            if f"layers.0.{name}" in tensors:
                try:
                    lists[name] = [tensors[f"layers.{i}.{name}"] for i in range(n)]
                except KeyError as e:
                    raise QParamsError(f"{path} is missing tensor {e.args[0]}; re-export it") from None
        for name, ts in lists.items():
            for i, t in enumerate(ts):
                if not torch.isfinite(t).all():
                    raise QParamsError(f"{path}: layer {i} {name} has NaN or inf values; recalibrate")
        reserved = {"format", "format_version", "granularity", "symmetric", "bits", "num_layers"}
        return cls(
            **lists,
            granularity=meta["granularity"],
            symmetric=json.loads(meta["symmetric"]),
            bits=int(meta["bits"]),
            metadata={k: v for k, v in meta.items() if k not in reserved},
        )


def _positions(value: object) -> int | None:
    """A position count kept in the file's string metadata, or None when absent or not a number."""
    return int(value) if value and str(value).isdigit() else None


_EXPORT_HINT = "export one with `python -m calib kv_qparams WORK_DIR OUT_DIR --format kvq`"


def resolve_path(path: str | Path) -> Path:
    """The qparams file at ``path``: the file itself, or ``FILE_NAME`` inside a folder."""
    path = Path(path).expanduser()
    if path.is_file():
        return path
    if not path.is_dir():
        raise QParamsError(f"qparams file not found: {path}; {_EXPORT_HINT}")
    if (path / FILE_NAME).is_file():
        return path / FILE_NAME
    names = sorted(p.name for p in path.iterdir())
    if "key_stats.pth" in names:
        raise QParamsError(f"{path} is a calibration work dir, not exported parameters: run "
                           f"`python -m calib kv_qparams {path} OUT_DIR --format kvq` and pass OUT_DIR")
    held = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "") if names else "nothing"
    raise QParamsError(f"{path} holds no {FILE_NAME} (it holds {held}); {_EXPORT_HINT}")
