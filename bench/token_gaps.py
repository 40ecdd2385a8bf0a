"""Token gaps under a long prompt: how long sessions that decode wait between tokens while another prompt comes in.

Part of ``python -m bench.serving --long-prompt N`` (see there). A few sessions decode through an engine's batch
worker, as the app's chat sessions do; once each has ``lead`` tokens, one N-token prompt arrives, and the
sessions go on until each has ``lead`` tokens more after its first token. Every gap between consecutive tokens
of the sessions from then on (once all have started) is timed where a reader of the stream sees it: whole
prompts stall every session for the whole prefill in one gap, chunked prefill for one chunk per step.
"""

from __future__ import annotations

import statistics
import threading
import time
from typing import Any

from kvcache import Engine, EngineConfig, KVMode, LoadedModel
from kvcache.engine.worker import Request


class TokenStream:
    """Reads one request's tokens on its own thread, stamping when each arrives (``perf_counter`` seconds)."""

    def __init__(self, request: Request):
        self.request, self.times = request, []
        self.ended, self.error = False, None
        self._cond = threading.Condition()
        threading.Thread(target=self._read, name="token-stream", daemon=True).start()

    def _read(self) -> None:
        try:
            for _ in self.request:
                with self._cond:
                    self.times.append(time.perf_counter())
                    self._cond.notify_all()
        except Exception as exc:  # the worker ended the request with an error: the run says so
            self.error = exc
        with self._cond:
            self.ended = True
            self._cond.notify_all()

    def wait_for(self, count: int, timeout: float = 3600.0) -> None:
        """Until ``count`` tokens have come, or the request ended."""
        with self._cond:
            self._cond.wait_for(lambda: len(self.times) >= count or self.ended, timeout)


def measure_gaps(loaded: LoadedModel, mode: KVMode, session_prompts: list[list[int]], long_prompt: list[int], *,
                 prefill_chunk: int | None, block_size: int, lead: int,
                 cache_max_entry_count: float | None = None) -> dict[str, Any]:
    """One run on a fresh engine (``loaded`` must have no EOS: sessions decode until cancelled): its gaps, in ms."""
    engine = Engine(loaded, EngineConfig(block_size=block_size, cache_max_entry_count=cache_max_entry_count,
                                         prefill_chunk=prefill_chunk))
    context = getattr(loaded.model.config, "max_position_embeddings", None) or 4096
    try:
        pool = engine.pool(mode)
        warm = TokenStream(engine.submit(pool, session_prompts[0], 3))  # first forwards are slower: not timed
        warm.wait_for(3)
        sessions = [TokenStream(engine.submit(pool, p, context - len(p) - 1)) for p in session_prompts]
        for s in sessions:
            s.wait_for(lead)
        submitted = time.perf_counter()
        long = TokenStream(engine.submit(pool, long_prompt, 2))
        long.wait_for(1)
        marks = [len(s.times) for s in sessions]
        for s, mark in zip(sessions, marks):
            s.wait_for(mark + lead)
        for s in (*sessions, long):
            s.request.cancel()
    finally:
        engine.close()
    errors = [repr(s.error) for s in (*sessions, long) if s.error is not None]
    if errors or not long.times:
        raise RuntimeError(f"the run ended early: {'; '.join(errors) or 'the long prompt got no token'}")
    start = max(s.times[0] for s in sessions)  # every session decoding from here on
    gaps = [(b - a) * 1e3 for s in sessions for a, b in zip(s.times, s.times[1:]) if a >= start]
    before = [(b - a) * 1e3 for s in sessions for a, b in zip(s.times, s.times[1:]) if a >= start and b < submitted]
    return dict(part="long_prompt", kv=mode.name, prefill_chunk=prefill_chunk, prompt_tokens=len(long_prompt),
                sessions=len(sessions), gaps=len(gaps), max_gap_ms=max(gaps), median_gap_ms=statistics.median(gaps),
                decode_gap_ms=statistics.median(before) if before else None,
                first_token_s=long.times[0] - submitted,
                tokens_during_prefill=min(sum(submitted < t < long.times[0] for t in s.times) for s in sessions))
