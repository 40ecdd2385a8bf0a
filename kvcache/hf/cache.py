"""A transformers ``Cache`` whose K/V live in blocks of a :class:`BlockPool`, quantized per the KV mode.

``update()`` stores the new tokens (quantized on write) where the step's :class:`StepContext` says and
hands attention a :class:`PagedView` instead of K/V tensors: attention then reads the stored format
itself, so there is never an fp16 copy of a quantized history. Models must run with the ``kvq``
attention implementation (:mod:`kvcache.hf.attention`), which the model loader selects.

One class serves both callers. In ``model.generate(ids, past_key_values=cache)`` the cache owns one
block table per batch row (all rows equally long) and builds each forward's context itself, at layer 0.
Under the engine's scheduler the sequences own their block tables and the scheduler sets the context
around each forward (``begin_step``/``end_step``); rows then keep their own lengths.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from ..codec import kv_float_dtype
from ..config import BASELINE_MODE
from ..errors import ConfigError
from ..kernels import store_kv
from ..modes import get_mode
from ..qparams import KVQParams
from ..storage.block_pool import BlockPool, KVMemory
from ..storage.context import StepContext
from ..storage.layout import LayerKV
from ..storage.maps import map_kv
from ..shape import KVShape


@dataclass
class PagedView:
    """What ``update()`` returns in place of K/V: the layer's storage and the step's context."""

    storage: LayerKV
    context: StepContext


class PagedLayer(CacheLayerMixin):
    is_sliding = False
    is_compileable = False

    def __init__(self, cache: "PagedKVCache", layer_idx: int):
        super().__init__()
        self.cache, self.layer_idx = cache, layer_idx

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device, self.is_initialized = key_states.device, True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> tuple[PagedView, PagedView]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        b, kvh, q, d = key_states.shape
        ctx = self.cache.step_context(self.layer_idx, b, q)
        storage = self.cache.pool.layers[self.layer_idx]
        key_states, value_states = map_kv(storage, key_states, value_states)
        flat = lambda x: x.transpose(1, 2).reshape(b * q, kvh, d)  # noqa: E731
        store_kv(storage, flat(key_states), flat(value_states), ctx.slots)
        view = PagedView(storage, ctx)
        return view, view

    def get_mask_sizes(self, query_length: int, *args) -> tuple[int, int]:
        return self.cache.mask_kv_length(query_length), 0

    def get_seq_length(self) -> int:
        return self.cache.seq_length()

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        pass  # the cache frees the blocks

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("PagedKVCache does not support beam search; use greedy decoding or sampling")

    def crop(self, *args) -> None:
        raise NotImplementedError("PagedKVCache does not support crop(); use PagedKVCache.truncate(num_tokens)")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("PagedKVCache does not support num_return_sequences > 1")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("PagedKVCache does not support selecting batch rows")


def _free_tables(pool: BlockPool, tables: list[list[int]]) -> None:
    for table in tables:
        pool.free(table)
    tables.clear()


class PagedKVCache(Cache):
    """Block-based KV cache for ``model.generate(ids, past_key_values=cache)`` and for the engine's scheduler."""

    def __init__(self, pool: BlockPool):
        self.pool = pool
        self.block_tables: list[list[int]] = []  # generate() use: one per batch row; changed in place only
        self.num_tokens = 0  # generate() use: tokens stored per row
        self.context: StepContext | None = None  # set by a scheduler around each forward
        self._own: StepContext | None = None  # generate() use: this forward's context, built at layer 0
        # A cache dropped without reset() still gives its blocks back (a shared pool outlives its caches).
        weakref.finalize(self, _free_tables, pool, self.block_tables)
        super().__init__(layers=[PagedLayer(self, i) for i in range(pool.shape.num_layers)])

    @classmethod
    def for_model(
        cls,
        model: Any,
        kv: str = BASELINE_MODE,
        *,
        qparams: KVQParams | str | None = None,
        block_size: int | None = None,
        fp_dtype: torch.dtype | None = None,
        num_blocks: int = 0,
        growable: bool = True,
    ) -> "PagedKVCache":
        """A cache shaped for ``model`` (a transformers model) in KV mode ``kv``, its floats in ``fp_dtype``
        (default: the model's 16-bit dtype, :func:`kvcache.codec.kv_float_dtype`)."""
        if isinstance(qparams, str):
            qparams = KVQParams.load(qparams)
        mode = get_mode(kv)
        mode.check_model(model.config)
        pool = BlockPool(
            mode, KVShape.from_config(model.config), block_size=block_size, num_blocks=num_blocks,
            growable=growable, device=model.device, fp_dtype=fp_dtype or kv_float_dtype(model.dtype),
            qparams=qparams if mode.reads_qparams else None,
        )
        return cls(pool)

    @property
    def kv(self) -> str:
        return self.pool.mode.name

    # --- the step context -----------------------------------------------------------------------
    def begin_step(self, context: StepContext) -> None:
        """A scheduler's forward starts: every layer stores and attends where ``context`` says."""
        self.context = context

    def end_step(self) -> None:
        self.context = None

    def step_context(self, layer_idx: int, batch: int, num_new: int) -> StepContext:
        """The context of the forward in progress (a layer's update asks for it)."""
        ctx = self.context
        if ctx is None:
            if layer_idx == 0:
                self._own = self._next_context(batch, num_new)
            ctx = self._own
        if ctx is None or (ctx.batch, ctx.num_new) != (batch, num_new):
            raise RuntimeError(f"PagedKVCache: layer {layer_idx} got {batch} rows of {num_new} tokens, not what this "
                               "step's context holds (a scheduler must call begin_step() for each forward)")
        return ctx

    def _next_context(self, batch: int, num_new: int) -> StepContext:
        """generate() use: allocate blocks for ``num_new`` more tokens per owned row; the tokens count as stored."""
        if not self.block_tables:
            self.block_tables.extend([] for _ in range(batch))
        elif len(self.block_tables) != batch:
            raise ConfigError(f"this cache holds {len(self.block_tables)} sequences, the input has {batch}; "
                              "call reset() first")
        start, bs = self.num_tokens, self.pool.block_size
        need = -(-(start + num_new) // bs)
        for table in self.block_tables:
            if len(table) < need:
                table.extend(self.pool.allocate(need - len(table), first=not table))
        self.num_tokens = start + num_new
        return StepContext.build(self.block_tables, [start] * batch, num_new, bs, self.pool.device)

    def seq_length(self) -> int:
        """Tokens stored before the forward in progress (the scheduler's longest row)."""
        ctx = self.context
        return ctx.end - ctx.num_new if ctx is not None else self.num_tokens

    def mask_kv_length(self, query_length: int) -> int:
        """Key length of the mask transformers builds: the longest row after this step."""
        ctx = self.context
        return ctx.end if ctx is not None else self.num_tokens + query_length

    # --- generate() rows --------------------------------------------------------------------------
    def truncate(self, num_tokens: int) -> None:
        """Keep the first ``num_tokens`` positions of every row (e.g. to reuse a chat prefix)."""
        if num_tokens < 0 or num_tokens > self.num_tokens:
            raise ValueError(f"cannot truncate to {num_tokens} tokens: the cache holds {self.num_tokens}")
        for table in self.block_tables:
            self.pool.truncate(table, num_tokens)
        self.num_tokens = num_tokens

    def reset(self) -> None:
        """Free every block; the cache is empty and may take a new batch size."""
        _free_tables(self.pool, self.block_tables)
        self.num_tokens, self._own = 0, None
        super().reset()

    def memory(self) -> KVMemory:
        return self.pool.memory([b for t in self.block_tables for b in t], self.num_tokens * len(self.block_tables))
