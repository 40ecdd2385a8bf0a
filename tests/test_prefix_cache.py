"""Prefix caching: sequences that start with the same tokens share the full blocks storing them, prefill only
the rest, get the tokens they get without sharing, and the pool counts a shared block once."""

import pytest
import torch
from conftest import make_tiny_llama

from kvcache import BlockPool, Engine, KVShape, PagedKVCache, get_mode
from kvcache.config import SYSTEM_PROMPT_FILE
from kvcache.engine.chat import GenerationConfig
from kvcache.engine.scheduler import BatchScheduler
from kvcache.hf.compat import cache_kwargs
from ui import charts

BLOCK = 4
KVS = ["fp16", "int8-dynamic", "int8-rot"]  # int8-rot: the first block carries a sink slot


@pytest.fixture(scope="module")
def model():
    return make_tiny_llama()


class Spy:
    """The model, recording the ``input_ids`` shape of every forward the scheduler runs."""

    def __init__(self, model):
        self.model, self.fed = model, []

    def __call__(self, **kwargs):
        self.fed.append(tuple(kwargs["input_ids"].shape))
        return self.model(**kwargs)


def _ids(n: int, seed: int) -> list[int]:
    return torch.randint(0, 128, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


PREFIX = _ids(14, seed=1)  # 3.5 blocks: 3 full blocks can be shared, the last 2 tokens are prefilled again
A, B = PREFIX + _ids(5, seed=2), PREFIX + _ids(6, seed=3)


def _pool(model, kv: str, num_blocks: int = 64, **kw) -> BlockPool:
    return BlockPool(get_mode(kv), KVShape.from_config(model.config), block_size=BLOCK, num_blocks=num_blocks,
                     growable=False, fp_dtype=torch.float32, **kw)


def _alone(model, kv: str, prompt: list[int], max_new: int) -> list[int]:
    """Without sharing: the prompt on its own through generate() over a cache of its own."""
    cache = PagedKVCache.for_model(model, kv, block_size=BLOCK, fp_dtype=torch.float32)
    ids = torch.tensor([prompt])
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new, min_new_tokens=max_new,
                          do_sample=False, pad_token_id=0, **cache_kwargs(cache))[0, len(prompt):].tolist()


@pytest.mark.parametrize("kv", KVS)
def test_a_second_sequence_shares_the_full_prefix_blocks_and_prefills_only_the_rest(model, kv):
    pool, spy = _pool(model, kv), Spy(model)
    sched = BatchScheduler(spy, pool, prefill_chunk=None)
    a = sched.add(A, 8)
    sched.step()  # A is stored and decoding: its three full prompt blocks are registered
    b = sched.add(B, 6)
    spy.fed.clear()
    sched.step()
    sa, sb = sched.sequences[a], sched.sequences[b]
    assert spy.fed == [(1, 1), (1, len(B) - 12)]  # A's decode row, then B from the last full block boundary on
    assert sb.num_shared == 12 and sb.block_table[:3] == sa.block_table[:3]
    assert all(pool.refs(blk) == 2 for blk in sa.block_table[:3])
    assert not set(sa.block_table[3:]) & set(sb.block_table[3:])  # the partial block and after: each its own
    # counted once: the pool's use is the union of both tables, a conversation's view names what it shares
    assert pool.num_used == len(set(sa.block_table) | set(sb.block_table))
    assert pool.num_used == len(sa.block_table) + len(sb.block_table) - 3
    assert pool.num_shared == 3 and pool.memory(sb.block_table, sb.num_cached).blocks_shared == 3
    if pool.sinks.tokens:  # the shared first block brings its sink slot: one slot for both
        assert pool.sinks.used_bytes == pool.sinks.slot_bytes
    sched.run_until_done()
    assert sa.generated_ids == _alone(model, kv, A, 8)
    assert sb.generated_ids == _alone(model, kv, B, 6)
    assert pool.num_used == 0 and pool.sinks.used_bytes == 0 and len(pool.prefix) == 0


