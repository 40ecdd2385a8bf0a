"""A transformers ``Cache`` whose K/V live in blocks of a :class:`BlockPool`, quantized per the KV mode.

``update()`` stores the new tokens (quantized on write) and hands the attention function a
:class:`PagedView` instead of full K/V tensors: attention then reads the stored format itself,
so there is never an fp16 copy of a quantized history. Models must run with the ``kvq``
attention implementation (``kvcache.attention``), which the model loader selects.
"""

from __future__ import annotations

import weakref
from dataclasses import asdict, dataclass
from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .block_pool import BlockPool
from .kernels import store_kv
from .kv_shape import KVShape
from .layout import LayerKV, slot_mapping
from .modes import get_mode
from .qparams import KVQParams


@dataclass
class KVMemory:
    """Exact byte accounting of one cache."""

    kv: str
    tokens_stored: int
    blocks_used: int
    block_size: int
    bytes_per_token: int  # marginal: data + per-token parameters, all layers
    param_bytes: int  # static parameters, held once
    bytes_used: int  # blocks in use + parameters
    bytes_held: int  # all storage this cache's pool holds, used or free

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class PagedView:
    """What ``update()`` returns in place of K/V: where this step's tokens went."""

    cache: "PagedKVCache"
    layer_idx: int
    start: int  # first new position
    end: int  # positions stored after this step

    @property
    def storage(self) -> LayerKV:
        return self.cache.pool.layers[self.layer_idx]

    def seq_lens(self, batch: int, device: torch.device | str) -> torch.Tensor:
        """``[batch]`` int32 tokens each row holds: all rows share ``end`` here (a batch view overrides it)."""
        return torch.full((batch,), self.end, dtype=torch.int32, device=device)


