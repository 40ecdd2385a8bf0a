"""KVQ Studio's quantized KV cache: the math, block storage, the transformers cache, kernels, the engine.

The public surface scripts use::

    from kvcache import load_model, PagedKVCache
    loaded = load_model("default")
    cache = PagedKVCache.for_model(loaded.model, "int8-dynamic")
    loaded.model.generate(ids, past_key_values=cache)
"""

from .config import EngineConfig
from .engine.chat import ChatSession, GenerationConfig
from .engine.engine import Engine
from .errors import (ConfigError, ContextTooLong, EvalError, KVCacheFull, KVQError, ModeError, ModelLoadError,
                     QParamsError, WorkerClosed)
from .hf.cache import PagedKVCache
from .models.loader import LoadedModel, load_model
from .modes import KV_MODES, KVMode, get_mode, parse_modes
from .qparams import KVQParams
from .storage.block_pool import BlockPool, KVMemory
from .shape import KVShape, config_hash

__all__ = [
    "EngineConfig", "ChatSession", "GenerationConfig", "Engine", "ConfigError", "ContextTooLong", "EvalError",
    "KVCacheFull", "KVQError", "ModeError", "ModelLoadError", "QParamsError", "WorkerClosed", "PagedKVCache",
    "LoadedModel", "load_model", "KV_MODES", "KVMode", "get_mode", "parse_modes", "KVQParams", "BlockPool",
    "KVMemory", "KVShape", "config_hash",
]
