"""The quantization math against hand-computed values and its error bounds."""

import pytest
import torch

from kvcache.quant import (
    asym_qparams,
    dequantize,
    dynamic_qparams,
    granularity_shape,
    qrange,
    quantize,
    reduce_to_granularity,
    sym_qparams,
)


def test_asym_params_follow_lmdeploy_recipe():
    scale, zp = asym_qparams(torch.tensor([-1.0]), torch.tensor([1.55]))
    assert zp.item() == pytest.approx(0.275)
    assert scale.item() == pytest.approx(2.55 / 255)
    q = quantize(torch.tensor([-1.0, 0.275, 1.55, 0.2995]), scale, zp)
    # (x - zp) / scale = -127.5 -> -128 (half to even), 0, +127.5 -> 128 clamped to 127, 2.45 -> 2
    assert q.tolist() == [-128, 0, 127, 2]
    assert q.dtype == torch.int8


def test_sym_params():
    scale, zp = sym_qparams(torch.tensor([2.54]))
    assert scale.item() == pytest.approx(0.02)
    assert zp.item() == 0
    assert quantize(torch.tensor([2.54, -2.54, 0.03, 0.01]), scale, zp).tolist() == [127, -127, 2, 0]


@pytest.mark.parametrize("bits", [8, 4])
def test_round_trip_error_at_most_half_a_step_inside_range(bits):
    torch.manual_seed(0)
    x = torch.randn(64, 128) * 3 + 1
    lo, hi = x.amin(dim=0), x.amax(dim=0)
    scale, zp = asym_qparams(lo, hi, bits)
    err = (dequantize(quantize(x, scale, zp, bits), scale, zp) - x).abs()
    assert (err <= scale / 2 + 1e-5).all()
    s_scale, s_zp = sym_qparams(x.abs().amax(dim=0), bits)
    err = (dequantize(quantize(x, s_scale, s_zp, bits), s_scale, s_zp) - x).abs()
    assert (err <= s_scale / 2 + 1e-5).all()


def test_dynamic_params_are_exact_in_storage_dtype():
    torch.manual_seed(1)
    x = torch.randn(37, 3, 64) * torch.linspace(0.1, 30, 64) + 5
    scale, zp = dynamic_qparams(x)
    assert scale.dtype == zp.dtype == torch.float16 and scale.shape == (37, 3)
    q = quantize(x, scale[..., None], zp[..., None])
    err = (dequantize(q, scale[..., None], zp[..., None]) - x).abs()
    # the stored (fp16) parameters are the ones used: the bound holds with them, no extra error
    assert (err <= scale.float()[..., None] / 2 + 1e-5).all()


def test_zero_range_gets_floored_scale():
    scale, zp = asym_qparams(torch.tensor([2.0]), torch.tensor([2.0]))
    assert scale.item() > 0
    assert dequantize(quantize(torch.tensor([2.0]), scale, zp), scale, zp).item() == pytest.approx(2.0)


def test_granularity_reduction():
    stat = torch.tensor([[1.0, 5.0], [-3.0, 2.0]])
    assert reduce_to_granularity(stat, "tensor", "max").tolist() == [[5.0]]
    assert reduce_to_granularity(stat, "head", "min").tolist() == [[1.0], [-3.0]]
    assert torch.equal(reduce_to_granularity(stat, "channel", "max"), stat)
    assert granularity_shape("head", 3, 64) == (3, 1)
    with pytest.raises(ValueError, match="tensor, head, channel"):
        granularity_shape("block", 3, 64)
    with pytest.raises(ValueError):
        qrange(9)
