"""Shared fixtures. Triton kernels run in the interpreter when no GPU is present."""

import os

import torch

# Must be set before any Triton kernel is defined (kernel modules are imported lazily).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from kvcache.attention import register_attention  # noqa: E402


def make_tiny_llama(num_layers: int = 2, num_heads: int = 4, num_kv_heads: int = 2, head_dim: int = 16,
                    vocab: int = 128, seed: int = 0) -> LlamaForCausalLM:
    """A randomly initialised Llama small enough for CPU tests, using the kvq attention."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=num_heads * head_dim, intermediate_size=2 * num_heads * head_dim,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        max_position_embeddings=1024, attn_implementation=register_attention(),
    )
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture
def tiny_llama() -> LlamaForCausalLM:
    return make_tiny_llama()


# --- model_loader: the real default model (SmolLM2-135M-Instruct), loaded once per session. ---
# Uses the normal model cache ($KVQ_CACHE_DIR or ~/.cache/kvq-studio): ~20 s the very first time, then ~1 s.
@pytest.fixture(scope="session")
def loaded_default():
    from kvcache.model_loader import load_model

    return load_model("default", device="cpu")
