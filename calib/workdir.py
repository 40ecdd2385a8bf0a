"""The calibration work dir: what calibrate writes (and how it swaps it in), and the reader export uses.

A work dir holds ``key_stats.pth`` and ``value_stats.pth``: ``torch.save`` of
``{stat: {layer name: tensor (num_kv_heads, head_dim)}}`` for the stats ``min``, ``max`` and
``absmax``. Ours also holds ``key_stats_pre_rope.pth``, ``inputs_stats.pth``, ``outputs_stats.pth``
and ``calib_meta.json`` (model, config hash, dataset, ...). LMDeploy's ``lite calibrate`` writes the
same two ``.pth`` files (its ``collect_kv_stats``) but no meta file, so its work dirs load too; the
model they came from can then be checked by KV shape only.

Writing goes to a temporary folder next to the work dir, swapped in at the end, so a failed or
cancelled run leaves a previous work dir as it was; a folder holding anything else is refused.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kvcache.measure.overlap import sketch_to_text
from kvcache.shape import KVShape, config_hash

from .errors import CalibError, CalibStatsError

KEY_STATS_FILE = "key_stats.pth"
VALUE_STATS_FILE = "value_stats.pth"
META_FILE = "calib_meta.json"
# The newest calib_meta.json format this reader understands.
META_FORMAT_VERSION = 1
STATS = ("min", "max", "absmax")
KEY_STATS_PRE_ROPE_FILE = "key_stats_pre_rope.pth"
INPUTS_STATS_FILE = "inputs_stats.pth"
OUTPUTS_STATS_FILE = "outputs_stats.pth"
QK_MOMENTS_FILE = "qk_moments.pth"  # ours only: E[k k^T], E[q q^T] per layer and KV head (the key transform)
WORK_DIR_FILES = (
    KEY_STATS_FILE, VALUE_STATS_FILE, KEY_STATS_PRE_ROPE_FILE, INPUTS_STATS_FILE, OUTPUTS_STATS_FILE,
    QK_MOMENTS_FILE, META_FILE,
)

_CALIBRATE_HINT = "run `python -m calib calibrate MODEL --work-dir {dir}` first"
_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)(?:\.|$)")


# --- writing -------------------------------------------------------------------------------------


def check_work_dir(work_dir: str | Path) -> Path:
    """The resolved work dir, refused when replacing it as a whole would damage something (a file, the
    current directory, a folder holding other files) or when its parent cannot be written."""
    work_dir = Path(work_dir).expanduser().resolve()
    if work_dir.exists() and not work_dir.is_dir():
        raise CalibError(f"work dir {work_dir} is a file: choose a folder with --work-dir")
    if work_dir.is_dir():
        cwd = Path.cwd().resolve()
        if cwd == work_dir or work_dir in cwd.parents:
            raise CalibError(f"work dir {work_dir} holds the current directory: choose a new folder with --work-dir")
        foreign = sorted(p.name for p in work_dir.iterdir() if p.name not in WORK_DIR_FILES)
        if foreign:
            shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
            raise CalibError(
                f"work dir {work_dir} holds files that are not calibration output ({shown}); it is replaced as a "
                "whole when calibration ends: choose an empty or new folder with --work-dir"
            )
    parent = work_dir.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CalibError(f"cannot create {parent} for the work dir ({exc.strerror or exc}): choose another "
                         "--work-dir") from exc
    if not os.access(parent, os.W_OK):
        raise CalibError(f"cannot write next to the work dir: {parent} is not writable; choose another --work-dir")
    return work_dir


def write_work_dir(work_dir: Path, files: dict[str, Any]) -> None:
    """Write ``files`` (``.json``: JSON, else ``torch.save``) into a temporary folder next to ``work_dir``, then
    swap it in (the old one renamed aside, then removed). A disk that fills up is a :class:`CalibError`."""
    try:
        _swap_in(work_dir, files)
    except OSError as exc:
        raise CalibError(f"cannot write the work dir {work_dir} ({exc.strerror or exc}): free disk space or "
                         "choose another --work-dir; a previous work dir is as it was") from exc


def _swap_in(work_dir: Path, files: dict[str, Any]) -> None:
    tmp = Path(tempfile.mkdtemp(prefix=f".{work_dir.name}.tmp-", dir=work_dir.parent))
    try:
        for name, obj in files.items():
            if name.endswith(".json"):
                (tmp / name).write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
            else:
                torch.save(obj, tmp / name)
        old = None
        if work_dir.exists():
            old = work_dir.parent / f".{work_dir.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(work_dir, old)
        try:
            os.rename(tmp, work_dir)
        except BaseException:
            if old is not None:
                os.rename(old, work_dir)
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# --- reading -------------------------------------------------------------------------------------


@dataclass
class CalibStats:
    """K/V statistics per layer, in layer order: ``key_stats["max"][i]`` is layer i's (num_kv_heads, head_dim)."""

    key_stats: dict[str, list[torch.Tensor]]
    value_stats: dict[str, list[torch.Tensor]]
    layer_names: list[str]
    meta: dict[str, Any] = field(default_factory=dict)
    work_dir: Path | None = None
    key_moments: list[torch.Tensor] | None = None  # per layer [kv_heads, d, d] float64: E[k k^T] (after RoPE)
    query_moments: list[torch.Tensor] | None = None  # per layer: E[q q^T], a KV head's query heads averaged
    rope_inv_freq: torch.Tensor | None = None  # [head_dim / 2] float64: the model's RoPE frequencies (with the moments)

    @property
    def has_meta(self) -> bool:
        return bool(self.meta)

    @property
    def num_layers(self) -> int:
        return len(self.layer_names)

    @property
    def num_kv_heads(self) -> int:
        return self.key_stats["max"][0].shape[0]

    @property
    def head_dim(self) -> int:
        return self.key_stats["max"][0].shape[1]

    def shape_str(self) -> str:
        return f"{self.num_layers} layers x {self.num_kv_heads} KV heads x head_dim {self.head_dim}"

    def text_sketch(self) -> dict[str, str]:
        """``{"text_sketch": ...}``: the calibration text's n-gram sketch, for an evaluation's overlap check."""
        sketch = self.meta.get("text_sketch")
        return {"text_sketch": sketch_to_text(sketch)} if isinstance(sketch, dict) else {}

    def metadata(self) -> dict[str, str]:
        """The calibration facts worth copying into exported files (those the meta file has)."""
        keys = ("model", "config_hash", "dataset", "samples", "seqlen", "date")
        out = {k: str(self.meta[k]) for k in keys if self.meta.get(k) is not None}
        if not self.has_meta:
            out["source"] = "lmdeploy work dir (no calib_meta.json)"
        return out


