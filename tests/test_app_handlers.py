"""The app's handlers as plain functions (no server, no browser), on the real default model."""

import gc
import subprocess
import sys

import gradio as gr
import pytest
import torch

from kvcache.config import PoolSize
from kvcache.engine.chat import ChatSession
from kvcache.errors import ConfigError, KVQError, ModelLoadError, WorkerClosed
from kvcache.modes import KV_MODES
from ui import charts, handlers
from ui.errors import shown_in_page
from ui.state import AppState, SessionState, UserError


@pytest.fixture
def app(loaded_default, tmp_path):
    state = AppState(work_root=tmp_path)
    state.replace_model(loaded_default)  # as the app starts: shared pools, one batch worker
    yield state
    state.cleanup()


def _run_chat(app, sess, message="What is 2+2?", mode="int8-dynamic", max_new_tokens=6, **kw):
    frames = list(handlers.chat(app, sess, message, mode, "You are a helpful assistant.", max_new_tokens, **kw))
    return frames


def _text(history):
    return history[-1]["content"]


def test_chat_streams_both_panes_and_keeps_the_conversation(app):
    sess = SessionState()
    frames = _run_chat(app, sess)
    assert len(frames) >= 3  # the empty start, then one frame per step of the two engines
    left, right, left_stats, right_stats = frames[-1]
    assert _text(left) and _text(right)
    assert left[-2] == {"role": "user", "content": "What is 2+2?"}
    assert _text(frames[0][0]) == "" and len(_text(frames[1][0])) <= len(_text(left))  # it streams
    for stats in (left_stats, right_stats):
        assert "tokens/s" in stats and "KV" in stats and " B, " in stats
    assert "identical" in left_stats or "differs at token" in left_stats
    assert sess.left.kv == "fp16" and sess.right.kv == "int8-dynamic"
    assert sess.left.memory().bytes_used > sess.right.memory().bytes_used  # int8 holds fewer bytes

    # divergence: the first token index where the two answers differ
    ids = (list(sess.left.last.token_ids), list(sess.right.last.token_ids))
    sess.left.last.token_ids, sess.right.last.token_ids = [1, 2, 3], [1, 2, 4]
    assert handlers.divergence(sess.left, sess.right).startswith("first differs at token 2")
    sess.right.last.token_ids = [1, 2, 3]
    assert handlers.divergence(sess.left, sess.right) == "identical so far (3 tokens)"
    sess.left.last.token_ids, sess.right.last.token_ids = ids

    left, right, *_ = _run_chat(app, sess, "And 3+3?", max_new_tokens=3)[-1]
    assert len(left) == 4 and len(right) == 4 and left[0]["content"] == "What is 2+2?"
    assert handlers.reset_chat(sess) == ([], [], "", "")
    assert sess.left.messages == [] and sess.left.memory().tokens_stored == 0


def test_sessions_are_isolated(app):
    a, b = SessionState(), SessionState()
    _run_chat(app, a, "First question from tab A.")
    left_b, *_ = _run_chat(app, b, "Hello from tab B.")[-1]
    assert len(left_b) == 2 and "tab A" not in str(left_b)
    assert a.left is not b.left and a.left.blocks is not b.left.blocks
    assert a.left.pool is b.left.pool  # one shared pool per mode, as in a serving engine
    assert a.left.loaded is b.left.loaded  # one model's weights, shared


def test_stop_really_stops_the_worker(app):
    sess = SessionState()
    gen = handlers.chat(app, sess, "Write a long story about a dragon.", "int8-dynamic", "", 200)
    next(gen)
    next(gen)
    handlers.stop(sess)
    frames = list(gen)
    assert sess.left.last.stopped and sess.right.last.stopped
    assert sess.left.last.new_tokens < 10 and sess.right.last.new_tokens < 10
    assert "stopped" in frames[-1][2]
    gen = handlers.chat(app, sess, "And now?", "int8-dynamic", "", 5)
    next(gen)  # a new turn clears the stop before it computes anything
    assert not sess.stop.is_set()
    gen.close()


def test_stop_pressed_before_the_turn_starts(app):
    sess = SessionState()
    handlers.submit(sess)  # Send (the page clears the stop flag here) ...
    handlers.stop(sess)  # ... then Stop while the turn still waits in the queue
    frames = list(handlers.chat(app, sess, "Hello?", "int8-dynamic", "", 50))
    assert frames == [([], [], "", "")] and sess.left is None  # nothing was computed
    frames = _run_chat(app, sess, max_new_tokens=2)  # an API turn (no Send) starts clean
    assert _text(frames[-1][0])


