"""Shared fixtures. Triton kernels run in the interpreter when no GPU is present."""

import dataclasses
import os

import torch

# Must be set before any Triton kernel is defined (kernel modules are imported lazily).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from kvcache.hf.attention import register_attention  # noqa: E402
from kvcache.modes import INT4_HEAD_MODE  # noqa: E402,F401  (the per-head 4-bit layout of the kernel tests)


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


def static_qparams(shape, granularity="channel", symmetric=False, lim=4.0, center=0.0):
    """Static int8 parameters for ranges ``center +- lim`` in every channel of every layer (K and V alike)."""
    from kvcache.qparams import KVQParams

    stat = lambda v: [torch.full((shape.num_kv_heads, shape.head_dim), v) for _ in range(shape.num_layers)]  # noqa: E731
    stats = {"min": stat(center - lim), "max": stat(center + lim), "absmax": stat(abs(center) + lim)}
    return KVQParams.from_stats(stats, stats, granularity=granularity, symmetric=symmetric)


def random_qparams(config, seed: int = 7):
    """Calibrated-looking parameters for a (tiny) model: static int8 ranges of +-4, a random, well-conditioned
    query-aware key transform per layer (determinant 1) and the eigenbasis after it for identity-like moments,
    enough for every calibrated mode to run."""
    from kvcache.shape import KVShape

    shape = KVShape.from_config(config)
    g = torch.Generator().manual_seed(seed)
    a = [torch.eye(shape.head_dim) + 0.2 * torch.randn(shape.num_kv_heads, shape.head_dim, shape.head_dim, generator=g)
         for _ in range(shape.num_layers)]
    qp = static_qparams(shape)
    qp.k_transform = [t / torch.linalg.det(t).abs()[:, None, None] ** (1 / shape.head_dim) for t in a]
    from kvcache.transforms import key_eigenbasis

    eye = torch.eye(shape.head_dim).expand(shape.num_kv_heads, -1, -1)
    moments = [(eye * torch.linspace(2.0, 0.05, shape.head_dim), eye) for _ in range(shape.num_layers)]
    bases = [key_eigenbasis(k, q, t) for (k, q), t in zip(moments, qp.k_transform)]
    qp.k_basis, qp.k_weight = [b for b, _ in bases], [w for _, w in bases]
    return qp


def clone_layer(layer):
    """A deep copy of a layer's storage (every tensor field cloned)."""
    return dataclasses.replace(layer, **{f.name: getattr(layer, f.name).clone() for f in dataclasses.fields(layer)
                                         if isinstance(getattr(layer, f.name), torch.Tensor)})


def stored_tensors(layer) -> list[str]:
    """Names of the tensors a write may change: the per-block ones and, with sinks, the sink slots."""
    return layer.per_block_tensors() + (["k_sink", "v_sink"] if layer.sink_tokens else [])


@pytest.fixture
def one_torch_thread():
    """Tiny tensors: one intra-op thread is faster, and immune to a busy machine's oversubscription."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def tiny_llama() -> LlamaForCausalLM:
    return make_tiny_llama()


# --- model_loader: the real default model (SmolLM2-135M-Instruct), loaded once per session. ---
# Uses the normal model cache ($KVQ_CACHE_DIR or ~/.cache/kvq-studio): ~20 s the very first time, then ~1 s.
@pytest.fixture(scope="session")
def loaded_default():
    from kvcache.models.loader import load_model

    return load_model("default", device="cpu")


# --- app (issue 5): one `python app.py` on a free port, shared by test_app_api.py and test_app_browser.py. ---
# Started on first use, killed at the end of the session; its log is printed when it fails to start.
@pytest.fixture(scope="session")
def app_server(tmp_path_factory):
    import socket
    import subprocess
    import sys
    import time
    import urllib.request
    from pathlib import Path

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log_path = tmp_path_factory.mktemp("app") / "app.log"
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    root = Path(__file__).resolve().parent.parent
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "app.py", "--port", str(port), "--max-upload-mb", "2"],
                                cwd=root, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    try:
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"app.py did not start (exit {proc.poll()}):\n{log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --- the embedded model calibrated once (built-in corpus, 16 x 256 tokens), exported with default flags. ---
# One parameters file that every calibrated mode takes (static int8, the query-aware key transform).
@pytest.fixture(scope="session")
def default_calibration(loaded_default, tmp_path_factory):
    """The calibration's work dir (statistics and calib_meta.json), for tests that export it their own way."""
    from calib.calibrate import calibrate

    root = tmp_path_factory.mktemp("default_calibration")
    return calibrate(loaded_default, dataset="builtin", samples=16, seqlen=256, batch_size=4, work_dir=root / "wd")


@pytest.fixture(scope="session")
def default_kvq(default_calibration, tmp_path_factory):
    from calib.cli import main as calib_main

    out = tmp_path_factory.mktemp("default_kvq") / "kvq"
    assert calib_main(["kv_qparams", str(default_calibration), str(out), "--format", "kvq"]) == 0
    return out
