"""Export formats (turbomind, kvq, vllm) from a hand-made work dir, checked byte for byte.

The stats are small integers ("base units") times C = 255*127*7 / 2^17, so every parameter is exact in
float32 and can be written down by hand: an asymmetric 8-bit scale is range*C/255, a symmetric one
absmax*C/127, a 4-bit one range*C/15 or absmax*C/7, an FP8 one absmax*C/448.
"""

import json
import struct
import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import LlamaConfig

from calib.errors import CalibStatsError, ExportError
from calib.export import export, export_kvq, export_turbomind, export_vllm
from calib.workdir import check_model, load_work_dir
from kvcache.qparams import KVQParams
from kvcache.quant import SCALE_EPS
from kvcache.shape import KVShape, config_hash

C = 226695 / 2**17  # 255 * 127 * 7 / 2^17, exact in float32

# Base-unit stats: 2 layers x 4 KV heads x head_dim 2 (rows are heads).
BASE = {
    ("key", 0): ([[-1, -2], [-1, -1], [-4, -3], [-2, -1]], [[1, 1], [3, 1], [2, 4], [1, 0]]),
    ("value", 0): ([[-1, -1], [-1, -1], [-1, -1], [-1, -1]], [[1, 1], [1, 1], [1, 1], [1, 3]]),
    ("key", 1): ([[0, -1], [-2, 0], [-1, -1], [0, 0]], [[2, 1], [0, 2], [1, 3], [1, 1]]),
    ("value", 1): ([[-3, -1], [-1, -1], [-2, -2], [-1, -1]], [[1, 1], [2, 1], [1, 1], [1, 2]]),
}
LAYER = "model.layers.{}.self_attn"


def tiny_config() -> LlamaConfig:
    """A Llama config with the work dir's KV shape (2 layers, 4 KV heads, head_dim 2)."""
    return LlamaConfig(
        vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, head_dim=2, max_position_embeddings=64,
    )


def stat_tensors(which: str, layer: int) -> dict[str, torch.Tensor]:
    lo, hi = (torch.tensor(b, dtype=torch.float64) * C for b in BASE[(which, layer)])
    return {"min": lo.float(), "max": hi.float(), "absmax": torch.maximum(-lo, hi).float()}


def make_work_dir(path, *, meta=True, config_hash_value=None, overrides=None, layer_order=(0, 1)):
    """Write key_stats.pth/value_stats.pth (LMDeploy's layout) and, if ``meta``, calib_meta.json."""
    path.mkdir(parents=True, exist_ok=True)
    for which in ("key", "value"):
        stats = {"max": {}, "min": {}, "absmax": {}}
        for i in layer_order:
            for stat, t in stat_tensors(which, i).items():
                stats[stat][LAYER.format(i)] = (overrides or {}).get((which, i, stat), t)
        torch.save(stats, path / f"{which}_stats.pth")
    if meta:
        (path / "calib_meta.json").write_text(json.dumps({
            "format_version": 1, "model": "tiny-llama", "config_hash": config_hash_value or config_hash(tiny_config()),
            "num_layers": 2, "num_kv_heads": 4, "head_dim": 2, "dataset": "c4", "samples": 128, "seqlen": 2048,
            "seed": 0, "tokens_seen": 262144, "date": "2025-01-01T00:00:00+00:00", "tool_version": "0.1.0",
        }))
    return path


@pytest.fixture
def work_dir(tmp_path):
    return make_work_dir(tmp_path / "quant_output")


@pytest.fixture
def stats(work_dir):
    return load_work_dir(work_dir)


def f32(*values: float) -> bytes:
    return struct.pack(f"<{len(values)}f", *values)


# --- turbomind -------------------------------------------------------------------------------------------

# (k_range, k_mid, v_range, v_mid) in base units per (layer, tp shard), worked out from BASE by hand.
ASYM_TP1 = {(0, 0): (8, 0, 4, 1), (1, 0): (5, 0.5, 5, -0.5)}
ASYM_TP2 = {
    (0, 0): (5, 0.5, 2, 0), (0, 1): (8, 0, 4, 1),  # layer 0: heads 0-1 K -2..3, V -1..1; heads 2-3 K -4..4, V -1..3
    (1, 0): (4, 0, 5, -0.5), (1, 1): (4, 1, 4, 0),  # layer 1: heads 0-1 K -2..2, V -3..2; heads 2-3 K -1..3, V -2..2
}
# (k_absmax, v_absmax) in base units.
SYM_TP1 = {(0, 0): (4, 3), (1, 0): (3, 3)}
SYM_TP2 = {(0, 0): (3, 1), (0, 1): (4, 3), (1, 0): (2, 3), (1, 1): (3, 2)}


