"""Every engine scheme against values worked out by hand from the engine's own definition (its source is named in
each scheme's module, kvcache/engines/): codes, rounding rules, saturation, parameters and their rounding, bytes.

The expected numbers come from the arithmetic written in the comments, not from running our code.
"""

from __future__ import annotations

import math

import pytest
import torch

from kvcache.cli import main
from kvcache.codec import Codec
from kvcache.encoding import SideParams, decode, encode
from kvcache.errors import ModeError
from kvcache.modes import KV_MODES, get_mode
from kvcache.storage.maps import layer_maps
from kvcache.shape import KVShape
from kvcache.storage.tables import layer_grid, layer_tensor_scale

pytestmark = pytest.mark.usefixtures("one_torch_thread")

OUR_MODEL = KVShape(30, 3, 64, 9)


def roundtrip(codec: Codec, values: list[float], head_dim: int | None = None, tensor_scale: float | None = None,
              fp: torch.dtype = torch.float16):
    """Encode one head vector (padded with zeros to ``head_dim``) and decode it: (codes, scale, zp, decoded)."""
    d = head_dim or max(32, len(values))
    x = torch.zeros(1, 1, d)
    x[0, 0, :len(values)] = torch.tensor(values)
    side = SideParams(grid=layer_grid(codec, 1, d, "cpu"), tensor_scale=layer_tensor_scale(codec, None, "cpu"),
                      param_dtype=codec.param_dtype_in(fp))
    if tensor_scale is not None:
        side.tensor_scale = torch.tensor(tensor_scale)
    enc = encode(codec, x, side)
    out = decode(codec, enc.codes, enc.scale, enc.zp, side)
    return enc.codes[0, 0], enc.scale, enc.zp, out[0, 0]


def k(name: str) -> Codec:
    return get_mode(name).k


def v(name: str) -> Codec:
    return get_mode(name).v


# --- llama.cpp -----------------------------------------------------------------------------------------


def test_q8_0_rounds_half_away_from_zero_and_stores_fp16_d():
    # amax 127 -> d = 1; roundf: 0.5 -> 1, 2.5 -> 3, -0.5 -> -1, -2.5 -> -3
    _, scale, _, out = roundtrip(k("llamacpp:q8_0-norot"), [127, 0.5, 1.5, 2.5, -0.5, -2.5, 3])
    assert out[:7].tolist() == [127, 1, 2, 3, -1, -3, 3] and scale[0, 0, 0].item() == 1.0
    # d = 1/127 = 0.0078740157 -> fp16 0.00787353515625, after the code 127 was computed with the fp32 d
    _, scale, _, out = roundtrip(k("llamacpp:q8_0-norot"), [1.0])
    assert scale[0, 0, 0].item() == 0.00787353515625 and out[0].item() == 127 * 0.00787353515625


def test_q4_0_code_space_rounding_follows_the_sign_of_d():
    # max = -8 (the first of largest magnitude) -> d = 1, code = min(15, trunc(x + 8.5)): 8 -> 16 -> 15 -> 7
    _, _, _, out = roundtrip(k("llamacpp:q4_0-norot"), [-8, 8, 0.5, -0.5, 1.5, -1.5, 2.4])
    assert out[:7].tolist() == [-8, 7, 1, 0, 2, -1, 2]
    # max = +8 -> d = -1: x * id + 8.5 = [0.5, 16.5, 8, 9] -> codes [0, 15, 8, 9] -> (code - 8) * -1
    _, _, _, out = roundtrip(k("llamacpp:q4_0-norot"), [8, -8, 0.5, -0.5])
    assert out[:4].tolist() == [8, -7, 0, -1]


def test_q4_1_and_q5_1_min_and_scale():
    # min -1, max 14: d = 1, m = -1; code = trunc(x + 1 + 0.5): 0.5 -> 2, 1.5 -> 3, 0 -> 1
    codes, scale, zp, out = roundtrip(k("llamacpp:q4_1-norot"), [-1, 14, 0.5, 1.5])
    assert out[:5].tolist() == [-1, 14, 1, 2, 0] and zp[0, 0, 0].item() == -1 and codes[:4].tolist() == [0, 15, 2, 3]
    # q5_1: d = 31/31 = 1, no clamp needed: 30.5 + 0.5 -> 31
    _, _, _, out = roundtrip(k("llamacpp:q5_1-norot"), [0, 31, 0.5, 30.5])
    assert out[:5].tolist() == [0, 31, 1, 31, 0]