def test_empty_message_and_int8_without_qparams(app):
    with pytest.raises(UserError, match="Type a message"):
        _run_chat(app, SessionState(), "   ")
    with pytest.raises(KVQError, match="needs calibrated parameters: run a calibration in the Calibrate tab"):
        _run_chat(app, SessionState(), mode="int8")
    assert "needs calibrated parameters" in handlers.set_mode(app, SessionState(), "int8")[-1]


def test_no_model_loaded_says_what_to_do(tmp_path):
    with pytest.raises(UserError, match="No model is loaded.*press Load"):
        _run_chat(AppState(work_root=tmp_path), SessionState())


def test_bad_model_path_keeps_the_previous_model(app, tmp_path):
    before = app.loaded
    with pytest.raises(UserError, match="previous model stays loaded"):
        handlers.load_model(app, str(tmp_path / "missing.gguf"))
    assert app.loaded is before and "does not exist" in app.load_error
    assert "still serving the previous model" in handlers.model_status(app)
    left, right = SessionState().engines(app, "int8-dynamic")  # still serving
    assert left.loaded is before


def test_out_of_memory_in_chat_is_a_message(app, monkeypatch):
    sess = SessionState()

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")
        yield ""

    monkeypatch.setattr(ChatSession, "stream_reply", oom)
    with pytest.raises(UserError, match="Out of GPU memory"):
        _run_chat(app, sess)
    assert sess.left.messages == [] and sess.left.memory().blocks_used == 0  # the conversation was freed


def test_errors_become_page_messages():
    with pytest.raises(gr.Error, match="bad path"):
        with shown_in_page():
            raise ModelLoadError("bad path: pass 'default'")
    with pytest.raises(gr.Error, match=r"internal error: ZeroDivisionError: division by zero \(details in .*\)"):
        with shown_in_page():
            1 / 0  # noqa: B018
    with pytest.raises(gr.Error, match="internal error: ValueError"):  # a library's ValueError is a bug, not user input
        with shown_in_page():
            raise ValueError("shape mismatch in some tensor op")
    with pytest.raises(gr.Error, match="model was replaced while this reply was being generated") as err:
        with shown_in_page():
            raise WorkerClosed("the model was replaced while this reply was being generated: send the message again")
    assert "internal error" not in str(err.value)


def test_memory_reports_process_memory_and_exact_kv(app):
    sess = SessionState()
    figures, banner, gauges, mem, kv = handlers.memory(app, sess)
    assert figures["process_rss"] > 0 and all(v is None for v in figures["kv"].values())
    left_engine, _ = sess.engines(app, "int8-dynamic")
    left_engine.blocks.extend(left_engine.pool.allocate(2))  # hold 100 tokens' blocks, as a turn would
    left_engine.cached_ids.extend(range(100))
    figures, banner, gauges, mem, kv = handlers.memory(app, sess)
    left = figures["kv"]["fp16 (left)"]
    assert left["bytes_held"] == sess.left.memory().bytes_held and left["capacity_tokens"] >= 100
    assert left["tokens_stored"] == 100 and left["blocks_used"] == 2
    assert figures["kv"]["int8-dynamic (right)"]["bytes_per_token"] < left["bytes_per_token"]
    if figures["nvml_error"]:
        assert "NVIDIA" in banner and "exact KV bytes" in banner
    assert "process RSS" in gauges and "KV fp16 (left)" in gauges and "gauge-fill" in gauges
    assert set(mem["series"]) >= {"process RSS"} and len(kv) == 2
    assert len(sess.memory_log) == 2


def test_gauge_colours_follow_nvitop():
    fig = {
        "timestamp": 0, "gpus": [{"index": 0, "name": "H100", "total": 100, "used": 90, "free": 10, "reserved": None,
                                  "process_used": 40}],
        "torch_cuda": {"device": 0, "allocated": 10, "reserved": 70, "max_allocated": 20},
        "process_rss": None, "system_total": None, "kv": {"fp16": None},
    }
    html = charts.gauges_html(fig)
    assert 'class="gauge-fill crit" style="width:90.0%"' in html
    assert 'class="gauge-fill warn" style="width:70.0%"' in html
    assert 'class="gauge-fill ok" style="width:10.0%"' in html
    assert "this process 40 B" in html


