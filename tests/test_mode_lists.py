"""The app's KV-mode lists (ui.modes) and the `modes` listing, grouped by engine: fast, no model, no browser."""

import json
from types import SimpleNamespace

import pytest

from kvcache.codec import INT8_TOKEN, KVMode
from kvcache.modes import KV_MODES, plan_to_json
from kvcache.shape import KVShape
from ui import charts, modes
from ui.state import AppState, SessionState, UserError

ENGINE_ORDER = ["kvq", "vllm", "sglang", "lmdeploy", "llamacpp", "hf"]  # issue 18: ours first, then the engines
SMOL = KVShape(num_layers=30, num_kv_heads=3, head_dim=64, num_heads=9)  # SmolLM2-135M: fp16 23,040 B/token


def _app(tmp_path, shape=SMOL):
    app = AppState(work_root=tmp_path)
    app.engine = SimpleNamespace(shape=shape)  # only the shape of the loaded model is read
    return app


def test_every_mode_once_grouped_by_engine_values_are_names(tmp_path):
    choices = modes.kv_mode_choices(_app(tmp_path))
    values = [v for _, v in choices]
    assert len(values) == len(set(values))
    assert set(values) == set(KV_MODES) - {"fp16"}  # fp16 is the left pane and every evaluation's reference
    engines = [KV_MODES[v].engine for v in values]
    assert engines == sorted(engines, key=ENGINE_ORDER.index)  # contiguous groups, in this order
    assert list(dict.fromkeys(engines)) == ENGINE_ORDER
    for engine in ENGINE_ORDER:  # within a group, the engine's own table order
        assert [v for v in values if KV_MODES[v].engine == engine] == [
            n for n, m in KV_MODES.items() if m.engine == engine and n != "fp16"]


def test_labels_name_the_engine_size_and_calibration(tmp_path):
    labels = dict((v, label) for label, v in modes.kv_mode_choices(_app(tmp_path)))
    assert labels["vllm:fp8"] == "vLLM · vllm:fp8 — 0.50x fp16"  # one byte per element, per-tensor scale
    # int4: 7,200 B/token and 4 fp16 sink tokens over 2,048: (7200 + 4 * 23040 / 2048) / 23040 = 0.3145
    assert labels["int4"] == "ours · int4 — 0.31x fp16 · needs calibration"
    assert labels["int8-dynamic"] == "ours · int8-dynamic — 0.53x fp16"  # 12,240 / 23,040
    assert labels["llamacpp:q4_0-norot"].startswith("llama.cpp · ")
    assert labels["hf:quanto-int4"].startswith("transformers · ")
    assert labels["sglang:fp8_e4m3"].startswith("SGLang · ") and labels["lmdeploy:4"].startswith("LMDeploy · ")
    assert all("needs calibration" in labels[v] for v in labels if KV_MODES[v].needs_qparams)
    assert not any("needs calibration" in labels[v] for v in labels if not KV_MODES[v].needs_qparams)
    # no model loaded: the bits; a model whose head_dim cannot be rotated or split in 32s: said so
    assert dict((v, lb) for lb, v in modes.kv_mode_choices())["vllm:fp8"] == "vLLM · vllm:fp8 — K 8 / V 8 bits"
    odd = dict((v, lb) for lb, v in modes.kv_mode_choices(_app(tmp_path, KVShape(2, 2, 48, 4))))
    assert odd["int8-rot"].endswith("not for this model") and odd["llamacpp:q4_0-norot"].endswith("not for this model")
    assert odd["int8-dynamic"].endswith("x fp16")


def test_info_line_says_what_turns_each_mode_on(tmp_path):
    app = _app(tmp_path)
    for name, mode in KV_MODES.items():
        assert f"Turn it on: `{mode.serve}`" in modes.mode_info(app, None, name)
    line = modes.mode_info(app, None, "vllm:fp8")
    assert line.startswith("**vLLM** `vllm:fp8`: ") and "vllm serve MODEL --kv-cache-dtype fp8" in line
    assert "0.50x fp16, 11,520 B/token" in line
    assert "Needs calibrated parameters" in modes.mode_info(app, None, "int8")
    both = modes.mode_info(app, None, ["llamacpp:q4_0-norot", "hf:hqq-int2"]).split("\n\n")
    assert "LLAMA_ATTN_ROT_DISABLE=1" in both[0] and 'QuantizedCache(backend="hqq"' in both[1]
    assert modes.mode_info(app, None, []) == "" and modes.mode_info(app, None, None) == ""


def test_engine_filter_keeps_only_that_engines_modes_and_the_picked_ones(tmp_path):
    app = _app(tmp_path)
    for engine in ENGINE_ORDER:
        values = [v for _, v in modes.kv_mode_choices(app, None, engine)]
        assert values and all(KV_MODES[v].engine == engine for v in values)
        assert len(values) == sum(m.engine == engine for n, m in KV_MODES.items() if n != "fp16")
    kept = [v for _, v in modes.kv_mode_choices(app, None, "vllm", keep=["int8-dynamic", "hf:hqq-int4"])]
    assert kept[0] == "int8-dynamic" and kept[-1] == "hf:hqq-int4"  # still in engine order
    assert [v for v in kept if KV_MODES[v].engine == "vllm"] == [v for _, v in modes.kv_mode_choices(app, None, "vllm")]
    assert len(modes.kv_mode_choices(app, None, modes.ALL_ENGINES)) == len(KV_MODES) - 1
    with pytest.raises(UserError, match="Unknown engine 'trt'"):
        modes.kv_mode_choices(app, None, "trt")
    assert [v for _, v in modes.engine_choices()] == ["all", *ENGINE_ORDER]


