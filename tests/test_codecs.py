"""The codec's pieces from their definitions: bit planes, codebooks (fp8/fp4, iq4nl, Lloyd-Max), nearest-entry
rounding, encode/decode of every grid, byte counts, and a mode of new pieces through the paged cache.

Expected values are worked out by hand (or from closed forms) in the comments, not produced by our code.
"""

from __future__ import annotations

import math

import pytest
import torch

from kvcache.codebooks import IQ4NL_LEVELS, float_codes, float_grid, lloyd_max, lloyd_max_peak
from kvcache.codec import Codec, KVMode
from kvcache.encoding import SideParams, decode, encode, from_storage, to_storage
from kvcache.hf.cache import PagedKVCache
from kvcache.hf.forward import forward_tokens
from kvcache.quant import code_planes, nearest_codes, pack_codes, pack_int4, unpack_codes

from conftest import make_tiny_llama

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --- bit planes ----------------------------------------------------------------------------------------


def test_planes_of_every_width():
    assert [code_planes(b) for b in range(1, 9)] == [(1,), (2,), (2, 1), (4,), (4, 1), (4, 2), (4, 2, 1), (8,)]


def test_two_bit_plane_layout_by_hand():
    # D = 8, 2 bits: one plane of 2 bytes; byte j holds channels j, j+2, j+4, j+6 at bits 0, 2, 4, 6.
    u = torch.tensor([[3, 0, 1, 2, 2, 1, 0, 3]])
    # byte 0: ch0=3, ch2=1, ch4=2, ch6=0 -> 3 | 1<<2 | 2<<4 | 0<<6 = 3 + 4 + 32 = 39
    # byte 1: ch1=0, ch3=2, ch5=1, ch7=3 -> 0 | 2<<2 | 1<<4 | 3<<6 = 8 + 16 + 192 = 216
    assert pack_codes(u, 2).tolist() == [[39, 216]]


def test_three_bit_codes_are_a_two_bit_and_a_one_bit_plane_by_hand():
    # D = 8, 3 bits = 2-bit plane (2 bytes) then 1-bit plane (1 byte: bit k = channel k's high bit).
    u = torch.tensor([[7, 0, 5, 2, 4, 3, 6, 1]])
    low = [c & 3 for c in u[0].tolist()]  # [3, 0, 1, 2, 0, 3, 2, 1]
    assert low == [3, 0, 1, 2, 0, 3, 2, 1]
    byte0 = 3 | 1 << 2 | 0 << 4 | 2 << 6  # ch0, ch2, ch4, ch6 -> 3 + 4 + 0 + 128 = 135
    byte1 = 0 | 2 << 2 | 3 << 4 | 1 << 6  # ch1, ch3, ch5, ch7 -> 0 + 8 + 48 + 64 = 120
    high = sum(((c >> 2) & 1) << k for k, c in enumerate(u[0].tolist()))  # ch0, ch2, ch4, ch6 -> 1 + 4 + 16 + 64 = 85
    assert (byte0, byte1, high) == (135, 120, 85)
    assert pack_codes(u, 3).tolist() == [[135, 120, 85]]