def test_q5_0():
    # d = -16 / -16 = 1; code = min(31, trunc(x + 16.5)): 16 -> 32 -> 31 -> 15
    _, _, _, out = roundtrip(k("llamacpp:q5_0-norot"), [-16, 16, 0.5, -0.5])
    assert out[:5].tolist() == [-16, 15, 1, 0, 0]


def test_iq4_nl_ties_up_then_refits_the_scale():
    # d0 = -127 / -127 = 1: 7 is halfway between levels 1 and 13 -> the upper, 13; 5 -> 1; 0 -> 1 (|0-1| < |0+10|)
    # least squares with w = x^2: d = (127^4 + 49*13*7 + 25*5) / (127^4 + 49*169 + 25) = 0.9999857 -> fp16 1.0
    codes, scale, _, out = roundtrip(k("llamacpp:iq4_nl-norot"), [-127, 7, 5])
    assert codes[:4].tolist() == [0, 9, 8, 8] and scale[0, 0, 0].item() == 1.0
    assert out[:4].tolist() == [-127, 13, 1, 1]


def test_llamacpp_rotation_is_the_orthonormal_hadamard_of_the_head():
    # k = e_0 rotated: 0.125 everywhere; q8_0 per block: d = 0.125/127 -> fp16 0.00098419189453125, codes 127
    mode = get_mode("llamacpp:q8_0")
    k_map, _, v_map = layer_maps(mode.k, mode.v, 1, 64)
    rotated = torch.zeros(64)
    rotated[0] = 1.0
    rotated = rotated @ k_map[0]
    assert torch.allclose(rotated, torch.full((64,), 0.125))
    _, _, _, out = roundtrip(mode.k, rotated.tolist(), head_dim=64)
    assert torch.allclose(out, torch.full((64,), 127 * 0.00098419189453125))
    back = out @ v_map.T  # V's blocks of 64 are the whole head here: the output rotation undoes it
    assert back[0].item() == pytest.approx(0.99993896, abs=1e-7) and back[1:].abs().max() < 1e-6


def test_llamacpp_block_that_does_not_divide_head_dim_is_refused():
    from kvcache.storage.block_pool import BlockPool

    with pytest.raises(ModeError, match="llamacpp:q4_0.*block.*32.*head_dim 48"):
        BlockPool(get_mode("llamacpp:q4_0-norot"), KVShape(1, 1, 48, 1))


# --- vLLM ----------------------------------------------------------------------------------------------


def test_vllm_fp8_saturates_and_rounds_half_to_even():
    # e4m3 steps of 1/8 in [1, 2): 1.0625 -> 1.0, 1.1875 -> 1.25; 0.3 -> 0.3125 (step 1/32 in [0.25, 0.5));
    # beyond 448 saturated; 2^-10 is half the smallest subnormal 2^-9 -> ties to 0
    _, _, _, out = roundtrip(k("vllm:fp8"), [1.0625, 1.1875, 0.3, 500, -1000, 2 ** -10, 448])
    assert out[:7].tolist() == [1.0, 1.25, 0.3125, 448, -448, 0, 448]
    # k_scale 2: 500 / 2 = 250 -> 256 (step 16 in [128, 256)) -> 512
    _, _, _, out = roundtrip(k("vllm:fp8"), [500], tensor_scale=2.0)
    assert out[0].item() == 512
    # e5m2: steps of 1/4 in [1, 2); 500 -> 512 (step 64); 61440 -> 57344 (satfinite)
    _, _, _, out = roundtrip(k("vllm:fp8_e5m2"), [1.0625, 1.1875, 500, 61440])
    assert out[:4].tolist() == [1.0, 1.25, 512, 57344]


