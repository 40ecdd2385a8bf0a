"""A copy of a Hugging Face model folder that vLLM serves with calibrated FP8 KV-cache scales, in one step.

What vLLM loads (its ``DefaultModelLoader._prepare_weights`` and ``filter_duplicate_safetensors_files``): with
the default ``--load-format auto``, every top-level ``*.safetensors`` file, but only those the
``model.safetensors.index.json`` ``weight_map`` names when that index exists; ``*.bin`` only when there is no
``*.safetensors`` at all; and only ``consolidated*.safetensors`` (Mistral's format) when such files exist.
So the scales go into a new ``kv_cache_scales.safetensors`` listed in the index (created when the model is a
single file), and ``consolidated*`` duplicates are left out of the copy.

The original folder is never written to: files are hard-linked (copied where linking fails), and each file
that changes (``config.json``, the index) is a new file in the copy, never a link. The copy is built in a
hidden folder next to OUT_DIR and renamed into place, so a failure leaves nothing half-made.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..workdir import CalibStats, check_model
from .common import ExportError, now, render, writing
from .vllm import (
    VLLM_DOC,
    VLLM_FILE,
    check_granularity,
    check_with_compressed_tensors,
    quantization_config,
    write_scales,
)

INDEX = "model.safetensors.index.json"
CONFIG = "config.json"
READY_README = "README_kvq_vllm.md"
_SCALE_SUFFIXES = (".k_scale", ".v_scale", ".kv_scale")
_NOT_COPIED_DIRS = {".git"}


@dataclass
class VLLMFolder:
    """What :func:`export_vllm_model` made: the folder, its new files, and how the rest got there."""

    out_dir: Path
    written: list[Path]
    linked: int = 0
    copied: int = 0
    left_out: list[str] = field(default_factory=list)
    compressed_tensors: str | None = None  # the version that parsed the config, None when not installed


@dataclass
class _Model:
    config: dict[str, Any]
    weight_map: dict[str, str]
    index: dict[str, Any] | None  # the original index, None when it has none
    total_size: int
    left_out: list[str]


def export_vllm_model(
    stats: CalibStats, model_dir: str | Path, out_dir: str | Path, *, granularity: str = "tensor"
) -> VLLMFolder:
    """Copy ``model_dir`` to ``out_dir`` with the scales merged in and ``config.json`` set for vLLM's FP8 KV cache.

    Everything is checked before anything is written: OUT_DIR new or empty and outside the model, the stats
    calibrated on this model, safetensors weights without KV scales, and a quantization config we can extend.
    """
    check_granularity(granularity)
    model, out = Path(model_dir).expanduser(), Path(out_dir).expanduser()
    _check_paths(model, out)
    check_model(stats, _hf_config(model))
    found = _read_model(model)
    new_config = {**found.config, "quantization_config": quantization_config(
        found.config.get("quantization_config"), granularity, where=str(model / CONFIG))}
    version = check_with_compressed_tensors(new_config["quantization_config"])
    for name in found.left_out:
        warnings.warn(f"{name} left out of the copy: with Mistral's consolidated files vLLM would load only those "
                      "and miss the scales; the Hugging Face shards hold the same weights", stacklevel=2)

    with writing(out):
        linked, copied, written = _build(stats, model, out, found, new_config, granularity)
    return VLLMFolder(out, [out / p.name for p in written], linked, copied, found.left_out, version)


def _build(stats: CalibStats, model: Path, out: Path, found: _Model, config: dict[str, Any],
           granularity: str) -> tuple[int, int, list[Path]]:
    """The copy, made in a hidden folder next to ``out`` and renamed into place; removed on any failure."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        linked, copied = _copy_tree(model, tmp, skip={CONFIG, INDEX, READY_README, *found.left_out})
        written = _write_new_files(stats, model, out, tmp, found, config, granularity, linked, copied)
        if out.exists():
            out.rmdir()  # empty (checked); the rename below puts the finished copy in its place
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return linked, copied, written