@pytest.mark.parametrize("kv", ["fp16", "int8-rot"])
def test_freeing_one_holder_keeps_the_others_blocks_and_their_tokens(model, kv):
    pool = _pool(model, kv, num_blocks=24)
    sched = BatchScheduler(model, pool, prefill_chunk=None)
    table_a, table_b = [], []  # two chat sessions keep their blocks between turns
    sched.add(A, 4, block_table=table_a)
    sched.run_until_done()
    b = sched.add(B, 4, block_table=table_b)
    sched.run_until_done()
    assert sched.sequences[b].num_shared == 12 and table_b[:3] == table_a[:3]
    shared = table_b[:3]
    pool.free(table_a)  # session A ends
    assert all(pool.refs(blk) == 1 for blk in shared) and pool.num_used == len(table_b)
    others = pool.allocate(pool.num_free)  # every free block: none of B's among them
    assert not set(others) & set(table_b)
    pool.free(others)
    # B's next turn over its kept blocks, and a new sequence that still finds the prefix B holds
    history = B + sched.sequences[b].generated_ids
    more = history + _ids(5, seed=4)
    turn = sched.add(more, 5, block_table=table_b, num_cached=len(history) - 1)
    c = sched.add(A, 4)
    sched.run_until_done()
    assert sched.sequences[turn].generated_ids == _alone(model, kv, more, 5)
    assert sched.sequences[c].num_shared == 12 and sched.sequences[c].generated_ids == _alone(model, kv, A, 4)
    pool.free(table_b)
    assert pool.num_used == 0 and pool.sinks.used_bytes == 0


def test_truncating_into_a_shared_block_gives_it_back_whole(model):
    """A conversation rolled back inside a shared block would write its new tokens over the other's: it keeps
    only the whole blocks before it, and then stores its own copy."""
    pool = _pool(model, "int8-dynamic")
    sched = BatchScheduler(model, pool, prefill_chunk=None)
    table_a, table_b = [], []
    for prompt, table in ((A, table_a), (B, table_b)):
        sched.add(prompt, 2, block_table=table)
        sched.run_until_done()
    third = table_b[2]
    assert pool.truncate(table_b, 10) == 8 and table_b == table_a[:2] and pool.refs(third) == 1
    # a block only A holds, cut into: A keeps it and writes into it, so no one may match it any more
    assert pool.truncate(table_a, 10) == 10 and len(table_a) == 3
    assert pool.prefix.match(A, 3) == table_a[:2]
    pool.free(table_a)
    pool.free(table_b)
    assert pool.num_used == 0


def test_a_mode_that_rewrites_old_tokens_shares_nothing():
    """transformers' residual window re-quantizes old tokens in place: its blocks are never shared."""
    model = make_tiny_llama(num_heads=2, num_kv_heads=1, head_dim=64)  # the hf: schemes group 64 channels
    pool = _pool(model, "hf:quanto-int4")
    assert not pool.mode.shares_prefix and pool.prefix is None
    sched = BatchScheduler(model, pool, prefill_chunk=None)
    a, b = sched.add(A, 3), sched.add(B, 3)
    sched.step()
    sched.step()
    sa, sb = sched.sequences[a], sched.sequences[b]
    assert sb.num_shared == 0 and not set(sa.block_table) & set(sb.block_table)
    sched.run_until_done()
    assert pool.num_used == 0


@pytest.fixture(scope="module")
def engine(loaded_default):
    e = Engine(loaded_default)
    yield e
    e.close()


def test_a_second_chat_with_the_default_system_prompt_prefills_at_most_its_last_partial_block(engine):
    """The target of issue 17: every chat starts with the same ~550-token system prompt."""
    system = SYSTEM_PROMPT_FILE.read_text(encoding="utf-8").strip()
    config = GenerationConfig(max_new_tokens=4)
    first, second = engine.chat("int8-dynamic", system_prompt=system), engine.chat("int8-dynamic", system_prompt=system)
    first.reply("What is 2 + 2?", config)
    reply = second.reply("Name a primary color.", config)
    prompt = engine.loaded.tokenizer.apply_chat_template([
        {"role": "system", "content": system}, second.messages[0]], add_generation_prompt=True, tokenize=True)
    prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)  # what the second chat's turn fed
    common = next(i for i, (x, y) in enumerate(zip(first.cached_ids, prompt)) if x != y)
    assert common > 500
    block = engine.config.block_size
    assert 0 <= second.last.prompt_tokens - (len(prompt) - common) < block  # at most one partial block again
    status = {p["kv"]: p for p in engine.status()["pools"]}["int8-dynamic"]
    shared = len(set(first.blocks) & set(second.blocks))
    assert shared == common // block and status["blocks_shared"] == shared
    assert status["blocks_used"] == len(first.blocks) + len(second.blocks) - shared  # counted once
    assert second.memory().blocks_shared == shared
    gauges = charts.gauges_html(dict(timestamp=0, gpus=[], torch_cuda=None, process_rss=None, system_total=None,
                                     kv={}, kv_pools=engine.status()["pools"]))
    assert f"{shared} blocks shared, counted once" in gauges
    first.reset()
    second.reset()
    alone = engine.chat("int8-dynamic", system_prompt=system)  # nothing registered now: no sharing
    assert alone.reply("Name a primary color.", config) == reply and alone.last.prompt_tokens > common
