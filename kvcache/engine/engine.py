"""The engine: one loaded model, its shared KV pools, their sizing, and the worker that batches every request.

Front ends (the app, the CLIs, the benchmarks) hold an engine and ask it for chat sessions; they never
build pools or workers themselves. There is one pool per KV mode and set of static parameters, shared by
every session of that mode, as in a serving engine. Pools are sized once from
:class:`~kvcache.config.EngineConfig` (a fraction of the memory free after the weights load, split over
``pools_sharing`` pools, or a number of blocks each), or grow on demand.
"""

from __future__ import annotations

import gc
import weakref
from typing import Any

import torch

from ..codec import kv_float_dtype
from ..config import BASELINE_MODE, EngineConfig, PoolSize, check_pool_size
from ..errors import ConfigError, WorkerClosed
from ..modes import KV_MODES, KVMode, get_mode, require_qparams
from ..qparams import KVQParams
from ..shape import KVShape
from ..storage.block_pool import BlockPool
from ..storage.sizing import budget_bytes, capacity_report, free_memory_bytes, pool_blocks
from .chat import ChatSession
from .sampling import eos_ids
from .turns import TurnLock
from .worker import BatchWorker, Request


class Engine:
    def __init__(self, loaded: Any, config: EngineConfig | None = None, *, device_lock: TurnLock | None = None):
        """``device_lock``: held by the worker for each step, so other device work (an evaluation) can take turns."""
        self.device_lock = device_lock or TurnLock()
        self.version = 0
        self.loaded: Any = None
        self.worker: BatchWorker | None = None
        self._start(loaded, config or EngineConfig())

    def _start(self, loaded: Any, config: EngineConfig) -> None:
        self.loaded, self.config = loaded, config
        self.shape = KVShape.from_config(loaded.model.config)
        self.fp_dtype = kv_float_dtype(loaded.model.dtype)  # every pool's 16-bit dtype: the model's (bf16) or fp16
        self.eos_ids = frozenset(eos_ids(loaded.tokenizer, loaded.model))
        self._pools: dict[tuple[str, int], BlockPool] = {}
        self._sessions: dict[tuple[str, int], weakref.WeakSet[ChatSession]] = {}
        self.worker = BatchWorker(loaded.model, eos_ids=self.eos_ids, device_lock=self.device_lock,
                                  prefill_chunk=config.prefill_chunk, max_num_seqs=config.max_num_seqs)
        self.free_after_load = free_memory_bytes(loaded.device)  # what a pool fraction applies to

    def replace_model(self, loaded: Any, config: EngineConfig | None = None) -> None:
        """Serve ``loaded`` instead: replies in flight end with a message, old sessions close, old pools go."""
        self.close()
        for sessions in self._sessions.values():
            for session in list(sessions):
                session.reset()
        self.version += 1
        self.loaded = self.worker = None
        self._pools, self._sessions = {}, {}
        gc.collect()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.empty_cache()
        self._start(loaded, config or self.config)

    def close(self) -> None:
        if self.worker is not None:
            self.worker.close()

    # --- pools ------------------------------------------------------------------------------------
    def pool_size(self, mode: str | KVMode) -> int:
        """Blocks a fixed pool of ``mode`` gets (0: it grows on demand)."""
        size = self.config.pool_size
        if size == PoolSize():
            return 0
        blocks = pool_blocks(get_mode(mode), self.shape, self._budget(size), self.config.block_size, self.fp_dtype,
                             stored=True, max_num_seqs=self.config.max_num_seqs)
        if blocks < 1:
            setting = (f"cache_blocks={size.cache_blocks}" if size.cache_blocks is not None
                       else f"cache_max_entry_count={size.cache_max_entry_count}")
            raise ConfigError(f"a KV pool of {setting} holds no block of {self.config.block_size} "
                              f"{get_mode(mode).name} tokens: raise it (a fraction of free memory, or a number of blocks)")
        return blocks

    def pool(self, mode: str | KVMode, qparams: KVQParams | None = None) -> BlockPool:
        """The shared pool of ``mode`` (and, for a static mode, ``qparams``), made at its first use."""
        kv = get_mode(mode)
        kv.check_model(self.loaded.model.config)
        require_qparams(kv, qparams)
        qparams = qparams if kv.reads_qparams else None
        key = (kv.name, id(qparams))  # the pool holds its qparams: no other object gets this id while it lives
        self._drop_unused(kv.name, keep=key)
        pool = self._pools.get(key)
        if pool is None:
            blocks = self.pool_size(kv)
            model = self.loaded.model
            pool = BlockPool(kv, self.shape, block_size=self.config.block_size, num_blocks=blocks,
                             growable=blocks == 0, device=model.device, fp_dtype=self.fp_dtype, qparams=qparams,
                             max_num_seqs=self.config.max_num_seqs)
            self._pools[key], self._sessions[key] = pool, weakref.WeakSet()
        return pool

    def _drop_unused(self, mode: str, keep: tuple[str, int]) -> None:
        """Forget the other pools of ``mode`` no session holds any more (parameters replaced), so their memory goes."""
        for key in [k for k in self._pools if k[0] == mode and k != keep and not self._sessions[k]]:
            self.worker.forget(self._pools.pop(key))
            del self._sessions[key]

    def pools(self) -> list[BlockPool]:
        return list(self._pools.values())

    def chat(self, mode: str | KVMode = BASELINE_MODE, *, qparams: KVQParams | None = None,
             system_prompt: str | None = None) -> ChatSession:
        """A new conversation in ``mode`` over the shared pool; its turns go through the worker."""
        pool = self.pool(mode, qparams)
        session = ChatSession(self, pool, system_prompt=system_prompt)
        self._sessions[(pool.mode.name, id(pool.qparams))].add(session)
        return session

    def submit(self, pool: BlockPool, prompt_ids: list[int], max_new_tokens: int, **options: Any) -> Request:
        """Queue a reply over ``pool`` (the worker batches it with the others of that pool): its token stream.
        ``options``: as :meth:`BatchWorker.submit` (block_table, num_cached, sampler, stop, cut_to_pool)."""
        if self.worker is None:
            raise WorkerClosed("the engine is between models: send the message again")
        return self.worker.submit(pool, prompt_ids, max_new_tokens, **options)

    # --- what the pages show ------------------------------------------------------------------------
    def _budget(self, size: PoolSize) -> int:
        return budget_bytes(self.shape, **size._asdict(), free_bytes=self.free_after_load,
                            pools_sharing=self.config.pools_sharing, block_size=self.config.block_size,
                            fp_dtype=self.fp_dtype)

    def capacity(self, cache_max_entry_count: float | None = None, session_tokens: int = 2048,
                 modes: list[KVMode] | None = None, *, cache_blocks: int | None = None) -> dict[str, Any]:
        """Both capacity views for a pool of ``cache_max_entry_count`` or ``cache_blocks``, sized exactly as this
        engine sizes its pools."""
        size = PoolSize(cache_max_entry_count, cache_blocks)
        check_pool_size(*size)
        return capacity_report(modes or list(KV_MODES.values()), self.shape, self._budget(size),
                               block_size=self.config.block_size, session_tokens=session_tokens, fp_dtype=self.fp_dtype,
                               max_num_seqs=self.config.max_num_seqs,
                               **size._asdict(), free_bytes=self.free_after_load, pools_sharing=self.config.pools_sharing)

    def status(self) -> dict[str, Any]:
        """Pools (size and use) and the worker's state, for the memory gauges."""
        pools = [dict(kv=p.mode.name, blocks_used=p.num_used, blocks_shared=p.num_shared, blocks=p.num_blocks,
                      block_size=p.block_size, bytes=p.capacity_bytes, bytes_used=p.used_bytes, growable=p.growable)
                 for p in self.pools()]
        return dict(pools=pools, kv_bytes=sum(p.capacity_bytes for p in self.pools()),
                    batching=self.worker.status() if self.worker is not None else None)
