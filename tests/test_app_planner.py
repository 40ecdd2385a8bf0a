"""Issue 12 in the app: every KV mode in the mode lists, the Calibrate tab's bit planner, Δppl against bytes.

Handlers as plain functions on the real default model. The planner's per-layer sensitivity sweep (240
teacher-forced passes) is replaced by fixed KL figures where a test needs a known plan; choosing the plan,
verifying it through the real cache on the held-out windows, writing its file and everything after are the real ones.
"""

import gradio as gr
import pytest
import torch

from kvcache.config import BASELINE_MODE
from kvcache.errors import KVQError
from kvcache.modes import KV_MODES, get_mode
from kvcache.shape import KVShape
from ui import build_demo, charts, handlers
from ui.errors import shown_in_page
from ui.state import AppState, SessionState


@pytest.fixture
def app(loaded_default, tmp_path):
    state = AppState(work_root=tmp_path)
    state.replace_model(loaded_default)
    yield state
    state.cleanup()


@pytest.fixture(scope="module")
def calibrated_qparams(loaded_default, tmp_path_factory):
    """This session's calibration (2 x 32 tokens of the built-in text), as 'Use in chat' loads it."""
    app = AppState(work_root=tmp_path_factory.mktemp("calib"))
    app.replace_model(loaded_default)
    sess = SessionState()
    handlers.calibrate(app, sess, "builtin", None, 2, 32, "channel", False, 1)
    handlers.use_in_chat(app, sess)
    yield sess.qparams
    app.cleanup()


def _fixed_sensitivity(free_v4_layers=(0,), kl_8bit=0.0, seen=None):
    """KL 0 at 16 bits, ``kl_8bit`` at 8, 1.0 below, but V at 4 bits free in ``free_v4_layers``: a known plan.

    ``seen`` collects the windows the sensitivities were measured on.
    """
    def sensitivity(scorer, options, num_layers, progress=None):
        if seen is not None:
            seen.append(scorer.windows)
        kl = {16: 0.0, 8: kl_8bit}
        out = {side: [[kl.get(c.bits, 1.0) for c in opts] for _ in range(num_layers)] for side, opts in options.items()}
        for i in free_v4_layers:
            out["v"][i][[c.bits for c in options["v"]].index(4)] = 0.0
        if progress:
            progress(1.0, "sensitivity (fixed for the test)")
        return out
    return sensitivity


def _shape(app):
    return KVShape.from_config(app.loaded.model.config)


def _component(demo, elem_id):
    return next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == elem_id)


def test_mode_lists_offer_every_library_mode(app):
    quantized = [name for name in KV_MODES if name != BASELINE_MODE]  # fp16 is the left pane / the reference
    values = lambda choices: [value for _, value in choices]  # noqa: E731  ((label, value) pairs, grouped by engine)
    assert sorted(values(handlers.kv_mode_choices())) == sorted(quantized) and {"k8v4", "int4", "int8-qk", "int8-rot"} <= set(quantized)
    demo = build_demo(app)
    for elem_id in ("kv-mode", "eval-modes"):
        assert [value for _, value in _component(demo, elem_id).choices] == values(handlers.kv_mode_choices(app))
    # a session's plans join the lists as ours: tests/test_mode_lists.py


def test_calibrated_modes_need_then_use_the_sessions_parameters(app, calibrated_qparams):
    sess = SessionState()
    for mode in ("int8-qk", "k8v4", "int4"):
        assert "needs calibrated parameters" in handlers.set_mode(app, sess, mode)[-1]
    with pytest.raises(KVQError, match="KV mode k8v4 needs calibrated parameters: run a calibration"):
        list(handlers.chat(app, sess, "Hi", "k8v4", "", 2))
    sess.use_qparams(calibrated_qparams, "this session's calibration")
    assert handlers.set_mode(app, sess, "k8v4")[-1] == "k8v4 with parameters from this session's calibration."
    right = list(handlers.chat(app, sess, "What is 2+2?", "k8v4", "", 3))[-1][1]
    assert sess.right.kv == "k8v4" and right[-1]["content"]


