"""Memory tab: live gauges (device, torch allocator, process, exact KV bytes) refreshed every second."""

from __future__ import annotations

import gradio as gr

from . import handlers
from .errors import shown_in_page
from .state import AppState

REFRESH_S = 1.0


def build(app: AppState, sess: gr.State, timer: gr.Timer) -> None:
    """The gauges; ``timer`` lives outside the tabs so the history fills even while another tab is open."""
    banner = gr.Markdown(label="banner", elem_id="nvml-banner", elem_classes="banner")
    gauges = gr.HTML(label="gauges", elem_id="gauges", value='<div class="gauges"><div class="gauge">reading memory…</div></div>')
    with gr.Row():
        mem_plot = gr.LinePlot(x="seconds", y="MiB", color="series", title="Memory, last minutes",
                               x_title="seconds before now", y_title="MiB", height=260, elem_id="memory-plot")
        kv_plot = gr.LinePlot(x="seconds", y="MiB", color="series", title="KV cache held, last minutes",
                              x_title="seconds before now", y_title="MiB", height=260, elem_id="kv-plot")
    with gr.Accordion("Raw figures (JSON)", open=False):
        figures = gr.JSON(label="memory reading", elem_id="memory-json")
    gr.Markdown(
        "GPU figures come from NVML (v2 memory info where the driver has it, else v1); *this process* is "
        "NVML's compute-process entry for this PID, when NVML can see it (not always inside containers). "
        "torch figures are the CUDA caching allocator's. KV figures are exact: the bytes each engine's block "
        "pool holds, and how many tokens that storage can take.",
        elem_classes="note",
    )
    def tick(state):
        with shown_in_page():
            return handlers.memory(app, state)

    timer.tick(tick, [sess], [figures, banner, gauges, mem_plot, kv_plot], api_name="memory",
               show_progress="hidden", concurrency_id="memory", trigger_mode="always_last")
