"""Errors a user can fix: one base class, so front ends show these as one line and log everything else.

The CLIs and the app catch :class:`KVQError` and print its message; any other exception is a bug,
logged with its traceback and shown as ``internal error: <one line> (details in the log)``.
"""

from __future__ import annotations


class KVQError(Exception):
    """Something the user can fix; the message is one line that says what to do."""


class ConfigError(KVQError):
    """A setting or option that cannot be honoured (a pool size, a block size, a flag)."""


class ModeError(ConfigError):
    """An unknown KV mode, or one that needs something the user did not give (calibrated parameters)."""


class QParamsError(KVQError):
    """A qparams file that is missing, corrupt, or made for another model."""


class ModelLoadError(KVQError):
    """A model that could not be loaded."""


class EvalError(KVQError):
    """Bad evaluation input (text, window size, prompts)."""


class MeasureCancelled(KVQError):
    """A measurement stopped at its progress callback's word (the app's Cancel); nothing was reported or cached."""


class KVCacheFull(KVQError):
    """The pool has no free block left; nothing already stored was touched."""


class ContextTooLong(KVQError):
    """A conversation longer than the model's context window: nothing of the turn was stored."""


class WorkerClosed(KVQError):
    """The model was replaced (its worker closed) before or while a reply was generated: send the message again."""


def one_line(exc: BaseException) -> str:
    """An exception's message on one line (library messages span several)."""
    return " ".join(str(exc).split()) or type(exc).__name__
