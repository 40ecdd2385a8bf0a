"""KV modes by name: our own and every serving engine's, and the plan files of the bit planner.

A mode pairs two :class:`~kvcache.codec.Codec` s, one for K and one for V, chosen separately (keys carry the
damage: outlier channels), plus a number of first tokens kept in 16 bits (attention sinks); a *plan* (the bit
planner's output) gives every layer its own pair. Named modes are the table :data:`KV_MODES`: ours
(:data:`KVQ_MODES`) and the engines' schemes, named ``ENGINE:FLAG`` (:mod:`kvcache.engines`).
"""

from __future__ import annotations

import functools
from dataclasses import replace
from pathlib import Path

from .codec import (FP16, INT8_STATIC, INT8_TOKEN, OUR_ENGINE, SEQUENCE_TOKENS, STATIC_PARAM_DTYPE, Codec, KVMode,  # noqa: F401
                    kv_float_dtype)
from .errors import ModeError


def _mode(name: str, description: str, k: Codec, v: Codec, sinks: int = 0, engine: str = OUR_ENGINE,
          serve: str = "") -> KVMode:
    return KVMode(name, description, k, v, sinks, engine=engine, serve=serve or f"--kv {name}")


INT4_HEAD = Codec(4, "token")
# Not a listed mode: 4-bit codes per token and KV head, asymmetric, by our rule; the per-head 4-bit layout the
# kernels take, for their tests and benchmarks (LMDeploy's ``lmdeploy:4`` codes by TurboMind's arithmetic instead).
INT4_HEAD_MODE = KVMode("int4-head", "int4 per token and KV head, asymmetric (our rule)", INT4_HEAD, INT4_HEAD)
INT4_G16 = Codec(4, "token", group_size=16, symmetric=True, rotate=True)
INT8_ROT = Codec(8, "token", rotate=True)


def sym_rotated(bits: int, group: int, qk: bool = False) -> Codec:
    """Symmetric codes per group of ``group`` channels after the Hadamard rotation (keys: the query-aware transform)."""
    return Codec(bits, "token", group_size=group, symmetric=True, rotate=True, qk_transform=qk)


INT8_SYM_QK = Codec(8, "token", symmetric=True, rotate=True, qk_transform=True)


def peak_lloyd_max(bits: int, group: int, qk: bool = False) -> Codec:
    """:func:`sym_rotated`'s codes on the ``lloyd-max-peak`` levels (:func:`kvcache.codebooks.lloyd_max_peak`)."""
    return replace(sym_rotated(bits, group, qk), grid="lloyd-max-peak")


def allocated_keys(mean_bits: float) -> Codec:
    """Keys in the calibrated eigenbasis after the query-aware transform, ``mean_bits`` per channel on average given
    where the score error they save is largest (0 to 8 per channel), N(0, 1) Lloyd-Max levels, one scale per token."""
    return Codec(8, "token", symmetric=True, qk_transform=True, grid="gauss", allocated=mean_bits)


INT3_G32, INT2_G32 = sym_rotated(3, 32), sym_rotated(2, 32)  # 3- and 2-bit codes on the uniform grid (keys: with qk_transform)
# Not a listed mode: 2-bit codes in groups of 32 (symmetric, rotated) for K and V, no calibration; the 2-bit bit-plane
# layout the kernels take, for their tests and benchmarks (the planner gives layers 2 bits; no named mode does).
INT2_G32_MODE = KVMode("int2-g32", "K and V 2-bit in groups of 32 (symmetric, rotated; our rule)", INT2_G32, INT2_G32)

