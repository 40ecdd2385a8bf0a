"""Chat sessions decoded together by one batch worker give the replies they give alone."""

import threading
import time

import pytest
import torch

from kvcache import BlockPool, KVShape, PagedKVCache, get_mode
from kvcache.engine import ChatSession, GenerationConfig, eos_ids
from kvcache.batching import BatchScheduler
from kvcache.serving import BatchWorker

QUESTIONS = ("What is the capital of France?", "Name three primary colours.")
CONFIG = GenerationConfig(max_new_tokens=16)


@pytest.fixture
def worker(loaded_default):
    w = BatchWorker(loaded_default.model, eos_ids=eos_ids(loaded_default.tokenizer, loaded_default.model))
    yield w
    w.close()


def _pool(loaded, kv: str, num_blocks: int = 0) -> BlockPool:
    return BlockPool(get_mode(kv), KVShape.from_config(loaded.model.config), num_blocks=num_blocks,
                     growable=num_blocks == 0, device=loaded.model.device)


def _session(loaded, pool: BlockPool, worker: BatchWorker | None) -> ChatSession:
    return ChatSession(loaded, pool.mode.name, cache=PagedKVCache(pool), worker=worker,
                       system_prompt="You are a helpful assistant.")


def _alone(loaded, kv: str, turns: tuple[str, ...]) -> list[str]:
    s = _session(loaded, _pool(loaded, kv), None)
    return [s.reply(q, CONFIG) for q in turns]


def _queued(worker: BatchWorker) -> int:
    return sum(len(s.waiting) for s in list(worker._schedulers.values()))


@pytest.mark.parametrize("kv", ["fp16", "int8-dynamic"])
def test_sessions_batched_together_get_the_replies_they_get_alone(loaded_default, worker, kv):
    pool = _pool(loaded_default, kv)
    sessions = [_session(loaded_default, pool, worker) for _ in QUESTIONS]
    replies = {}

    def chat(i: int) -> None:
        replies[i] = [sessions[i].reply(QUESTIONS[i], CONFIG), sessions[i].reply("Say it again, shorter.", CONFIG)]

    with worker.device_lock:  # hold the worker until both first turns are queued: they start together
        threads = [threading.Thread(target=chat, args=(i,)) for i in range(len(QUESTIONS))]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while _queued(worker) < len(QUESTIONS) and time.monotonic() < deadline:
            time.sleep(0.01)
    for t in threads:
        t.join(timeout=300)
    assert worker.max_batch == len(QUESTIONS)  # one decode forward carried both sessions
    for i, q in enumerate(QUESTIONS):
        assert replies[i] == _alone(loaded_default, kv, (q, "Say it again, shorter.")), i
        s = sessions[i]
        assert s.last.prompt_tokens < len(s._prompt_ids()) // 2  # the second turn prefilled only what was new
        assert s.cache.num_tokens == len(s.cached_ids) and s.last.decode_s > 0
    assert pool.num_used == sum(len(s.cache.row_table()) for s in sessions)  # conversations keep their blocks
    for s in sessions:
        s.reset()
    assert pool.num_used == 0


def test_stop_ends_the_request_in_the_worker(loaded_default, worker):
    pool = _pool(loaded_default, "fp16")
    s = _session(loaded_default, pool, worker)
    stop = threading.Event()
    for _ in s.stream_reply("Count from one to a hundred.", GenerationConfig(max_new_tokens=200), stop):
        stop.set()
    assert s.last.stopped and s.last.new_tokens < 10
    assert not any(sched.running or sched.waiting for sched in worker._schedulers.values())
    assert s.cache.num_tokens == len(s.cached_ids)  # the next turn starts from a consistent cache
    assert s.reply("Thanks.", GenerationConfig(max_new_tokens=4))


def test_a_request_the_pool_cannot_hold_undoes_the_turn(loaded_default, worker):
    pool = _pool(loaded_default, "int8-dynamic", num_blocks=1)  # 64 tokens
    s = _session(loaded_default, pool, worker)
    with pytest.raises(Exception, match=r"KV cache full: this request needs \d+ tokens"):
        s.reply("Explain in detail how a key-value cache speeds up decoding. " * 4, CONFIG)
    assert s.messages == [] and s.cache.num_tokens == 0 and pool.num_used == 0