@pytest.mark.parametrize("num_tp, table", [(1, ASYM_TP1), (2, ASYM_TP2)])
def test_turbomind_asym_bytes(stats, tmp_path, num_tp, table):
    out = tmp_path / "tm"
    files = export(stats, out, "turbomind", num_tp=num_tp)
    weights = sorted(p.name for p in files if p.suffix == ".weight")
    assert weights == sorted(f"layers.{i}.past_kv_scale.{tp}.weight" for i, tp in table)
    for (i, tp), (kr, km, vr, vm) in table.items():
        data = (out / f"layers.{i}.past_kv_scale.{tp}.weight").read_bytes()
        assert data == f32(kr * C / 255, km * C, vr * C / 255, vm * C), (i, tp)
        assert len(data) == 16
    sidecar = json.loads((out / "kv_qparams_turbomind.json").read_text())
    assert sidecar["layout"] == ["k_scale", "k_zp", "v_scale", "v_zp"] and sidecar["num_tp"] == num_tp
    assert sidecar["metadata"]["config_hash"] == config_hash(tiny_config())


@pytest.mark.parametrize("num_tp, table", [(1, SYM_TP1), (2, SYM_TP2)])
def test_turbomind_sym_bytes(stats, tmp_path, num_tp, table):
    out = tmp_path / "tm"
    with pytest.warns(UserWarning, match="read only by TurboMind from before LMDeploy PR #218"):
        export_turbomind(stats, out, kv_sym=True, num_tp=num_tp)
    for (i, tp), (ka, va) in table.items():
        assert (out / f"layers.{i}.past_kv_scale.{tp}.weight").read_bytes() == f32(ka * C / 127, va * C / 127)
    assert len(list(out.glob("*.weight"))) == len(table)


def test_turbomind_first_value_is_little_endian_float32(stats, tmp_path):
    export_turbomind(stats, tmp_path, num_tp=1)
    raw = (tmp_path / "layers.0.past_kv_scale.0.weight").read_bytes()
    k_scale = 8 * 889 / 2**17  # 8 * C / 255
    assert raw[:4] == struct.pack("<f", k_scale) != struct.pack(">f", k_scale)


def test_turbomind_rejects_bad_tp_bits_and_granularity(stats, tmp_path):
    with pytest.raises(ExportError, match=r"--num-tp 3 does not divide the model's 4 KV heads: use one of 1, 2, 4"):
        export(stats, tmp_path, "turbomind", num_tp=3)
    with pytest.raises(ExportError, match="8-bit parameters only"):
        export(stats, tmp_path, "turbomind", kv_bits=4)
    with pytest.raises(ExportError, match="granularity must be tensor"):
        export(stats, tmp_path, "turbomind", granularity="head")
    assert not list(tmp_path.glob("*.weight"))


def test_zero_range_floors_scale_and_warns_naming_layer(tmp_path):
    flat = torch.full((4, 2), 0.5)
    wd = make_work_dir(tmp_path / "wd", overrides={
        ("value", 1, "min"): flat, ("value", 1, "max"): flat, ("value", 1, "absmax"): flat,
    })
    st = load_work_dir(wd)
    with pytest.warns(UserWarning, match=r"zero range .*layer 1 V"):
        export_turbomind(st, tmp_path / "tm")
    raw = (tmp_path / "tm" / "layers.1.past_kv_scale.0.weight").read_bytes()
    assert raw == f32(5 * C / 255, 0.5 * C, SCALE_EPS, 0.5)
    with pytest.warns(UserWarning, match=r"zero range .*layer 1 V"):
        export_kvq(st, tmp_path / "kvq")
    zero = torch.zeros(4, 2)
    wd0 = make_work_dir(tmp_path / "wd0", overrides={
        ("key", 0, "min"): zero, ("key", 0, "max"): zero, ("key", 0, "absmax"): zero,
    })
    with pytest.warns(UserWarning, match=r"zero range .*layer 0 K"):
        export_vllm(load_work_dir(wd0), tmp_path / "vllm")
    assert load_file(tmp_path / "vllm" / "kv_cache_scales.safetensors")["model.layers.0.self_attn.k_scale"].item() == \
        pytest.approx(SCALE_EPS)