def test_vllm_fp8_takes_the_calibrated_per_tensor_scale():
    from conftest import static_qparams

    from kvcache.storage.block_pool import BlockPool

    shape = KVShape(2, 2, 16, 2)
    qp = static_qparams(shape, symmetric=True, lim=896.0)  # absmax 896 -> k_scale 896 / 448 = 2
    pool = BlockPool(get_mode("vllm:fp8"), shape, qparams=qp)
    assert pool.layers[0].k_tscale.item() == pytest.approx(2.0)
    assert BlockPool(get_mode("vllm:fp8"), shape).layers[0].k_tscale.item() == 1.0  # the engines' default


def test_vllm_per_token_head_truncates_int8_and_casts_fp8():
    # absmax 127 -> scale 1.0 (fp32): codes trunc([127, 63.5, 0.5, -2.5]) = [127, 63, 0, -2]
    _, scale, _, out = roundtrip(k("vllm:int8_per_token_head"), [127, 63.5, 0.5, -2.5])
    assert out[:4].tolist() == [127, 63, 0, -2] and scale.dtype == torch.float32
    # fp8: scale 896 / 448 = 2; [448, 0.5, 0.25] are exact e4m3 values
    _, _, _, out = roundtrip(k("vllm:fp8_per_token_head"), [896, 1, 0.5])
    assert out[:3].tolist() == [896, 1, 0.5]


def test_vllm_int4_per_token_head_maps_the_peak_to_the_top_level():
    _, scale, _, out = roundtrip(v("vllm:int4_per_token_head"), [2.0, -1.0, 0.5])
    assert scale[0, 0, 0].item() == 2.0 and out[0].item() == 2.0 and out[1] < 0


def test_vllm_turboquant_keys_decode_a_spike_exactly_with_norm_correction():
    mode = get_mode("vllm:turboquant_k3v4_nc")
    k_map, _, _ = layer_maps(mode.k, mode.v, 1, 64)
    for c, want in ((3.0, 3.0), (0.1, 0.0999755859375)):  # fp16(0.1) = 0.0999755859375
        spike = torch.zeros(64)
        spike[0] = c
        rotated = spike @ k_map[0]  # c/8 everywhere: every coordinate of the unit vector is 1 sigma = 0.125
        codes, scale, _, out = roundtrip(mode.k, rotated.tolist(), head_dim=64)
        # midpoints 0.500315 and 1.049413 sigma around it: centroid index 5 everywhere; norm correction makes the
        # decoded unit vector exact, so the key comes back as fp16(c) e_0
        assert codes.tolist() == [5] * 64
        back = out @ k_map[0].T
        assert back[0].item() == pytest.approx(want, rel=1e-6) and back[1:].abs().max() < 1e-6


def test_vllm_turboquant_values_round_half_up_with_fp16_scale_and_min():
    # min 0, max 15 -> scale 1; trunc(v + 0.5): 0.5 -> 1, 2.5 -> 3, 7.25 -> 7
    _, _, _, out = roundtrip(v("vllm:turboquant_k3v4_nc"), [0, 0.5, 2.5, 15, 7.25], head_dim=64)
    assert out[:6].tolist() == [0, 1, 3, 15, 7, 0]
    _, _, _, out = roundtrip(v("vllm:turboquant_3bit_nc"), [0, 7, 3.5, 1.75], head_dim=64)  # 3 bits: scale 1
    assert out[:4].tolist() == [0, 7, 4, 2]
    _, _, _, out = roundtrip(k("vllm:turboquant_k8v4"), [500, 1.0625], head_dim=64)  # e4m3, no scale
    assert out[:2].tolist() == [448, 1.0]


def test_vllm_turboquant_centroids_are_vllms_numerical_solution():
    from kvcache.codebooks import lloyd_max_vllm

    # vLLM's trapezoid-rule solution in units of sigma (3 bits): +-0.244984, 0.755646, 1.34318, 2.15035
    got = lloyd_max_vllm(3, 64)[4:] * 8
    assert torch.allclose(got, torch.tensor([0.244984, 0.755646, 1.34318, 2.15035]), atol=2e-5)