def test_upload_is_size_limited(app, tmp_path):
    big = tmp_path / "big.txt"
    big.write_text("x" * 2048)
    app.max_upload_bytes = 1024
    with pytest.raises(UserError, match="over the 1.00 KiB limit"):
        handlers.check_upload(str(big), app, "text file")
    with pytest.raises(UserError, match="Upload a text file"):
        handlers.check_upload(None, app, "text file")


def test_evaluate_tiny(app):
    sess = SessionState()
    summary, table, quality, cost, tradeoff, positions, growth = handlers.evaluate(
        app, sess, "builtin-zh", None, ["int8-dynamic"], 32, 2, 1, 2)
    assert list(table["kv"]) == ["fp16", "int8-dynamic"]
    assert table["vs fp16"].iloc[1] < 0.6 and "2 windows x 32 tokens" in summary and "1 prompts x 2 tokens" in summary
    assert "on `builtin-zh`" in summary and "top-1" in summary and "95% CI" in summary
    assert {"top-1 %", "Δppl 95% CI", "first divergence", "calibrated on"} <= set(table.columns)
    assert table["top-1 %"].iloc[0] == 100 and 0 < table["top-1 %"].iloc[1] <= 100
    assert list(cost["kv"]) == ["fp16", "int8-dynamic"] and list(tradeoff["kv"]) == ["fp16", "int8-dynamic"]
    assert list(tradeoff["engine"]) == ["fp16 baseline", "ours"]  # the scatter's colour and legend
    assert list(positions["positions"]) == ["0-32"] and positions["KL vs fp16"].iloc[0] == table["KL vs fp16"].iloc[1]
    assert list(growth["position"]) == [32] and "stored (quantized) copy" in summary
    with pytest.raises(UserError, match="Pick at least one"):
        handlers.evaluate(app, sess, "builtin-en", None, [], 32, 2, 1, 2)


def test_long_jobs_show_progress_and_cancel(app, tmp_path, monkeypatch):
    from kvcache.errors import MeasureCancelled

    monkeypatch.setenv("KVQ_CACHE_DIR", str(tmp_path / "cache"))
    sess = SessionState()
    seen = []
    summary, figure = handlers.needle_grid(app, sess, ["int8-dynamic"], [256], [0, 1], 1,
                                           progress=lambda f, m="": seen.append((f, m)))
    assert seen[-1][0] == 1.0 and "int8-dynamic: context 256, depth 1, trial 1 of 1" in seen[-1][1]
    assert "`fp16` 2/2" in summary and len(figure.axes) == 3  # fp16's heatmap, the mode's, the colour bar
    summary, table = handlers.recommend_options(app, sess, "lmdeploy", 256, 64, "builtin-en", None)
    assert list(table["option"])[0] == "fp16" and "lmdeploy:4" in list(table["option"])
    assert (table["turn it on"].iloc[list(table["option"]).index("lmdeploy:4")]
            == "lmdeploy serve api_server MODEL --quant-policy 4")
    assert "**Pick**" in summary and table["tokens in budget"].iloc[0] > 0

    def cancel_at_first(f, m=""):
        handlers.cancel_evaluation(sess)  # the Cancel button, pressed while the grid runs

    with pytest.raises(MeasureCancelled, match="cancelled"):
        handlers.needle_grid(app, sess, ["int8-dynamic"], [256], [0, 1], 1, progress=cancel_at_first)


def test_evaluate_with_static_parameters_names_their_calibration(app):
    sess = SessionState()
    handlers.calibrate(app, sess, "builtin", None, 2, 32, "channel", False, 1)
    handlers.use_in_chat(app, sess)
    summary, table, *_ = handlers.evaluate(app, sess, "builtin-en", None, ["int8"], 32, 2, 0, 2)
    assert "calibrated on **builtin, 2 x 32**" in summary and "overlap with this text" in summary
    assert list(table["calibrated on"]) == ["", "builtin, 2 x 32"]


def test_uploaded_parameters_file_or_folder(app, tmp_path):
    from calib.export import export
    from calib.workdir import load_work_dir

    sess = SessionState()
    handlers.calibrate(app, sess, "builtin", None, 2, 32, "channel", False, 1)
    folder = tmp_path / "kvq"
    [path] = export(load_work_dir(sess.calib_dir), folder, "kvq")
    (folder / "notes.json").write_text("{}")
    mode, message = handlers.upload_qparams(app, sess, [str(path)])
    # the best calibrated mode of the README's table that these parameters serve (they hold key transforms)
    assert mode == "int8-qk" and "uploaded kv_qparams.safetensors, calibrated on builtin" in message
    assert handlers.upload_qparams(app, sess, [str(folder / "notes.json"), str(path)])[0] == "int8-qk"  # a folder's files
    (folder / "README.md").write_text("turbomind files, say")
    with pytest.raises(UserError, match=r"holds no kv_qparams.safetensors \(it holds README.md, notes.json\)"):
        handlers.upload_qparams(app, sess, [str(folder / "notes.json"), str(folder / "README.md")])
    with pytest.raises(Exception, match="not a readable safetensors"):
        handlers.upload_qparams(app, sess, [str(folder / "notes.json")])


