"""Every handler error becomes a one-line message in the page; the app keeps serving."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import gradio as gr
import torch

logger = logging.getLogger(__name__)


def _known_errors() -> tuple[type[BaseException], ...]:
    """The library's own one-line errors (and ValueError, which they derive from)."""
    from kvcache.block_pool import KVCacheFull
    from kvcache.evaluate import EvalError
    from kvcache.model_loader import ModelLoadError
    from kvcache.qparams import QParamsError
    from kvcache.serving import WorkerClosed

    from .state import UserError

    known: tuple[type[BaseException], ...] = (UserError, ModelLoadError, QParamsError, EvalError, KVCacheFull, WorkerClosed,
                                              ValueError, OSError)
    with contextlib.suppress(ImportError):
        from calib import calibrate as calib_mod

        known += tuple(
            e for e in (getattr(calib_mod, n, None) for n in ("CalibDataError", "CalibOOMError", "CalibCancelled"))
            if isinstance(e, type) and issubclass(e, BaseException)
        )
    return known


def one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


@contextlib.contextmanager
def shown_in_page() -> Iterator[None]:
    """Turn any exception into ``gr.Error`` with a readable message (and log the unexpected ones)."""
    try:
        yield
    except gr.Error:
        raise
    except torch.OutOfMemoryError:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.empty_cache()
        raise gr.Error("Out of GPU memory: try a smaller request. The app is still running.") from None
    except Exception as exc:
        if isinstance(exc, _known_errors()):
            raise gr.Error(one_line(exc)) from None
        logger.exception("handler failed")
        raise gr.Error(f"Unexpected error ({type(exc).__name__}: {one_line(exc)}). The app is still running.") from None
