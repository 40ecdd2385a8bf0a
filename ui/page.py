"""The whole page: a model bar over four tabs (Chat, Memory, Calibrate, Evaluate)."""

from __future__ import annotations

import gradio as gr

from . import handlers
from .errors import shown_as_warning, shown_in_page
from .state import AppState, SessionState
from .tabs import GPU
from .tabs import calibrate as calibrate_tab
from .tabs import chat as chat_tab
from .tabs import evaluate as evaluate_tab
from .tabs import memory as memory_tab

HEADER = """<div class="kvq-header"><span class="kvq-logo">KVQ Studio</span>
<span class="kvq-sub">KV-cache quantization for chat LLMs: the same model answers with an fp16 KV cache
and a quantized one, side by side</span></div>"""


def build_demo(app: AppState) -> gr.Blocks:
    with gr.Blocks(title="KVQ Studio") as demo:
        sess = gr.State(SessionState)  # one per browser session: its own chats, engines, calibration
        timer = gr.Timer(memory_tab.REFRESH_S, active=False)  # memory readings, only while the Memory tab is open
        gr.HTML(HEADER)
        eval_modes = evaluate_tab.mode_choice(app)  # rendered in the Evaluate tab; the Calibrate tab's plans join it
        with gr.Row(equal_height=True, elem_id="model-bar"):
            model_path = gr.Textbox(app.model_path, label="Model", scale=3, elem_id="model-path",
                                    info="'default' (embedded SmolLM2-135M-Instruct), a local Hugging Face folder"
                                         + (", a .gguf file or a Hub id (ORG/NAME)" if app.takes_hub_ids
                                            else " or a .gguf file"))
            pool = gr.Textbox(handlers.pool_setting(app), label="KV pool (cache_max_entry_count)", scale=1,
                              elem_id="pool-size", placeholder="grow on demand",
                              info="0.5 = half the memory free after the weights load, 400 = 400 blocks each; "
                                   "empty = grow on demand; applied at Load")
            load = gr.Button("Load", variant="secondary", scale=0, min_width=90, elem_id="load")
            status = gr.Markdown(handlers.model_status(app), label="model status", elem_id="model-status", elem_classes="model-status")
        with gr.Tabs(elem_id="tabs"):
            with gr.Tab("Chat", id="chat") as chat_page:
                chat = chat_tab.build(app, sess)
            with gr.Tab("Memory", id="memory", elem_id="memory-tab") as memory_page:
                memory_tab.build(app, sess, timer)
            with gr.Tab("Calibrate", id="calibrate", elem_id="calibrate-tab") as calibrate_page:
                calibrate_tab.build(app, sess, chat, eval_modes)
            with gr.Tab("Evaluate", id="evaluate", elem_id="evaluate-tab") as evaluate_page:
                evaluate_tab.build(app, sess, eval_modes)
        # The gauges and plots are rendered only while someone looks at them.
        memory_page.select(lambda: gr.Timer(active=True), None, [timer], queue=False, api_visibility="private")
        for other in (chat_page, calibrate_page, evaluate_page):
            other.select(lambda: gr.Timer(active=False), None, [timer], queue=False, api_visibility="private")

        def run_load(path: str, pool_size: str = "") -> tuple[str, str]:
            with shown_as_warning():  # the message goes into the page; the previous model keeps serving
                handlers.load_model(app, path, pool_size)
            return handlers.model_status(app), handlers.pool_setting(app)

        def run_lists(mode, engine, picked, state):
            """Every KV-mode list and its line again: the sizes are the loaded model's."""
            with shown_in_page():
                return (gr.update(choices=handlers.kv_mode_choices(app, state)), handlers.mode_info(app, state, mode),
                        gr.update(choices=handlers.kv_mode_choices(app, state, engine, keep=picked or [])),
                        handlers.mode_info(app, state, picked))

        lists = [chat.mode, chat.mode_info, eval_modes.modes, eval_modes.info]
        load.click(run_load, [model_path, pool], [status, pool], api_name="load_model", concurrency_id=GPU).then(
            lambda state: handlers.reset_chat(state), [sess], chat.panes, api_visibility="private", queue=False).then(
            run_lists, [chat.mode, eval_modes.engine, eval_modes.modes, sess], lists, api_visibility="private",
            queue=False)
        demo.load(lambda: handlers.model_status(app), None, [status], api_visibility="private", queue=False)
    return demo


# Gradio's queue polls for new events every millisecond on Linux when it has none, and for progress to send
# every 10 ms (gradio/queueing.py ``sleep_when_free``, ``progress_update_sleep_when_free``): about 7% of a
# core with no browser attached. Every 50 ms is still far below a chat turn's latency and smooth enough for a
# progress bar, and an idle server then costs next to nothing.
IDLE_POLL_S = 0.05


def queue_quietly(demo: gr.Blocks, **queue_options) -> gr.Blocks:
    """``demo.queue(**queue_options)``, polling every ``IDLE_POLL_S`` instead of every millisecond when idle."""
    demo.queue(**queue_options)
    queue = getattr(demo, "_queue", None)
    for knob in ("sleep_when_free", "progress_update_sleep_when_free"):  # private: versions without them keep theirs
        if queue is not None and 0 < getattr(queue, knob, IDLE_POLL_S) < IDLE_POLL_S:
            setattr(queue, knob, IDLE_POLL_S)
    return demo
