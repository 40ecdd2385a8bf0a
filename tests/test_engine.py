"""The chat session: streaming, prefix reuse between turns, stop, and the stats a user reads."""

import threading

import pytest
import torch

from kvcache import Engine, EngineConfig
from kvcache.engine.chat import GenerationConfig
from kvcache.engine.sampling import next_token
from kvcache.errors import ConfigError, ContextTooLong, KVCacheFull, WorkerClosed


@pytest.fixture(scope="module")
def engine(loaded_default):
    e = Engine(loaded_default)
    yield e
    e.close()


def _stored(s) -> int:
    """Tokens the session's blocks hold, from the pool's own accounting."""
    return s.memory().tokens_stored


def test_two_turns_reuse_the_cached_prefix(engine):
    s = engine.chat("int8-dynamic", system_prompt="You are a helpful tutor.")
    first = "".join(s.stream_reply("What is 2 + 2?", GenerationConfig(max_new_tokens=12)))
    assert first.strip()
    assert s.last.new_tokens > 0 and s.last.tokens_per_s > 0 and s.last.prefill_s > 0
    assert s.last.kv.tokens_stored == len(s.cached_ids) and len(s.blocks) == -(-len(s.cached_ids) // 64)
    cached_after_first = len(s.cached_ids)
    s.reply("And 3 + 3?", GenerationConfig(max_new_tokens=8))
    # the second turn fed only what was not cached: far fewer tokens than the whole conversation
    assert s.last.prompt_tokens < len(s._prompt_ids()) - cached_after_first // 2
    used, held = s.pool.num_used, len(s.blocks)
    s.reset()
    assert s.blocks == [] and s.messages == [] and s.pool.num_used == used - held


def test_greedy_is_deterministic_and_matches_fp16_on_short_answers(engine):
    a = engine.chat("fp16").reply("Name a primary color.", GenerationConfig(max_new_tokens=6))
    b = engine.chat("fp16").reply("Name a primary color.", GenerationConfig(max_new_tokens=6))
    assert a == b and a


def test_stop_event_stops_computing(engine):
    s = engine.chat("fp16")
    stop = threading.Event()
    pieces = []
    for piece in s.stream_reply("Count from one to fifty.", GenerationConfig(max_new_tokens=200), stop):
        pieces.append(piece)
        stop.set()
    assert s.last.stopped and s.last.new_tokens < 5


def test_top_p_keeps_only_the_nucleus():
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.05, 0.05]]))
    g = torch.Generator().manual_seed(0)
    picks = {int(next_token(logits, temperature=1.0, top_p=0.5, generator=g)) for _ in range(50)}
    assert picks == {0}
    picks = {int(next_token(logits, temperature=1.0, top_p=0.85, generator=g)) for _ in range(200)}
    assert picks == {0, 1}


def _small_engine(loaded, blocks: int) -> Engine:
    """fp16 pools of ``blocks`` blocks of 16 tokens (cache_blocks counts fp16 blocks)."""
    return Engine(loaded, EngineConfig(block_size=16, cache_blocks=blocks))


def test_full_pool_ends_the_reply_and_keeps_the_conversation_consistent(loaded_default):
    small = _small_engine(loaded_default, blocks=3)  # 48 tokens
    try:
        s = small.chat("fp16")
        reply = s.reply("Count from one to fifty, one number per line.", GenerationConfig(max_new_tokens=200))
        assert s.last.cache_full and s.last.cache_full.startswith("KV cache full: 48 tokens in use of 48")
        assert reply and s.messages[-1] == {"role": "assistant", "content": reply}
        # what the pool holds for the session is exactly the tokens the session believes it holds
        assert _stored(s) == len(s.cached_ids) == 48 and s.pool.num_used == len(s.blocks) == 3
    finally:
        small.close()


