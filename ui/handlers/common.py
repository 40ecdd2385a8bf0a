"""What every tab's handlers share: the assets the page shows, upload checks (the modes it offers: ``ui.modes``)."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from kvcache.config import EXAMPLES_FILE, SYSTEM_PROMPT_FILE
from kvcache.errors import one_line

from .. import charts
from ..state import AppState, UserError

logger = logging.getLogger(__name__)

ProgressFn = Callable[[float, str], Any]


def taking_turns(app: AppState, progress: ProgressFn | None) -> ProgressFn:
    """``progress``, letting waiting chat steps run at each report (a long job holds the device lock)."""

    def report(fraction: float, message: str = "") -> Any:
        out = progress(fraction, message) if progress is not None else True
        app.device_lock.take_turns()
        return out

    return report


def default_system_prompt() -> str:
    try:
        return SYSTEM_PROMPT_FILE.read_text(encoding="utf-8").strip()
    except OSError:
        logger.warning("system prompt %s not found; starting with an empty one", SYSTEM_PROMPT_FILE)
        return ""


def example_questions() -> list[str]:
    """The clickable example questions (Chinese and English) from ``assets/prompts/examples.json``."""
    try:
        items = json.loads(EXAMPLES_FILE.read_text(encoding="utf-8"))
        return [str(item["text"]) for item in items if str(item.get("text", "")).strip()]
    except (OSError, ValueError, TypeError, KeyError) as exc:
        logger.warning("example questions unavailable (%s)", one_line(exc))
        return []


def check_upload(path: str | Path | None, app: AppState, what: str) -> Path:
    """An uploaded file, checked for presence and size; it is only ever read as data."""
    if not path:
        raise UserError(f"Upload a {what} first.")
    path = Path(path)
    if not path.is_file():
        raise UserError(f"The uploaded {what} is gone; upload it again.")
    size = path.stat().st_size
    if size > app.max_upload_bytes:
        raise UserError(
            f"The uploaded {what} is {charts.fmt_bytes(size)}, over the {charts.fmt_bytes(app.max_upload_bytes)} limit."
        )
    return path


def empty_cuda_cache() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
