"""Memory tab: live gauges (device, torch allocator, process, exact KV bytes) refreshed every second."""

from __future__ import annotations

import gradio as gr

from .. import charts, handlers
from ..errors import shown_in_page
from ..state import AppState

REFRESH_S = 1.0


def build(app: AppState, sess: gr.State, timer: gr.Timer) -> None:
    """The gauges; ``timer`` (made by the page) ticks only while this tab is open, so hidden tabs cost nothing."""
    banner = gr.Markdown(label="banner", elem_id="nvml-banner", elem_classes="banner")
    gauges = gr.HTML(label="gauges", elem_id="gauges", value='<div class="gauges"><div class="gauge">reading memory…</div></div>')
    with gr.Row():
        mem_plot = gr.LinePlot(x="seconds", y="MiB", color="series", title="Memory, last minutes",
                               x_title="seconds before now", y_title="MiB", height=260, elem_id="memory-plot")
        kv_plot = gr.LinePlot(x="seconds", y="MiB", color="series", title="KV cache of each conversation, last minutes",
                              x_title="seconds before now", y_title="MiB", height=260, elem_id="kv-plot")
    with gr.Accordion("Raw figures (JSON)", open=False):
        figures = gr.JSON(label="memory reading", elem_id="memory-json")
    gr.Markdown(
        "GPU figures come from NVML (v2 memory info where the driver has it, else v1); *this process* is "
        "NVML's compute-process entry for this PID, when NVML can see it (not always inside containers). "
        "torch figures are the CUDA caching allocator's. KV figures are exact: the bytes of each conversation's "
        "blocks, and each shared pool's size and use (one pool per KV mode serves every session).",
        elem_classes="note",
    )
    gr.Markdown("### Capacity: the two views people confuse", elem_id="capacity-title")
    with gr.Row(equal_height=True):
        fraction = gr.Slider(0.05, 1.0, value=0.5, step=0.05, label="cache_max_entry_count",
                             info="fraction of the memory free after the weights loaded", elem_id="capacity-fraction")
        session_tokens = gr.Number(2048, precision=0, minimum=1, label="tokens per conversation", elem_id="capacity-tokens")
        compute = gr.Button("Compute", scale=0, min_width=110, elem_id="capacity-compute")
    with gr.Row():
        same_memory = gr.Dataframe(headers=charts.same_memory_columns(), label="Same memory: how many tokens", elem_id="capacity-same-memory",
                                   interactive=False)
        same_conversation = gr.Dataframe(headers=charts.same_conversation_columns(), label="Same conversation: how many bytes",
                                         elem_id="capacity-same-conversation", interactive=False)
    with gr.Accordion("Capacity plan (JSON)", open=False):
        plan_json = gr.JSON(label="capacity plan", elem_id="capacity-json")

    def run_capacity(state, count, tokens):
        with shown_in_page():
            return handlers.capacity(app, state, count, int(tokens or 1))

    compute.click(run_capacity, [sess, fraction, session_tokens], [plan_json, same_memory, same_conversation],
                  api_name="capacity", concurrency_id="memory")

    def tick(state):
        with shown_in_page():
            return handlers.memory(app, state)

    timer.tick(tick, [sess], [figures, banner, gauges, mem_plot, kv_plot], api_name="memory",
               show_progress="hidden", concurrency_id="memory", trigger_mode="always_last")
