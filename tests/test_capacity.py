"""Capacity planning against hand-computed block arithmetic."""

import json

import pytest
from conftest import stored_tensors

from kvcache import BlockPool, ConfigError, Engine, EngineConfig, KVShape, get_mode
from kvcache.cli import main
from kvcache.config import MAX_NUM_SEQS, PoolSize, parse_cache_blocks, parse_cache_max_entry_count, parse_pool_setting, parse_pool_size
from kvcache.storage.sizing import budget_bytes, capacity_report

SMOL = KVShape(num_layers=30, num_kv_heads=3, head_dim=64, num_heads=9)
MODES = [get_mode(m) for m in ("fp16", "int8", "int8-dynamic")]


def test_same_memory_int8_holds_twice_the_tokens():
    rep = capacity_report(MODES, SMOL, 256 * 2**20, block_size=64, session_tokens=2048)
    fp16, int8, dyn = rep["results"]
    # fp16: 23040 B/token -> 1,474,560 B/block; 268,435,456 // 1,474,560 = 182 blocks
    assert (fp16["block_bytes"], fp16["blocks"], fp16["tokens"]) == (1474560, 182, 11648)
    # int8: 11520 B/token; 92,160 B of per-channel params come off the budget first -> 363 blocks
    assert (int8["block_bytes"], int8["blocks"]) == (737280, (256 * 2**20 - 92160) // 737280) == (737280, 363)
    assert int8["tokens_vs_fp16"] >= 1.95
    assert dyn["bytes_per_token"] == 12240 and dyn["blocks"] == 256 * 2**20 // (12240 * 64)
    # same conversation: 2048 tokens = 32 blocks
    assert fp16["session_bytes"] == 32 * 1474560 and fp16["sessions"] == 182 // 32
    assert int8["session_bytes"] == 32 * 737280 + 92160


def test_fraction_of_free_memory_and_block_counts():
    fake_free = 10 * 2**30
    budget = budget_bytes(SMOL, cache_max_entry_count=0.5, free_bytes=fake_free)
    assert budget == 5 * 2**30 and budget_bytes(SMOL, cache_max_entry_count=0.5, free_bytes=fake_free, pools_sharing=2) == 5 * 2**30 // 2
    rep = capacity_report(MODES[:1], SMOL, budget)
    assert rep["results"][0]["blocks"] == 5 * 2**30 // 1474560
    rep = capacity_report(MODES, SMOL, budget_bytes(SMOL, cache_blocks=100))  # an integer: blocks, counted in fp16 block memory
    assert rep["results"][0]["blocks"] == 100
    assert rep["results"][1]["blocks"] == (100 * 1474560 - 92160) // 737280


@pytest.mark.parametrize("text,message", [("-3", "fraction in (0, 1]"), ("1.5", "not a fraction"), ("lots", "fraction in (0, 1]"),
                                          ("12", "for a number of blocks pass --cache-blocks 12")])
def test_bad_cache_max_entry_count(text, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_cache_max_entry_count(text)
    # LMDeploy's meaning: 1 and 1.0 are both all of the free memory; blocks are their own flag
    assert parse_cache_max_entry_count("0.25") == 0.25 and parse_cache_max_entry_count("1") == parse_cache_max_entry_count("1.0") == 1.0
    assert parse_cache_blocks("12") == 12 and parse_pool_setting("12 blocks") == PoolSize(cache_blocks=12)
    assert parse_pool_setting("0.5") == parse_pool_size("0.5", None) == PoolSize(0.5)
    with pytest.raises(ConfigError, match="at least 1 block"):
        parse_cache_blocks("0")
    for grow in ("", "0", None, 0):  # no fixed pool: every pool grows on demand
        assert parse_cache_max_entry_count(grow) is None
    assert parse_pool_size(None, None) == PoolSize()


def test_a_pool_size_is_one_setting_and_a_count_above_one_is_not_blocks():
    with pytest.raises(ConfigError, match="not both"):
        parse_pool_size("0.5", "12")
    with pytest.raises(ConfigError, match="set cache_blocks"):
        EngineConfig(cache_max_entry_count=12)
    with pytest.raises(ConfigError, match="at least 1"):
        EngineConfig(cache_blocks=0)
    assert EngineConfig(cache_blocks=12).pool_size == PoolSize(None, 12)


def test_the_engine_capacity_view_sizes_pools_as_the_engine_does(loaded_default):
    """The Memory tab's capacity view and the app's real pools: the same split of the same memory."""
    engine = Engine(loaded_default, EngineConfig(cache_max_entry_count=0.01, pools_sharing=2))
    try:
        report = engine.capacity(0.01)
        assert report["budget_bytes"] == int(0.01 * engine.free_after_load) // 2 and report["pools_sharing"] == 2
        for row in report["results"]:
            mode = get_mode(row["kv"])
            if not mode.needs_qparams:  # a calibrated mode's pool needs parameters; same rule
                pool = engine.pool(row["kv"])
                assert pool.num_blocks == engine.pool_size(row["kv"])
                if mode.emulated:  # the view counts transformers' own storage; the emulation holds 16-bit values
                    assert pool.num_blocks < row["blocks"]
                    continue
                assert pool.num_blocks == row["blocks"]
                # what the pool really holds (blocks, sink slots, maps) fits the budget, and one block more would not
                held = pool.capacity_bytes
                assert held <= report["budget_bytes"] < held + row["block_bytes"] + pool.sinks.slot_bytes
                # and that count is every byte of every tensor the pool allocated
                storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for layer in pool.layers
                            for t in [getattr(layer, n) for n in stored_tensors(layer)] + layer.static_tensors()}
                assert held == sum(storages.values())
    finally:
        engine.close()


def test_capacity_cli_json(tmp_path, loaded_default, capsys):
    out = tmp_path / "cap.json"
    assert main(["capacity", "--budget-mib", "64", "--kv", "fp16,int8", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["budget_bytes"] == 64 * 2**20 and [r["kv"] for r in data["results"]] == ["fp16", "int8"]
    assert data["results"][0]["blocks"] == 64 * 2**20 // 1474560
    assert main(["capacity", "--cache-max-entry-count", "2.5"]) == 2
    assert "not a fraction" in capsys.readouterr().err
    assert main(["capacity", "--cache-blocks", "10", "--kv", "fp16", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["results"][0]["blocks"] == 10


def test_chat_with_a_pool_too_small_for_one_block(loaded_default, capsys):
    assert main(["chat", "--model", "default", "--kv", "fp16", "--cache-max-entry-count", "0.0000000001"]) == 2
    assert "holds no block of 64 fp16 tokens: raise it" in capsys.readouterr().err


@pytest.mark.parametrize("kv", ["fp16", "int8-rot", "int8-dynamic"])
@pytest.mark.parametrize("session_tokens", [16, 64, 200])
def test_the_session_count_is_what_a_pool_of_that_many_blocks_holds(kv, session_tokens):
    """Every per-sequence cost counted: short sessions of a mode with sinks run out of sink slots before blocks."""
    from kvcache import BlockPool, KVCacheFull

    shape, mode = KVShape(num_layers=2, num_kv_heads=2, head_dim=16, num_heads=4), get_mode(kv)
    row = capacity_report([mode], shape, budget_bytes(shape, cache_blocks=40, block_size=16), block_size=16,
                          session_tokens=session_tokens)["results"][0]
    pool = BlockPool(mode, shape, block_size=16, num_blocks=row["blocks"], growable=False)
    held = 0
    try:
        while True:
            pool.allocate(-(-session_tokens // 16), first=True)
            held += 1
    except KVCacheFull:
        pass
    assert row["sessions"] == held
    if kv == "int8-rot" and session_tokens == 16:  # one block each: a sink slot for each, none runs out first
        assert held == row["blocks"] < MAX_NUM_SEQS and pool.num_free == 0


def test_sessions_are_at_most_max_num_seqs_and_the_slots_bytes_count():
    """Past ``max_num_seqs`` blocks a fixed pool holds max_num_seqs sink slots, no more: their bytes leave room for
    the blocks, and the sessions a pool runs at once are at most max_num_seqs, whatever its free blocks."""
    mode = get_mode("int8-rot")
    budget = 1000 * 64 * mode.bytes_per_token(SMOL)
    row = capacity_report([mode], SMOL, budget, block_size=64, session_tokens=64, max_num_seqs=8)["results"][0]
    room = budget - mode.static_param_bytes(SMOL)
    assert row["blocks"] == (room - 8 * mode.sink_bytes(SMOL)) // (64 * mode.bytes_per_token(SMOL)) and row["sessions"] == 8
    pool = BlockPool(mode, SMOL, block_size=64, num_blocks=row["blocks"], growable=False, max_num_seqs=8)
    assert pool.sinks.num_slots == 8 and pool.capacity_bytes <= budget


def test_a_residual_window_counts_in_a_sessions_bytes():
    mode = get_mode("hf:quanto-int4")
    row = capacity_report([mode], SMOL, 256 * 2**20, block_size=64, session_tokens=2048)["results"][0]
    block = mode.bytes_per_token(SMOL) * 64
    assert mode.residual_bytes(SMOL) > 0
    assert row["session_bytes"] == 32 * block + mode.residual_bytes(SMOL) + mode.static_param_bytes(SMOL)
    assert row["sessions"] == row["blocks"] * block // (32 * block + mode.residual_bytes(SMOL)) < row["blocks"] // 32
