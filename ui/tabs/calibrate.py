"""Calibrate tab: record K/V statistics, look at them, export parameters, use them in chat; plan bits per layer."""

from __future__ import annotations

import gradio as gr

from calib.data import FILE_EXTENSIONS
from calib.errors import CalibCancelled

from .. import charts, handlers
from ..errors import shown_in_page
from ..state import AppState
from . import GPU
from .chat import ChatTab
from .evaluate import ModeChoice

SYMMETRY = [("asymmetric (min / max)", "asym"), ("symmetric (absmax)", "sym")]


def build(app: AppState, sess: gr.State, chat: ChatTab, eval_modes: ModeChoice) -> None:
    """The tab; a plan the bit planner makes joins the chat's KV modes and the Evaluate tab's ``eval_modes``."""
    num_layers = app.loaded.num_layers if app.loaded is not None else 32
    with gr.Row():
        with gr.Column(scale=1, min_width=300):
            dataset = gr.Dropdown(list(handlers.CALIB_DATASETS), value="builtin", label="Dataset", elem_id="calib-dataset",
                                  info="builtin: text shipped with the app; self: text the model writes; others need --calib-data-dir")
            upload = gr.File(label="Calibration file (.txt, .jsonl, .json or .parquet with a text field)",
                             file_types=list(FILE_EXTENSIONS), type="filepath",
                             visible=False, elem_id="calib-upload")
            samples = gr.Slider(1, 512, value=16, step=1, label="Samples", elem_id="calib-samples")
            seqlen = gr.Slider(16, 4096, value=256, step=16, label="Sequence length (tokens)", elem_id="calib-seqlen")
            granularity = gr.Radio(["tensor", "head", "channel"], value="channel", label="Granularity",
                                   info="for the kvq file; turbomind is per tensor, vllm per tensor or head")
            symmetry = gr.Radio(SYMMETRY, value="asym", label="Quantization")
            num_tp = gr.Slider(1, 8, value=1, step=1, label="num_tp (turbomind shards)",
                               info="must divide the number of KV heads")
            with gr.Row():
                run = gr.Button("Calibrate", variant="primary", elem_id="calib-run")
                cancel = gr.Button("Cancel", variant="stop", elem_id="calib-cancel")
            status = gr.Markdown(label="status", elem_id="calib-status", elem_classes="note")
        with gr.Column(scale=2):
            layer = gr.Slider(0, max(0, num_layers - 1), value=0, step=1, label="Layer for the heatmaps", elem_id="calib-layer")
            k_heat = gr.Plot(label="K absmax (KV head x channel)", elem_id="k-heatmap", format="png", show_label=False)
            v_heat = gr.Plot(label="V absmax (KV head x channel)", elem_id="v-heatmap", format="png", show_label=False)
            ranges = gr.LinePlot(x="layer", y="value", color="series", title="Per-layer K/V range", height=240,
                                 elem_id="calib-ranges")
            outliers = gr.Dataframe(headers=charts.OUTLIER_COLUMNS, label="Outlier channels (absmax far above the layer's median channel)",
                                    elem_id="calib-outliers", interactive=False, max_height=260)
            with gr.Row():
                dl_tm = gr.DownloadButton("turbomind files (.zip)", value=None, elem_id="dl-turbomind", interactive=True)
                dl_kvq = gr.DownloadButton("kvq qparams (.safetensors)", value=None, elem_id="dl-kvq")
                dl_vllm = gr.DownloadButton("vllm scales (.zip)", value=None, elem_id="dl-vllm")
                use = gr.Button("Use in chat", variant="primary", elem_id="calib-use")
            files = gr.File(label="Exported files", file_count="multiple", interactive=False, elem_id="calib-files",
                            height=240)
            with gr.Row():
                qparams_upload = gr.File(label="Or use parameters you have: kv_qparams.safetensors (or the files of "
                                               "the folder kv_qparams wrote)", file_count="multiple",
                                         file_types=[".safetensors", ".json"], type="filepath", elem_id="qparams-upload")
                serving = gr.Markdown(handlers.serving_commands(app, handlers.default_quantized_mode(app)),
                                      label="serving engines", elem_id="serving-commands", elem_classes="note")
    gr.Markdown("### Bit planner: bits per layer for K and V within a quality budget", elem_id="planner-title")
    with gr.Row():
        with gr.Column(scale=1, min_width=300):
            budget = gr.Slider(0.1, 3.0, value=0.5, step=0.1, label="Δppl budget (%)", elem_id="plan-budget",
                               info="the perplexity change vs fp16 the plan may cost, verified on held-out windows")
            with gr.Row():
                plan_samples = gr.Slider(4, 32, value=8, step=1, label="Planning samples", elem_id="plan-samples")
                plan_seqlen = gr.Slider(32, 1024, value=256, step=32, label="Planning tokens per sample",
                                        elem_id="plan-seqlen")
            plan_run = gr.Button("Plan bits", variant="primary", elem_id="plan-run")
            dl_plan = gr.DownloadButton("plan (.json)", value=None, elem_id="dl-plan")
            gr.Markdown("Uses this session's parameters when they carry the calibrated key transforms (calibrate "
                        "or upload first), else calibration-free candidates. Each layer's K and V take 16, 8, 4, 3 "
                        "or 2 bits; half the samples choose the plan, the other half verify it.",
                        elem_classes="note")
        with gr.Column(scale=2):
            plan_status = gr.Markdown(label="plan", elem_id="plan-status", elem_classes="note")
            plan_layers = gr.Dataframe(headers=charts.PLAN_COLUMNS, label="Bits per layer", elem_id="plan-table",
                                       interactive=False, max_height=360)

    view = [status, k_heat, v_heat, ranges, outliers, files, dl_tm, dl_kvq, dl_vllm]

    def run_calibrate(dataset_, upload_, samples_, seqlen_, granularity_, symmetry_, num_tp_, layer_,
                      state, progress=gr.Progress()):
        def report(fraction: float, message: str = "") -> None:
            progress(fraction, desc=message)

        with shown_in_page():
            try:
                return handlers.calibrate(app, state, dataset_, upload_, samples_, seqlen_, granularity_,
                                          symmetry_ == "sym", num_tp_, layer_, progress=report)
            except CalibCancelled:
                gr.Info("Calibration cancelled.")
                return ["Calibration cancelled: nothing was written.", *[gr.skip()] * (len(view) - 1)]

    def run_reexport(granularity_, symmetry_, num_tp_, layer_, state):
        with shown_in_page():
            out = handlers.reexport(app, state, granularity_, symmetry_ == "sym", num_tp_, layer_)
        return out if out is not None else [gr.skip()] * len(view)

    def run_heatmaps(layer_, state):
        with shown_in_page():
            out = handlers.heatmaps(state, layer_)
        return out if out is not None else (gr.skip(), gr.skip())

    def run_use(state):
        with shown_in_page():
            mode, message = handlers.use_in_chat(app, state)
        gr.Info(message)
        return mode, message

    def layer_range(state):
        stats = state.calib_stats
        return gr.update(maximum=max(0, stats.num_layers - 1)) if stats is not None else gr.skip()

    dataset.change(lambda d: gr.update(visible=d == "upload"), [dataset], [upload], queue=False, api_visibility="private")
    inputs = [dataset, upload, samples, seqlen, granularity, symmetry, num_tp, layer, sess]
    run.click(handlers.submit_calibration, [sess], None, queue=False, api_visibility="private").then(
        run_calibrate, inputs, view, api_name="calibrate", concurrency_id=GPU,
    ).success(layer_range, [sess], [layer], queue=False, api_visibility="private")
    cancel.click(handlers.cancel_calibration, [sess], [status], api_name="cancel_calibration",
                 concurrency_limit=None, queue=False)
    for opt in (granularity, symmetry, num_tp):
        opt.change(run_reexport, [granularity, symmetry, num_tp, layer, sess], view, api_visibility="private",
                   concurrency_id="export")
    layer.change(run_heatmaps, [layer, sess], [k_heat, v_heat], api_visibility="private", concurrency_id="export",
                 trigger_mode="always_last")
    def run_upload(paths, state):
        if not paths:
            return gr.skip(), gr.skip()
        with shown_in_page():
            mode, message = handlers.upload_qparams(app, state, paths)
        gr.Info(message)
        return mode, message

    # "Use in chat" switches the right pane to the static mode; its .change resets both conversations.
    use.click(run_use, [sess], [chat.mode, chat.note], api_name="use_in_chat", concurrency_id=GPU)
    qparams_upload.upload(run_upload, [qparams_upload, sess], [chat.mode, chat.note], api_name="upload_qparams",
                          concurrency_id=GPU)
    chat.mode.change(lambda m, state: handlers.serving_commands(app, m, state), [chat.mode, sess], [serving],
                     queue=False, api_visibility="private")

    def run_plan(budget_, samples_, seqlen_, state, progress=gr.Progress()):
        def report(fraction: float, message: str = "") -> None:
            progress(fraction, desc=message)

        with shown_in_page():
            summary, table, path, label = handlers.plan_bits(app, state, budget_, samples_, seqlen_, progress=report)
        gr.Info(f"{label} is ready: pick it in the Chat tab.")
        choices = handlers.kv_mode_choices(app, state)
        return summary, table, path, gr.update(choices=choices), gr.update(choices=choices)

    # the plan joins every engine's list, so the Evaluate tab's engine filter goes back to all
    plan_run.click(run_plan, [budget, plan_samples, plan_seqlen, sess],
                   [plan_status, plan_layers, dl_plan, chat.mode, eval_modes.modes], api_name="plan_bits",
                   concurrency_id=GPU).success(lambda: handlers.ALL_ENGINES, None, [eval_modes.engine], queue=False,
                                               api_visibility="private")
