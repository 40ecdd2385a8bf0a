"""Chat tab: the fp16 KV cache (left) and a quantized one (right) answer the same message side by side."""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from .. import handlers
from ..errors import shown_in_page
from ..state import LEFT_MODE, AppState
from . import CHAT, CHAT_SESSIONS


@dataclass
class ChatTab:
    mode: gr.Dropdown
    mode_info: gr.Markdown
    left: gr.Chatbot
    right: gr.Chatbot
    left_stats: gr.Markdown
    right_stats: gr.Markdown
    note: gr.Markdown

    @property
    def panes(self) -> list[gr.components.Component]:
        return [self.left, self.right, self.left_stats, self.right_stats]


def build(app: AppState, sess: gr.State) -> ChatTab:
    modes = handlers.kv_mode_choices(app)  # every named mode but fp16, by engine; the session's plans join later
    default_mode = handlers.default_quantized_mode(app)
    with gr.Row(equal_height=True):
        with gr.Column(elem_classes="pane"):
            gr.Textbox(f"{LEFT_MODE}: the unquantized baseline", label="Baseline KV cache", interactive=False,
                       info="the left pane's KV mode", elem_id="base-mode")
            left = gr.Chatbot(label=f"{LEFT_MODE} KV", height=400, elem_id="left-chat", show_label=False,
                              placeholder="The fp16-KV answer streams here.")
            left_stats = gr.Markdown(label="fp16 stats", elem_id="left-stats", elem_classes="pane-stats")
        with gr.Column(elem_classes="pane"):
            mode = gr.Dropdown(modes, value=default_mode, label="Quantized KV cache", elem_id="kv-mode",
                               info="the right pane's KV mode, grouped by engine: pick one", interactive=True)
            mode_info = gr.Markdown(handlers.mode_info(app, None, default_mode), label="about this KV mode",
                                    elem_id="kv-mode-info", elem_classes="note")
            right = gr.Chatbot(label="quantized KV", height=400, elem_id="right-chat", show_label=False,
                               placeholder="The quantized-KV answer streams here.")
            right_stats = gr.Markdown(label="quantized stats", elem_id="right-stats", elem_classes="pane-stats")
    note = gr.Markdown(label="note", elem_id="chat-note", elem_classes="note")
    with gr.Row(equal_height=True):
        msg = gr.Textbox(placeholder="Ask both engines the same question… (Enter sends)", show_label=False,
                         scale=8, elem_id="msg", lines=1, max_lines=6, autofocus=True)
        send = gr.Button("Send", variant="primary", scale=1, elem_id="send", min_width=90)
        stop = gr.Button("Stop", variant="stop", scale=1, elem_id="stop", min_width=90)
        clear = gr.Button("Clear", variant="secondary", scale=1, elem_id="clear", min_width=90)
    pending = gr.Textbox(visible=False, label="message")  # what the chat endpoint receives
    examples = handlers.example_questions()
    if examples:
        gr.Examples([[q] for q in examples], inputs=[msg], label="Example questions (click one)", examples_per_page=8)
    system = gr.Textbox(handlers.default_system_prompt(), label="System prompt", lines=2, max_lines=8,
                        elem_id="system-prompt", info="sent to both engines at every turn; edit freely")
    with gr.Accordion("Sampling", open=False):
        with gr.Row():
            max_new = gr.Slider(1, 1024, value=256, step=1, label="Max new tokens", elem_id="max-new-tokens")
            temperature = gr.Slider(0.0, 2.0, value=0.0, step=0.05, label="Temperature",
                                    info="0 = greedy, so the two answers are comparable")
            top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="Top-p")

    tab = ChatTab(mode, mode_info, left, right, left_stats, right_stats, note)

    def take(message: str, state) -> tuple[str, str]:
        handlers.submit(state)
        return "", message

    def run_chat(message, kv_mode, system_prompt, max_new_tokens, temp, top_p_, state):
        with shown_in_page():
            yield from handlers.chat(app, state, message, kv_mode, system_prompt, max_new_tokens, temp, top_p_)

    def run_stop(state) -> None:
        handlers.stop(state)

    def run_clear(state):
        with shown_in_page():
            return handlers.reset_chat(state)

    def run_mode(kv_mode, state):
        with shown_in_page():
            return handlers.set_mode(app, state, kv_mode)

    chat_inputs = [pending, mode, system, max_new, temperature, top_p, sess]
    for trigger, api_name in ((send.click, "chat"), (msg.submit, None)):
        trigger(take, [msg, sess], [msg, pending], queue=False, api_visibility="private").then(
            run_chat, chat_inputs, tab.panes, api_name=api_name, concurrency_id=CHAT,
            concurrency_limit=CHAT_SESSIONS, show_progress="minimal",
            api_visibility="public" if api_name else "private",
        )
    stop.click(run_stop, [sess], None, api_name="stop", concurrency_limit=None, queue=False)
    clear.click(run_clear, [sess], tab.panes, api_name="reset_chat", concurrency_id=CHAT)
    mode.change(run_mode, [mode, sess], [*tab.panes, note], api_visibility="private", concurrency_id=CHAT)

    def run_info(kv_mode, state):
        with shown_in_page():
            return handlers.mode_info(app, state, kv_mode)

    mode.change(run_info, [mode, sess], [mode_info], queue=False, api_visibility="private")
    return tab