def test_mode_lists_size_modes_for_the_loaded_model(app):
    labels = {value: label for label, value in handlers.kv_mode_choices(app)}
    assert labels["vllm:fp8"] == "vLLM · vllm:fp8 — 0.50x fp16" and labels["int8"].endswith("· needs calibration")
    info = handlers.mode_info(app, SessionState(), "llamacpp:q4_0-norot")
    assert info.startswith("**llama.cpp** `llamacpp:q4_0-norot`") and "6,480 B/token" in info
    assert "Turn it on: `LLAMA_ATTN_ROT_DISABLE=1 llama-server -m MODEL -ctk q4_0 -ctv q4_0 -fa on`" in info
    assert handlers.default_quantized_mode(app) == "int8-dynamic"


def test_serving_commands_follow_the_mode(app):
    assert "--quant-policy 8" in handlers.serving_commands(app, "int8-dynamic")
    text = handlers.serving_commands(app, "int8")
    assert "no equivalent of `int8`" in text and "calibration" in text and "--format vllm --model MODEL_DIR" in text


def test_calibrate_tiny_exports_and_feeds_chat(app):
    sess = SessionState()
    seen = []
    view = handlers.calibrate(app, sess, "builtin", None, 2, 32, "channel", False, 1, 3,
                              progress=lambda f, m="": seen.append(f))
    status, k_heat, v_heat, ranges, outliers, files, tm_zip, kvq, vllm_zip = view
    assert "Calibrated" in status and seen
    names = {f.rsplit("/", 1)[-1] for f in files}
    assert {"kv_qparams.safetensors", "kv_cache_scales.safetensors", "layers.0.past_kv_scale.0.weight"} <= names
    assert tm_zip.endswith(".zip") and kvq.endswith("kv_qparams.safetensors") and vllm_zip.endswith(".zip")
    assert k_heat.axes[0].images[0].get_array().shape == (app.loaded.num_kv_heads, app.loaded.head_dim)
    assert set(ranges["series"]) == {"K max", "K min", "V max", "V min"} and len(outliers) > 0
    # export options the format can't honour become a note, not a crash
    bad = handlers.reexport(app, sess, "channel", True, 2, 0)
    assert "Not exported" in bad[0] and "does not divide" in bad[0]
    handlers.reexport(app, sess, "head", True, 1, 0)
    mode, message = handlers.use_in_chat(app, sess)
    assert mode == "int8-qk" and "int8-qk" in message
    left, right, *_ = _run_chat(app, sess, mode="int8", max_new_tokens=3)[-1]
    assert sess.right.kv == "int8" and _text(right)


def test_calibration_cancel(app):
    sess = SessionState()

    def cancel_midway(fraction, message=""):
        handlers.cancel_calibration(sess)

    with pytest.raises(Exception) as info:
        handlers.calibrate(app, sess, "builtin", None, 4, 32, "channel", False, 1, progress=cancel_midway)
    assert type(info.value).__name__ == "CalibCancelled"
    assert sess.calib_stats is None


