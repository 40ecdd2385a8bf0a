"""What the app holds: the engine and the app's settings (:class:`AppState`) and, per browser session,
its own two conversations, calibration and memory history (:class:`SessionState`).

The engine (:class:`kvcache.Engine`) owns the model, its shared KV pools and the batch worker; the UI
holds a handle to it and asks it for chat sessions. With a pool size (``cache_max_entry_count``) its
pools are preallocated and split evenly between the two panes' modes (``pools_sharing=2``), so the
page shows what the same memory holds in each.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import weakref
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvcache.config import BASELINE_MODE, EngineConfig, PoolSize
from kvcache.engine.chat import ChatSession
from kvcache.engine.engine import Engine
from kvcache.engine.turns import TurnLock
from kvcache.errors import KVQError
from kvcache.modes import get_mode, require_qparams
from kvcache.qparams import KVQParams

LEFT_MODE = BASELINE_MODE
PANES = 2  # the fp16 pane and the quantized pane share the pool memory evenly
MEMORY_HISTORY_S = 300  # the rolling memory plot shows the last five minutes
PLAN_PREFIX = "plan: "  # a plan the bit planner made in this session, as the KV-mode lists show it
CALIBRATE_HINT = ("run a calibration in the Calibrate tab and press 'Use in chat' (or upload parameters there, or "
                  "start the app with --qparams), or pick a dynamic mode")


class UserError(KVQError):
    """Something the person can fix; the page shows the message as it is."""


def kv_label(mode: str) -> str:
    """What the page calls a KV mode: its name, or ``plan: <file stem>`` for a plan file's path."""
    return f"{PLAN_PREFIX}{Path(mode).stem}" if mode.endswith(".json") else mode


@dataclass
class AppState:
    """Shared by every session: the engine (model, pools, worker) and the app's settings."""

    engine: Engine | None = None
    model_path: str = "default"  # what the model box shows: the last path that loaded
    load_error: str | None = None  # why the last load failed (the previous model stays)
    device: str | None = None
    dtype: str | None = None  # what models compute in (``--dtype``; None: the loader's default)
    default_qparams: KVQParams | None = None
    default_qparams_label: str | None = None
    calib_data_dir: str | None = None
    max_upload_bytes: int = 20 * 2**20
    model_roots: list[Path] | None = None  # served beyond localhost: the folders the Model box may open (None: any)
    allow_hub: bool = False  # Hub ids in the Model box where model_roots limits it (ui.access.hub_ids_allowed)
    work_root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="kvq-studio-")))
    sessions: weakref.WeakSet = field(default_factory=weakref.WeakSet)
    load_lock: threading.Lock = field(default_factory=threading.Lock)
    device_lock: TurnLock = field(default_factory=TurnLock)  # long jobs vs the worker's steps: they take turns

    @property
    def loaded(self) -> Any:
        return self.engine.loaded if self.engine is not None else None

    @property
    def takes_hub_ids(self) -> bool:
        """Whether the Model box loads Hub ids: with no roots to keep to (loopback), or when the operator allowed it."""
        return self.model_roots is None or self.allow_hub

    @property
    def pool_size(self) -> PoolSize:
        return self.engine.config.pool_size if self.engine is not None else PoolSize()

    def require_engine(self) -> Engine:
        if self.engine is None:
            why = f" (last attempt: {self.load_error})" if self.load_error else ""
            raise UserError(f"No model is loaded{why}: enter a model path and press Load.")
        return self.engine

    def require_model(self) -> Any:
        return self.require_engine().loaded

    def replace_model(self, loaded: Any, pool: PoolSize = PoolSize()) -> None:
        """Serve ``loaded`` to every session; replies in flight end with a message, old pools and weights go."""
        config = EngineConfig(**pool._asdict(), pools_sharing=PANES)
        if self.engine is None:
            self.engine = Engine(loaded, config, device_lock=self.device_lock)
        else:
            self.engine.replace_model(loaded, config)
        self.load_error = None

    def cleanup(self) -> None:
        if self.engine is not None:
            self.engine.close()
        shutil.rmtree(self.work_root, ignore_errors=True)


