"""Every handler error becomes a one-line message in the page; the app keeps serving.

Errors a user can fix (:class:`kvcache.errors.KVQError`, the UI's own ``UserError`` among them) are shown
as they are. Anything else is a bug: logged with its traceback (server log and log file) and shown as
``internal error: <one line> (details in the log)``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import gradio as gr
import torch

from kvcache.errors import KVQError, one_line
from kvcache.logs import internal_error

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def shown_in_page(where: str = "the app") -> Iterator[None]:
    """Turn any exception into ``gr.Error`` with a readable message."""
    try:
        yield
    except gr.Error:
        raise
    except KVQError as exc:
        raise gr.Error(one_line(exc)) from None
    except torch.OutOfMemoryError:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.empty_cache()
        raise gr.Error("Out of GPU memory: try a smaller request. The app is still running.") from None
    except Exception as exc:
        logger.exception("handler failed")
        raise gr.Error(f"{internal_error(exc, where)}. The app is still running.") from None


@contextlib.contextmanager
def shown_as_warning(where: str = "the app") -> Iterator[None]:
    """Like :func:`shown_in_page`, but the message is a warning toast and the handler goes on."""
    try:
        with shown_in_page(where):
            yield
    except gr.Error as exc:
        gr.Warning(exc.message)