def test_vllm_turboquant_skips_the_boundary_layers():
    mode = get_mode("vllm:turboquant_3bit_nc")
    layers = mode.layer_codecs(30)
    assert [i for i, (kc, _) in enumerate(layers) if not kc.quantized] == [0, 1, 28, 29]
    # bytes as vLLM stores them: 26 layers x 3 heads x (26 + 28) + 4 layers x 3 heads x 256 = 7,284
    assert mode.bytes_per_token(OUR_MODEL) == 7284


def test_nvfp4_block_scales_in_e4m3_and_saturating_codes():
    # amax 6: block scale e4m3(6 / 6) = 1; e2m1 ties to even: 2.5 -> 2, 0.25 -> 0, -0.75 -> -1, 5 -> 4; 1.3 -> 1.5
    _, _, _, out = roundtrip(k("vllm:nvfp4"), [6, 3, 2.5, 0.25, -0.75, 1.3, 0, 5] + [0] * 8, head_dim=16)
    assert out[:8].tolist() == [6, 3, 2, 0, -1, 1.5, 0, 4]
    # amax 7: e4m3(7/6 = 1.1667) = 1.125 (step 1/8); 7 / 1.125 = 6.2 saturates to 6 -> 6.75
    _, _, _, out = roundtrip(k("vllm:nvfp4"), [7] + [0] * 15, head_dim=16)
    assert out[0].item() == 6.75


# --- SGLang --------------------------------------------------------------------------------------------


def test_sglang_fp8_is_torchs_cast_e5m2_overflows():
    _, _, _, out = roundtrip(k("sglang:fp8_e4m3"), [1.0625, 1000])
    assert out[:2].tolist() == [1.0, 448]
    codes, _, _, _ = roundtrip(k("sglang:fp8_e5m2"), [61440])
    assert codes[0].item() == 0x7C  # torch's e5m2 cast overflows to +inf (vLLM's satfinite gives 57344)


def test_sglang_mxfp4_power_of_two_scales_ties_up():
    # amax 6 -> 6/6 = 1 -> scale 2^0; ties go up: 2.5 -> 3, 0.25 -> 0.5, -0.75 -> -1, 5 -> 6; 0.1 -> 0
    _, scale, _, out = roundtrip(k("sglang:fp4_e2m1"), [6, 3, 2.5, 0.25, -0.75, 1.3, 0, 5, 0.1] + [0] * 7, head_dim=16)
    assert out[:9].tolist() == [6, 3, 3, 0.5, -1.0, 1.5, 0, 6, 0] and scale[0, 0, 0].item() == 127  # 2^(127 - 127)
    # amax 7 -> 7/6 -> scale 2^ceil(0.222) = 2: 7 / 2 = 3.5 -> 4 (tie up) -> 8
    _, scale, _, out = roundtrip(k("sglang:fp4_e2m1"), [7] + [0] * 15, head_dim=16)
    assert scale[0, 0, 0].item() == 128 and out[0].item() == 8  # exponent byte 128: 2^1


def test_sglang_has_no_int8_flag():
    with pytest.raises(ModeError, match="unknown sglang KV scheme 'sglang:int8'; sglang's: fp8_e4m3, fp8_e5m2, fp4_e2m1"):
        get_mode("sglang:int8")


# --- LMDeploy ------------------------------------------------------------------------------------------


def test_lmdeploy_turbomind_rounds_half_to_even():
    # min 0, max 15 -> scale 1, zero 0; cvt.rni: 0.5 -> 0, 1.5 -> 2, 2.5 -> 2
    codes, scale, zp, out = roundtrip(k("lmdeploy:4"), [0, 15, 0.5, 1.5, 2.5], head_dim=64)
    assert codes[:5].tolist() == [0, 15, 0, 2, 2] and out[:5].tolist() == [0, 15, 0, 2, 2]
    assert scale.dtype == torch.float16 and zp[0, 0, 0].item() == 0
    assert get_mode("int4-lmdeploy") is get_mode("lmdeploy:4")  # the old name