def test_close_ends_waiting_requests_with_a_reason(loaded_default, worker):
    s = _session(loaded_default, _pool(loaded_default, "fp16"), worker)
    errors = []

    def chat() -> None:
        try:
            s.reply("Hello!", CONFIG)
        except RuntimeError as exc:
            errors.append(str(exc))

    with worker.device_lock:
        t = threading.Thread(target=chat)
        t.start()
        while _queued(worker) < 1:
            time.sleep(0.01)
        closer = threading.Thread(target=worker.close)
        closer.start()
        time.sleep(0.2)
    closer.join(timeout=60)
    t.join(timeout=60)
    assert errors and "model was replaced" in errors[0]
    with pytest.raises(RuntimeError, match="closed"):
        s.reply("Hello again", CONFIG)


def test_sampling_rows_use_their_own_generator(loaded_default, worker):
    config = GenerationConfig(max_new_tokens=12, temperature=0.8, top_p=0.9, seed=3)
    pool = _pool(loaded_default, "fp16")
    a, b = (_session(loaded_default, pool, worker) for _ in range(2))
    assert a.reply(QUESTIONS[0], config) == b.reply(QUESTIONS[0], config)  # same seed, same text


def test_a_failing_step_ends_the_requests_with_its_error(loaded_default, worker, monkeypatch):
    s = _session(loaded_default, _pool(loaded_default, "fp16"), worker)
    monkeypatch.setattr(BatchScheduler, "step", lambda self: (_ for _ in ()).throw(torch.OutOfMemoryError("boom")))
    with pytest.raises(torch.OutOfMemoryError, match="boom"):
        s.reply("Hello!", CONFIG)
    assert s.cache.num_tokens == len(s.cached_ids) == 0 and worker.status()["alive"]


def test_a_broken_worker_never_leaves_a_caller_waiting(loaded_default, worker, monkeypatch):
    s = _session(loaded_default, _pool(loaded_default, "fp16"), worker)
    monkeypatch.setattr(BatchWorker, "_step", lambda self, key, sched: 1 / 0)
    with pytest.raises(RuntimeError, match="the batch worker stopped \\(ZeroDivisionError"):
        s.reply("Hello!", CONFIG)
    assert not worker.status()["alive"]


def test_a_pool_nobody_uses_is_forgotten(loaded_default, worker):
    import gc
    import weakref

    pool = _pool(loaded_default, "fp16")
    s = _session(loaded_default, pool, worker)
    s.reply("Hi", GenerationConfig(max_new_tokens=2))
    s.reset()
    worker.forget(pool)
    gone = weakref.ref(pool)
    del s, pool
    gc.collect()
    assert gone() is None  # the worker no longer holds the pool's storage


def test_a_request_arriving_mid_step_is_added_after_the_step(monkeypatch):
    """The scheduler is not thread-safe: submit waits for the step in progress instead of changing its queues under it."""
    from conftest import make_tiny_llama

    model = make_tiny_llama()
    pool = BlockPool(get_mode("fp16"), KVShape.from_config(model.config), block_size=4, num_blocks=64,
                     growable=False, fp_dtype=torch.float32)
    in_step, release = threading.Event(), threading.Event()
    step = BatchScheduler.step

    def held_step(self):
        in_step.set()
        release.wait(30)
        return step(self)

    monkeypatch.setattr(BatchScheduler, "step", held_step)
    worker = BatchWorker(model)
    try:
        first = worker.submit(pool, [1, 2, 3], 3)
        assert in_step.wait(30)
        requests = []
        late = threading.Thread(target=lambda: requests.append(worker.submit(pool, [4, 5], 3)))
        late.start()
        late.join(0.5)
        assert late.is_alive() and not requests  # held back while the step runs
        release.set()
        late.join(30)
        assert len(requests) == 1
        for request in (first, *requests):
            assert request.done.wait(30) and request.error is None
            assert len(request.seq.generated_ids) == 3
    finally:
        release.set()
        worker.close()
