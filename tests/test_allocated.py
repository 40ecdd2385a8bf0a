"""Allocated key codes (``int3-klt``, ``int2-klt``): bits per channel in the calibrated eigenbasis, from definitions.

The greedy allocation against brute force, the bit-stream layout by hand, the N(0, 1) distortions against Max's
(1960) table, the eigenbasis's defining properties, the coding error against its prediction, a cache round trip,
and the refusals a user can meet.
"""

from __future__ import annotations

import itertools
from dataclasses import replace

import pytest
import torch

from kvcache.codebooks import gauss_distortion, gauss_levels
from kvcache.codec import KVMode
from kvcache.encoding import SideParams, decode, encode, from_storage, to_storage
from kvcache.errors import ModeError, QParamsError
from kvcache.hf.cache import PagedKVCache
from kvcache.hf.forward import forward_tokens
from kvcache.kernels.common import unsupported, unsupported_store
from kvcache.modes import KV_MODES, allocated_keys
from kvcache.quant import allocate_bits, pack_widths, unpack_widths
from kvcache.shape import KVShape
from kvcache.transforms import key_eigenbasis, qk_transform

from conftest import make_tiny_llama, random_qparams

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_gauss_distortions_are_max_1960():
    # J. Max, "Quantizing for minimum distortion" (1960), Table II, mean squared error of N(0, 1) at 2..16 levels
    max_table = {1: 0.3634, 2: 0.1175, 3: 0.03454, 4: 0.009497}
    d = gauss_distortion()
    assert d[0] == 1.0 and all(abs(d[b] - v) / v < 2e-3 for b, v in max_table.items())
    assert bool((d[1:] < d[:-1]).all())  # every bit helps
    drops = d[:-1] - d[1:]
    assert bool((drops[1:] <= drops[:-1]).all())  # convex: greedy allocation is optimal
    assert gauss_levels()[0].abs().sum() == 0 and torch.allclose(gauss_levels()[1, :2], torch.tensor([-0.7979, 0.7979]), atol=1e-4)


def test_greedy_allocation_matches_brute_force():
    d = gauss_distortion()[:5]  # at most 4 bits per channel
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        w = torch.rand(5, generator=g) ** 3
        got = allocate_bits(w, 9, d)
        best = min((b for b in itertools.product(range(5), repeat=5) if sum(b) == 9),
                   key=lambda b: float(sum(w[i] * d[b[i]] for i in range(5))))
        cost = lambda b: float(sum(w[i] * d[int(b[i])] for i in range(5)))  # noqa: E731
        assert int(got.sum()) == 9 and abs(cost(got) - cost(best)) < 1e-12


def test_allocation_by_hand():
    # weights 16, 1, 1, 0: the first channel is worth more than the others until 4^b evens them out
    d = gauss_distortion()
    assert allocate_bits(torch.tensor([16.0, 1, 1, 0]), 8, d).tolist() == [4, 2, 2, 0]
    assert allocate_bits(torch.ones(2, 4), 12, d).tolist() == [[3, 3, 3, 3]] * 2
    with pytest.raises(ValueError):
        allocate_bits(torch.ones(4), 40, d[:9])


def test_bit_stream_layout_by_hand():
    widths = torch.tensor([[3, 5, 0, 0], [0, 0, 4, 4]], dtype=torch.int32)
    codes = torch.tensor([[[5, 17, 0, 0], [0, 0, 9, 12]]], dtype=torch.int32)
    packed = pack_widths(codes, widths)
    # head 0: 5 in bits 0-2 (101), 17 in bits 3-7 (10001): 0b10001_101 = 141; head 1: 9 | 12 << 4 = 201
    assert packed.tolist() == [[[141], [201]]]
    assert torch.equal(unpack_widths(packed, widths), codes)


def test_bit_streams_round_trip_at_random_widths():
    g = torch.Generator().manual_seed(1)
    widths = allocate_bits(torch.rand(3, 64, generator=g) ** 4, 208, gauss_distortion())
    codes = torch.randint(0, 256, (7, 3, 64), generator=g) % (1 << widths)
    packed = pack_widths(codes, widths)
    assert packed.shape == (7, 3, 26) and packed.dtype == torch.uint8
    assert torch.equal(unpack_widths(packed, widths), codes)
    with pytest.raises(ValueError, match="multiple of 8"):
        pack_widths(codes[..., :3], widths[:, :3])


