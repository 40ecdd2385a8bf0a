"""Evaluate tab: KL, Δppl and top-1 of KV modes against fp16 (overall and by position, windows up to the model's
context), the pass-key retrieval grid as heatmaps beside fp16's, and which option of an engine to pick."""

from __future__ import annotations

from dataclasses import dataclass

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


@dataclass
class ModeChoice:
    """The tab's KV-mode choice: an engine filter, the modes it narrows and the line about the chosen ones."""

    engine: gr.Radio
    modes: gr.CheckboxGroup
    info: gr.Markdown


def mode_choice(app: AppState) -> ModeChoice:
    """The tab's KV-mode choice, made before the tabs (unrendered) so the Calibrate tab's planner can add its plans."""
    choices = handlers.kv_mode_choices(app)
    values = [value for _, value in choices]
    engine = gr.Radio(handlers.engine_choices(), value=handlers.ALL_ENGINES, label="Engine", elem_id="eval-engine",
                      info="narrows the modes below to one engine's; what you picked stays", render=False)
    modes = gr.CheckboxGroup(choices, value=[m for m in values if m == "int8-dynamic"] or values[:1],
                             label="KV modes (fp16 is always the reference), grouped by engine", elem_id="eval-modes",
                             render=False)
    info = gr.Markdown(handlers.mode_info(app, None, modes.value), label="about these KV modes",
                       elem_id="eval-modes-info", elem_classes="note", render=False)
    return ModeChoice(engine, modes, info)


def build(app: AppState, sess: gr.State, choice: ModeChoice) -> None:
    """The tab; ``choice`` is :func:`mode_choice`'s, rendered here."""
    chosen = choice.modes
    with gr.Row():
        with gr.Column(scale=1, min_width=300):
            source = gr.Radio(SOURCES, value="builtin-en", label="Text", elem_id="eval-source",
                              info="not the calibration text: static parameters look better on what they saw")
            upload = gr.File(label="Text to score (UTF-8 .txt)", file_types=[".txt"], type="filepath", visible=False,
                             elem_id="eval-upload")
            choice.engine.render()
            chosen.render()
            choice.info.render()
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
            tradeoff = gr.ScatterPlot(x="bytes vs fp16", y="Δppl %", color="engine", color_map=charts.ENGINE_COLOURS,
                                      color_title="engine", tooltip=charts.SCATTER_COLUMNS,
                                      title="Δppl (%) against KV bytes per token (ratio to fp16), one point per mode, "
                                            "coloured by engine",
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

    def run_filter(engine_, chosen_, state):
        with shown_in_page():
            return gr.update(choices=handlers.kv_mode_choices(app, state, engine_, keep=chosen_ or []))

    def run_info(chosen_, state):
        with shown_in_page():
            return handlers.mode_info(app, state, chosen_)

    choice.engine.change(run_filter, [choice.engine, chosen, sess], [chosen], queue=False, api_visibility="private")
    chosen.change(run_info, [chosen, sess], [choice.info], queue=False, api_visibility="private")
    source.change(lambda s: gr.update(visible=s == "upload"), [source], [upload], queue=False, api_visibility="private")
    run.click(run_eval, [source, upload, chosen, seqlen, samples, greedy_prompts, greedy_tokens, sess],
              [summary, table, quality, cost, tradeoff, positions, growth], api_name="evaluate", concurrency_id=GPU)
    needle_run.click(run_needle, [chosen, lengths, depths, trials, sess], [needle_summary, needle_plot],
                     api_name="needle", concurrency_id=GPU)
    rec_run.click(run_recommend, [engine, context, budget, source, upload, sess], [rec_summary, rec_table],
                  api_name="recommend", concurrency_id=GPU)
    cancel.click(handlers.cancel_evaluation, [sess], [summary], api_name="cancel_evaluation", queue=False)
