"""The served page's queue waits 50 ms between polls when idle, not gradio's 1 ms (7% of a core -> under 1%)."""

import gradio as gr

from ui.page import IDLE_POLL_S, queue_quietly


def test_queue_polls_every_50_ms_when_idle():
    with gr.Blocks() as demo:
        gr.Textbox()
    assert queue_quietly(demo, default_concurrency_limit=1) is demo
    assert demo._queue.sleep_when_free == IDLE_POLL_S == 0.05
    assert demo._queue.progress_update_sleep_when_free == IDLE_POLL_S
    assert demo._queue.default_concurrency_limit == 1  # the options still reach gradio
