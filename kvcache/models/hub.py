"""A model by its Hub id (``Qwen/Qwen2.5-7B-Instruct``) -> a folder in the local Hugging Face cache.

Resolved as transformers users expect: the cached snapshot of the revision when it is there (no network, so
``HF_HUB_OFFLINE=1`` works); else a download with huggingface_hub's progress bar, only when the caller allows it
and ``HF_HUB_OFFLINE`` is unset, after checking the cache's disk has room; else one line that says what to do.
The cache is huggingface_hub's own (``HF_HUB_CACHE``, or ``HF_HOME``/hub), so ``hf download`` fills it too.
A local path of the same name wins over the id (:func:`names_hub_model`, which the loader and the app both ask).
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

import huggingface_hub as hf
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.file_download import repo_folder_name
from huggingface_hub.utils import validate_repo_id

from ..errors import ModelLoadError, one_line
from . import internlm

logger = logging.getLogger(__name__)

# Weight formats transformers does not load here (or that a safetensors copy makes redundant): never downloaded;
# nor are subfolders (original/, onnx/) or Mistral's consolidated.* copy of the weights (its own format).
_OTHER_FORMATS = (".gguf", ".onnx", ".onnx_data", ".msgpack", ".h5", ".ot", ".tflite", ".mlmodel", ".pt", ".pth",
                  ".ckpt", ".nemo")
_GB = 1e9


def is_hub_id(model: str) -> bool:
    """``ORG/NAME`` as the Hub spells repo ids (a path that does not exist may still read as one)."""
    if model.count("/") != 1 or model.startswith((".", "/", "~")):
        return False
    try:
        validate_repo_id(model)
    except HFValidationError:
        return False
    return True


def names_hub_model(model: str) -> bool:
    """Whether the loader takes ``model`` from the Hub: nothing of that name here (a local path wins), and a Hub id."""
    return not Path(model).expanduser().exists() and is_hub_id(model)


def cache_dir() -> Path:
    """huggingface_hub's model cache: ``HF_HUB_CACHE``, else ``HF_HOME``/hub, else ~/.cache/huggingface/hub."""
    return Path(hf.constants.HF_HUB_CACHE)


def snapshot_folder(model_id: str, revision: str | None = None, *, allow_download: bool = False) -> Path:
    """The folder of ``model_id`` at ``revision`` (default: main): cached, else downloaded when allowed and online."""
    cached, missing = _cached(model_id, revision)
    if cached is not None and missing is None:
        return cached
    offline = hf.constants.HF_HUB_OFFLINE
    if offline or not allow_download:
        fetch = f"`hf download {model_id}{_rev_flag(revision)}`"
        why = "HF_HUB_OFFLINE is set" if offline else "this call does not download (allow_download=False)"
        fix = " or unset HF_HUB_OFFLINE" if offline else ""
        where = (f"is only partly in the Hugging Face cache ({cached}: {missing})" if cached is not None else
                 f"is not a local folder and not in the Hugging Face cache (HF_HUB_CACHE={cache_dir()}"
                 f"{', revision ' + revision if revision else ''})")
        raise ModelLoadError(f"model {model_id} {where}, and {why}: download it first with {fetch}{fix}")
    return _download(model_id, revision)


def _rev_flag(revision: str | None) -> str:
    return f" --revision {revision}" if revision else ""


def _cached(model_id: str, revision: str | None) -> tuple[Path | None, str | None]:
    """The cached snapshot folder holding config.json (None: not cached) and what it lacks to load (None: nothing).
    No network: huggingface_hub resolves the revision through the cache's refs."""
    try:
        config = hf.try_to_load_from_cache(model_id, "config.json", revision=revision)
    except (HFValidationError, OSError, ValueError):  # a damaged cache is the same as no cache here
        return None, None
    if not isinstance(config, str):
        return None, None
    folder = Path(config).parent
    try:
        internlm.weight_files(folder)  # safetensors or .bin, every shard an index names
    except internlm.ConversionError:
        return folder, "no complete weights"
    return folder, None


