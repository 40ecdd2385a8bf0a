"""Evaluate tab: KL, Δppl and top-1 of KV modes against fp16 (overall and by position, windows up to the model's
context), the pass-key retrieval grid as heatmaps beside fp16's, and which option of an engine to pick."""

from __future__ import annotations

import gradio as gr

from kvcache.measure.recommend import engines

from .. import charts, handlers
from ..errors import shown_in_page
from ..state import AppState
from . import GPU

SOURCES = [("built-in English technical prose", "builtin-en"), ("built-in Chinese politics-exam prose", "builtin-zh"),
           ("built-in long English narrative (2 x 8K tokens)", "builtin-en-long"), ("uploaded text file", "upload")]
NEEDLE_LENGTHS = [1024, 2048, 4096, 8192]
NEEDLE_DEPTHS = [0, 0.25, 0.5, 0.75, 1]


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
            seqlen = gr.Slider(32, 8192, value=256, step=32, label="Sequence length (tokens per window)",
                               info="up to the model's context; long windows are scored chunk by chunk through the cache")
            samples = gr.Slider(1, 64, value=4, step=1, label="Windows")
            greedy_prompts = gr.Slider(0, 16, value=2, step=1, label="Greedy prompts",
                                       info="windows whose start each mode continues greedily (first divergence)")
            greedy_tokens = gr.Slider(1, 128, value=16, step=1, label="Greedy tokens",
                                      info="tokens generated per prompt")
            with gr.Row():
                run = gr.Button("Evaluate", variant="primary", elem_id="eval-run")
                cancel = gr.Button("Cancel", variant="stop", elem_id="eval-cancel")
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
            with gr.Row():
                positions = gr.Dataframe(headers=charts.POSITION_COLUMNS, label="By position in the window",
                                         interactive=False, elem_id="eval-positions")
                growth = gr.LinePlot(x="position", y="KL vs fp16", color="kv", title="KL by position (bucket end)",
                                     height=260, elem_id="eval-growth")
    with gr.Accordion("Retrieval: a pass key hidden in a long context", open=False):
        with gr.Row():
            with gr.Column(scale=1, min_width=300):
                lengths = gr.CheckboxGroup(NEEDLE_LENGTHS, value=[1024, 4096], label="Context lengths (tokens)",
                                           elem_id="needle-lengths")
                depths = gr.CheckboxGroup(NEEDLE_DEPTHS, value=[0, 0.5, 1], label="Needle depths",
                                          info="0: first, 1: right before the question", elem_id="needle-depths")
                trials = gr.Slider(1, 5, value=2, step=1, label="Pass keys per cell")
                needle_run = gr.Button("Run the grid (the modes chosen above, and fp16)", elem_id="needle-run")
            with gr.Column(scale=2):
                needle_summary = gr.Markdown(elem_id="needle-summary", elem_classes="note")
                needle_plot = gr.Plot(label="Pass keys found, per mode", elem_id="needle-plot")
    with gr.Accordion("Which to pick: one engine's options and ours, measured at your context", open=False):
        with gr.Row():
            with gr.Column(scale=1, min_width=300):
                engine = gr.Dropdown(engines(), value="vllm", label="Engine", elem_id="rec-engine")
                context = gr.Slider(256, 8192, value=4096, step=256, label="Context (tokens per sequence)")
                budget = gr.Number(value=1024, label="KV budget (MiB)", minimum=0, elem_id="rec-budget")
                rec_run = gr.Button("Rank the options", elem_id="rec-run")
            with gr.Column(scale=2):
                rec_summary = gr.Markdown(elem_id="rec-summary", elem_classes="note")
                rec_table = gr.Dataframe(headers=charts.RECOMMEND_COLUMNS, label="Ranked", interactive=False,
                                         elem_id="rec-table")

    def run_eval(source_, upload_, chosen_, seqlen_, samples_, prompts_, tokens_, state, progress=gr.Progress()):
        def report(fraction: float, message: str = "") -> None:
            progress(fraction, desc=message)

        with shown_in_page():
            summary_, table_, quality_, cost_, tradeoff_, positions_, growth_ = handlers.evaluate(
                app, state, source_, upload_, chosen_, seqlen_, samples_, prompts_, tokens_, progress=report)
        top = float(cost_["KV bytes/token"].max()) * 1.1  # bars from zero, so the saving reads true
        return summary_, table_, quality_, gr.update(value=cost_, y_lim=[0, top]), tradeoff_, positions_, growth_

    def run_needle(chosen_, lengths_, depths_, trials_, state, progress=gr.Progress()):
        with shown_in_page():
            return handlers.needle_grid(app, state, chosen_, lengths_, depths_, trials_,
                                        progress=lambda f, m="": progress(f, desc=m))

    def run_recommend(engine_, context_, budget_, source_, upload_, state, progress=gr.Progress()):
        with shown_in_page():
            return handlers.recommend_options(app, state, engine_, context_, budget_, source_, upload_,
                                              progress=lambda f, m="": progress(f, desc=m))

    source.change(lambda s: gr.update(visible=s == "upload"), [source], [upload], queue=False, api_visibility="private")
    run.click(run_eval, [source, upload, chosen, seqlen, samples, greedy_prompts, greedy_tokens, sess],
              [summary, table, quality, cost, tradeoff, positions, growth], api_name="evaluate", concurrency_id=GPU)
    needle_run.click(run_needle, [chosen, lengths, depths, trials, sess], [needle_summary, needle_plot],
                     api_name="needle", concurrency_id=GPU)
    rec_run.click(run_recommend, [engine, context, budget, source, upload, sess], [rec_summary, rec_table],
                  api_name="recommend", concurrency_id=GPU)
    cancel.click(handlers.cancel_evaluation, [sess], [summary], api_name="cancel_evaluation", queue=False)
