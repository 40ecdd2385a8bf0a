"""KVQ Studio's quantized KV cache: math, block storage, transformers cache, kernels."""

from .block_pool import BlockPool, KVCacheFull
from .cache import KVMemory, PagedKVCache
from .kv_shape import KVShape, config_hash
from .modes import KV_MODES, KVMode, get_mode, parse_modes
from .qparams import KVQParams, QParamsError

__all__ = [
    "BlockPool", "KVCacheFull", "KVMemory", "PagedKVCache", "KVShape", "config_hash",
    "KV_MODES", "KVMode", "get_mode", "parse_modes", "KVQParams", "QParamsError",
]