@pytest.mark.parametrize("bits", range(1, 9))
def test_planes_round_trip(bits):
    u = torch.randint(0, 1 << bits, (3, 5, 64), generator=torch.Generator().manual_seed(bits))
    packed = pack_codes(u, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 5, 64 * bits // 8)
    assert torch.equal(unpack_codes(packed, bits, 64), u.to(torch.int32))


def test_four_bit_planes_are_the_int4_layout():
    c = torch.randint(-8, 8, (4, 64), generator=torch.Generator().manual_seed(0), dtype=torch.int8)
    assert torch.equal(pack_codes(c.to(torch.int32) + 8, 4), pack_int4(c))


# --- codebooks ---------------------------------------------------------------------------------------------


def test_fp8_grids_by_hand():
    e4m3 = float_grid("e4m3")
    # e4m3fn: bias 7, 3 mantissa bits; 0x7E = 0 1111 110 = 2^(15-7) * (1 + 6/8) = 448; 0x01 = 2^-6 * 1/8 = 2^-9
    assert e4m3[0x7E] == 448 and e4m3[0x01] == 2 ** -9 and e4m3[0x38] == 1.0 and e4m3[0xB8] == -1.0
    e5m2 = float_grid("e5m2")
    # e5m2: bias 15; 0x7B = 0 11110 11 = 2^15 * 1.75 = 57344; 0x3C = 2^0 = 1
    assert e5m2[0x7B] == 57344 and e5m2[0x3C] == 1.0


def test_fp8_codes_round_half_even_and_saturate():
    # e4m3 between 1 and 2 steps by 1/8: 1.0625 ties to 1.0 (even mantissa 000), 1.1875 ties to 1.25 (010)
    x = torch.tensor([1.0625, 1.1875, 500.0, -1000.0, 448.0])
    got = float_grid("e4m3")[float_codes(x, "e4m3")]
    assert got.tolist() == [1.0, 1.25, 448.0, -448.0, 448.0]
    # agrees with torch's own cast wherever that does not overflow
    y = torch.randn(4096, generator=torch.Generator().manual_seed(1)) * 100
    assert torch.equal(float_grid("e4m3")[float_codes(y, "e4m3")], y.to(torch.float8_e4m3fn).float())
    assert torch.equal(float_grid("e5m2")[float_codes(y, "e5m2")], y.to(torch.float8_e5m2).float())


def test_fp4_e2m1_codes_by_hand():
    # magnitudes 0 .5 1 1.5 2 3 4 6 at codes 0..7; ties go to the even code (even mantissa)
    x = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0, -2.9])
    assert float_codes(x, "e2m1").tolist() == [0, 2, 2, 4, 4, 6, 6, 7, 8 | 5]
    assert float_grid("e2m1")[8 | 5] == -3.0


def test_nearest_codes_tie_rules():
    table = torch.tensor([-1.0, 0.0, 1.0, 2.0])
    x = torch.tensor([-0.5, 0.5, 1.5, 0.4, 9.0, -9.0])
    assert nearest_codes(x, table, "down").tolist() == [0, 1, 2, 1, 3, 0]
    assert nearest_codes(x, table, "up").tolist() == [1, 2, 3, 1, 3, 0]
    assert nearest_codes(x, table, "even").tolist() == [0, 2, 2, 1, 3, 0]


def test_lloyd_max_against_closed_forms():
    # 1 bit: +-E|Z| = +-sqrt(2/pi) sigma; 2 bits: the classic Gaussian quantizer +-0.4528, +-1.5104 (Max, 1960)
    d = 64
    sigma = 1 / math.sqrt(d)
    assert torch.allclose(lloyd_max(1, d), torch.tensor([-1.0, 1.0]) * math.sqrt(2 / math.pi) * sigma, atol=1e-6)
    assert torch.allclose(lloyd_max(2, d) / sigma, torch.tensor([-1.5104, -0.4528, 0.4528, 1.5104]), atol=1e-4)
    three = lloyd_max(3, d) / sigma  # Max's 8-level table: 0.2451 0.7560 1.3439 2.1520
    assert torch.allclose(three[4:], torch.tensor([0.2451, 0.7560, 1.3439, 2.1520]), atol=1e-3)


def _peak_scaled(groups: torch.Tensor) -> torch.Tensor:
    """``-x / peak`` of every coordinate of sampled Gaussian groups (the peak: the value of largest magnitude)."""
    peak = groups.gather(-1, groups.abs().argmax(-1, keepdim=True))
    return (-groups / peak).flatten()