def test_full_pool_at_prefill_undoes_the_turn(loaded_default):
    small = _small_engine(loaded_default, blocks=2)  # 32 tokens
    try:
        s = small.chat("fp16")
        s.reply("Hi", GenerationConfig(max_new_tokens=4))
        before = (list(s.messages), list(s.cached_ids), list(s.blocks), s.pool.num_used)
        with pytest.raises(KVCacheFull, match="KV cache full"):
            s.reply("Explain the causes of the First World War in detail, with dates and names of the key people.")
        assert (s.messages, s.cached_ids, s.blocks, s.pool.num_used) == before
        s.reset()  # the session frees its blocks and starts again
        assert s.pool.num_used == 0 and s.reply("Hi", GenerationConfig(max_new_tokens=4))
    finally:
        small.close()


def test_a_replaced_model_closes_its_sessions(loaded_default):
    other = Engine(loaded_default)
    try:
        s = other.chat("int8-dynamic")
        s.reply("Hi", GenerationConfig(max_new_tokens=3))
        assert s.pool.num_used > 0
        pool = s.pool
        other.replace_model(loaded_default)
        assert s.closed and pool.num_used == 0 and other.pools() == []
        with pytest.raises(WorkerClosed, match="model was replaced"):
            s.reply("Again?")
        assert other.chat("int8-dynamic").reply("Hi", GenerationConfig(max_new_tokens=3))
    finally:
        other.close()


def test_a_reply_abandoned_midway_stays_in_the_conversation(engine):
    s = engine.chat("fp16")
    stream = s.stream_reply("Count from one to fifty.", GenerationConfig(max_new_tokens=100))
    got = next(stream) + next(stream)
    stream.close()  # Ctrl-C in the terminal, a closed browser tab
    assert s.messages[-1]["role"] == "assistant" and s.messages[-1]["content"].startswith(got)
    assert _stored(s) == len(s.cached_ids) and s.last.new_tokens < 100
    assert s.reply("Thanks!", GenerationConfig(max_new_tokens=4))
    assert [m["role"] for m in s.messages] == ["user", "assistant", "user", "assistant"]


def test_the_context_window_bounds_a_reply_and_refuses_a_longer_conversation(engine):
    s = engine.chat("fp16")
    s._context = 48  # as if the model had been trained for 48 positions (SmolLM2's is 8192)
    s.reply("Count from one to fifty, one number per line.", GenerationConfig(max_new_tokens=200))
    assert _stored(s) + 1 <= 48 and s.last.new_tokens > 0  # the reply ended at the window
    before = (list(s.messages), list(s.cached_ids), list(s.blocks))
    with pytest.raises(ContextTooLong, match=r"the conversation is \d+ tokens and .* reads at most 48: clear the chat"):
        s.reply("And now from fifty-one to a hundred.")
    assert (s.messages, s.cached_ids, s.blocks) == before


def test_a_prompt_prefilled_in_small_chunks_gives_the_same_reply(loaded_default, engine):
    """16-bit: the same 8 tokens. int8: the same first token. Chunks change the matmuls' shapes, so K and V differ in
    the last bits; an int8 code on a rounding edge then flips, and a later greedy token on a near-tie may follow."""
    chunked = Engine(loaded_default, EngineConfig(prefill_chunk=8))
    try:
        config = GenerationConfig(max_new_tokens=8)
        for mode, words in (("fp16", None), ("int8-dynamic", 1)):
            s = chunked.chat(mode, system_prompt="You are a helpful tutor.")
            want = engine.chat(mode, system_prompt="You are a helpful tutor.").reply("What is 2 + 2?", config)
            got = s.reply("What is 2 + 2?", config)
            assert got.split()[:words] == want.split()[:words] and s.last.prefill_s > 0, (mode, got, want)
        assert chunked.worker.prefill_chunk == 8 and s.last.prompt_tokens > 16  # a few chunks
    finally:
        chunked.close()
    with pytest.raises(ConfigError, match=r"prefill_chunk must be at least 1 token \(or None for whole prompts\), got 0"):
        EngineConfig(prefill_chunk=0)
