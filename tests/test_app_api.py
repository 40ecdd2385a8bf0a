"""The app as users run it (`python app.py` on a free port), driven through its named API endpoints."""

from pathlib import Path

import pytest
from gradio_client import Client, handle_file

from kvcache.modes import KV_MODES

ENDPOINTS = {"/load_model", "/chat", "/stop", "/reset_chat", "/memory", "/calibrate", "/cancel_calibration",
             "/use_in_chat", "/upload_qparams", "/evaluate", "/capacity", "/plan_bits"}


@pytest.fixture(scope="module")
def client(app_server):
    return Client(app_server, verbose=False)


def _text(history: list[dict]) -> str:
    content = history[-1]["content"]
    if isinstance(content, list):  # gradio 6: a list of typed parts
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return str(content)


def test_named_endpoints(client):
    api = client.view_api(print_info=False, return_format="dict")
    assert ENDPOINTS <= set(api["named_endpoints"])


def test_load_model_failure_keeps_the_previous_model(client):
    status, pool = client.predict("/no/such/model.gguf", "", api_name="/load_model")
    assert "does not exist" in status and "still serving the previous model" in status
    assert "SmolLM2-135M-Instruct" in status and pool == ""
    status, pool = client.predict("default", "", api_name="/load_model")
    assert status.startswith("**SmolLM2-135M-Instruct**") and "30 layers" in status


def test_chat_turn_returns_two_answers(client):
    left, right, left_stats, right_stats = client.predict(
        "What is the capital of France?", "int8-dynamic", "You are a helpful assistant.", 12, 0.0, 1.0, api_name="/chat"
    )
    assert _text(left).strip() and _text(right).strip()
    assert len(left) == len(right) == 2
    assert "tokens/s" in left_stats and "tokens/s" in right_stats and "generating" not in left_stats


def test_memory_returns_figures_per_session(app_server, client):
    figures, banner, gauges, mem_plot, kv_plot = client.predict(api_name="/memory")
    assert figures["process_rss"] > 0 and figures["system_total"] > 0
    kv = figures["kv"]
    assert kv["fp16 (left)"]["bytes_held"] > 0 and kv["int8-dynamic (right)"]["bytes_held"] > 0
    assert kv["int8-dynamic (right)"]["bytes_per_token"] < kv["fp16 (left)"]["bytes_per_token"]
    if figures["nvml_error"]:
        assert "NVIDIA" in banner
    else:
        assert figures["gpus"] and figures["gpus"][0]["total"] > 0
    assert "gauge-fill" in gauges
    # another client is another browser session: it has no engines of its own yet
    other = Client(app_server, verbose=False)
    assert all(v is None for v in other.predict(api_name="/memory")[0]["kv"].values())


def test_tiny_calibration_returns_files(client):
    out = client.predict("builtin", None, 2, 64, "channel", "asym", 1, 0, api_name="/calibrate")
    status, k_heat, v_heat, ranges, outliers, files, tm_zip, kvq, vllm_zip = out
    assert "Calibrated" in status and "2 samples x 64 tokens" in status
    names = {Path(f).name for f in files}
    assert {"kv_qparams.safetensors", "kv_cache_scales.safetensors", "README_vllm.md",
            "layers.0.past_kv_scale.0.weight", "kv_qparams_turbomind.json"} <= names
    assert Path(kvq).name == "kv_qparams.safetensors" and Path(kvq).stat().st_size > 0
    assert Path(tm_zip).suffix == ".zip" and Path(vllm_zip).suffix == ".zip"
    assert k_heat and v_heat  # plots (matplotlib images)
    mode, note = client.predict(api_name="/use_in_chat")
    assert mode == "int8-qk" and "int8-qk" in note


def test_uploads_over_the_limit_are_refused(client, tmp_path):
    big = tmp_path / "big.txt"
    big.write_text("calibration text " * 200_000)  # ~3.4 MB, over the fixture's --max-upload-mb 2
    with pytest.raises(ValueError, match="exceeds the maximum file size"):
        client.predict("upload", handle_file(str(big)), 2, 64, "channel", "asym", 1, 0, api_name="/calibrate")


def test_tiny_evaluation_returns_a_table(client):
    summary, table, quality, cost, tradeoff, positions, growth = client.predict(
        "builtin-en", None, ["int8-dynamic"], 32, 1, 1, 2, api_name="/evaluate")
    assert "1 windows x 32 tokens" in summary
    headers = table["headers"]
    assert headers[:3] == ["kv", "perplexity", "Δppl %"] and "top-1 %" in headers
    assert [row[0] for row in table["data"]] == ["fp16", "int8-dynamic"]
    bytes_col = headers.index("KV bytes/token")
    assert table["data"][1][bytes_col] < table["data"][0][bytes_col]  # int8 stores fewer KV bytes per token
    assert tradeoff and "fp16 baseline" in str(tradeoff)  # the Δppl-against-bytes scatter, points by engine
    assert positions["headers"][:2] == ["kv", "positions"] and growth


def test_capacity_endpoint_gives_both_views(client):
    report, same_memory, same_conversation = client.predict(0.5, 2048, api_name="/capacity")
    by_kv = {r["kv"]: r for r in report["results"]}
    # one pane's pool: half the free memory, split between the two panes' pools as the app's own pools are
    assert report["cache_max_entry_count"] == 0.5 and report["budget_bytes"] == int(0.5 * report["free_bytes"]) // 2
    assert by_kv["int8"]["tokens_vs_fp16"] >= 1.95 and by_kv["int8"]["session_bytes_vs_fp16"] < 0.51
    assert same_memory["headers"][:3] == ["kv", "blocks", "tokens"]
    assert [row[0] for row in same_conversation["data"]] == list(KV_MODES)
