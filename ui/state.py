"""What the app holds: one shared model (:class:`AppState`) and, per browser session, its own
conversation, engines, calibration and memory history (:class:`SessionState`).

The model's weights are loaded once and shared; every session builds its two chat engines
(fp16 left, the chosen mode right) over them. Every session's cache takes its blocks from one pool
per KV mode, shared by all sessions as in a serving engine, and one batch worker decodes the
requests of each pool together. With a pool size (``cache_max_entry_count``) the pools are
preallocated and fixed; without one they grow on demand.
"""

from __future__ import annotations

import gc
import shutil
import tempfile
import threading
import weakref
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvcache.block_pool import BlockPool
from kvcache.cache import PagedKVCache
from kvcache.capacity import free_memory_bytes, pool_blocks
from kvcache.engine import ChatSession, eos_ids
from kvcache.kv_shape import KVShape
from kvcache.modes import get_mode
from kvcache.qparams import KVQParams
from kvcache.serving import BatchWorker

LEFT_MODE = "fp16"
MEMORY_HISTORY_S = 300  # the rolling memory plot shows the last five minutes


class UserError(Exception):
    """Something the person can fix; the page shows the message as it is."""


@dataclass
class AppState:
    """Shared by every session: the loaded model and the app's settings."""

    loaded: Any = None  # kvcache.model_loader.LoadedModel
    model_path: str = "default"  # what the model box shows: the last path that loaded
    model_version: int = 0  # bumped on every successful load; sessions rebuild their engines
    load_error: str | None = None  # why the last load failed (the previous model stays)
    device: str | None = None
    default_qparams: KVQParams | None = None
    default_qparams_label: str | None = None
    calib_data_dir: str | None = None
    max_upload_bytes: int = 20 * 2**20
    work_root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="kvq-studio-")))
    sessions: weakref.WeakSet = field(default_factory=weakref.WeakSet)
    load_lock: threading.Lock = field(default_factory=threading.Lock)
    # KV pool: None grows each cache on demand; a fraction (0, 1] of the memory free after the weights
    # load, or a whole number of blocks, preallocates one pool per mode, shared by every session.
    cache_max_entry_count: float | int | None = None
    free_after_load: int | None = None
    pools: dict[tuple[str, int], BlockPool] = field(default_factory=dict)
    worker: BatchWorker | None = None  # decodes every session's chat requests, batched per pool
    device_lock: threading.Lock = field(default_factory=threading.Lock)  # calibration/evaluation vs the worker

    def require_model(self) -> Any:
        if self.loaded is None:
            why = f" (last attempt: {self.load_error})" if self.load_error else ""
            raise UserError(f"No model is loaded{why}: enter a model path and press Load.")
        return self.loaded

    def replace_model(self, loaded: Any, cache_max_entry_count: float | int | None = None) -> None:
        """Switch every session to ``loaded``; their old engines, pools and the old weights are released."""
        if self.worker is not None:
            self.worker.close()  # replies still running end with a message saying why
        self.loaded, self.load_error = loaded, None
        self.model_version += 1
        for session in list(self.sessions):
            session.drop_engines()
        self.pools.clear()
        self.worker = BatchWorker(loaded.model, eos_ids=eos_ids(loaded.tokenizer, loaded.model), device_lock=self.device_lock)
        gc.collect()
        _empty_cuda_cache()
        self.cache_max_entry_count = cache_max_entry_count
        self.free_after_load = free_memory_bytes(loaded.device)

    def new_cache(self, mode: str, qparams: KVQParams | None = None) -> PagedKVCache:
        """A cache over the shared pool of ``mode`` (and ``qparams``), made at its first use.

        With a pool size, the fp16 pane's pool and the quantized pane's pool get the same memory (a
        fraction is split evenly between the two), so the page shows what the same memory holds in each.
        """
        count = self.cache_max_entry_count
        kv = get_mode(mode)
        qparams = qparams if kv.needs_qparams else None
        key = (kv.name, id(qparams))  # the pool holds its qparams: no other object gets this id while it is here
        pool = self.pools.get(key)
        if pool is None:
            for stale in [k for k, p in self.pools.items() if k[0] == kv.name and p.num_used == 0]:
                # e.g. parameters replaced by 'Use in chat': no session holds blocks there any more
                if self.worker is not None:
                    self.worker.forget(self.pools[stale])
                del self.pools[stale]
            model = self.require_model().model
            shape = KVShape.from_config(model.config)
            blocks = 0
            if count is not None:
                free = self.free_after_load // 2 if isinstance(count, float) and self.free_after_load else None
                blocks = pool_blocks(kv, shape, count, model.device, free_bytes=free)
                if blocks < 1:
                    raise UserError(f"A KV pool of cache_max_entry_count={count} holds no block of {kv.name}: raise it.")
            pool = BlockPool(kv, shape, num_blocks=blocks, growable=count is None, device=model.device, qparams=qparams)
            self.pools[key] = pool
        return PagedKVCache(pool)

    def cleanup(self) -> None:
        if self.worker is not None:
            self.worker.close()
        shutil.rmtree(self.work_root, ignore_errors=True)