def _moments(heads: int = 2, d: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mk = torch.randn(heads, d, d, generator=g) * torch.logspace(0, -1.5, d)
    mq = torch.randn(heads, d, d, generator=g) * torch.logspace(-1, 0, d)
    return mk @ mk.transpose(-1, -2) / d, mq @ mq.transpose(-1, -2) / d


def test_the_eigenbasis_whitens_keys_and_diagonalises_queries():
    ck, cq = _moments()
    a = qk_transform(ck, cq)
    basis, weight = key_eigenbasis(ck, cq, a)
    b = basis.double()
    eye = torch.eye(16, dtype=torch.float64).expand(2, -1, -1)
    assert torch.allclose(b.transpose(-1, -2) @ ck.double() @ b, eye, atol=1e-4)  # unit variance, uncorrelated
    inv = torch.linalg.inv(b)
    cq_in = inv @ cq.double() @ inv.transpose(-1, -2)
    assert torch.allclose(cq_in, torch.diag_embed(cq_in.diagonal(dim1=-2, dim2=-1)), atol=1e-4 * float(cq_in.abs().max()))
    assert torch.allclose(weight.double(), cq_in.diagonal(dim1=-2, dim2=-1), rtol=1e-4)
    assert bool((weight[:, 1:] <= weight[:, :-1] * (1 + 1e-4)).all())  # descending: the first channels matter most


def test_coding_error_is_the_predicted_score_error_and_beats_even_bits():
    """Keys drawn from the moments, coded in 3 bits per channel on average: the score error E[(q.(k - k^))^2] is
    what the allocation predicts (sum w_i D(b_i), within the per-token scale's noise) and below giving every
    channel 3 bits in the same basis."""
    ck, cq = _moments(heads=1, d=16)
    basis, weight = key_eigenbasis(ck, cq, qk_transform(ck, cq))
    g = torch.Generator().manual_seed(2)
    z = torch.randn(20000, 1, 16, generator=g)  # keys in the basis: unit variance, uncorrelated
    codec = allocated_keys(3.0)
    widths = allocate_bits(weight, 48, gauss_distortion())

    def score_error(w: torch.Tensor) -> float:
        side = SideParams(grid=gauss_levels(), param_dtype=torch.float32, widths=w)
        enc = encode(codec, z, side)
        err = decode(codec, enc.codes, enc.scale, None, side) - z
        return float((err.pow(2) * weight[None]).sum(-1).mean())

    predicted = float((weight[0] * gauss_distortion()[widths[0].long()].float()).sum())
    allocated = score_error(widths)
    assert abs(allocated - predicted) / predicted < 0.15
    assert allocated < 0.7 * score_error(torch.full_like(widths, 3))


def test_allocated_keys_through_the_paged_cache():
    """int3-klt on a tiny model: prefill and step-by-step decode read the same store; keys take 3.25 x 32 / 8 =
    13 bytes and one fp16 scale per token and head; the layer holds every channel's width and its place in the stream."""
    model = make_tiny_llama(head_dim=32)
    qp = random_qparams(model.config)
    ids = torch.randint(0, model.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(0))
    whole = forward_tokens(model, PagedKVCache.for_model(model, "int3-klt", qparams=qp), ids, last_only=False)
    cache = PagedKVCache.for_model(model, "int3-klt", qparams=qp)
    forward_tokens(model, cache, ids[:, :16])
    steps = [forward_tokens(model, cache, ids[:, i:i + 1])[:, -1] for i in range(16, 24)]
    assert torch.allclose(torch.stack(steps, 1), whole[:, 16:], atol=1e-4)
    layer = cache.pool.layers[0]
    assert layer.k.shape[-1] == 13 and layer.k_scale.shape[-1] == 1 and layer.k_zp is None
    assert layer.k_widths.sum(-1).tolist() == [104, 104]
    assert torch.equal(layer.k_layout & 15, layer.k_widths) and torch.equal(layer.k_layout[:, 1:] >> 4, layer.k_widths.cumsum(-1)[:, :-1])
    fp16 = PagedKVCache.for_model(model, "fp16")
    ref = forward_tokens(model, fp16, ids, last_only=False)
    assert (whole - ref).abs().max() < 0.5 * ref.abs().max()  # close to the float cache, not equal
    # the attention kernels read the bit streams (tests/test_kernels.py); the store kernel leaves them to the reference
    assert unsupported(layer) is None and "allocated bit streams" in unsupported_store(layer)


def test_stored_codes_are_the_encoded_ones():
    model = make_tiny_llama(head_dim=32)
    cache = PagedKVCache.for_model(model, "int2-klt", qparams=random_qparams(model.config))
    layer = cache.pool.layers[1]
    x = torch.randn(5, 2, 32, generator=torch.Generator().manual_seed(4))
    side = layer.side_params("k")
    enc = encode(layer.k_codec, x, side)
    stored = to_storage(layer.k_codec, enc.codes, layer.k_widths)
    assert stored.shape == (5, 2, 10)  # 2.5 bits x 32 channels = 80 bits
    assert torch.equal(from_storage(layer.k_codec, stored, 32, layer.k_widths), enc.codes)


def test_bytes_of_the_named_modes():
    shape = KVShape(num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64)
    k3, k2 = KV_MODES["int3-klt"], KV_MODES["int2-klt"]
    # K: 3.25 x 64 / 8 = 26 bytes + one fp16 scale; V: 24 bytes of 3-bit codes + two fp16 scales (int3-lm's V)
    assert k3.bytes_per_token(shape) == 30 * 3 * (28 + 28) == KV_MODES["int3-lm"].bytes_per_token(shape)
    # K: 2.5 x 64 / 8 = 20 + 2; V: 16 + 4
    assert k2.bytes_per_token(shape) == 30 * 3 * (22 + 20) and k2.ratio_to_fp16(shape) <= 0.17
    assert k3.k_bits == 3.25 and k2.k_bits == 2.5 and k3.needs_qparams


def test_allocations_that_are_not_whole_bytes_are_refused():
    mode = KVMode("k-odd", "t", allocated_keys(3.3), KV_MODES["int3"].v, 4)
    with pytest.raises(ModeError, match="not a whole number of bytes"):
        mode.check_shape(KVShape(num_layers=2, num_heads=4, num_kv_heads=2, head_dim=64))
    with pytest.raises(ValueError, match="not a codec"):
        replace(allocated_keys(3.0), rotate=True)


def test_parameters_without_an_eigenbasis_or_for_another_head_dim_are_refused():
    model = make_tiny_llama(head_dim=32)
    qp = random_qparams(model.config)
    old = replace(qp, k_basis=None, k_weight=None)
    with pytest.raises(QParamsError, match="no key eigenbasis.*kv_qparams WORK_DIR OUT_DIR --format kvq"):
        PagedKVCache.for_model(model, "int3-klt", qparams=old)
    other = random_qparams(make_tiny_llama(head_dim=16).config)
    with pytest.raises(QParamsError, match="recalibrate this model"):
        PagedKVCache.for_model(model, "int3-klt", qparams=replace(qp, k_basis=other.k_basis))