def test_a_sessions_plan_is_ours_in_every_list(tmp_path):
    app, sess = _app(tmp_path), SessionState()
    plan = KVMode("p", "two int8 layers", layers=((INT8_TOKEN, INT8_TOKEN),) * 30)
    path = tmp_path / "tight.json"
    path.write_text(json.dumps(plan_to_json(plan)))
    label = sess.add_plan(path)
    choices = dict((v, lb) for lb, v in modes.kv_mode_choices(app, sess))
    assert choices[label] == "ours · plan: tight — 0.53x fp16"
    assert label in [v for _, v in modes.kv_mode_choices(app, sess, "kvq")]
    assert label not in [v for _, v in modes.kv_mode_choices(app, sess, "vllm")]
    assert modes.mode_info(app, sess, label).startswith("**ours** `plan: tight`: two int8 layers")
    assert f"--kv {path}" in modes.mode_info(app, sess, label)


def test_quality_vs_bytes_points_and_capacity_rows_carry_their_engine():
    report = {"results": [dict(kv=kv, kv_ratio_to_fp16=r, delta_ppl_pct=d, top1_match_pct=t, kv_bytes_per_token=b)
                          for kv, r, d, t, b in [("fp16", 1.0, 0.0, 100.0, 23040), ("int8-dynamic", 0.531, 0.1, 99.0, 12240),
                                                 ("vllm:fp8", 0.5, 0.4, 98.0, 11520), ("llamacpp:q4_0", 0.281, 2.0, 90.0, 6480)]]}
    frame = charts.eval_scatter(report)
    assert list(frame["engine"]) == ["fp16 baseline", "ours", "vLLM", "llama.cpp"]
    assert set(frame["engine"]) <= set(charts.ENGINE_COLOURS)  # each has its colour in the legend
    assert len(set(charts.ENGINE_COLOURS.values())) == len(charts.ENGINE_COLOURS)
    assert "engine" in charts.SCATTER_COLUMNS


def test_page_lists_are_labelled_pairs(tmp_path):
    from ui import build_demo

    demo = build_demo(AppState(work_root=tmp_path))  # no model: the page still builds, sizes in bits
    by_id = {b.elem_id: b for b in demo.blocks.values() if getattr(b, "elem_id", None)}
    for elem_id in ("kv-mode", "eval-modes"):
        values = [v for _, v in by_id[elem_id].choices]
        assert len(values) == len(KV_MODES) - 1 and values[0] == "int8"
        assert dict((v, lb) for lb, v in by_id[elem_id].choices)["vllm:fp8"] == "vLLM · vllm:fp8 — K 8 / V 8 bits"
    assert "Turn it on: `--kv int8-dynamic`" in by_id["kv-mode-info"].value
    assert [v for _, v in by_id["eval-engine"].choices] == ["all", *ENGINE_ORDER]


def test_modes_listing_grouped_by_engine_with_every_per_sequence_cost():
    from kvcache.measure.modes_listing import format_modes_by_engine

    picked = [KV_MODES[n] for n in ("hf:quanto-int4", "vllm:turboquant_k8v4", "int4", "fp16", "llamacpp:q4_0")]
    lines = format_modes_by_engine(picked, SMOL).splitlines()
    heads = [line for line in lines if line.endswith(("mode", "modes"))]
    assert heads == ["kvq (ours): 2 modes", "vllm: 1 mode", "llamacpp: 1 mode", "hf: 1 mode"]
    rows = {line.split()[0]: line.split() for line in lines[1:] if line and line not in heads}
    # TurboQuant k8v4 keeps the first and last 2 of 30 layers in 16 bits: K (26 * 8 + 4 * 16) / 30 = 9.07 bits
    assert rows["vllm:turboquant_k8v4"][1:3] == ["9.07", "5.6"]
    # int4: 4 fp16 sink tokens once per sequence = 4 * 23,040 B; 7,200 + 92,160 / 2,048 = 7,245 B/token
    assert rows["int4"][4:8] == ["7,200", "92,160", "(4", "sinks)"] and "7,245" in rows["int4"]
    # transformers' window: 128 tokens held in 16 bits instead of 6,480 B codes: 128 * (23,040 - 6,480) B
    assert rows["hf:quanto-int4"][4:6] == ["6,480", "2,119,680"] and "7,515" in rows["hf:quanto-int4"]
    assert lines[-1].endswith('QuantizedCache(backend="quanto", config=model.config, nbits=4)')
    assert rows["fp16"][-2:] == ["--kv", "fp16"]


def test_modes_json_counts_the_layers_a_mode_leaves_in_16_bits():
    from kvcache.measure.modes_listing import format_modes_by_engine, mode_facts

    picked = [KV_MODES[n] for n in ("vllm:turboquant_k8v4", "k8v4")]
    config = SimpleNamespace(num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                             hidden_size=576)
    facts = {f["name"]: f for f in mode_facts(picked, config)}
    # TurboQuant k8v4 keeps the first and last 2 of 30 layers in 16 bits: K (26 * 8 + 4 * 16) / 30, V (26 * 4 + 64) / 30
    assert (facts["vllm:turboquant_k8v4"]["k_bits"], facts["vllm:turboquant_k8v4"]["v_bits"]) == (9.067, 5.6)
    assert (facts["k8v4"]["k_bits"], facts["k8v4"]["v_bits"]) == (8, 4)
    lines = format_modes_by_engine(picked, KVShape.from_config(config)).splitlines()
    rows = {line.split()[0]: line.split() for line in lines[1:] if line and not line.endswith(("mode", "modes"))}
    for name, f in facts.items():
        assert rows[name][1:3] == [f"{f['k_bits']:.3g}", f"{f['v_bits']:.3g}"]  # the JSON and the table agree
