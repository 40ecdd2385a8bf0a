"""Many chat sessions, one model: a worker thread decodes every running request together.

Each pool (one per KV mode) gets one :class:`~kvcache.engine.scheduler.BatchScheduler`; the worker steps
them in turn, so the requests of every session in a pool share each decode forward (continuous
batching: they join and leave between steps). A chat session keeps its conversation's blocks
between turns and hands them in with its next request, so only the new tokens are prefilled.
Callers read their tokens from a :class:`Request` as they come; ``device_lock`` is held for each
step, so other work on the device (an evaluation) can take turns with the worker (:mod:`.turns`).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Iterable, Iterator
from typing import Any

from ..config import MAX_NUM_SEQS, PREFILL_CHUNK
from ..errors import KVCacheFull, WorkerClosed
from ..storage.block_pool import BlockPool
from .scheduler import BatchScheduler
from .sequence import Sampler, Sequence
from .turns import TurnLock

logger = logging.getLogger(__name__)

_END = object()  # closes a request's token stream


class Request:
    """One reply being generated: iterate it for token ids; ``cancel()`` ends it early."""

    def __init__(self, seq: Sequence, stop: threading.Event | None):
        self.seq = seq
        self._stop = stop  # the caller's Stop button (it may stop other requests too)
        self._cancelled = threading.Event()  # this request only
        self.done = threading.Event()
        self.error: BaseException | None = None
        self._tokens: queue.Queue = queue.Queue()

    def __iter__(self) -> Iterator[int]:
        while (item := self._tokens.get()) is not _END:
            yield item
        if self.error is not None:
            raise self.error

    def cancel(self) -> None:
        """Stop generating (the worker finishes the sequence before its next step) and wait for that."""
        self._cancelled.set()
        if not self.done.wait(timeout=600):
            raise RuntimeError("the batch worker did not end the request within 10 minutes")

    @property
    def stopping(self) -> bool:
        return self._cancelled.is_set() or (self._stop is not None and self._stop.is_set())

    def _put(self, token: int) -> None:
        self._tokens.put(token)

    def _end(self, error: BaseException | None = None) -> None:
        self.error = error
        self.done.set()
        self._tokens.put(_END)


class BatchWorker:
    """The thread that runs ``model`` for every request, batching those that share a pool."""

    def __init__(self, model: Any, *, eos_ids: Iterable[int] = (), device_lock: TurnLock | None = None,
                 prefill_chunk: int | None = PREFILL_CHUNK, max_num_seqs: int = MAX_NUM_SEQS):
        self.model, self.prefill_chunk, self.max_num_seqs = model, prefill_chunk, max_num_seqs
        self.eos_ids = frozenset(eos_ids)
        self.device_lock = device_lock or TurnLock()
        self.max_batch = 0  # the most rows one decode forward has carried
        self.steps = 0
        self._schedulers: dict[int, BatchScheduler] = {}  # by id(pool)
        self._requests: dict[tuple[int, int], Request] = {}  # by (id(pool), sequence id)
        self._wake = threading.Condition()
        # A scheduler is not thread-safe: a request arriving mid-step is added after the step, not during it.
        self._step_lock = threading.Lock()
        self._closed = False
        self._thread: threading.Thread | None = None

    def submit(
        self,
        pool: BlockPool,
        prompt_ids: list[int],
        max_new_tokens: int,
        *,
        block_table: list[int] | None = None,
        num_cached: int = 0,
        sampler: Sampler | None = None,
        stop: threading.Event | None = None,
        cut_to_pool: bool = False,
    ) -> Request:
        """Queue a reply to ``prompt_ids`` (see :meth:`BatchScheduler.add`); raises ``KVCacheFull`` if it can never fit."""
        with self._wake:
            if self._closed:
                raise WorkerClosed("the batch worker is closed (the model was replaced): send the message again")
            sched = self._schedulers.get(id(pool))
            if sched is None:
                sched = self._schedulers[id(pool)] = BatchScheduler(self.model, pool, eos_ids=self.eos_ids,
                                                                      prefill_chunk=self.prefill_chunk,
                                                                      max_num_seqs=self.max_num_seqs)
            with self._step_lock:
                seq_id = sched.add(prompt_ids, max_new_tokens, block_table=block_table, num_cached=num_cached,
                                   sampler=sampler, cut_to_pool=cut_to_pool)
            request = self._requests[(id(pool), seq_id)] = Request(sched.sequences[seq_id], stop)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="kvq-batch-worker", daemon=True)
                self._thread.start()
            self._wake.notify()
        return request

    def forget(self, pool: BlockPool) -> None:
        """Drop the scheduler of a pool nobody uses any more, so the pool's memory can be freed."""
        with self._wake:
            sched = self._schedulers.get(id(pool))
            if sched is not None and not (sched.waiting or sched.running):
                del self._schedulers[id(pool)]

    def close(self) -> None:
        """End every request (with an error saying why) and stop the thread."""
        with self._wake:
            self._closed = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout=600)
        for key in list(self._requests):
            self._end(key, WorkerClosed("the model was replaced while this reply was being generated: send the message again"))

    # --- the thread ---------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                with self._wake:
                    while not self._closed and not self._busy():
                        self._wake.wait()
                    if self._closed:
                        return
                    schedulers = [(key, s) for key, s in self._schedulers.items() if s.waiting or s.running]
                for key, sched in schedulers:
                    self._step(key, sched)
                schedulers = sched = None  # hold no pool while idle: a forgotten one must be freeable
        except BaseException as exc:  # a bug here must not leave callers waiting for tokens that never come
            logger.exception("the batch worker stopped")
            with self._wake:
                self._closed = True
                for key in list(self._requests):
                    self._end(key, RuntimeError(f"the batch worker stopped ({type(exc).__name__}: {exc})"))

    def status(self) -> dict[str, Any]:
        """What the page shows: requests running and waiting per pool, steps taken, the largest decode batch."""
        with self._wake:
            pools = {s.pool.mode.name: dict(running=len(s.running), waiting=len(s.waiting))
                     for s in self._schedulers.values()}
        return dict(pools=pools, steps=self.steps, max_batch=self.max_batch, alive=not self._closed)

    def _busy(self) -> bool:
        return any(s.waiting or s.running for s in self._schedulers.values())

    def _step(self, key: int, sched: BatchScheduler) -> None:
        with self._wake:  # requests stopped by their callers leave before the step
            for seq in [*sched.running, *sched.waiting]:
                if self._requests[(key, seq.id)].stopping:
                    sched.finish(seq.id)
                    self._end((key, seq.id))
            rows = len(sched.running)
        try:
            with self.device_lock, self._step_lock:
                new = sched.step() if sched.waiting or sched.running else {}
        except Exception as exc:  # e.g. out of memory: every request of this pool ends with it
            logger.exception("batch step failed")
            with self._wake:
                for seq in [*sched.running, *sched.waiting]:
                    sched.finish(seq.id)
                    self._end((key, seq.id), exc)
            return
        self.steps += 1
        self.max_batch = max(self.max_batch, rows)
        with self._wake:
            for seq_id, token in new.items():
                self._requests[(key, seq_id)]._put(token)
            for (k, seq_id), request in list(self._requests.items()):
                if k == key and request.seq.finished:
                    error = KVCacheFull(request.seq.error) if request.seq.error else None
                    self._end((k, seq_id), error)

    def _end(self, key: tuple[int, int], error: BaseException | None = None) -> None:
        sched = self._schedulers.get(key[0])
        if sched is not None:
            sched.sequences.pop(key[1], None)  # a long-running app keeps no history of finished requests
        request = self._requests.pop(key, None)
        if request is not None:
            request._end(error)