@pytest.mark.parametrize("bits,group", [(4, 16), (3, 32), (2, 32)])
def test_lloyd_max_peak_meets_lloyds_conditions_on_sampled_groups(bits, group):
    levels = lloyd_max_peak(bits, group).double()
    assert levels[0] == -1 and torch.all(levels[1:] > levels[:-1]) and levels[-1] < 1
    y = _peak_scaled(torch.randn(40_000, group, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    cell = (y[:, None] - levels[None]).abs().argmin(-1)  # nearest level, by definition
    for i in range(1, len(levels)):  # every free level is the mean of its cell (level 0 holds the peaks, -1)
        assert abs(y[cell == i].mean() - levels[i]) < 4e-3
    # and the squared error is below the uniform grid's with the peak on its lowest level (q4_0's rule)
    half = 1 << (bits - 1)
    uniform = torch.arange(-half, half, dtype=torch.float64) / half
    err = lambda t: ((y[:, None] - t[None]).abs().min(-1).values ** 2).mean()  # noqa: E731
    assert err(levels) < 0.95 * err(uniform)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_peak_grid_puts_the_peak_on_level_zero_by_hand(sign):
    codec = Codec(4, "token", group_size=8, symmetric=True, grid="lloyd-max-peak")
    x = sign * torch.tensor([[[2.0, -0.5, 1.0, 0.0, 0.25, -2.0, 1.5, 0.75]]])  # peak 2 (first of +-2), times sign
    enc = encode(codec, x, _side(codec))
    assert enc.scale.item() == -2.0 * sign  # signed: the peak / -1
    table = lloyd_max_peak(4, 8)
    unit = x[0, 0] / enc.scale.item()
    want = (unit[:, None] - table[None]).abs().argmin(-1)  # the nearest level of each
    assert enc.codes[0, 0].tolist() == want.tolist() and want[0] == 0 and want[5] == 15  # -2 sits past the top level
    back = decode(codec, enc.codes, enc.scale, enc.zp, _side(codec))
    assert back[0, 0, 0] == x[0, 0, 0] and torch.allclose(back[0, 0], table[want] * enc.scale.item())


# --- encode and decode -----------------------------------------------------------------------------------


def _side(codec: Codec, heads: int = 1, head_dim: int = 8) -> SideParams:
    from kvcache.storage.tables import layer_grid, layer_tensor_scale

    return SideParams(grid=layer_grid(codec, heads, head_dim, "cpu"), tensor_scale=layer_tensor_scale(codec, None, "cpu"))


def test_iq4nl_with_a_scale_by_hand():
    codec = Codec(4, "token", symmetric=True, grid="iq4nl")
    x = torch.tensor([[[-127.0, 113.0, 0.0, 12.0, -23.0, 60.0, 5.0, 100.0]]])  # one token, one head
    enc = encode(codec, x, _side(codec))
    # the peak |x| = 127 maps to the table's largest magnitude 127: scale 1; every value its nearest level
    # 0 -> 1 (|0-1| < |0+10|), 12 -> 13, -23 -> -22, 60 -> 53 (|60-53|=7 < |60-69|=9), 5 -> 1, 100 -> 89 (11 < 13)
    assert enc.scale.item() == 1.0
    assert [IQ4NL_LEVELS[i] for i in enc.codes[0, 0].tolist()] == [-127, 113, 1, 13, -22, 53, 1, 89]
    back = decode(codec, enc.codes, enc.scale, enc.zp, _side(codec))
    assert back[0, 0].tolist() == [-127.0, 113.0, 1.0, 13.0, -22.0, 53.0, 1.0, 89.0]


def test_fp8_with_a_per_tensor_scale():
    codec = Codec(8, "none", grid="e4m3", tensor_scale=True)
    side = SideParams(tensor_scale=torch.tensor(0.5))
    x = torch.tensor([[[1.0, -3.0, 300.0, 0.03125, 2.0, 0.0, -0.5, 1000.0]]])
    enc = encode(codec, x, side)
    # x / 0.5 = 2, -6, 600 -> 448 (saturated), 0.0625, 4, 0, -1, 2000 -> 448; decoded times 0.5
    back = decode(codec, enc.codes, None, None, side)
    assert back[0, 0].tolist() == [1.0, -3.0, 224.0, 0.03125, 2.0, 0.0, -0.5, 224.0]


def test_norm_codes_with_norm_correction():
    codec = Codec(2, "token", symmetric=True, grid="lloyd-max", rule="norm", norm_correction=True)
    side = _side(codec, head_dim=4)
    x = torch.tensor([[[3.0, -1.0, 0.5, -2.0]]])
    enc = encode(codec, x, side)
    # norm = sqrt(9 + 1 + .25 + 4) = sqrt(14.25); unit coordinates 0.795, -0.265, 0.132, -0.530 against the
    # 2-bit centroids of N(0, 1/4) (+-0.2264, +-0.7552): codes 3, 1, 2, 0
    assert enc.codes[0, 0].tolist() == [3, 1, 2, 0]
    assert enc.scale.item() == pytest.approx(math.sqrt(14.25), rel=1e-3)
    c = lloyd_max(2, 4)[torch.tensor([3, 1, 2, 0])]
    want = c / c.norm() * torch.tensor(math.sqrt(14.25)).half().float()  # norm correction: the decoded vector's norm is the stored one
    assert torch.allclose(decode(codec, enc.codes, enc.scale, None, side)[0, 0], want, atol=1e-6)


@pytest.mark.parametrize("codec", [
    Codec(8, "token"), Codec(4, "token", group_size=16, symmetric=True), Codec(3, "token", group_size=32),
    Codec(2, "token", symmetric=True, group_size=16), Codec(5, "token"), Codec(4, "token", grid="e2m1", group_size=16, symmetric=True),
    Codec(8, "token", grid="e4m3", symmetric=True), Codec(3, "token", grid="lloyd-max", rule="norm", symmetric=True),
], ids=lambda c: c.label())
def test_storage_round_trip_and_error_bound(codec):
    """Stored bytes read back as the same codes; the decoded error of a Gaussian vector shrinks with bits."""
    x = torch.randn(16, 2, 64, generator=torch.Generator().manual_seed(3))
    side = _side(codec, heads=2, head_dim=64)
    enc = encode(codec, x, side)
    stored = to_storage(codec, enc.codes)
    assert stored.shape[-1] == codec.code_width(64)
    assert torch.equal(from_storage(codec, stored, 64), enc.codes)
    err = (decode(codec, enc.codes, enc.scale, enc.zp, side) - x).pow(2).mean() / x.pow(2).mean()
    assert err < {8: 1e-3, 5: 5e-3, 4: 3e-2, 3: 6e-2, 2: 0.2}[codec.bits]


def test_bytes_per_token_by_hand():
    # 3-bit codes of 64 channels = 24 bytes, one fp16 norm = 2: vLLM TurboQuant's 3-bit key, 26 bytes
    assert Codec(3, "token", symmetric=True, grid="lloyd-max", rule="norm").bytes_per_token_per_head(64) == 26
    # llama.cpp q4_1: blocks of 32, fp16 d and m: 64 channels = 2 blocks x (16 + 4) = 40 bytes
    assert Codec(4, "token", group_size=32, grid="uint").bytes_per_token_per_head(64) == 40
    # nvfp4: 32 bytes of fp4 codes, one e4m3 scale per 16: 4 bytes
    assert Codec(4, "token", group_size=16, symmetric=True, grid="e2m1", param_dtype="e4m3").bytes_per_token_per_head(64) == 36


def test_codecs_that_do_not_exist_are_refused():
    for bad in (dict(bits=3, grid="e4m3", scaling="token"), dict(bits=8, scaling="none"),
                dict(bits=4, scaling="static", grid="iq4nl"), dict(bits=9, scaling="token")):
        with pytest.raises(ValueError, match="not a codec"):
            Codec(**bad)


def test_new_pieces_through_the_paged_cache():
    """K 3-bit Lloyd-Max norms, V 2-bit integers in groups: prefill and step-by-step decode read the same store."""
    model = make_tiny_llama(head_dim=32)
    mode = KVMode("test-3k2v", "t", Codec(3, "token", symmetric=True, grid="lloyd-max", rule="norm", rotate=True),
                  Codec(2, "token", group_size=16))
    ids = torch.randint(0, model.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(0))
    whole = forward_tokens(model, PagedKVCache.for_model(model, mode), ids, last_only=False)
    cache = PagedKVCache.for_model(model, mode)
    forward_tokens(model, cache, ids[:, :16])
    steps = [forward_tokens(model, cache, ids[:, i:i + 1])[:, -1] for i in range(16, 24)]
    assert torch.allclose(torch.stack(steps, 1), whole[:, 16:], atol=1e-4)
    assert cache.memory().bytes_per_token == model.config.num_hidden_layers * model.config.num_key_value_heads * (12 + 2 + 8 + 2 * 2 * 2)