KVQ_MODES: dict[str, KVMode] = {  # ours
    m.name: m
    for m in (
        _mode("fp16", "16-bit floats: bf16 when the model computes in bf16, fp16 otherwise (the baseline, no "
                      "quantization)", FP16, FP16),
        _mode("int8", "int8, static parameters from a calibration (--qparams)", INT8_STATIC, INT8_STATIC),
        _mode("int8-dynamic", "int8, per-token per-head parameters computed at write time (no calibration)",
              INT8_TOKEN, INT8_TOKEN),
        _mode("int8-rot", "int8 per token and head after a Hadamard rotation, first 4 tokens 16-bit (no calibration)",
              INT8_ROT, INT8_ROT, sinks=4),
        _mode("int8-qk", "int8 per token and head after a rotation, K through the calibrated query-aware transform; "
                         "first 4 tokens 16-bit (--qparams)",
              replace(INT8_ROT, qk_transform=True), INT8_ROT, sinks=4),
        _mode("k8v4", "K int8 (symmetric, rotated, calibrated query-aware transform); V int4 in groups of 16 "
                      "(symmetric, rotated); first 4 tokens 16-bit (--qparams)",
              INT8_SYM_QK, INT4_G16, sinks=4),
        _mode("k8v4-lm", "K int8 (symmetric, rotated, calibrated query-aware transform); V 4-bit in groups of 16 on "
                         "Lloyd-Max levels for peak-scaled rotated groups (k8v4's bytes); first 4 tokens 16-bit (--qparams)",
              INT8_SYM_QK, peak_lloyd_max(4, 16), sinks=4),
        _mode("int4", "K and V int4 in groups of 16 (symmetric, rotated), K through the calibrated query-aware "
                      "transform; first 4 tokens 16-bit (--qparams)",
              replace(INT4_G16, qk_transform=True), INT4_G16, sinks=4),
        # Below 0.3 of fp16 (the engines' 4-bit and 3-bit schemes): the query-aware key transform at every width;
        # measured on the embedded model it cuts 3-bit keys' KL 2.8x (README, "Below 4 bits").
        _mode("int4-compact", "K int4 per head, V int4 in groups of 32 (symmetric, rotated), K through the calibrated "
                              "query-aware transform; first 4 tokens fp16 (--qparams)",
              sym_rotated(4, 0, qk=True), sym_rotated(4, 32), sinks=4),
        _mode("int3", "K and V 3-bit in groups of 32 (symmetric, rotated), K through the calibrated query-aware "
                      "transform; first 4 tokens fp16 (--qparams)",
              replace(INT3_G32, qk_transform=True), INT3_G32, sinks=4),
        _mode("int3-lm", "K and V 3-bit in groups of 32 on Lloyd-Max levels for peak-scaled rotated groups (int3's "
                         "bytes), K through the calibrated query-aware transform; first 4 tokens fp16 (--qparams)",
              peak_lloyd_max(3, 32, qk=True), peak_lloyd_max(3, 32), sinks=4),
        _mode("int3-compact", "K and V 3-bit per head (symmetric, rotated), K through the calibrated query-aware "
                              "transform; first 4 tokens fp16 (--qparams)",
              sym_rotated(3, 0, qk=True), sym_rotated(3, 0), sinks=4),
        # Bits allocated per key channel in the calibrated eigenbasis (transform coding): at int3's bytes it cuts
        # the keys' share of the loss (README, "Below 4 bits").
        _mode("int3-klt", "K 3.25 bits per channel on average, allocated per channel in the calibrated eigenbasis of "
                          "the query-aware transform, one scale per token; V int3-lm's (int3's bytes); first 4 tokens "
                          "fp16 (--qparams)",
              allocated_keys(3.25), peak_lloyd_max(3, 32), sinks=4),
        _mode("int2-klt", "K 2.5 bits per channel on average, allocated as int3-klt's; V 2-bit in groups of 32 on "
                          "Lloyd-Max levels for peak-scaled rotated groups; first 4 tokens fp16 (--qparams)",
              allocated_keys(2.5), peak_lloyd_max(2, 32), sinks=4),
    )
}

from .engines import ALIASES, ENGINE_MODES  # noqa: E402  (the engines build their rows from the codec)

# The calibrated mode to reach for first: the lowest KL and highest top-1 of every mode in the README's quality
# table, on both evaluation texts (int8-qk), at 0.533 of fp16; static int8 where the parameters hold no key transform.
BEST_CALIBRATED, BEST_STATIC = "int8-qk", "int8"


def best_calibrated_mode(qparams: object | None) -> str:
    """The mode "Use in chat" and the export's printed command pick for these parameters (see :data:`BEST_CALIBRATED`)."""
    return BEST_CALIBRATED if getattr(qparams, "k_transform", None) is not None else BEST_STATIC

KV_MODES: dict[str, KVMode] = {**KVQ_MODES, **ENGINE_MODES}  # every named mode: ours, then the engines'


PLAN_FORMAT = "kvq-kv-plan"
PLAN_VERSION = 1


def plan_to_json(mode: KVMode, **facts: object) -> dict:
    """A plan as the JSON a spec file holds: every layer's K and V codec, the sinks, and ``facts`` (model, budget...)."""
    from dataclasses import asdict

    layers = [{"k": asdict(k), "v": asdict(v)} for k, v in (mode.layers or ())]
    return {"format": PLAN_FORMAT, "format_version": PLAN_VERSION, "description": mode.description,
            "sink_tokens": mode.sink_tokens, "config_hash": mode.model_hash, **facts, "layers": layers}


