"""What the page's buttons do, as plain functions over :class:`AppState` and :class:`SessionState`, one module per tab.

No gradio here: each function takes plain values and returns plain values (text, pandas frames,
matplotlib figures, file paths), so it can be tested without a browser. Every step is a call into the
library (``kvcache``, ``calib``); these modules only arrange the results for the page. Errors a person
can fix are raised as :class:`~ui.state.UserError` (or the library's own :class:`~kvcache.errors.KVQError`).
"""

from .calibrate import (
                        CALIB_DATASETS,
                        EXPORT_FORMATS,
                        calibrate,
                        calibration_view,
                        cancel_calibration,
                        export_all,
                        heatmaps,
                        plan_bits,
                        reexport,
                        serving_commands,
                        submit_calibration,
                        upload_qparams,
                        use_in_chat,
)
from .chat import (
                        chat,
                        chat_view,
                        divergence,
                        pane_stats,
                        reset_chat,
                        set_mode,
                        stop,
                        submit,
)
from ..modes import ALL_ENGINES, default_quantized_mode, engine_choices, kv_mode_choices, mode_info, quantized_modes
from .common import check_upload, default_system_prompt, example_questions
from .evaluate import cancel_evaluation, evaluate, needle_grid, recommend_options
from .memory import capacity, memory
from .model import check_model_path, load_model, model_status, pool_setting, pool_status

__all__ = [
    "CALIB_DATASETS", "EXPORT_FORMATS", "calibrate", "calibration_view", "cancel_calibration", "export_all", "heatmaps",
    "plan_bits", "reexport", "serving_commands", "submit_calibration", "upload_qparams", "use_in_chat", "chat", "chat_view",
    "divergence", "pane_stats", "reset_chat", "set_mode", "stop", "submit", "check_upload", "default_quantized_mode",
    "default_system_prompt", "example_questions", "kv_mode_choices", "quantized_modes", "engine_choices", "mode_info", "ALL_ENGINES", "evaluate", "cancel_evaluation", "needle_grid", "recommend_options",
    "capacity", "memory",
    "check_model_path", "load_model", "model_status", "pool_setting", "pool_status",
]
