"""16-bit models as they are: a bf16 model's pools, sinks and per-token parameters are bf16, so K/V beyond fp16's
range (65504) are stored, not overflowed; ``--dtype`` picks what the model computes in."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import make_tiny_llama
from transformers import DynamicCache

from kvcache import Engine, LoadedModel, PagedKVCache, get_mode
from kvcache.codec import kv_float_dtype
from kvcache.hf.compat import cache_kwargs

FP16_MAX = torch.finfo(torch.float16).max
SCALE = 2.0 ** 22  # a power of two: the rescaled model computes exactly what the original does


@pytest.fixture(scope="module")
def big_kv_bf16() -> torch.nn.Module:
    """A tiny bf16 Llama whose K and V reach about 1e6 or more (k_proj, v_proj x 2^22; q_proj, o_proj / 2^22: scores
    and outputs unchanged, as in models whose K/V exceed fp16's range)."""
    model = make_tiny_llama(head_dim=32, seed=3)
    with torch.no_grad():
        for layer in model.model.layers:
            attn = layer.self_attn
            attn.k_proj.weight.mul_(SCALE)
            attn.v_proj.weight.mul_(SCALE)
            attn.q_proj.weight.div_(SCALE)
            attn.o_proj.weight.div_(SCALE)
    return model.to(torch.bfloat16)


def _logits(model: torch.nn.Module, ids: torch.Tensor, cache) -> torch.Tensor:
    with torch.inference_mode():
        return model(ids, **cache_kwargs(cache)).logits.float()


def _ids() -> torch.Tensor:
    return torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(0))


def test_pool_dtype_follows_the_model():
    assert kv_float_dtype(torch.bfloat16) == torch.bfloat16
    assert kv_float_dtype(torch.float16) == torch.float16
    assert kv_float_dtype(torch.float32) == torch.float16  # fp32 models keep fp16 pools
    fp32 = make_tiny_llama()
    assert PagedKVCache.for_model(fp32, "fp16").pool.layers[0].k.dtype == torch.float16
    assert PagedKVCache.for_model(fp32, "int8-dynamic").pool.layers[0].k_scale.dtype == torch.float16
    assert "bf16 when the model computes in bf16" in get_mode("fp16").description


def test_bf16_pool_stores_what_fp16_would_overflow(big_kv_bf16):
    ids = _ids()
    ref = _logits(big_kv_bf16, ids, DynamicCache(config=big_kv_bf16.config))
    cache = PagedKVCache.for_model(big_kv_bf16, "fp16")
    got = _logits(big_kv_bf16, ids, cache)
    stored = cache.pool.layers[0].k
    assert stored.dtype == torch.bfloat16 and torch.isfinite(stored).all()
    assert float(stored.float().abs().max()) > 4 * FP16_MAX  # the values really are beyond fp16
    torch.testing.assert_close(got, ref, rtol=0, atol=0.01 * float(ref.abs().max()))  # bf16 values round-trip exactly

    fp16_pool = PagedKVCache.for_model(big_kv_bf16, "fp16", fp_dtype=torch.float16)  # what the pools were before
    broken = _logits(big_kv_bf16, ids, fp16_pool)
    assert torch.isinf(fp16_pool.pool.layers[0].k).any()
    assert not torch.isfinite(broken).all()


@pytest.mark.parametrize("kv", ["int8-dynamic", "int8-rot"])
def test_bf16_per_token_parameters_and_sinks(big_kv_bf16, kv):
    """Per-token scales and zero points of our codecs, and sink tokens, are bf16 in a bf16 pool: finite, and the
    cache's logits stay near the no-cache bf16 forward."""
    ids = _ids()
    ref = _logits(big_kv_bf16, ids, DynamicCache(config=big_kv_bf16.config))
    cache = PagedKVCache.for_model(big_kv_bf16, kv)
    got = _logits(big_kv_bf16, ids, cache)
    layer = cache.pool.layers[0]
    assert layer.k_scale.dtype == layer.v_zp.dtype == torch.bfloat16
    used = layer.k_zp[:2].float()
    assert torch.isfinite(used).all() and used.abs().max() > FP16_MAX  # a zero point fp16 could not hold
    if layer.sink_tokens:
        assert layer.k_sink.dtype == torch.bfloat16 and torch.isfinite(layer.k_sink).all()
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, ref, rtol=0, atol=0.03 * float(ref.abs().max()))