class SessionState:
    """One browser tab's own state. Gradio keeps one per session (``gr.State(SessionState)``)."""

    def __init__(self) -> None:
        self.model_version = -1
        self.left: ChatSession | None = None
        self.right: ChatSession | None = None
        self.qparams: KVQParams | None = None  # from "Use in chat"; else the app's --qparams
        self.qparams_label: str | None = None
        self.stop = threading.Event()  # Stop button: the running reply stops after its current token
        self.turn_lock = threading.Lock()  # held by a chat turn; what changes the engines waits for it
        self.submitted = False  # Send was pressed and its turn has not started yet
        self.cancel = threading.Event()  # Cancel button: the running calibration stops at its next step
        self.calib_submitted = False  # Calibrate was pressed and its run has not started yet
        self.memory_log: deque[dict[str, Any]] = deque()
        self.calib_stats: Any = None  # calib.stats_io.CalibStats of the last calibration
        self.calib_dir: Path | None = None
        self.exports: dict[str, Any] = {}
        self.eval_report: dict[str, Any] | None = None

    def __deepcopy__(self, memo: dict) -> "SessionState":
        return self  # gradio deep-copies a State's initial value; ours is made fresh per session

    def drop_engines(self) -> None:
        for engine in (self.left, self.right):
            if engine is not None:
                engine.reset()  # gives its blocks back to a shared pool now
        self.left = self.right = None
        self.model_version = -1

    def current_qparams(self, app: AppState) -> tuple[KVQParams | None, str | None]:
        if self.qparams is not None:
            return self.qparams, self.qparams_label
        return app.default_qparams, app.default_qparams_label

    def engines(self, app: AppState, mode: str) -> tuple[ChatSession, ChatSession]:
        """The two chat engines over the shared model, rebuilt when the model or the right mode changed."""
        loaded = app.require_model()
        kv = get_mode(mode)
        if self.model_version != app.model_version or self.left is None:
            self.left = ChatSession(loaded, LEFT_MODE, cache=app.new_cache(LEFT_MODE), worker=app.worker)
            self.right = None
            self.model_version = app.model_version
        if self.right is None or self.right.kv != kv.name:
            qparams, _ = self.current_qparams(app)
            if kv.needs_qparams and qparams is None:
                raise UserError(
                    f"KV mode {kv.name} needs calibrated parameters: run a calibration in the Calibrate tab "
                    "and press 'Use in chat' (or start the app with --qparams FILE), or pick int8-dynamic."
                )
            self.right = ChatSession(loaded, kv.name, cache=app.new_cache(kv.name, qparams), worker=app.worker)
            self.left.reset()  # keep the two conversations comparable
        return self.left, self.right

    def use_qparams(self, qparams: KVQParams, label: str) -> None:
        self.qparams, self.qparams_label = qparams, label
        if self.right is not None and get_mode(self.right.kv).needs_qparams:
            self.right = None  # rebuilt with the new parameters at the next turn

    def reset_chat(self) -> None:
        for engine in (self.left, self.right):
            if engine is not None:
                engine.reset()

    def work_dir(self, app: AppState, name: str) -> Path:
        """A fresh folder of this session's own under the app's work root."""
        path = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=app.work_root))
        return path


def _empty_cuda_cache() -> None:
    try:
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.empty_cache()
    except Exception:
        pass