def test_lmdeploy_42_residual_sign_bit():
    mode = get_mode("lmdeploy:42")
    c = 2.0
    u = torch.full((64,), c * 0.125)  # c e_0 rotated: every coordinate of the unit vector is 1 sigma = 0.125
    codes, scale, zp, out = roundtrip(mode.k, u.tolist(), head_dim=64)
    # 3-bit boundaries x sigma: 0.0625687 < 0.125 < 0.1312447 -> index 5, centroid 0.7560052 / 8 = 0.09450065;
    # residual 0.03049935 >= 0 -> sign bit 1 (code 5 | 8 = 13); qjl_norm = RMS of the residual = 0.03049935
    assert codes.tolist() == [13] * 64
    assert scale[0, 0, 0].item() == c and zp[0, 0, 0].item() == pytest.approx(0.03049935, rel=1e-3)
    want = c * (0.7560052 / 8 + torch.tensor(0.03049935).half().item())
    assert torch.allclose(out, torch.full((64,), want), rtol=1e-5)
    # values, 2 bits: 1 sigma > 0.9815992 sigma -> the top centroid 1.5104176 sigma: a 51% overshoot on a spike
    codes, _, _, out = roundtrip(mode.v, u.tolist(), head_dim=64)
    assert codes.tolist() == [3] * 64 and torch.allclose(out, torch.full((64,), c * 1.5104176 / 8), rtol=1e-5)


# --- transformers' QuantizedCache ----------------------------------------------------------------------------


def test_quanto_groups_of_64_round_half_to_even():
    from kvcache.engines.hf import quanto

    # min -1, max 14: scale 1, shift 1; round(x + 1) half to even: 1.5 -> 2, 2.5 -> 2, 3.5 -> 4
    x = torch.zeros(1, 1, 64)
    x[0, 0, :5] = torch.tensor([-1, 14, 0.5, 1.5, 2.5])
    assert quanto(x, 4)[0, 0, :6].tolist() == [-1, 14, 1, 1, 3, 0]
    # int2: min -1, max 2: scale 1, shift 1: round([0, 3, 1.5, 0.5, 1]) = [0, 3, 2, 0, 1]
    x = torch.zeros(1, 1, 64)
    x[0, 0, :4] = torch.tensor([-1, 2, 0.5, -0.5])
    assert quanto(x, 2)[0, 0, :5].tolist() == [-1, 2, 1, -1, 0]


def test_hqq_groups_are_strided_over_the_sequence():
    from kvcache.engines.hf import hqq

    # [1 head, 2 tokens, 64]: axis 0 reshapes to [64, 2], so group 0 = the even channels of both tokens, group 1
    # the odd ones. Both groups on the integer grid 0..15 (min 0 and max 15 present): the optimiser's fixed point,
    # decoded exactly.
    w = torch.randint(0, 16, (64, 2), generator=torch.Generator().manual_seed(0)).float()
    w[0], w[1] = 0.0, 15.0
    x = w.reshape(1, 2, 64)  # flat index r * 2 + j: column j of [64, 2] is group j
    assert torch.equal(hqq(x, 4), x)
    # one outlier in token 1's channel 0 widens group 0 (even channels of both tokens) only
    y = x.clone()
    y[0, 1, 0] = 150.0
    err = (hqq(y, 4) - y).abs()
    assert err[0, :, 1::2].max() == 0 and err[0, :, 0::2].max() > 1


