"""A calibration run's progress: a tqdm bar on a terminal plus the caller's ``progress(fraction, message)``.

The callback is also the way to cancel: returning False stops the run with :class:`CalibCancelled`
at its next step (nothing is written then).
"""

from __future__ import annotations

from collections.abc import Callable

from tqdm.auto import tqdm

from .errors import CalibCancelled

Progress = Callable[[float, str], "bool | None"]


class RunProgress:
    """Fractions in [0, 1] for the callback: a data phase first (its ``share``), then ``total`` steps."""

    def __init__(self, callback: Progress | None, bar: bool | None):
        self.callback = callback
        self.start, self.total, self.done = 0.0, 1, 0
        self.bar = None
        self._bar_on = bar  # None: only on a terminal

    def data_phase(self, share: float) -> Progress:
        """The callback for loading the data: its fractions are scaled into the first ``share`` of the bar."""

        def report(fraction: float, message: str) -> bool | None:
            self.report(fraction * share, message)
            return None

        return report

    def begin(self, total: int, start: float) -> None:
        self.total, self.start, self.done = max(total, 1), start, 0
        disable = None if self._bar_on is None else not self._bar_on
        self.bar = tqdm(total=total, desc="calibrate", unit="batch", disable=disable, leave=False)

    def step(self, message: str) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(message, refresh=False)
        self.report(self.start + (1.0 - self.start) * self.done / self.total, message)

    def report(self, fraction: float, message: str) -> None:
        if self.callback is None:
            return
        if self.callback(min(max(fraction, 0.0), 1.0), message) is False:
            raise CalibCancelled(
                f"calibration cancelled ({message}): nothing was written, the old work dir is untouched"
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
