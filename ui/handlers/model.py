"""The model bar: what is loaded, loading another model (only under allowed roots, and Hub ids only when allowed,
when served beyond localhost)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from kvcache.config import parse_pool_setting
from kvcache.errors import ModelLoadError, one_line

from ..state import AppState, UserError
from .common import empty_cuda_cache

logger = logging.getLogger(__name__)


def model_status(app: AppState) -> str:
    m = app.loaded
    if m is None:
        why = f" Last attempt: {app.load_error}" if app.load_error else ""
        return f"**No model loaded.**{why}"
    text = (
        f"**{m.name}** on `{m.device}` ({str(m.dtype).removeprefix('torch.')}) · {m.num_layers} layers · "
        f"{m.num_kv_heads} KV heads · head_dim {m.head_dim}"
    )
    if app.load_error:
        text = f"⚠️ {app.load_error} — still serving the previous model.\n\n{text}"
    notes = "".join(f"\n\nℹ️ {n}" for n in getattr(m, "notes", ()))  # a sliding window that caps the context
    return f"{text} · {pool_status(app)}{notes}"


def load_model(app: AppState, path: str, cache_max_entry_count: str | float | None = None) -> str:
    """Load ``path`` ('default', a local HF folder, a .gguf or a Hub id) for everyone; on failure the old model stays.

    ``cache_max_entry_count``: the KV pools' size, applied after the weights load (0 or None: grow on demand).
    """
    from kvcache.models.loader import load_model as _load

    path = (path or "").strip() or "default"
    check_model_path(app, path)
    pool = parse_pool_setting(cache_max_entry_count)
    with app.load_lock:
        try:
            loaded = _load(path, device=app.device, dtype=app.dtype, allow_download=True)  # never while HF_HUB_OFFLINE is set
        except ModelLoadError as exc:
            app.load_error = str(exc)
            raise UserError(f"Could not load {path}: {exc}. The previous model stays loaded.") from None
        except torch.OutOfMemoryError:
            app.load_error = f"out of memory loading {path}"
            empty_cuda_cache()
            raise UserError(f"Out of memory loading {path}: the previous model stays loaded.") from None
        except Exception as exc:  # a broken checkpoint must not take the app down
            logger.exception("loading %s failed", path)
            app.load_error = f"{type(exc).__name__}: {one_line(exc)}"
            raise UserError(f"Could not load {path} ({app.load_error}). The previous model stays loaded.") from None
        app.replace_model(loaded, pool)
        app.model_path = path
    return model_status(app)


def check_model_path(app: AppState, path: str) -> None:
    """Served beyond localhost, the Model box opens only 'default', folders under the operator's ``--model-root``s
    and, with ``--allow-hub``, Hub ids. A name that exists here is a path (the loader takes the local folder first)."""
    from kvcache.models.hub import names_hub_model

    if app.model_roots is None or path == "default":
        return
    if names_hub_model(path):
        if not app.takes_hub_ids:
            raise UserError(f"This server does not load models from the Hugging Face Hub ({path}); its operator can "
                            "allow it with --allow-hub. Folders under --model-root and 'default' work.")
        return
    where = Path(path).expanduser().resolve()
    if not any(where == root or where.is_relative_to(root) for root in app.model_roots):
        roots = ", ".join(str(r) for r in app.model_roots) or "none"
        raise UserError(f"This server opens models only under the folders its operator allowed (--model-root: {roots}); "
                        "'default' always works.")


def pool_setting(app: AppState) -> str:
    """The pool size as the model bar shows it: '' (grow on demand), a fraction, or a number of blocks."""
    fraction, blocks = app.pool_size
    return f"{blocks} blocks" if blocks is not None else "" if fraction is None else str(fraction)


def pool_status(app: AppState) -> str:
    """The KV pools' size setting, in a few words (their use is on the Memory tab's gauges)."""
    fraction, blocks = app.pool_size
    if blocks is not None:
        return f"KV pools: shared, {blocks} blocks each"
    return "KV pools: shared, growing on demand" if fraction is None else f"KV pools: shared, cache_max_entry_count={fraction}"


