"""Where a genuine bug goes: its traceback into the log file, one line to the person who met it.

Errors a user can fix (:class:`~kvcache.errors.KVQError`) are shown as they are. Anything else is a
bug: front ends call :func:`internal_error`, which appends the traceback to the log file and returns
``internal error: <one line> (details in <log>)``; the app also logs it to its server log.
"""

from __future__ import annotations

import os
import time
import traceback
from pathlib import Path

from .config import cache_root
from .errors import one_line


def log_file() -> Path:
    """``$KVQ_LOG_FILE``, or ``kvq-studio.log`` under the cache root."""
    return Path(os.environ.get("KVQ_LOG_FILE") or cache_root() / "kvq-studio.log")


def internal_error(exc: BaseException, where: str) -> str:
    """Record ``exc`` (raised in ``where``, e.g. ``python -m kvcache chat``) and return the line to show."""
    path = log_file()
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as f:
            f.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} {where}\n{text}")
        details = str(path)
    except OSError:
        details = "the log"
    return f"internal error: {type(exc).__name__}: {one_line(exc)} (details in {details})"
