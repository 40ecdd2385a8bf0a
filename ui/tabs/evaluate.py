"""Evaluate tab: perplexity, KL and top-1 agreement of KV modes against fp16, as a table, bars and Δppl vs bytes."""

from __future__ import annotations

import gradio as gr

from .. import charts, handlers
from ..errors import shown_in_page
from ..state import AppState
from . import GPU

SOURCES = [("built-in English technical prose", "builtin-en"), ("built-in Chinese politics-exam prose", "builtin-zh"),
           ("uploaded text file", "upload")]


def mode_choice() -> gr.CheckboxGroup:
    """The tab's KV-mode choice, made before the tabs (unrendered) so the Calibrate tab's planner can add its plans."""
    modes = handlers.kv_mode_choices()
    return gr.CheckboxGroup(modes, value=[m for m in modes if m == "int8-dynamic"] or modes[:1],
                            label="KV modes (fp16 is always the reference)", elem_id="eval-modes", render=False)


def build(app: AppState, sess: gr.State, chosen: gr.CheckboxGroup) -> None:
    """The tab; ``chosen`` is :func:`mode_choice`'s, rendered here."""
    with gr.Row():
        with gr.Column(scale=1, min_width=300):
            source = gr.Radio(SOURCES, value="builtin-en", label="Text", elem_id="eval-source",
                              info="not the calibration text: static parameters look better on what they saw")
            upload = gr.File(label="Text to score (UTF-8 .txt)", file_types=[".txt"], type="filepath", visible=False,
                             elem_id="eval-upload")
            chosen.render()
            seqlen = gr.Slider(32, 2048, value=256, step=32, label="Sequence length (tokens per window)")
            samples = gr.Slider(1, 64, value=4, step=1, label="Windows")
            greedy_prompts = gr.Slider(0, 16, value=2, step=1, label="Greedy prompts",
                                       info="windows whose start each mode continues greedily (first divergence)")
            greedy_tokens = gr.Slider(1, 128, value=16, step=1, label="Greedy tokens",
                                      info="tokens generated per prompt")
            run = gr.Button("Evaluate", variant="primary", elem_id="eval-run")
        with gr.Column(scale=2):
            summary = gr.Markdown(label="summary", elem_id="eval-summary", elem_classes="note")
            table = gr.Dataframe(headers=charts.EVAL_COLUMNS, label="Results", interactive=False, elem_id="eval-table")
            with gr.Row():
                quality = gr.BarPlot(x="kv", y="Δppl %", color="kv", title="Perplexity change vs fp16 (%)", height=240)
                cost = gr.BarPlot(x="kv", y="KV bytes/token", color="kv", title="KV bytes per token", height=240)
            tradeoff = gr.ScatterPlot(x="bytes vs fp16", y="Δppl %", color="kv", tooltip=charts.SCATTER_COLUMNS,
                                      title="Δppl (%) against KV bytes per token (ratio to fp16), one point per mode",
                                      x_title="KV bytes per token / fp16's", y_title="Δppl %", x_lim=[0, 1.05],
                                      height=300, elem_id="eval-tradeoff")

    def run_eval(source_, upload_, chosen_, seqlen_, samples_, prompts_, tokens_, state, progress=gr.Progress()):
        def report(fraction: float, message: str = "") -> None:
            progress(fraction, desc=message)

        with shown_in_page():
            summary_, table_, quality_, cost_, tradeoff_ = handlers.evaluate(
                app, state, source_, upload_, chosen_, seqlen_, samples_, prompts_, tokens_, progress=report)
        top = float(cost_["KV bytes/token"].max()) * 1.1  # bars from zero, so the saving reads true
        return summary_, table_, quality_, gr.update(value=cost_, y_lim=[0, top]), tradeoff_

    source.change(lambda s: gr.update(visible=s == "upload"), [source], [upload], queue=False, api_visibility="private")
    run.click(run_eval, [source, upload, chosen, seqlen, samples, greedy_prompts, greedy_tokens, sess], [summary, table, quality, cost, tradeoff],
              api_name="evaluate", concurrency_id=GPU)