class PagedLayer(CacheLayerMixin):
    is_sliding = False
    is_compileable = False

    def __init__(self, cache: "PagedKVCache", layer_idx: int):
        super().__init__()
        self.cache, self.layer_idx = cache, layer_idx
        self.num_tokens = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device, self.is_initialized = key_states.device, True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> tuple[PagedView, PagedView]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        b, kvh, q, d = key_states.shape
        start, end = self.num_tokens, self.num_tokens + q
        slots = self.cache.slots(b, start, end)
        flat = lambda x: x.transpose(1, 2).reshape(b * q, kvh, d)  # noqa: E731
        store_kv(self.cache.pool.layers[self.layer_idx], flat(key_states), flat(value_states), slots)
        self.num_tokens = end
        view = PagedView(self.cache, self.layer_idx, start, end)
        return view, view

    def get_mask_sizes(self, query_length: int, *args) -> tuple[int, int]:
        return self.num_tokens + query_length, 0

    def get_seq_length(self) -> int:
        return self.num_tokens

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.num_tokens = 0

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
    """Block-based KV cache for ``model.generate(ids, past_key_values=cache)``; one block table per batch row."""

    def __init__(self, pool: BlockPool):
        self.pool = pool
        self.block_tables: list[list[int]] = []  # changed in place only: the finalizer below holds it
        # A cache dropped without reset() still gives its blocks back (a shared pool outlives its caches).
        weakref.finalize(self, _free_tables, pool, self.block_tables)
        self._slot_cache: tuple[tuple[int, int, int], torch.Tensor] | None = None
        self._table_tensor: torch.Tensor | None = None  # built once per change of the block tables
        super().__init__(layers=[PagedLayer(self, i) for i in range(pool.shape.num_layers)])

    @classmethod
    def for_model(
        cls,
        model: Any,
        kv: str = "fp16",
        *,
        qparams: KVQParams | str | None = None,
        block_size: int = 64,
        fp_dtype: torch.dtype = torch.float16,
        num_blocks: int = 0,
        growable: bool = True,
    ) -> "PagedKVCache":
        """A cache shaped for ``model`` (a transformers model) in KV mode ``kv``."""
        if isinstance(qparams, str):
            qparams = KVQParams.load(qparams)
        mode = get_mode(kv)
        pool = BlockPool(
            mode, KVShape.from_config(model.config), block_size=block_size, num_blocks=num_blocks,
            growable=growable, device=model.device, fp_dtype=fp_dtype, qparams=qparams if mode.needs_qparams else None,
        )
        return cls(pool)

    @property
    def kv(self) -> str:
        return self.pool.mode.name

    @property
    def num_tokens(self) -> int:
        """Tokens stored per batch row (all rows have the same length in the generate() path)."""
        return self.layers[0].num_tokens

    def slots(self, batch: int, start: int, end: int) -> torch.Tensor:
        """Flat slots of positions ``[start, end)`` for every row, allocating blocks as needed."""
        key = (batch, start, end)
        if self._slot_cache is not None and self._slot_cache[0] == key:
            return self._slot_cache[1]
        if not self.block_tables:
            self.block_tables.extend([] for _ in range(batch))
        elif len(self.block_tables) != batch:
            raise ValueError(f"this cache holds {len(self.block_tables)} sequences, the input has {batch}; call reset() first")
        bs = self.pool.block_size
        need = -(-end // bs)
        for table in self.block_tables:
            if len(table) < need:
                table.extend(self.pool.allocate(need - len(table)))
                self._tables_changed()
        positions = torch.arange(start, end, device=self.pool.device).expand(batch, -1)
        slots = slot_mapping(self.block_table_tensor(), positions, bs).reshape(-1)
        self._slot_cache = (key, slots)
        return slots

    def block_table_tensor(self) -> torch.Tensor:
        """``[batch, max_blocks]`` int32 block tables (rows padded with 0); every layer of a step reads it."""
        if self._table_tensor is None:
            width = max((len(t) for t in self.block_tables), default=0)
            rows = [t + [0] * (width - len(t)) for t in self.block_tables]
            self._table_tensor = torch.tensor(rows, dtype=torch.int32, device=self.pool.device).reshape(len(rows), width)
        return self._table_tensor

    def _tables_changed(self) -> None:
        """Block tables or lengths changed: the tensors derived from them are rebuilt when next needed."""
        self._slot_cache = self._table_tensor = None

    def row_table(self) -> list[int]:
        """The one sequence's block table, for a batch scheduler to extend in place (see ``set_num_tokens``)."""
        if len(self.block_tables) > 1:
            raise ValueError(f"this cache holds {len(self.block_tables)} sequences; a batch scheduler takes one")
        if not self.block_tables:
            self.block_tables.append([])
        self._tables_changed()
        return self.block_tables[0]

    def set_num_tokens(self, num_tokens: int) -> None:
        """Record how many tokens the row holds after a batch scheduler wrote them into ``row_table()``."""
        for layer in self.layers:
            layer.num_tokens = num_tokens
        self._tables_changed()

    def truncate(self, num_tokens: int) -> None:
        """Keep the first ``num_tokens`` positions of every row (e.g. to reuse a chat prefix)."""
        if num_tokens < 0 or num_tokens > self.num_tokens:
            raise ValueError(f"cannot truncate to {num_tokens} tokens: the cache holds {self.num_tokens}")
        keep = -(-num_tokens // self.pool.block_size)
        for table in self.block_tables:
            self.pool.free(table[keep:])
            del table[keep:]
        for layer in self.layers:
            layer.num_tokens = num_tokens
        self._tables_changed()

    def reset(self) -> None:
        """Free every block; the cache is empty and may take a new batch size."""
        _free_tables(self.pool, self.block_tables)
        self._tables_changed()
        super().reset()

    def memory(self) -> KVMemory:
        pool = self.pool
        blocks = sum(len(t) for t in self.block_tables)
        return KVMemory(
            kv=self.kv,
            tokens_stored=self.num_tokens * len(self.block_tables),
            blocks_used=blocks,
            block_size=pool.block_size,
            bytes_per_token=pool.bytes_per_token,
            param_bytes=pool.param_bytes,
            bytes_used=blocks * pool.bytes_per_block + pool.param_bytes,
            bytes_held=pool.capacity_bytes,
        )