def test_residual_window_attends_what_transformers_quantizedcache_does():
    """Our one-pass prefill through the emulated window equals transformers' own QuantizedLayer fed token by token
    (with the same quantizer as its backend): the flushes after tokens 0, 128, 256 and the compounding re-quantization."""
    from transformers.cache_utils import Cache, QuantizedLayer

    from conftest import make_tiny_llama
    from kvcache.engines.hf import quanto
    from kvcache.hf.cache import PagedKVCache
    from kvcache.hf.compat import cache_kwargs
    from kvcache.hf.forward import forward_tokens

    class QuantoLayer(QuantizedLayer):
        def _quantize(self, tensor, axis):
            return quanto(tensor, 4)

        def _dequantize(self, q):
            return q

    model = make_tiny_llama(num_layers=2, head_dim=64)
    ids = torch.randint(0, 128, (1, 300), generator=torch.Generator().manual_seed(3))
    ours = forward_tokens(model, PagedKVCache.for_model(model, "hf:quanto-int4", fp_dtype=torch.float32), ids,
                          last_only=False)[0]
    cache = Cache(layers=[QuantoLayer() for _ in range(2)])
    theirs = []
    with torch.inference_mode():
        for i in range(300):
            out = model(input_ids=ids[:, i:i + 1], position_ids=torch.tensor([[i]]), use_cache=True, **cache_kwargs(cache))
            theirs.append(out.logits[0, -1].float())
    theirs = torch.stack(theirs)
    assert torch.allclose(ours, theirs, atol=2e-4), (ours - theirs).abs().max()
    assert (ours[129:] - forward_tokens(model, PagedKVCache.for_model(model, "fp16", fp_dtype=torch.float32), ids,
                                         last_only=False)[0][129:]).abs().max() > 1e-3  # it did quantize


def test_hf_bytes_count_the_residual_window():
    mode = get_mode("hf:quanto-int4")
    assert mode.bytes_per_token(OUR_MODEL) == 90 * 72  # 32 B codes + fp16 scale and shift per 64, K and V
    # a full window of 128 tokens held in 16 bits instead of codes, per sequence
    assert mode.residual_bytes(OUR_MODEL) == 128 * (23040 - 6480)
    assert mode.bytes_per_token_at(OUR_MODEL, 2048) == pytest.approx(6480 + 128 * 16560 / 2048)


# --- every scheme ----------------------------------------------------------------------------------------


BYTES_PER_HEAD_D64 = {  # K + V per token, head and layer, as each engine stores them (its source's layout)
    "vllm:fp8": 128, "vllm:fp8_e5m2": 128, "vllm:int8_per_token_head": 136, "vllm:fp8_per_token_head": 136,
    "vllm:int4_per_token_head": 72, "vllm:nvfp4": 72, "sglang:fp8_e4m3": 128, "sglang:fp8_e5m2": 128,
    "sglang:fp4_e2m1": 72, "lmdeploy:8": 136, "lmdeploy:4": 72, "lmdeploy:42": 54, "llamacpp:q8_0": 136,
    "llamacpp:q5_1": 96, "llamacpp:q5_0": 88, "llamacpp:q4_1": 80, "llamacpp:q4_0": 72, "llamacpp:iq4_nl": 72,
    "llamacpp:q8_0-q4_0": 104, "hf:quanto-int4": 72, "hf:quanto-int2": 40, "hf:hqq-int4": 72, "hf:hqq-int2": 40,
}


@pytest.mark.parametrize("name,per_head", BYTES_PER_HEAD_D64.items())
def test_bytes_per_token_as_the_engine_stores_them(name, per_head):
    assert get_mode(name).bytes_per_token(OUR_MODEL) == 90 * per_head
    if name.startswith("llamacpp:"):
        assert get_mode(name + "-norot").bytes_per_token(OUR_MODEL) == 90 * per_head


def test_every_engine_mode_names_its_source_and_command():
    engine_modes = [m for m in KV_MODES.values() if m.engine != "kvq"]
    assert len(engine_modes) >= 30
    for m in engine_modes:
        assert m.name.startswith(m.engine + ":") and m.source and m.serve
    assert get_mode("llamacpp:q4_0-norot").serve.startswith("LLAMA_ATTN_ROT_DISABLE=1 llama-server")
    assert get_mode("vllm:turboquant_3bit_nc").serve == "vllm serve MODEL --kv-cache-dtype turboquant_3bit_nc"
    assert get_mode("lmdeploy:42").serve == "lmdeploy serve api_server MODEL --backend pytorch --quant-policy 42"