def test_no_warning_for_normal_stats(stats, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for fmt in ("turbomind", "kvq", "vllm"):
            export(stats, tmp_path / fmt, fmt)


# --- kvq -------------------------------------------------------------------------------------------------


def _expected_channel(which, layer, sym, bits):
    lo, hi = (torch.tensor(b, dtype=torch.float64) for b in BASE[(which, layer)])
    if sym:
        return (torch.maximum(-lo, hi) * C / ((1 << (bits - 1)) - 1)).float(), torch.zeros(4, 2)
    return ((hi - lo) * C / ((1 << bits) - 1)).float(), ((hi + lo) / 2 * C).float()


def test_kvq_tensor_and_head_granularity_by_hand(stats, tmp_path):
    [path] = export(stats, tmp_path / "t", "kvq", granularity="tensor")
    qp = KVQParams.load(path)
    assert qp.granularity == "tensor" and not qp.symmetric and qp.bits == 8
    assert qp.k_scale[0].tolist() == [[8 * C / 255]] and qp.k_zp[0].tolist() == [[0.0]]
    assert qp.v_scale[0].tolist() == [[4 * C / 255]] and qp.v_zp[0].tolist() == [[1 * C]]
    assert qp.k_scale[1].tolist() == [[5 * C / 255]] and qp.k_zp[1].tolist() == [[0.5 * C]]

    [path] = export(stats, tmp_path / "h", "kvq", granularity="head")
    qp = KVQParams.load(path)
    # layer 0 K per head: (min, max) = (-2, 1), (-1, 3), (-4, 4), (-2, 1)
    assert qp.k_scale[0].tolist() == [[3 * C / 255], [4 * C / 255], [8 * C / 255], [3 * C / 255]]
    assert qp.k_zp[0].tolist() == [[-0.5 * C], [1 * C], [0.0], [-0.5 * C]]
    qp.check_matches(KVShape.from_config(tiny_config()))


@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("bits", [8, 4])
def test_kvq_channel_granularity(stats, tmp_path, sym, bits):
    [path] = export(stats, tmp_path, "kvq", kv_sym=sym, kv_bits=bits)
    assert path.name == "kv_qparams.safetensors"
    qp = KVQParams.load(path)
    assert (qp.granularity, qp.symmetric, qp.bits, qp.num_layers) == ("channel", sym, bits, 2)
    for i in range(2):
        for which, scales, zps in (("key", qp.k_scale, qp.k_zp), ("value", qp.v_scale, qp.v_zp)):
            scale, zp = _expected_channel(which, i, sym, bits)
            assert torch.equal(scales[i], scale) and torch.equal(zps[i], zp), (which, i)
    for key, value in {"model": "tiny-llama", "config_hash": config_hash(tiny_config()), "dataset": "c4",
                       "samples": "128", "seqlen": "2048", "date": "2025-01-01T00:00:00+00:00"}.items():
        assert qp.metadata[key] == value


def test_kvq_rejects_bits_and_tp(stats, tmp_path):
    with pytest.raises(ExportError, match="4 or 8"):
        export(stats, tmp_path, "kvq", kv_bits=6)
    with pytest.raises(ExportError, match="turbomind format only"):
        export(stats, tmp_path, "kvq", num_tp=2)


# --- vllm ------------------------------------------------------------------------------------------------


def test_vllm_per_tensor_names_shapes_values(stats, tmp_path):
    files = export(stats, tmp_path, "vllm")
    assert [p.name for p in files] == ["kv_cache_scales.safetensors", "README_vllm.md"]
    t = load_file(files[0])
    assert sorted(t) == sorted(f"model.layers.{i}.self_attn.{kv}_scale" for i in range(2) for kv in "kv")
    expected = {(0, "k"): 4, (0, "v"): 3, (1, "k"): 3, (1, "v"): 3}  # per-layer absmax in base units
    for (i, kv), a in expected.items():
        x = t[f"model.layers.{i}.self_attn.{kv}_scale"]
        assert x.dtype == torch.float32 and x.shape == (1,)
        assert x.tolist() == [a * C / 448]
    with safe_open(str(files[0]), "pt") as f:
        meta = f.metadata()
    assert meta["granularity"] == "tensor" and meta["format"] == "kvq-vllm-kv-scales" and meta["fp8_max"] == "448.0"
    readme = files[1].read_text()
    assert "docs.vllm.ai" in readme and 'kv_cache_dtype="fp8"' in readme and "calculate_kv_scales=False" in readme
    assert '"strategy": "tensor"' in readme and "model.safetensors.index.json" in readme
    assert "--format vllm --granularity tensor --model MODEL_DIR" in readme  # the one command for a ready folder
    assert len(readme.splitlines()) < 25


def test_vllm_per_head(stats, tmp_path):
    [path, readme] = export(stats, tmp_path, "vllm", granularity="head")
    t = load_file(path)
    per_head = {(0, "k"): [2, 3, 4, 2], (0, "v"): [1, 1, 1, 3], (1, "k"): [2, 2, 3, 1], (1, "v"): [3, 2, 2, 2]}
    for (i, kv), absmax in per_head.items():
        x = t[f"model.layers.{i}.self_attn.{kv}_scale"]
        assert x.shape == (4,) and x.tolist() == [a * C / 448 for a in absmax]
    assert '"strategy": "attn_head"' in readme.read_text()


def test_vllm_rejects_channel_and_bits(stats, tmp_path):
    with pytest.raises(ExportError, match="tensor or head"):
        export(stats, tmp_path, "vllm", granularity="channel")
    with pytest.raises(ExportError, match="8-bit"):
        export(stats, tmp_path, "vllm", kv_bits=4)


def test_unknown_format(stats, tmp_path):
    with pytest.raises(ExportError, match="unknown format 'awq': use one of turbomind, kvq, vllm"):
        export(stats, tmp_path, "awq")


# --- reading work dirs -----------------------------------------------------------------------------------


def test_load_orders_layers_and_keeps_meta(tmp_path):
    st = load_work_dir(make_work_dir(tmp_path, layer_order=(1, 0)))
    assert st.layer_names == [LAYER.format(0), LAYER.format(1)]
    assert torch.equal(st.key_stats["min"][0], stat_tensors("key", 0)["min"])
    assert (st.num_layers, st.num_kv_heads, st.head_dim) == (2, 4, 2)
    assert st.meta["dataset"] == "c4"


def test_lmdeploy_work_dir_without_meta_warns(tmp_path):
    with pytest.warns(UserWarning, match="no calib_meta.json.*cannot be checked"):
        st = load_work_dir(make_work_dir(tmp_path, meta=False))
    check_model(st, tiny_config())  # the shape still matches
    assert st.metadata()["source"].startswith("lmdeploy")


def test_load_errors(tmp_path):
    with pytest.raises(CalibStatsError, match=r"not found: run `python -m calib calibrate"):
        load_work_dir(tmp_path / "nope")
    wd = make_work_dir(tmp_path / "wd")
    (wd / "value_stats.pth").unlink()
    with pytest.raises(CalibStatsError, match=r"no value_stats.pth: run `python -m calib calibrate"):
        load_work_dir(wd)
    (wd / "value_stats.pth").write_bytes(b"\x00not a torch file")
    with pytest.raises(CalibStatsError, match="value_stats.pth is corrupt"):
        load_work_dir(wd)


def test_nan_names_layer_and_stat(tmp_path):
    bad = stat_tensors("key", 1)["max"].clone()
    bad[2, 1] = float("nan")
    with pytest.raises(CalibStatsError, match=r"key stat 'max' of layer 1 \(model.layers.1.self_attn\) has NaN"):
        load_work_dir(make_work_dir(tmp_path, overrides={("key", 1, "max"): bad}))


def test_inconsistent_shapes(tmp_path):
    wd = make_work_dir(tmp_path, overrides={("value", 1, s): torch.ones(2, 2) for s in ("min", "max", "absmax")})
    with pytest.raises(CalibStatsError, match=r"inconsistent shapes: value stat 'min' of layer 1 .* is \(2, 2\)"):
        load_work_dir(wd)


def test_check_model_hash_and_shape(stats):
    check_model(stats, tiny_config())
    other = tiny_config()
    other.rope_theta = 500000.0
    other.rope_parameters = {"rope_type": "default", "rope_theta": 500000.0}
    assert config_hash(other) != config_hash(tiny_config())
    with pytest.raises(CalibStatsError, match="from another model: calibrated on tiny-llama"):
        check_model(stats, other)
    wider = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=16, num_hidden_layers=2,
                        num_attention_heads=8, num_key_value_heads=8, head_dim=2)
    with pytest.raises(CalibStatsError, match="4 KV heads .* the model has 2 layers x 8 KV heads"):
        check_model(stats, wider)
