"""Chat sessions decoded together by one batch worker give the replies they give alone."""

import threading
import time

import pytest
import torch

from kvcache import BlockPool, Engine, EngineConfig, KVShape, get_mode
from kvcache.engine.chat import GenerationConfig
from kvcache.engine.scheduler import BatchScheduler
from kvcache.engine.worker import BatchWorker
from kvcache.errors import WorkerClosed

QUESTIONS = ("What is the capital of France?", "Name three primary colours.")
CONFIG = GenerationConfig(max_new_tokens=16)
SYSTEM = "You are a helpful assistant."


@pytest.fixture
def engine(loaded_default):
    e = Engine(loaded_default)
    yield e
    e.close()


def _alone(loaded, kv: str, turns: tuple[str, ...]) -> list[str]:
    alone = Engine(loaded)
    try:
        s = alone.chat(kv, system_prompt=SYSTEM)
        return [s.reply(q, CONFIG) for q in turns]
    finally:
        alone.close()


def _queued(worker: BatchWorker) -> int:
    return sum(len(s.waiting) for s in list(worker._schedulers.values()))


@pytest.mark.parametrize("kv", ["fp16", "int8-dynamic"])
def test_sessions_batched_together_get_the_replies_they_get_alone(loaded_default, engine, kv):
    worker = engine.worker
    sessions = [engine.chat(kv, system_prompt=SYSTEM) for _ in QUESTIONS]
    pool = sessions[0].pool
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
        assert s.memory().tokens_stored == len(s.cached_ids) and s.last.decode_s > 0
    assert pool.num_used == sum(len(s.blocks) for s in sessions)  # conversations keep their blocks
    for s in sessions:
        s.reset()
    assert pool.num_used == 0


def test_stop_ends_the_request_in_the_worker(engine):
    worker = engine.worker
    s = engine.chat("fp16", system_prompt=SYSTEM)
    stop = threading.Event()
    for _ in s.stream_reply("Count from one to a hundred.", GenerationConfig(max_new_tokens=200), stop):
        stop.set()
    assert s.last.stopped and s.last.new_tokens < 10
    assert not any(sched.running or sched.waiting for sched in worker._schedulers.values())
    assert s.memory().tokens_stored == len(s.cached_ids)  # the next turn starts from a consistent cache
    assert s.reply("Thanks.", GenerationConfig(max_new_tokens=4))


def test_a_request_the_pool_cannot_hold_undoes_the_turn(loaded_default):
    small = Engine(loaded_default, EngineConfig(cache_blocks=1))  # one block of 64 tokens per pool
    try:
        s = small.chat("int8-dynamic", system_prompt=SYSTEM)
        assert s.pool.num_blocks == 1
        with pytest.raises(Exception, match=r"KV cache full: this request needs \d+ tokens"):
            s.reply("Explain in detail how a key-value cache speeds up decoding. " * 4, CONFIG)
        assert s.messages == [] and s.cached_ids == [] and s.pool.num_used == 0
    finally:
        small.close()


def test_close_ends_waiting_requests_with_a_reason(engine):
    worker = engine.worker
    s = engine.chat("fp16", system_prompt=SYSTEM)
    errors = []

    def chat() -> None:
        try:
            s.reply("Hello!", CONFIG)
        except WorkerClosed as exc:
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
    with pytest.raises(WorkerClosed, match="closed"):
        s.reply("Hello again", CONFIG)


def test_sampling_rows_use_their_own_generator(engine):
    config = GenerationConfig(max_new_tokens=12, temperature=0.8, top_p=0.9, seed=3)
    a, b = (engine.chat("fp16", system_prompt=SYSTEM) for _ in range(2))
    assert a.reply(QUESTIONS[0], config) == b.reply(QUESTIONS[0], config)  # same seed, same text


def test_a_failing_step_ends_the_requests_with_its_error(engine, monkeypatch):
    s = engine.chat("fp16", system_prompt=SYSTEM)
    monkeypatch.setattr(BatchScheduler, "step", lambda self: (_ for _ in ()).throw(torch.OutOfMemoryError("boom")))
    with pytest.raises(torch.OutOfMemoryError, match="boom"):
        s.reply("Hello!", CONFIG)
    assert s.memory().tokens_stored == len(s.cached_ids) == 0 and engine.worker.status()["alive"]


def test_a_broken_worker_never_leaves_a_caller_waiting(engine, monkeypatch):
    s = engine.chat("fp16", system_prompt=SYSTEM)
    monkeypatch.setattr(BatchWorker, "_step", lambda self, key, sched: 1 / 0)
    with pytest.raises(RuntimeError, match="the batch worker stopped \\(ZeroDivisionError"):
        s.reply("Hello!", CONFIG)
    assert not engine.worker.status()["alive"]


def test_a_pool_nobody_uses_is_forgotten(loaded_default, engine):
    """Parameters replaced: the old pool leaves the engine and the worker once no session holds it."""
    import gc
    import weakref

    from kvcache.qparams import KVQParams

    shape = KVShape.from_config(loaded_default.model.config)
    stat = [torch.full((shape.num_kv_heads, shape.head_dim), 4.0) for _ in range(shape.num_layers)]
    stats = {"min": [-t for t in stat], "max": stat, "absmax": stat}
    old, new = (KVQParams.from_stats(stats, stats) for _ in range(2))
    s = engine.chat("int8", qparams=old)
    s.reply("Hi", GenerationConfig(max_new_tokens=2))
    gone = weakref.ref(s.pool)
    keeper = engine.chat("int8", qparams=new)  # a second set: the first pool is still held by ``s``
    assert gone() in engine.pools()
    del s
    gc.collect()
    engine.chat("int8", qparams=new)  # asking again drops the pools nobody holds
    gc.collect()
    assert gone() is None and keeper.pool in engine.pools()  # neither the engine nor the worker holds it


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


def test_the_long_prompt_benchmark_sees_the_sessions_decode_through_a_chunked_prefill(one_torch_thread):
    """bench.serving --long-prompt's measurement, on the tiny model: chunked, the sessions get a token every chunk."""
    from bench.serving import as_loaded
    from bench.token_gaps import measure_gaps
    from conftest import make_tiny_llama

    loaded = as_loaded(make_tiny_llama(), 2)
    sessions, long = [[1, 2, 3, 4, 5], [6, 7, 8]], list(range(10, 110)) * 2  # 200 tokens
    rows = {chunk: measure_gaps(loaded, get_mode("fp16"), sessions, long, prefill_chunk=chunk, block_size=16, lead=4)
            for chunk in (16, None)}
    assert all(r["prompt_tokens"] == 200 and r["max_gap_ms"] >= r["median_gap_ms"] > 0 for r in rows.values())
    # every step of the 13 chunks gave each session a token; whole, the prompt took one step (and the sessions
    # may get a step or two in before the worker takes the prompt up: a timing, so a margin)
    assert rows[16]["tokens_during_prefill"] >= 200 // 16 - 1 > 4 >= rows[None]["tokens_during_prefill"]