def test_planner_gives_a_table_a_plan_file_and_a_chat_mode(app, monkeypatch):
    import calib.plan

    windows, real_make_plan = [], calib.plan.make_plan
    monkeypatch.setattr("calib.plan.sensitivity", _fixed_sensitivity(free_v4_layers=(0, 5), seen=windows))
    monkeypatch.setattr("calib.plan.make_plan",
                        lambda held, *a, **kw: windows.append(held.windows) or real_make_plan(held, *a, **kw))
    sess, seen = SessionState(), []
    summary, table, path, label = handlers.plan_bits(app, sess, 3.0, 4, 64, progress=lambda f, m="": seen.append(f))
    # chosen on two windows, verified on the two others
    chosen_on, verified_on = windows
    assert chosen_on.shape == verified_on.shape == (2, 64)
    assert not any(torch.equal(a, b) for a in chosen_on for b in verified_on)
    shape = _shape(app)
    assert list(table.columns) == charts.PLAN_COLUMNS and list(table["layer"]) == list(range(shape.num_layers))
    assert list(table["K bits"]) == [8] * shape.num_layers
    assert [i for i, b in enumerate(table["V bits"]) if b == 4] == [0, 5]
    mode = get_mode(path)  # the file every --kv and the chat take
    assert path.endswith("kv_plan_dppl3.json") and path.startswith(str(app.work_root))
    assert [(k.bits, v.bits) for k, v in mode.layers] == list(zip(table["K bits"], table["V bits"]))
    assert list(table["V"]) == [v.label() for _, v in mode.layers] and not mode.needs_qparams
    fp16 = get_mode(BASELINE_MODE).bytes_per_token(shape)
    saved_mib = (fp16 - mode.bytes_per_token_at(shape)) * 2048 / charts.MiB
    assert f"**{mode.bytes_per_token(shape):,} B** vs fp16's {fp16:,} B" in summary
    assert f"{saved_mib:.2f} MiB saved** across all 30 layers" in summary and "calibration-free candidates" in summary
    assert "held-out windows: measured Δppl" in summary and "95% interval up to **" in summary and seen[-1] == 1.0
    assert "Δppl predicted" in summary and "2 x 64 held out" in summary
    # selectable in chat (and in Evaluate) as "plan: <name>"
    assert label == "plan: kv_plan_dppl3" and handlers.kv_mode_choices(app, sess)[-1][1] == label
    assert "per-layer plan (30 layers)" in handlers.set_mode(app, sess, label)[-1]
    right = list(handlers.chat(app, sess, "What is 2+2?", label, "", 3))[-1][1]
    assert sess.right.kv == path and right[-1]["content"]
    with pytest.raises(KVQError, match="not a plan of this session"):
        handlers.set_mode(app, sess, "plan: someone-elses")
    assert handlers.plan_bits(app, sess, 3.0, 4, 64)[3] == "plan: kv_plan_dppl3_1"  # a second plan keeps the first


def test_unmeetable_budget_is_a_one_line_page_message(app, monkeypatch):
    from kvcache.measure.planner import Scorer

    monkeypatch.setattr("calib.plan.sensitivity", _fixed_sensitivity((), kl_8bit=0.01))
    real_score = Scorer.score

    def costly(self, mode):  # a held-out text on which every plan, 8 bits everywhere too, costs 1% more
        got = real_score(self, mode)
        return {**got, "dppl_pct": got["dppl_pct"] + 1, "dppl_interval": [x + 1 for x in got["dppl_interval"]]}

    monkeypatch.setattr(Scorer, "score", costly)
    sess = SessionState()
    with pytest.raises(gr.Error) as err, shown_in_page():
        handlers.plan_bits(app, sess, 0.5, 4, 64)
    message = err.value.message
    assert "\n" not in message and message.startswith("no plan meets Δppl <= 0.5% on the held-out planning windows")
    assert "raise the budget" in message and "internal error" not in message and sess.plans == {}
    with pytest.raises(gr.Error) as err, shown_in_page():
        handlers.plan_bits(app, sess, 3.0, 3, 64)
    message = err.value.message
    assert message.startswith("the planner needs at least 4 planning windows") and "\n" not in message


def test_scatter_has_one_point_per_mode_at_its_bytes_ratio(app, calibrated_qparams, monkeypatch):
    monkeypatch.setattr("calib.plan.sensitivity", _fixed_sensitivity())
    sess = SessionState()
    sess.use_qparams(calibrated_qparams, "this session's calibration")
    summary, _, path, label = handlers.plan_bits(app, sess, 3.0, 4, 32)  # with calibrated keys: their candidates
    assert "calibrated key transforms from this session's calibration" in summary
    modes = [*handlers.quantized_modes(), label]
    summary, table, _, _, tradeoff, *_ = handlers.evaluate(app, sess, "builtin-en", None, modes, 32, 1, 0, 1)
    shape = _shape(app)
    fp16 = get_mode(BASELINE_MODE).bytes_per_token(shape)
    assert list(tradeoff["kv"]) == [BASELINE_MODE, *modes] and list(tradeoff.columns) == charts.SCATTER_COLUMNS
    # a 2,048-token sequence's bytes, its 4 fp16 sink tokens spread over it, over fp16's
    want_x = [get_mode(m).bytes_per_token_at(shape, 2048) / fp16 for m in [BASELINE_MODE, *modes[:-1], path]]
    assert list(tradeoff["bytes vs fp16"]) == pytest.approx(want_x, abs=1e-4)
    rows = sess.eval_report["results"]
    assert list(tradeoff["Δppl %"]) == pytest.approx([r["delta_ppl_pct"] for r in rows], abs=1e-4)
    assert list(tradeoff["top-1 %"]) == pytest.approx([r["top1_match_pct"] for r in rows], abs=0.01)
    assert tradeoff["top-1 %"].iloc[0] == 100 and tradeoff["bytes vs fp16"].iloc[0] == 1
    assert get_mode(path).needs_qparams and all(k.qk_transform for k, _ in get_mode(path).layers)
    assert list(table["kv"])[-1] == label and list(table["calibrated on"])[-1] == "builtin, 2 x 32"