def test_unknown_schemes_list_the_engines_flags(capsys):
    with pytest.raises(ModeError, match="unknown vllm KV scheme 'vllm:fp4'; vllm's: fp8, fp8_e5m2"):
        get_mode("vllm:fp4")
    with pytest.raises(ModeError, match="unknown engine 'trt'.*known engines: vllm, sglang, lmdeploy, llamacpp, hf"):
        get_mode("trt:fp8")
    assert main(["modes", "--kv", "llamacpp:q3_0"]) == 2
    assert "llamacpp's: q8_0, q8_0-norot" in capsys.readouterr().err


def test_every_scheme_round_trips_a_random_head_within_its_class():
    """Each scheme's decoded error on a Gaussian head, rotated where it rotates, is what its bits allow."""
    x = torch.randn(8, 3, 64, generator=torch.Generator().manual_seed(0))
    for m in (mm for mm in KV_MODES.values() if mm.engine != "kvq" and not mm.emulated):
        for side, codec in (("k", m.k), ("v", m.v)):
            if not codec.quantized:
                continue
            sp = SideParams(grid=layer_grid(codec, 3, 64, "cpu"), tensor_scale=layer_tensor_scale(codec, None, "cpu"),
                            param_dtype=codec.param_dtype_in(torch.float16))
            enc = encode(codec, x, sp)
            err = ((decode(codec, enc.codes, enc.scale, enc.zp, sp) - x) ** 2).mean().item()
            bits = codec.bits - (1 if codec.residual_sign else 0)
            assert err < {8: 2e-3, 5: 1e-2, 4: 4e-2, 3: 0.1, 2: 0.3}[bits] * (3 if codec.grid in ("e4m3", "e5m2") else 1), (m.name, side, err)
            assert math.isfinite(err)


def test_each_engine_scheme_is_paired_with_our_best_mode_at_no_more_bytes():
    """The README's pairs: our lowest-KL mode among those at no more bytes of a 2,048-token sequence (sinks counted)."""
    from kvcache.measure.pairs import engine_pairs, pairs_markdown
    from kvcache.modes import KV_MODES
    from kvcache.shape import KVShape

    shape = KVShape(num_layers=30, num_kv_heads=3, head_dim=64, num_heads=9)  # the embedded model's
    row = lambda kv, kl: dict(kv=kv, kl_vs_fp16=kl, top1_match_pct=90.0, delta_ppl_pct=1.0)  # noqa: E731
    results = [row("fp16", 0.0), row("int8-dynamic", 4e-4), row("int8-qk", 5e-5), row("k8v4", 3e-3), row("int4", 9e-3),
               row("vllm:fp8", 1e-3), row("lmdeploy:4", 1.2e-1), row("llamacpp:q4_1", 4e-2), row("llamacpp:q8_0", 1e-5)]
    pairs = {p["scheme"]: p for p in engine_pairs(results, KV_MODES, shape)}
    assert list(pairs) == ["vllm:fp8", "lmdeploy:4", "llamacpp:q4_1", "llamacpp:q8_0"]
    # vllm:fp8 stores 11,520 B/token: int8-dynamic (12,240) and int8-qk (12,240 + 4 sinks) do not fit, k8v4 does
    assert (pairs["vllm:fp8"]["ours"], pairs["vllm:fp8"]["winner"]) == ("k8v4", "vllm")
    # q8_0 (12,240 B/token, no sinks): int8-dynamic fits exactly, int8-qk's sinks (92,160 B / 2,048) do not
    assert (pairs["llamacpp:q8_0"]["ours"], pairs["llamacpp:q8_0"]["winner"]) == ("int8-dynamic", "llamacpp")
    # lmdeploy:4 (6,480 B/token): no mode of ours is that small; q4_1 (7,200): int4 is 7,200 + 45 of sinks
    assert pairs["lmdeploy:4"]["ours"] is None and pairs["llamacpp:q4_1"]["ours"] is None
    assert pairs["vllm:fp8"]["kl_ratio"] == pytest.approx(1e-3 / 3e-3)
    table = pairs_markdown(list(pairs.values()))
    assert "| lmdeploy:4 | 0.281 | 1.2e-01 |" in table and "(none of ours fits)" in table