def test_engine_pools_follow_the_model(big_kv_bf16):
    tokenizer = SimpleNamespace(eos_token_id=0, get_vocab=dict, convert_tokens_to_ids=lambda t: None)
    engine = Engine(LoadedModel(big_kv_bf16, tokenizer, "tiny", "test", torch.device("cpu"), torch.bfloat16))
    try:
        assert engine.pool("fp16").layers[0].k.dtype == torch.bfloat16
        assert engine.pool("int8-rot").layers[0].k_sink.dtype == torch.bfloat16
        assert engine.pool("int8-dynamic").layers[0].v_scale.dtype == torch.bfloat16
        assert engine.pool("llamacpp:q8_0").layers[0].k_scale.dtype == torch.float16  # llama.cpp stores fp16 scales
    finally:
        engine.close()


# --- --dtype -------------------------------------------------------------------------------------------


def _captured_load(monkeypatch) -> dict:
    """Replace the loader: what it was called with lands in the returned dict, then the command stops."""
    import kvcache.models.loader as loader

    seen = {}

    def fake(model, **kwargs):
        seen.update(kwargs, model=model)
        raise SystemExit(0)

    monkeypatch.setattr(loader, "load_model", fake)
    return seen


@pytest.mark.parametrize("argv", [["evaluate", "--kv", "fp16"], ["chat"]])
def test_kvcache_dtype_reaches_the_loader(monkeypatch, argv):
    from kvcache.cli import main

    seen = _captured_load(monkeypatch)
    with pytest.raises(SystemExit):
        main([*argv, "--dtype", "bfloat16"])
    assert seen["dtype"] == "bfloat16"


def test_calibrate_dtype_reaches_the_loader(monkeypatch, tmp_path):
    from calib.cli import main

    seen = _captured_load(monkeypatch)
    with pytest.raises(SystemExit):
        main(["calibrate", "default", "--calib-dataset", "builtin", "--work-dir", str(tmp_path), "--dtype", "float16"])
    assert seen["dtype"] == "float16"


def test_app_takes_dtype():
    from app import build_parser

    assert build_parser().parse_args(["--dtype", "float32"]).dtype == "float32"
    assert build_parser().parse_args([]).dtype is None


@pytest.mark.parametrize("command", ["kvcache", "calib", "app"])
def test_bad_dtype_is_one_line(command, capsys):
    from app import build_parser as app_parser
    from calib.cli import build_parser as calib_parser
    from kvcache.cli import build_parser as kvcache_parser

    parse = {"kvcache": lambda a: kvcache_parser().parse_args(["evaluate", *a]),
             "calib": lambda a: calib_parser().parse_args(["calibrate", "default", *a]),
             "app": lambda a: app_parser().parse_args(a)}[command]
    with pytest.raises(SystemExit) as exc:
        parse(["--dtype", "fp8"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--dtype: invalid choice: 'fp8'" in err and "bfloat16" in err


def test_loader_takes_dtype_names(monkeypatch):
    from kvcache.errors import ModelLoadError
    from kvcache.models.loader import _resolve_dtype

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert _resolve_dtype("bfloat16", cpu) == torch.bfloat16
    assert _resolve_dtype("float16", cpu) == torch.float16
    assert _resolve_dtype(None, cpu) is None  # the loader's default then
    with pytest.raises(ModelLoadError, match="unknown dtype 'half': use one of float32, bfloat16, float16"):
        _resolve_dtype("half", cpu)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert _resolve_dtype("bfloat16", cuda) == torch.float16  # a GPU without bf16: fp16, with a note