def _check_paths(model: Path, out: Path) -> None:
    if model.is_file() or not model.exists():
        what = "is a file" if model.is_file() else "does not exist"
        raise ExportError(
            f"--model {model} {what}: the vllm format needs the Hugging Face model folder (config.json and "
            "*.safetensors) the stats were calibrated on; leave out --model for the scales alone"
        )
    if not (model / CONFIG).is_file():
        raise ExportError(
            f"{model} is not a Hugging Face model folder (no config.json): give the folder the stats were calibrated on"
        )
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(
            f"OUT_DIR {out} exists and is not empty: give a new or empty folder (nothing was written)"
        )
    m, o = model.resolve(), out.resolve()
    if o == m or m in o.parents:
        raise ExportError(f"OUT_DIR {out} is inside the model folder {model}: put it elsewhere (the model is never written to)")


def _read_model(model: Path) -> _Model:
    """config.json, the weight map (from the index, or built from the safetensors headers) and what to leave out."""
    config = _read_json(model / CONFIG)
    if "compression_config" in config:
        raise ExportError(f"{model / CONFIG} has a compression_config (an older compressed-tensors layout): "
                          "resave the model with a current llm-compressor, or export for the unquantized model")
    files = sorted(p.name for p in model.glob("*.safetensors") if p.is_file())
    left_out = [f for f in files if f.startswith("consolidated")]
    shards = [f for f in files if f not in left_out]
    if not shards:
        if any(model.glob("*.bin")) or any(model.glob("*.pt")):
            raise ExportError(
                f"{model} has PyTorch .bin/.pt weights only: vLLM would then load just the added scales file (it "
                "prefers *.safetensors); resave the model as safetensors first (transformers: save_pretrained)"
            )
        raise ExportError(f"{model} has no *.safetensors weights: give a Hugging Face model folder with its weights")
    if VLLM_FILE in files:
        raise ExportError(f"{model} already has a {VLLM_FILE}: start from the model without KV-cache scales")
    left_out += [n for n in ("consolidated.safetensors.index.json",) if left_out and (model / n).exists()]
    index = _read_json(model / INDEX) if (model / INDEX).is_file() else None
    weight_map, total = _weight_map(model, shards, index)
    scales = [n for n in weight_map if n.endswith(_SCALE_SUFFIXES)]
    if scales:
        raise ExportError(f"{model} already holds KV-cache scales ({scales[0]} in {weight_map[scales[0]]}): "
                          "start from the model without them")
    return _Model(config, weight_map, index, total, left_out)


def _weight_map(model: Path, shards: list[str], index: dict[str, Any] | None) -> tuple[dict[str, str], int]:
    if index is not None:
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ExportError(f"{model / INDEX} has no weight_map: fix or remove the index")
        missing = sorted({f for f in weight_map.values() if not (model / f).is_file()})
        if missing:
            raise ExportError(f"{model / INDEX} lists {missing[0]}, which is not in the folder: complete the download")
        return dict(weight_map), int((index.get("metadata") or {}).get("total_size") or 0)
    weight_map, total = {}, 0
    for name in shards:
        for tensor, info in _safetensors_header(model / name).items():
            if tensor != "__metadata__":
                weight_map[tensor] = name
                total += info["data_offsets"][1] - info["data_offsets"][0]
    return weight_map, total


def _safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file (names, dtypes, offsets), read without loading any tensor."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            return json.loads(f.read(n))
    except (OSError, ValueError, struct.error) as exc:
        raise ExportError(f"{path} is not a readable safetensors file ({exc}): check the model download") from None