def _download(model_id: str, revision: str | None) -> Path:
    """Download the files the loader reads (one weight format), after checking the cache's disk has room."""
    with _hub_errors(model_id, revision):
        info = hf.HfApi().model_info(model_id, revision=revision, files_metadata=True)
    files = _files_to_fetch({s.rfilename: s.size or 0 for s in info.siblings or []})
    if not any(name.endswith((".safetensors", ".bin")) for name in files):
        raise ModelLoadError(
            f"{model_id} has no transformers weights (safetensors or .bin) on the Hugging Face Hub: for a GGUF repo, "
            f"download one file (`hf download {model_id} FILE.gguf`) and pass its path"
        )
    _check_disk_space(model_id, info.sha, files)
    logger.info("downloading %s (%s) into %s", model_id, info.sha, cache_dir())
    with _hub_errors(model_id, revision):  # pinned to the commit whose sizes were checked
        return Path(hf.snapshot_download(model_id, revision=info.sha, allow_patterns=list(files)))


# The HTTP library's base error (httpx's or requests', by huggingface_hub version): a connection that failed.
_TRANSPORT_ERRORS = (OSError, *(c for c in HfHubHTTPError.__mro__ if c.__name__ == "HTTPError"))


@contextlib.contextmanager
def _hub_errors(model_id: str, revision: str | None) -> Iterator[None]:
    """The Hub's refusals and a failed connection as one line each that says what to do."""
    try:
        yield
    except GatedRepoError:
        raise ModelLoadError(
            f"{model_id} is gated on the Hugging Face Hub: accept its terms at https://huggingface.co/{model_id} "
            "and log in (`hf auth login` or HF_TOKEN), then load it again"
        ) from None
    except RepositoryNotFoundError:
        raise ModelLoadError(
            f"{model_id} is neither a local folder nor a model on the Hugging Face Hub (or it is private): "
            "check the name, or log in (`hf auth login` or HF_TOKEN) if it is yours"
        ) from None
    except RevisionNotFoundError:
        raise ModelLoadError(
            f"{model_id} has no revision '{revision or 'main'}' on the Hugging Face Hub: pass a branch, tag or commit "
            "it has (--revision)"
        ) from None
    except _TRANSPORT_ERRORS as exc:  # the Hub unreachable or failing, a full disk mid-download
        raise ModelLoadError(
            f"could not download {model_id} ({one_line(exc)}): check the "
            f"connection and retry, or download it first with `hf download {model_id}{_rev_flag(revision)}`"
        ) from None


def _files_to_fetch(sizes: dict[str, int]) -> dict[str, int]:
    """The repo's top-level files the loader can read: safetensors weights when there are any, else ``.bin``."""
    top = {name: size for name, size in sizes.items()
           if "/" not in name and not name.endswith(_OTHER_FORMATS) and not name.startswith("consolidated.")}
    if any(name.endswith(".safetensors") for name in top):
        top = {name: size for name, size in top.items()
               if not (name.endswith(".bin") or name == "pytorch_model.bin.index.json")}
    return top


def _check_disk_space(model_id: str, commit: str | None, files: dict[str, int]) -> None:
    """Refuse a download the cache's disk cannot hold (files of a partial snapshot already there do not count)."""
    snapshot = cache_dir() / repo_folder_name(repo_id=model_id, repo_type="model") / "snapshots" / (commit or "")
    need = sum(size for name, size in files.items() if not (commit and (snapshot / name).is_file()))
    where = cache_dir()
    while not where.exists() and where != where.parent:
        where = where.parent
    free = shutil.disk_usage(where).free
    if need > free:
        raise ModelLoadError(
            f"{model_id} needs {need / _GB:.1f} GB but the Hugging Face cache (HF_HUB_CACHE={cache_dir()}) has "
            f"{free / _GB:.1f} GB free: free some space, or point HF_HUB_CACHE at a bigger disk"
        )