def load_work_dir(work_dir: str | Path) -> CalibStats:
    """Load ``key_stats.pth``/``value_stats.pth`` (and ``calib_meta.json`` when present) from ``work_dir``."""
    path = Path(work_dir)
    hint = _CALIBRATE_HINT.format(dir=path)
    if not path.is_dir():
        raise CalibStatsError(f"calibration work dir {path} not found: {hint}")
    missing = [n for n in (KEY_STATS_FILE, VALUE_STATS_FILE) if not (path / n).is_file()]
    if missing:
        raise CalibStatsError(f"{path} has no {' or '.join(missing)}: {hint}")

    key_raw = _load_pth(path / KEY_STATS_FILE)
    value_raw = _load_pth(path / VALUE_STATS_FILE)
    names = _layer_order(key_raw, path / KEY_STATS_FILE)
    value_names = _layer_order(value_raw, path / VALUE_STATS_FILE)
    if set(names) != set(value_names):
        raise CalibStatsError(
            f"{path}: key_stats.pth and value_stats.pth cover different layers "
            f"({len(names)} vs {len(value_names)}); they are not from the same run: recalibrate"
        )
    key_stats = _to_lists(key_raw, names, "key", path)
    value_stats = _to_lists(value_raw, names, "value", path)
    _check_shapes(key_stats, value_stats, names, path)

    meta: dict[str, Any] = {}
    meta_file = path / META_FILE
    if meta_file.is_file():
        meta = _load_meta(meta_file)
    else:
        warnings.warn(
            f"{path} has no {META_FILE} (an LMDeploy work dir?): the model it was calibrated on cannot be "
            "checked, only its KV shape",
            stacklevel=2,
        )
    stats = CalibStats(key_stats, value_stats, names, meta, path)
    if meta:
        _check_meta_shape(stats, meta_file)
    if (path / QK_MOMENTS_FILE).is_file():
        stats.key_moments, stats.query_moments, stats.rope_inv_freq = _load_moments(path / QK_MOMENTS_FILE, names, stats)
    return stats