class SessionState:
    """One browser tab's own state. Gradio keeps one per session (``gr.State(SessionState)``)."""

    def __init__(self) -> None:
        self.left: ChatSession | None = None
        self.right: ChatSession | None = None
        self.qparams: KVQParams | None = None  # from "Use in chat" or an upload; else the app's --qparams
        self.qparams_label: str | None = None
        self.stop = threading.Event()  # Stop button: the running reply stops after its current token
        self.turn_lock = threading.Lock()  # held by a chat turn; what changes the engines waits for it
        self.submitted = False  # Send was pressed and its turn has not started yet
        self.cancel = threading.Event()  # Cancel button: the running calibration stops at its next step
        self.calib_submitted = False  # Calibrate was pressed and its run has not started yet
        self.memory_log: deque[dict[str, Any]] = deque()
        self.calib_stats: Any = None  # calib's CalibStats of the last calibration
        self.calib_dir: Path | None = None
        self.exports: dict[str, Any] = {}
        self.eval_report: dict[str, Any] | None = None
        self.eval_cancel = threading.Event()  # the Evaluate tab's Cancel: its running measurement stops at its next unit
        self.needle_report: dict[str, Any] | None = None
        self.recommend_report: dict[str, Any] | None = None
        self.plans: dict[str, Path] = {}  # "plan: <name>" -> the plan file this session's bit planner wrote

    def __deepcopy__(self, memo: dict) -> "SessionState":
        return self  # gradio deep-copies a State's initial value; ours is made fresh per session

    def current_qparams(self, app: AppState) -> tuple[KVQParams | None, str | None]:
        if self.qparams is not None:
            return self.qparams, self.qparams_label
        return app.default_qparams, app.default_qparams_label

    def resolve_mode(self, mode: str) -> str:
        """A KV mode as the library takes it: a named mode as it is, a plan's label as its file's path."""
        mode = (mode or "").strip()
        if mode in self.plans:
            return str(self.plans[mode])
        if mode.startswith(PLAN_PREFIX) or mode.endswith(".json"):
            raise UserError(f"{mode!r} is not a plan of this session: make one with the Calibrate tab's bit planner.")
        return mode

    def add_plan(self, path: Path) -> str:
        """Offer the plan file ``path`` in this session's KV-mode lists; returns its label."""
        label = kv_label(str(path))
        self.plans[label] = path
        return label

    def engines(self, app: AppState, mode: str) -> tuple[ChatSession, ChatSession]:
        """The two conversations, rebuilt when the model was replaced or the right pane's mode changed."""
        engine = app.require_engine()
        kv = get_mode(self.resolve_mode(mode))
        if self.left is None or self.left.closed:
            self.left = engine.chat(LEFT_MODE)
            self.right = None
        if self.right is None or self.right.closed or self.right.kv != kv.name:
            qparams, _ = self.current_qparams(app)
            require_qparams(kv, qparams, CALIBRATE_HINT)
            self.right = engine.chat(kv, qparams=qparams if kv.reads_qparams else None)
            self.left.reset()  # keep the two conversations comparable
        return self.left, self.right

    def use_qparams(self, qparams: KVQParams, label: str) -> None:
        self.qparams, self.qparams_label = qparams, label
        if self.right is not None and get_mode(self.right.kv).needs_qparams:
            self.right.reset()
            self.right = None  # rebuilt with the new parameters at the next turn

    def reset_chat(self) -> None:
        for session in (self.left, self.right):
            if session is not None:
                session.reset()

    def work_dir(self, app: AppState, name: str) -> Path:
        """A fresh folder of this session's own under the app's work root."""
        return Path(tempfile.mkdtemp(prefix=f"{name}-", dir=app.work_root))
