"""``MODE+recentN``: our modes with the newest tokens kept in 16 bits (KIVI's residual), counted in their bytes.

Against definitions: the stored copy after a prefill (the tokens the window let go coded exactly as the mode's own
pool codes them, the newer ones as they came), a window longer than the text (fp16's logits), token-by-token decode
against one prefill, the bytes, and the refusals a user can meet.
"""

from __future__ import annotations

import pytest
import torch

from kvcache.errors import ModeError
from kvcache.hf.cache import PagedKVCache
from kvcache.hf.forward import forward_tokens
from kvcache.hf.residual import flush
from kvcache.kernels.reference import gather_kv_reference, store_kv_reference
from kvcache.measure.modes_listing import mode_facts, mode_row
from kvcache.modes import KV_MODES, get_mode
from kvcache.shape import KVShape

from conftest import make_tiny_llama, random_qparams

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _ids(n: int, vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("mode", ["int3-klt", "int4", "k8v4-lm", "lmdeploy:42"])
def test_the_window_holds_the_newest_tokens_and_codes_the_others_as_the_mode_does(mode):
    """21 tokens in an 8-token window, flushed at positions 0, 8 and 16 (as the attention does): positions 0..16
    are what the mode's own pool decodes for the same 16-bit tokens (rounded to the pool's fp16), 17..20 the
    tokens as they came. A window codes a token from its 16-bit copy, as a serving engine's window would."""
    model = make_tiny_llama(head_dim=32)
    qp = random_qparams(model.config)
    pools = [PagedKVCache.for_model(model, m, qparams=qp).pool for m in (f"{mode}+recent8", mode)]
    for pool in pools:
        pool.storage.grow(2)
    windowed, coded = (pool.layers[1] for pool in pools)
    g = torch.Generator().manual_seed(3)
    k, v = (torch.randn(21, 2, 32, generator=g).half() for _ in range(2))
    slots, table = torch.arange(21), torch.tensor([0, 1], dtype=torch.int32)
    for layer in (windowed, coded):
        store_kv_reference(layer, k, v, slots)
    for position in (0, 8, 16):
        flush(windowed, table, position)
    got = gather_kv_reference(windowed, table[None], 21, torch.float32)
    want = gather_kv_reference(coded, table[None], 21, torch.float32)
    for x, w, fresh in zip(got, want, (k, v)):
        assert torch.equal(x[0, :, :17], w[0, :, :17].half().float())
        assert torch.equal(x[0, :, 17:], fresh[17:].transpose(0, 1).float())
    assert not torch.equal(want[0][0, :, 17:], k[17:].transpose(0, 1).float())  # the mode's pool lost something there


def test_a_window_longer_than_the_text_gives_fp16s_logits():
    """Only position 0 is ever flushed, and a sink mode reads it from its 16-bit sink copy."""
    model = make_tiny_llama(head_dim=32)
    qp = random_qparams(model.config)
    ids = _ids(24, model.config.vocab_size, seed=1)
    ref = forward_tokens(model, PagedKVCache.for_model(model, "fp16"), ids, last_only=False)
    got = forward_tokens(model, PagedKVCache.for_model(model, "int2-klt+recent64", qparams=qp), ids, last_only=False)
    coded = forward_tokens(model, PagedKVCache.for_model(model, "int2-klt", qparams=qp), ids, last_only=False)
    assert (got - ref).abs().max() < 2e-3 * ref.abs().max()  # the 16-bit pool's rounding of the mapped keys
    assert (coded - ref).abs().max() > 20 * (got - ref).abs().max()


def test_decoding_token_by_token_reads_what_one_prefill_reads():
    model = make_tiny_llama(head_dim=32)
    qp = random_qparams(model.config)
    ids = _ids(30, model.config.vocab_size, seed=2)
    whole = forward_tokens(model, PagedKVCache.for_model(model, "int3-klt+recent8", qparams=qp), ids, last_only=False)
    cache = PagedKVCache.for_model(model, "int3-klt+recent8", qparams=qp)
    forward_tokens(model, cache, ids[:, :13])
    steps = [forward_tokens(model, cache, ids[:, i:i + 1])[:, -1] for i in range(13, 30)]
    assert torch.allclose(torch.stack(steps, 1), whole[:, 13:], atol=1e-4)


def test_the_window_counts_in_every_byte_figure():
    shape = KVShape(num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64)  # the embedded model
    base, windowed = KV_MODES["int2-klt"], get_mode("int2-klt+recent128")
    fp16 = shape.float_bytes_per_token()
    assert windowed.bytes_per_token(shape) == base.bytes_per_token(shape) == 3780  # the codes are the mode's
    assert windowed.residual_bytes(shape) == 128 * (fp16 - 3780)
    want = (3780 * 2048 + base.sink_bytes(shape) + 128 * (fp16 - 3780)) / (2048 * fp16)
    assert windowed.ratio_to_fp16(shape) == round(want, 4) == 0.2183 > base.ratio_to_fp16(shape) == 0.1660
    row = mode_row(windowed, shape)
    assert f"{base.sink_bytes(shape) + windowed.residual_bytes(shape):,} (4 sinks, 128-token window)" in row
    assert row[-1] == "--kv int2-klt+recent128" and row[-2].endswith("last 128 tokens 16-bit then coded")
    facts = mode_facts([windowed], make_tiny_llama(head_dim=32).config)[0]
    tiny = KVShape.from_config(make_tiny_llama(head_dim=32).config)
    assert facts["window_tokens"] == 128 and facts["window_bytes_per_sequence"] == windowed.residual_bytes(tiny) > 0
    assert not windowed.shares_prefix  # a stored token changes when the window lets it go


@pytest.mark.parametrize("name,message", [
    ("int2-klt+recentX", "the window after \\+recent is a number of tokens, e.g. int2-klt\\+recent128"),
    ("int2-klt+recent0", "is a number of tokens"),
    ("hf:quanto-int2+recent64", "already keeps a 128-token residual window; drop \\+recent64"),
    ("fp16+recent64", "stores every token in 16 bits"),
    ("int9+recent64", "unknown KV mode 'int9'"),
])
def test_bad_windows_are_one_line(name, message):
    with pytest.raises(ModeError, match=message):
        get_mode(name)


def test_a_window_as_long_as_the_context_is_refused():
    model = make_tiny_llama(head_dim=32)  # 1,024 positions
    with pytest.raises(ModeError, match="as long as this model's whole context \\(1024 tokens\\).*under 1024"):
        PagedKVCache.for_model(model, "int4+recent1024", qparams=random_qparams(model.config))
    PagedKVCache.for_model(model, "int4+recent1023", qparams=random_qparams(model.config))