def test_library_rooms_never_import_gradio():
    code = (
        "import sys, kvcache.engine.chat, kvcache.measure.evaluate, kvcache.measure.device_memory, kvcache.cli, calib.export, calib.workdir\n"
        "assert 'gradio' not in sys.modules, 'gradio imported by the library'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cancel_pressed_before_the_run_starts(app):
    sess = SessionState()
    handlers.submit_calibration(sess)  # Calibrate (the page clears the flag here) ...
    handlers.cancel_calibration(sess)  # ... then Cancel while the run still waits in the queue
    with pytest.raises(Exception) as info:
        handlers.calibrate(app, sess, "builtin", None, 2, 32, "channel", False, 1)
    assert type(info.value).__name__ == "CalibCancelled" and sess.calib_stats is None


# --- KV pool (cache_max_entry_count) and capacity -------------------------------------------------------

LONG_MESSAGE = "Explain, step by step and with examples, how a key-value cache speeds up decoding. " * 12


def test_shared_pool_serves_every_session_and_a_full_pool_is_a_message(app, loaded_default):
    app.replace_model(loaded_default, PoolSize(cache_blocks=4))  # each pool gets the memory of 4 fp16 blocks (256 fp16 tokens)
    a, b = SessionState(), SessionState()
    _run_chat(app, a)
    _run_chat(app, b)
    assert a.left.pool is b.left.pool and a.right.pool is b.right.pool
    fp16_pool, dyn_pool = a.left.pool, a.right.pool
    assert (fp16_pool.num_blocks, dyn_pool.num_blocks) == (4, 7)  # same memory: 4 x 1,474,560 B // 783,360 B
    assert fp16_pool.num_used == 2 and dyn_pool.num_used == 2
    figures = handlers.memory(app, a)[0]
    assert figures["kv_all_sessions_bytes"] == fp16_pool.capacity_bytes + dyn_pool.capacity_bytes  # once each
    assert {p["kv"]: p["blocks_used"] for p in figures["kv_pools"]} == {"fp16": 2, "int8-dynamic": 2}
    assert "KV pool fp16" in handlers.memory(app, a)[2]

    # ~275 tokens: more than the whole fp16 pool; int8-dynamic's pool (448 tokens) still answers
    left, right, left_stats, right_stats = _run_chat(app, a, LONG_MESSAGE, max_new_tokens=4)[-1]
    assert _text(left).startswith("⚠️ Not answered: KV cache full: this request needs") and "of 256" in _text(left)
    assert "KV cache full" in left_stats
    assert _text(right) and not _text(right).startswith("⚠️") and "KV cache full" not in right_stats
    # ~200 tokens: the fp16 pool could hold them, but not while b keeps its conversation there
    left = _run_chat(app, a, LONG_MESSAGE[: len(LONG_MESSAGE) * 2 // 3], max_new_tokens=4)[-1][0]
    assert _text(left).startswith("⚠️ Not answered: KV cache full: 128 tokens in use of 256, ")
    assert "held by other conversations" in _text(left)
    # the fp16 conversation is as it was; session b never noticed
    assert [m["content"] for m in a.left.messages][-2] == "What is 2+2?" and fp16_pool.num_used == 2
    handlers.reset_chat(b)
    assert fp16_pool.num_used == 1
    del a
    gc.collect()  # a closed browser session gives its blocks back
    assert fp16_pool.num_used == 0 and dyn_pool.num_used == 0


def test_pool_from_a_fraction_of_free_memory_and_bad_values(app, loaded_default):
    with pytest.raises(ConfigError, match="not a fraction"):
        handlers.load_model(app, "default", "1.5")
    app.replace_model(loaded_default, PoolSize(0.5))
    app.engine.free_after_load = 100 * 2**20  # as if 100 MiB were free after the weights loaded
    left, right = SessionState().engines(app, "int8-dynamic")
    # half of it, split evenly between the two panes: 25 MiB each
    assert left.pool.num_blocks == 25 * 2**20 // 1_474_560 and right.pool.num_blocks == 25 * 2**20 // 783_360
    assert handlers.pool_setting(app) == "0.5"  # what the model bar shows, so Load keeps it
    report = handlers.capacity(app, SessionState(), 0.5, 2048)[0]  # the Memory tab's view: the same split
    assert {r["kv"]: r["blocks"] for r in report["results"]}["fp16"] == left.pool.num_blocks
    assert "KV pools: shared, cache_max_entry_count=0.5" in handlers.model_status(app)
    pools = {p["kv"]: p for p in handlers.memory(app, SessionState())[0]["kv_pools"]}
    assert (pools["fp16"]["blocks"], pools["fp16"]["blocks_used"], pools["fp16"]["growable"]) == (17, 0, False)


def test_capacity_both_views_against_block_arithmetic(app):
    sess = SessionState()
    report, same_memory, same_conversation = handlers.capacity(app, sess, "10 blocks", 1000)
    by_kv = {r["kv"]: r for r in report["results"]}
    # SmolLM2-135M: 30 layers x 3 KV heads x head_dim 64. fp16: 23,040 B/token, 1,474,560 B per block of 64;
    # budget 10 such blocks. int8 (per channel): 11,520 B/token + 92,160 B of fp32 parameters;
    # int8-dynamic: 12,240 B/token (an fp16 scale and zero point per token, head, K and V).
    assert report["budget_bytes"] == 10 * 1_474_560
    assert (by_kv["fp16"]["blocks"], by_kv["fp16"]["tokens"], by_kv["fp16"]["sessions"]) == (10, 640, 0)
    assert (by_kv["int8"]["blocks"], by_kv["int8"]["tokens"]) == ((14_745_600 - 92_160) // 737_280, 1216)
    assert (by_kv["int8-dynamic"]["blocks"], by_kv["int8-dynamic"]["bytes_per_token"]) == (18, 12_240)
    assert by_kv["int8"]["tokens_vs_fp16"] >= 1.9
    # same conversation of 1000 tokens = 16 blocks
    assert by_kv["fp16"]["session_bytes"] == 16 * 1_474_560 and by_kv["int8"]["session_bytes"] == 16 * 737_280 + 92_160
    assert list(same_memory["kv"]) == list(KV_MODES) and list(same_memory["tokens"])[:3] == [640, 1216, 1152]
    # int4 (K and V in 4-bit groups of 16 with an fp16 scale each: 40 B per token and head and side, 7,200 B/token)
    # holds its maps (K: key map and query map per head and layer, 2,949,120 B; V: one shared Hadamard, 16,384 B)
    # and a 92,160 B sink slot per sequence it runs (min(blocks, max_num_seqs)): 21 blocks of 460,800 B + 21 slots
    # fit the 14,745,600 B, 22 do not.
    assert (by_kv["int4"]["bytes_per_token"], by_kv["int4"]["blocks"]) == (7_200, 21)
    assert 2_965_504 + 21 * (460_800 + 92_160) <= 14_745_600 < 2_965_504 + 22 * (460_800 + 92_160)
    assert by_kv["k8v4"]["bytes_per_token"] == 30 * 3 * (64 + 2 + 32 + 4 * 2)
    assert "bytes for 1000 tokens" in same_conversation.columns
    engine = dict(zip(same_memory["kv"], same_memory["engine"]))
    assert (engine["fp16"], engine["int4"], engine["vllm:fp8"], engine["llamacpp:q4_0"]) == (
        "fp16 baseline", "ours", "vLLM", "llama.cpp")
    assert list(same_conversation["engine"]) == list(same_memory["engine"])
    with pytest.raises(ConfigError, match="fraction in \\(0, 1\\]"):
        handlers.capacity(app, sess, "lots", 1000)


def test_two_sessions_chatting_at_once_are_decoded_together(app):
    import threading
    import time as _time

    questions = ("What is the capital of France?", "Name a primary colour.")
    alone = [_run_chat(app, SessionState(), q, max_new_tokens=10)[-1][:2] for q in questions]
    for s in list(app.sessions):
        s.reset_chat()
    app.engine.worker.max_batch = 0
    results = {}

    def chat(i):
        results[i] = _run_chat(app, SessionState(), questions[i], max_new_tokens=10)[-1][:2]

    with app.device_lock:  # both turns are queued before the worker takes its first step
        threads = [threading.Thread(target=chat, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        deadline = _time.monotonic() + 60
        while sum(len(s.waiting) for s in app.engine.worker._schedulers.values()) < 2 and _time.monotonic() < deadline:
            _time.sleep(0.01)
    for t in threads:
        t.join(timeout=300)
    assert app.engine.worker.max_batch == 2  # one decode forward carried both sessions' rows of a pool
    figures, _, gauges, _, _ = handlers.memory(app, SessionState())
    assert figures["batching"]["max_batch"] == 2 and "largest decode batch 2" in gauges
    assert figures["batching"]["pools"]["fp16"] == {"running": 0, "waiting": 0}
    assert [results[0], results[1]] == alone  # and each got exactly the replies it gets alone


def test_a_shared_pool_keeps_its_qparams_alive(app):
    """Pools are found by id(qparams): the pool must hold its parameters, or a later set made at the same
    address would be handed blocks coded with the old scales."""
    import gc
    import weakref

    from kvcache import KVQParams, KVShape

    shape = KVShape.from_config(app.loaded.model.config)
    stat = [torch.ones(shape.num_kv_heads, shape.head_dim)] * shape.num_layers
    qparams = KVQParams.from_stats({"min": [-s for s in stat], "max": stat, "absmax": stat},
                                   {"min": [-s for s in stat], "max": stat, "absmax": stat})
    ref = weakref.ref(qparams)
    pool = app.engine.pool("int8", qparams)
    del qparams
    gc.collect()
    assert ref() is not None and pool.qparams is ref()