def _copy_tree(src: Path, dst: Path, skip: set[str]) -> tuple[int, int]:
    """Hard-link (else copy) every file of ``src`` into ``dst`` except the top-level names in ``skip``."""
    linked = copied = 0
    for root, dirs, files in os.walk(src):
        dirs[:] = [d for d in dirs if d not in _NOT_COPIED_DIRS]
        rel = Path(root).relative_to(src)
        (dst / rel).mkdir(parents=True, exist_ok=True)
        for name in files:
            if rel == Path(".") and name in skip:
                continue
            # A symlink (e.g. into the HF cache's blobs/) is resolved: os.link would link the symlink itself.
            source, target = os.path.realpath(Path(root) / name), dst / rel / name
            try:
                os.link(source, target)
                linked += 1
            except OSError:
                shutil.copy2(source, target)
                copied += 1
    return linked, copied


def _write_new_files(
    stats: CalibStats, model: Path, out: Path, tmp: Path, found: _Model, config: dict[str, Any],
    granularity: str, linked: int, copied: int,
) -> list[Path]:
    """The files that differ from the original, each created new (never through a link)."""
    scales = write_scales(stats, tmp / VLLM_FILE, granularity)
    added = {name: VLLM_FILE for name in _tensor_names(scales)}
    metadata = dict((found.index or {}).get("metadata") or {})
    metadata["total_size"] = found.total_size + sum(_sizes(scales))
    if "total_parameters" in metadata:  # transformers >= 5 writes it
        per_layer = 2 * (1 if granularity == "tensor" else stats.num_kv_heads)
        metadata["total_parameters"] = int(metadata["total_parameters"]) + stats.num_layers * per_layer
    index = {**(found.index or {}), "metadata": metadata, "weight_map": {**found.weight_map, **added}}
    _create(tmp / INDEX, json.dumps(index, indent=2) + "\n")
    _create(tmp / CONFIG, json.dumps(config, indent=2) + "\n")
    _create(tmp / READY_README, _readme(stats, model, out, found, config, granularity, linked, copied))
    return [scales, tmp / INDEX, tmp / CONFIG, tmp / READY_README]


def _tensor_names(path: Path) -> list[str]:
    return [n for n in _safetensors_header(path) if n != "__metadata__"]


def _sizes(path: Path) -> list[int]:
    header = _safetensors_header(path)
    return [v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__"]


def _create(path: Path, text: str) -> None:
    with open(path, "x", encoding="utf-8") as f:  # "x": fails rather than write into an existing (linked) file
        f.write(text)


def _readme(
    stats: CalibStats, model: Path, out: Path, found: _Model, config: dict[str, Any], granularity: str,
    linked: int, copied: int,
) -> str:
    facts = ", ".join(f"{k} {stats.meta[k]}" for k in ("dataset", "samples", "seqlen") if k in stats.meta)
    links = f" ({linked} hard links, {copied} copies)" if copied else f" (hard links: {linked} files)"
    links += "; a hard link shares its bytes with the original, so replace such a file rather than edit it in place"
    skipped = f"\n- Left out: {', '.join(found.left_out)} (vLLM would load only those)." if found.left_out else ""
    shape = "(1,)" if granularity == "tensor" else f"({stats.num_kv_heads},) (one per KV head)"
    return render(
        "README_kvq_vllm.md", model=stats.meta.get("model", model.name), source=model, out_dir=out, date=now(),
        work_dir=stats.work_dir or "the work dir", calibration=facts or "no calib_meta.json",
        scales_file=VLLM_FILE, num_layers=stats.num_layers, shape=shape,
        index_note="updated" if found.index is not None else "new: the model was one file",
        config_note="extended" if found.config.get("quantization_config") else "added",
        scheme=json.dumps(config["quantization_config"]["kv_cache_scheme"]), links_note=links,
        skipped_note=skipped, doc=VLLM_DOC,
    )


def _hf_config(model: Path) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise ExportError(f"could not read {model / CONFIG} ({_first(exc)})") from None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ExportError(f"{path} is not readable JSON ({_first(exc)}): fix or re-download it") from None
    if not isinstance(data, dict):
        raise ExportError(f"{path} is not a JSON object: fix or re-download it")
    return data


def _first(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