def _load_moments(
    file: Path, names: list[str], stats: CalibStats
) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor | None]:
    """The per-layer second moments, in layer order, checked against the K/V stats' shape, and the RoPE frequencies.

    Work dirs calibrated before the frequencies were recorded have none: their key transform fits the
    calibration windows' positions only.
    """
    raw = _load_pth(file)
    want = (stats.num_kv_heads, stats.head_dim, stats.head_dim)
    out = []
    for which in ("key", "query"):
        by_name = raw.get(which) if isinstance(raw, dict) else None
        if not isinstance(by_name, dict) or set(map(str, by_name)) != set(names):
            raise CalibStatsError(f"{file} does not cover the layers of key_stats.pth: the work dir mixes runs; recalibrate")
        moments = [by_name[n].double() for n in names]
        if any(tuple(m.shape) != want or not torch.isfinite(m).all() for m in moments):
            raise CalibStatsError(f"{file}: {which} moments are not finite {want} tensors per layer; recalibrate")
        out.append(moments)
    inv_freq = raw.get("rope_inv_freq")
    if inv_freq is not None:
        inv_freq = torch.as_tensor(inv_freq).double()
        if tuple(inv_freq.shape) != (stats.head_dim // 2,) or not torch.isfinite(inv_freq).all():
            raise CalibStatsError(f"{file}: rope_inv_freq is not {stats.head_dim // 2} finite frequencies; recalibrate")
    return out[0], out[1], inv_freq


def check_model(stats: CalibStats, config: Any) -> None:
    """Raise when ``stats`` were not calibrated on the model with this transformers ``config``."""
    shape = KVShape.from_config(config)
    where = stats.work_dir or "the work dir"
    if (shape.num_layers, shape.num_kv_heads, shape.head_dim) != (stats.num_layers, stats.num_kv_heads, stats.head_dim):
        raise CalibStatsError(
            f"the stats in {where} are from another model: they have {stats.shape_str()}, the model has {shape}; "
            "calibrate this model with `python -m calib calibrate MODEL`"
        )
    want = stats.meta.get("config_hash")
    if want is None:
        return  # LMDeploy work dir: already warned at load that only the shape can be checked
    have = config_hash(config)
    if str(want) != have:
        made_on = stats.meta.get("model", "another model")
        raise CalibStatsError(
            f"the stats in {where} are from another model: calibrated on {made_on} (config hash {want}), "
            f"this model's config hash is {have}; calibrate this model with `python -m calib calibrate MODEL`"
        )


def _load_pth(file: Path) -> Any:
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load raises many types for a damaged file; all mean the same here
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CalibStatsError(
            f"{file} is corrupt or not a stats file ({reason[:160]}): rerun `python -m calib calibrate`"
        ) from None


def _layer_order(raw: Any, file: Path) -> list[str]:
    """The layer names, ordered by the index in the name (``model.layers.3.self_attn`` -> 3) where all have one."""
    if not isinstance(raw, dict):
        raise CalibStatsError(f"{file} is not a stats file (holds a {type(raw).__name__}, not a dict): recalibrate")
    missing = [s for s in STATS if s not in raw]
    if missing:
        raise CalibStatsError(f"{file} lacks the stat(s) {', '.join(missing)} (has {', '.join(map(str, raw))}): recalibrate")
    layers = raw["max"]
    if not isinstance(layers, dict) or not layers:
        raise CalibStatsError(f"{file} has no layers under 'max': recalibrate")
    names = [str(n) for n in layers]
    for s in STATS:
        if not isinstance(raw[s], dict) or set(map(str, raw[s])) != set(names):
            raise CalibStatsError(f"{file}: stat '{s}' does not cover the same layers as 'max': recalibrate")
    indices = [_LAYER_INDEX.search(n) for n in names]
    if all(indices):
        idx = [int(m.group(1)) for m in indices]  # type: ignore[union-attr]
        if len(set(idx)) == len(idx):
            names = [n for _, n in sorted(zip(idx, names))]
    return names


def _to_lists(raw: dict, names: list[str], which: str, path: Path) -> dict[str, list[torch.Tensor]]:
    out: dict[str, list[torch.Tensor]] = {}
    for s in STATS:
        by_name = {str(k): v for k, v in raw[s].items()}
        tensors = []
        for i, name in enumerate(names):
            t = by_name[name]
            if not isinstance(t, torch.Tensor) or t.dim() != 2:
                got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise CalibStatsError(
                    f"{path}: {which} stat '{s}' of layer {i} ({name}) is {got}, not a (num_kv_heads, head_dim) tensor: "
                    "recalibrate"
                )
            t = t.detach().float()
            if not torch.isfinite(t).all():
                raise CalibStatsError(
                    f"{path}: {which} stat '{s}' of layer {i} ({name}) has NaN or inf values "
                    "(overflow in the model, or a layer that saw no tokens): recalibrate, e.g. in fp32 or bf16"
                )
            tensors.append(t)
        out[s] = tensors
    return out


def _check_shapes(key_stats: dict, value_stats: dict, names: list[str], path: Path) -> None:
    want = tuple(key_stats["max"][0].shape)
    for which, stats in (("key", key_stats), ("value", value_stats)):
        for s in STATS:
            for i, t in enumerate(stats[s]):
                if tuple(t.shape) != want:
                    raise CalibStatsError(
                        f"{path}: inconsistent shapes: {which} stat '{s}' of layer {i} ({names[i]}) is "
                        f"{tuple(t.shape)}, layer 0's key 'max' is {want}: the work dir mixes runs; recalibrate"
                    )
        for i in range(len(names)):
            if (stats["min"][i] > stats["max"][i]).any():
                raise CalibStatsError(
                    f"{path}: {which} stats of layer {i} ({names[i]}) have min > max: the stats are damaged; recalibrate"
                )


def _load_meta(meta_file: Path) -> dict[str, Any]:
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CalibStatsError(f"{meta_file} is unreadable ({exc}): rerun `python -m calib calibrate`") from None
    if not isinstance(meta, dict):
        raise CalibStatsError(f"{meta_file} is not a JSON object: rerun `python -m calib calibrate`")
    version = meta.get("format_version", 1)
    if not isinstance(version, int) or version > META_FORMAT_VERSION:
        raise CalibStatsError(
            f"{meta_file} has format version {version!r}, newer than this tool reads ({META_FORMAT_VERSION}): "
            "upgrade KVQ Studio"
        )
    return meta


def _check_meta_shape(stats: CalibStats, meta_file: Path) -> None:
    have = {"num_layers": stats.num_layers, "num_kv_heads": stats.num_kv_heads, "head_dim": stats.head_dim}
    for key, value in have.items():
        if key in stats.meta and stats.meta[key] != value:
            raise CalibStatsError(
                f"{meta_file} says {key}={stats.meta[key]} but the stats have {value} ({stats.shape_str()}): "
                "the work dir mixes runs; recalibrate"
            )