@functools.lru_cache(maxsize=32)
def _load_plan(path: str, mtime_ns: int) -> KVMode:
    import json

    try:
        spec = json.loads(Path(path).read_text(encoding="utf-8"))
        if spec.get("format") != PLAN_FORMAT:
            raise ModeError(f"{path} is not a KV plan (format {spec.get('format')!r}); make one with `python -m calib plan MODEL --budget-dppl PCT --out plan.json`")
        if int(spec.get("format_version", 0)) > PLAN_VERSION:
            raise ModeError(f"{path} is a newer KV plan than this KVQ Studio reads: upgrade it")
        layers = tuple((Codec(**d["k"]), Codec(**d["v"])) for d in spec["layers"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ModeError(f"{path} is not a readable KV plan ({' '.join(str(exc).split())}): make one with "
                        "`python -m calib plan MODEL --budget-dppl PCT --out plan.json`") from None
    if not layers:
        raise ModeError(f"{path} holds no layers: make one with `python -m calib plan MODEL --budget-dppl PCT --out plan.json`")
    return KVMode(path, spec.get("description", "a per-layer plan"), layers[0][0], layers[0][1],
                  int(spec.get("sink_tokens", 0)), layers=layers, serve=f"--kv {path}", model_hash=spec.get("config_hash"))


def get_mode(name: "str | KVMode") -> KVMode:
    """The mode called ``name``, or the plan in the ``.json`` file ``name`` (a mode is returned as it is)."""
    if isinstance(name, KVMode):
        return name
    name = name.strip()
    if RECENT in name:
        return _with_recent(name)
    if name.endswith(".json"):
        path = Path(name).expanduser()
        if not path.is_file():
            raise ModeError(f"KV plan file not found: {name}; make one with `python -m calib plan MODEL --budget-dppl PCT --out plan.json`")
        return _load_plan(str(path), path.stat().st_mtime_ns)
    try:
        return KV_MODES[ALIASES.get(name, name)]
    except KeyError:
        pass
    engine = name.split(":", 1)[0] if ":" in name else None
    if engine is not None:
        flags = [m.split(":", 1)[1] for m in KV_MODES if m.startswith(engine + ":")]
        if flags:
            raise ModeError(f"unknown {engine} KV scheme {name!r}; {engine}'s: {', '.join(flags)}")
        from .engines import ENGINES

        raise ModeError(f"unknown engine {engine!r} in KV mode {name!r}; known engines: {', '.join(ENGINES)} "
                        "(`python -m kvcache modes` lists every mode)")
    raise ModeError(f"unknown KV mode {name!r}; our modes: {', '.join(KVQ_MODES)}, and every engine's as ENGINE:FLAG "
                    "(`python -m kvcache modes` lists them; or a plan's .json file)")


RECENT = "+recent"  # MODE+recentN: the newest N tokens of MODE kept in 16 bits (KIVI's residual), counted in its bytes


def _with_recent(name: str) -> KVMode:
    """``MODE+recentN``: ``MODE`` whose newest tokens stay 16-bit until ``N`` have come, then are coded together."""
    base_name, _, count = name.rpartition(RECENT)
    if not count.isdigit() or int(count) < 1:
        raise ModeError(f"KV mode {name!r}: the window after {RECENT} is a number of tokens, e.g. "
                        f"{base_name or 'int2-klt'}{RECENT}128")
    base = get_mode(base_name)
    if base.residual:
        raise ModeError(f"KV mode {base.name!r} already keeps a {base.residual}-token residual window; "
                        f"drop {RECENT}{count}")
    if not base.quantized:
        raise ModeError(f"KV mode {base.name!r} stores every token in 16 bits: a {RECENT} window changes nothing")
    window, full = int(count), f"{base.name}{RECENT}{count}"
    serve = f"--kv {full}" if base.engine == OUR_ENGINE else f"{base.serve} (the window is KVQ Studio's: {base.engine} has none)"
    return replace(base, name=full, residual=window, serve=serve,
                   description=f"{base.description}; the newest tokens (up to {window}) in 16 bits, coded when they fill")


def parse_modes(spec: str) -> list[KVMode]:
    """Modes from a comma-separated list such as ``fp16,int8-dynamic``."""
    names = [n for n in (s.strip() for s in spec.split(",")) if n]
    if not names:
        raise ModeError(f"no KV mode given; valid modes: {', '.join(KV_MODES)}")
    return [get_mode(n) for n in names]


QPARAMS_HINT = "pass --qparams FILE_OR_DIR, made by `python -m calib calibrate` then `python -m calib kv_qparams WORK_DIR OUT_DIR --format kvq`"


def require_qparams(mode: "str | KVMode", qparams: object | None, hint: str = QPARAMS_HINT) -> None:
    """The one rule for calibrated modes: they need calibrated parameters; ``hint`` says how to get them."""
    mode = get_mode(mode)
    if mode.needs_qparams and qparams is None:
        raise ModeError(f"KV mode {mode.name} needs calibrated parameters: {hint}")
