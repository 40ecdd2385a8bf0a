"""The device lock that long jobs hand over: chat steps run between an evaluation's units of work.

The batch worker holds the lock for each step; a long job (an evaluation, a needle grid, a plan) holds it
for its whole run and calls :meth:`TurnLock.take_turns` between units of work (each progress report). When
a step is waiting, the job lets that step run and waits for it to finish, so every chat keeps getting a
token per unit of work instead of waiting for the whole job. A plain ``threading.Lock`` would not do: the
thread that releases it usually takes it again before a waiting one wakes.
"""

from __future__ import annotations

import threading


class TurnLock:
    """A lock (``with lock:``) whose holder can hand it to the threads waiting for it, then take it back."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._state = threading.Condition()
        self._waiting = 0
        self._grants = 0  # acquisitions so far: a change tells the holder a waiter got its turn

    def acquire(self) -> bool:
        with self._state:
            self._waiting += 1
        self._lock.acquire()
        with self._state:
            self._waiting -= 1
            self._grants += 1
            self._state.notify_all()
        return True

    def release(self) -> None:
        self._lock.release()

    def locked(self) -> bool:
        return self._lock.locked()

    def __enter__(self) -> TurnLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def take_turns(self, timeout_s: float = 1.0) -> bool:
        """Called by the holder: if anyone waits, let one of them run, then take the lock back. True if one ran."""
        with self._state:
            if not self._waiting:
                return False
            granted = self._grants
        self._lock.release()
        with self._state:
            self._state.wait_for(lambda: self._grants != granted, timeout=timeout_s)
        self.acquire()
        return True
