"""Calibration's errors a user can fix, in one place; every one is a :class:`kvcache.errors.KVQError`.

Front ends (``python -m calib``, the app) show these as one line and treat anything else as a bug
(logged with its traceback by :func:`kvcache.logs.internal_error`). The message says what to do.
"""

from __future__ import annotations

from kvcache.errors import KVQError


class CalibError(KVQError):
    """A calibration run, work dir or export that cannot start or finish (the base of calib's errors)."""


class CalibDataError(CalibError):
    """Calibration data that is missing, empty, too short or not text."""


class CalibCancelled(CalibError):
    """The run was cancelled (a progress callback returned False); nothing was written."""


class CalibOOMError(CalibError):
    """Out of GPU (or CPU) memory; the message names the largest size that fits."""


class CalibNaNError(CalibError):
    """NaN or inf in the collected statistics; the message names the layer."""


class CalibStatsError(CalibError):
    """A work dir that is missing, corrupt, inconsistent, or made for another model."""


class ExportError(CalibError):
    """Options or inputs that an export format cannot honour, or an output folder that cannot be written."""


class UsageError(CalibError):
    """A ``python -m calib`` command line that cannot be run as given (two models, none, ...)."""
