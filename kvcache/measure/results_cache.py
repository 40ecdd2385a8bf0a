"""Measurements kept between runs, so a second ``recommend`` at the same context is instant.

One SQLite file under :func:`kvcache.config.cache_root` (``measurements.sqlite``). A row is one mode's
figures on one text at one context, keyed by everything that decides them: the model's config hash, the
text's hash, the context and number of windows, the mode's name *and* its codecs (a mode redefined under
the same name is measured again), the calibrated parameters' content hash, and :data:`METHOD_VERSION`
(bumped when the way of measuring changes).
"""

from __future__ import annotations

import hashlib
import contextlib
import json
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ..config import cache_root
from ..modes import KVMode
from ..qparams import KVQParams

METHOD_VERSION = 1
FILE_NAME = "measurements.sqlite"


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def mode_fingerprint(mode: KVMode) -> str:
    """The codecs and sinks a mode stores with, hashed: what its figures depend on, whatever it is called."""
    return hashlib.sha256(repr((mode.k, mode.v, mode.layers, mode.sink_tokens)).encode()).hexdigest()[:16]


def qparams_hash(qparams: KVQParams | None) -> str:
    """The calibrated parameters' content, hashed ("none" without): another calibration is another measurement."""
    if qparams is None:
        return "none"
    h = hashlib.sha256(f"{qparams.granularity}/{qparams.symmetric}/{qparams.bits}".encode())
    for name in ("k_scale", "k_zp", "v_scale", "v_zp", "k_transform"):
        for t in getattr(qparams, name) or []:
            h.update(t.detach().to(torch.float32).contiguous().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


class ResultsCache:
    """``get(key)`` / ``put(key, value)`` of JSON values under JSON keys, in one SQLite table."""

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path else cache_root() / FILE_NAME
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.execute("CREATE TABLE IF NOT EXISTS results (key TEXT PRIMARY KEY, value TEXT NOT NULL, saved REAL)")

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=30)
        try:
            with db:  # one transaction: committed, or rolled back on an error
                yield db
        finally:
            db.close()

    @staticmethod
    def _key(key: dict[str, Any]) -> str:
        return json.dumps({**key, "method": METHOD_VERSION}, sort_keys=True)

    def get(self, key: dict[str, Any]) -> dict[str, Any] | None:
        with self._connect() as db:
            row = db.execute("SELECT value FROM results WHERE key = ?", (self._key(key),)).fetchone()
        return json.loads(row[0]) if row else None

    def put(self, key: dict[str, Any], value: dict[str, Any]) -> None:
        with self._connect() as db:
            db.execute("INSERT OR REPLACE INTO results VALUES (?, ?, ?)", (self._key(key), json.dumps(value), time.time()))
