"""The KV-mode lists every tab shows, built here once: ours first, then each serving engine's schemes in
:func:`kvcache.engines.engine_order`, each labelled with its engine and its bytes for the loaded model.

A dropdown option has no hover of its own, so the line under a list (:func:`mode_info`) says what the selected
modes are and what turns each on in its engine (``KVMode.serve``). Values stay mode names (a plan: its label),
so every handler receives what it did before.
"""

from __future__ import annotations

from collections.abc import Iterable

from kvcache.config import BASELINE_MODE
from kvcache.codec import OUR_ENGINE
from kvcache.engines import engine_order as order_engines
from kvcache.errors import ModeError
from kvcache.modes import KV_MODES, KVMode, get_mode
from kvcache.shape import KVShape

from .state import LEFT_MODE, AppState, SessionState, UserError, kv_label

ALL_ENGINES = "all"  # the engine filter's "no filter"
ENGINE_TITLES = {OUR_ENGINE: "ours", "vllm": "vLLM", "sglang": "SGLang", "lmdeploy": "LMDeploy", "llamacpp": "llama.cpp",
                 "hf": "transformers"}
BASELINE_TITLE = "fp16 baseline"  # the reference point of the pictures, apart from our modes


def engine_order() -> list[str]:
    """The engines the mode table names, in :func:`kvcache.engines.engine_order` (ours first)."""
    return order_engines(m.engine for m in KV_MODES.values())


def engine_title(engine: str) -> str:
    """What the page calls an engine: ``vLLM``, ``llama.cpp``, ``ours``..."""
    return ENGINE_TITLES.get(engine, engine)


def point_group(mode: str) -> str:
    """The legend entry of a mode's point in the pictures: its engine's title, or the fp16 baseline."""
    return BASELINE_TITLE if mode == BASELINE_MODE else engine_title(get_mode(mode).engine)


def point_groups() -> list[str]:
    """Every legend entry of the pictures, in order: the fp16 baseline, then each engine's title."""
    return [BASELINE_TITLE, *(engine_title(e) for e in engine_order())]


def engine_choices() -> list[tuple[str, str]]:
    """The engine filter's choices: all, then each engine as (title, name)."""
    return [("all engines", ALL_ENGINES), *((f"{engine_title(e)} ({e})", e) for e in engine_order())]


def quantized_modes() -> list[str]:
    """Every named KV mode but fp16 (the left pane, the reference), grouped by engine in :func:`engine_order`."""
    rank = {e: i for i, e in enumerate(engine_order())}
    return sorted((n for n in KV_MODES if n != LEFT_MODE), key=lambda n: rank[KV_MODES[n].engine])  # stable sort


def default_quantized_mode(app: AppState) -> str:
    """The right pane's first mode: the static one when the app started with --qparams, else a dynamic one."""
    modes = quantized_modes()
    if app.default_qparams is not None:
        return next((m for m in modes if KV_MODES[m].needs_qparams), modes[0])
    return next((m for m in modes if not KV_MODES[m].needs_qparams), modes[0])


def _shape(app: AppState | None) -> KVShape | None:
    return app.engine.shape if app is not None and app.engine is not None else None


def _size(mode: KVMode, shape: KVShape | None) -> str:
    """A 2,048-token sequence's bytes against fp16's for ``shape`` (every per-sequence cost counted); the mean K/V
    bits without a model; why not, for a mode this model cannot hold."""
    if shape is None:
        return f"K {mode.k_bits:g} / V {mode.v_bits:g} bits"
    try:
        mode.check_shape(shape)
        return f"{mode.ratio_to_fp16(shape):.2f}x fp16"
    except ModeError:
        return "not for this model"


def mode_label(name: str, mode: KVMode, shape: KVShape | None) -> str:
    """``vLLM · vllm:fp8 — 0.50x fp16``: engine, name and size; ``needs calibration`` when it takes ``--qparams``."""
    calibrated = " · needs calibration" if mode.needs_qparams else ""
    return f"{engine_title(mode.engine)} · {kv_label(name)} — {_size(mode, shape)}{calibrated}"


def _listed(sess: SessionState | None) -> list[tuple[str, KVMode]]:
    """(value, mode) of every list entry: the named modes by engine, then this session's plans (ours)."""
    named = [(n, KV_MODES[n]) for n in quantized_modes()]
    return named + [(label, get_mode(str(path))) for label, path in (sess.plans.items() if sess is not None else ())]


def kv_mode_choices(app: AppState | None = None, sess: SessionState | None = None, engine: str = ALL_ENGINES,
                    keep: Iterable[str] = ()) -> list[tuple[str, str]]:
    """Every KV-mode list's choices as (label, value): the quantized pane's, the evaluation's, the planner's
    updates. ``engine`` narrows them to that engine's modes; ``keep`` (the ones already picked) stay whatever it is."""
    if engine not in (ALL_ENGINES, *engine_order()):
        raise UserError(f"Unknown engine {engine!r}: pick one of {', '.join((ALL_ENGINES, *engine_order()))}.")
    keep, shape = set(keep or ()), _shape(app)
    return [(mode_label(value, mode, shape), value) for value, mode in _listed(sess)
            if engine in (ALL_ENGINES, mode.engine) or value in keep]


def mode_info(app: AppState | None, sess: SessionState | None, modes: str | Iterable[str] | None) -> str:
    """The line under a KV-mode list, one per selected mode: engine, name, what it is, its size, what turns it on."""
    names = [modes] if isinstance(modes, str) else list(modes or ())
    shape, lines = _shape(app), []
    for name in (n for n in names if n):
        mode = get_mode(sess.resolve_mode(name) if sess is not None else name)
        size = _size(mode, shape)
        if shape is not None and size.endswith("x fp16"):
            size += f", {mode.bytes_per_token(shape):,} B/token"
        calibrated = " Needs calibrated parameters (Calibrate tab)." if mode.needs_qparams else ""
        lines.append(f"**{engine_title(mode.engine)}** `{kv_label(name)}`: {mode.description} ({size}).{calibrated} "
                     f"Turn it on: `{mode.serve}`")
    return "\n\n".join(lines)
