"""The whole page: a model bar over four tabs (Chat, Memory, Calibrate, Evaluate)."""

from __future__ import annotations

import gradio as gr

from . import calibrate_tab, chat_tab, evaluate_tab, handlers, memory_tab
from .chat_tab import GPU
from .state import AppState, SessionState

HEADER = """<div class="kvq-header"><span class="kvq-logo">KVQ Studio</span>
<span class="kvq-sub">KV-cache quantization for chat LLMs: the same model answers with an fp16 KV cache
and a quantized one, side by side</span></div>"""


def build_demo(app: AppState) -> gr.Blocks:
    with gr.Blocks(title="KVQ Studio") as demo:
        sess = gr.State(SessionState)  # one per browser session: its own chats, engines, calibration
        timer = gr.Timer(memory_tab.REFRESH_S)  # memory readings, whichever tab is open
        gr.HTML(HEADER)
        with gr.Row(equal_height=True, elem_id="model-bar"):
            model_path = gr.Textbox(app.model_path, label="Model", scale=3, elem_id="model-path",
                                    info="'default' (embedded SmolLM2-135M-Instruct), a local Hugging Face folder or a .gguf file")
            pool = gr.Slider(0.0, 1.0, value=app.cache_max_entry_count if isinstance(app.cache_max_entry_count, float) else 0.0,
                             step=0.05, label="KV pool (cache_max_entry_count)", scale=1, elem_id="pool-fraction",
                             info="share of memory free after the weights load; 0 = grow on demand; applied at Load")
            load = gr.Button("Load", variant="secondary", scale=0, min_width=90, elem_id="load")
            status = gr.Markdown(handlers.model_status(app), label="model status", elem_id="model-status", elem_classes="model-status")
        with gr.Tabs(elem_id="tabs"):
            with gr.Tab("Chat", id="chat"):
                chat = chat_tab.build(app, sess)
            with gr.Tab("Memory", id="memory", elem_id="memory-tab"):
                memory_tab.build(app, sess, timer)
            with gr.Tab("Calibrate", id="calibrate", elem_id="calibrate-tab"):
                calibrate_tab.build(app, sess, chat)
            with gr.Tab("Evaluate", id="evaluate", elem_id="evaluate-tab"):
                evaluate_tab.build(app, sess)

        def run_load(path: str, pool_fraction: float = 0.0) -> str:
            try:
                return handlers.load_model(app, path, pool_fraction)
            except Exception as exc:  # the message goes into the page; the previous model keeps serving
                gr.Warning(str(exc))
                return handlers.model_status(app)

        load.click(run_load, [model_path, pool], [status], api_name="load_model", concurrency_id=GPU).then(
            lambda state: handlers.reset_chat(state), [sess], chat.panes, api_visibility="private", queue=False)
        demo.load(lambda: handlers.model_status(app), None, [status], api_visibility="private", queue=False)
    return demo
