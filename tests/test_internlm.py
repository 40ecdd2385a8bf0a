"""InternLM / InternLM2 checkpoints load as transformers' Llama without remote code: tiny random Llamas written
out in each family's own layout come back with the same logits; the sentencepiece tokenizer; the errors users see."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
from kvcache.engine.sampling import eos_ids
from safetensors.torch import save_file
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import LlamaConfig, LlamaForCausalLM

from kvcache.models import loader as model_loader
from kvcache.cli import main
from kvcache.hf.attention import register_attention
from kvcache.models.internlm import InternLMTokenizer, llama_config, split_wqkv
from kvcache.models.loader import LoadedModel, ModelLoadError, load_model

HEADS, KV_HEADS, HEAD_DIM, LAYERS, VOCAB = 4, 2, 8, 2, 400
HIDDEN = HEADS * HEAD_DIM
IDS = torch.tensor([[1, 17, 250, 3, 99, 4, 399, 42, 7, 8, 300, 12]])

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CHATML = ("{{ bos_token }}{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] "
          "+ '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
TEXT = """The quick brown fox jumps over the lazy dog.
KV cache quantization stores keys and values in eight bits.
你好，世界！今天天气很好。
Hello world, hello KV cache; 2+2=4 and 3*3=9.
  indented line with  double  spaces
"""


# --- the tokenizer files InternLM2-Chat ships: tokenizer.model + a tokenizer_config.json naming remote code ----


def _special(content: str) -> dict:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
            "special": True}


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory) -> Path:
    """A BPE sentencepiece model with byte fallback and ChatML's tokens as user-defined pieces (ids 3, 4)."""
    out = tmp_path_factory.mktemp("sp")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TEXT.splitlines() * 20), model_prefix=str(out / "tokenizer"), vocab_size=VOCAB,
        model_type="bpe", byte_fallback=True, character_coverage=1.0, user_defined_symbols=["<|im_start|>", "<|im_end|>"],
        remove_extra_whitespaces=False, normalization_rule_name="identity", unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        num_threads=1, minloglevel=2,
    )
    (out / "tokenizer.vocab").unlink()
    (out / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": True, "add_eos_token": False,
        "added_tokens_decoder": {str(i): _special(t) for i, t in enumerate(["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"])},
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "auto_map": {"AutoTokenizer": ["tokenization_internlm2.InternLM2Tokenizer", None]},
        "bos_token": "<s>", "eos_token": "</s>", "pad_token": "</s>", "unk_token": "<unk>", "chat_template": CHATML,
        "clean_up_tokenization_spaces": False, "decode_with_prefix_space": False, "sp_model_kwargs": None,
        "tokenizer_class": "InternLM2Tokenizer",
    }))
    return out


# --- writing a Llama out in InternLM2's / InternLM's layout --------------------------------------------------


def reference(*, kv_heads=KV_HEADS, bias=False, tie=False, rope=None, max_pos=64, seed=0) -> LlamaForCausalLM:
    """A tiny Llama with every parameter random (norms and biases too, so a swapped name shows in the logits)."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        num_key_value_heads=kv_heads, head_dim=HEAD_DIM, rms_norm_eps=1e-5, max_position_embeddings=max_pos,
        attention_bias=bias, tie_word_embeddings=tie, attn_implementation=register_attention(),
        rope_parameters=rope or {"rope_type": "default", "rope_theta": 50000.0},
    )
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3 + (1.0 if p.dim() == 1 else 0.0))
    return model


def pack_wqkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_heads: int = KV_HEADS) -> torch.Tensor:
    """InternLM2's packing: per KV head, its query heads, then its key, then its value (head_dim rows each)."""
    groups = q.shape[0] // HEAD_DIM // kv_heads
    parts = (q.view(kv_heads, groups, HEAD_DIM, -1), k.view(kv_heads, 1, HEAD_DIM, -1), v.view(kv_heads, 1, HEAD_DIM, -1))
    return torch.cat(parts, dim=1).reshape(-1, q.shape[1])


def internlm2_tensors(model: LlamaForCausalLM) -> dict[str, torch.Tensor]:
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    out = {"model.tok_embeddings.weight": sd.pop("model.embed_tokens.weight"), "model.norm.weight": sd.pop("model.norm.weight")}
    lm_head = sd.pop("lm_head.weight")
    if not model.config.tie_word_embeddings:
        out["output.weight"] = lm_head
    names = {"self_attn.o_proj": "attention.wo", "mlp.gate_proj": "feed_forward.w1", "mlp.up_proj": "feed_forward.w3",
             "mlp.down_proj": "feed_forward.w2", "input_layernorm": "attention_norm",
             "post_attention_layernorm": "ffn_norm"}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        qkv = [sd.pop(f"{p}self_attn.{n}_proj.weight") for n in "qkv"]
        out[f"{p}attention.wqkv.weight"] = pack_wqkv(*qkv, kv_heads=model.config.num_key_value_heads)
        for llama, ours in names.items():
            out[f"{p}{ours}.weight"] = sd.pop(f"{p}{llama}.weight")
    assert not sd, sd.keys()
    return out


def write_checkpoint(folder: Path, tensors: dict, config: dict, sp_dir: Path, *, fmt="safetensors", shards=1,
                     dtype=torch.float32) -> Path:
    """Weights (one file, or ``shards`` files and an index), config.json, and the tokenizer files."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.to(dtype).contiguous() for k, v in tensors.items()}
    ext, index_name = (".safetensors", "model.safetensors.index.json") if fmt == "safetensors" else (".bin", "pytorch_model.bin.index.json")
    stem = "model" if fmt == "safetensors" else "pytorch_model"
    keys = list(tensors)
    groups = [keys[i::shards] for i in range(shards)]
    names = [f"{stem}{ext}"] if shards == 1 else [f"{stem}-{i + 1:05d}-of-{shards:05d}{ext}" for i in range(shards)]
    for name, group in zip(names, groups):
        part = {k: tensors[k] for k in group}
        save_file(part, folder / name, metadata={"format": "pt"}) if fmt == "safetensors" else torch.save(part, folder / name)
    if shards > 1:
        weight_map = {k: name for name, group in zip(names, groups) for k in group}
        (folder / index_name).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    torch_dtype = str(dtype).removeprefix("torch.")
    (folder / "config.json").write_text(json.dumps(config | {"torch_dtype": torch_dtype}))
    for f in sp_dir.iterdir():
        shutil.copy(f, folder / f.name)
    return folder


def internlm2_config(model: LlamaForCausalLM, **overrides) -> dict:
    c = model.config
    return {
        "architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2",
        "auto_map": {"AutoConfig": "configuration_internlm2.InternLM2Config",
                     "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM"},
        "attn_implementation": "eager", "bias": False, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2,
        "hidden_act": "silu", "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
        "initializer_range": 0.02, "max_position_embeddings": c.max_position_embeddings,
        "num_attention_heads": c.num_attention_heads, "num_hidden_layers": c.num_hidden_layers,
        "num_key_value_heads": c.num_key_value_heads, "pretraining_tp": 1, "rms_norm_eps": c.rms_norm_eps,
        "rope_scaling": None, "rope_theta": c.rope_parameters["rope_theta"],
        "tie_word_embeddings": c.tie_word_embeddings, "use_cache": True, "vocab_size": c.vocab_size,
    } | overrides


def internlm_v1_config(model: LlamaForCausalLM, **overrides) -> dict:
    c = model.config
    return {
        "architectures": ["InternLMForCausalLM"], "model_type": "internlm",
        "auto_map": {"AutoConfig": "configuration_internlm.InternLMConfig",
                     "AutoModelForCausalLM": "modeling_internlm.InternLMForCausalLM"},
        "bias": True, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "hidden_act": "silu",
        "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size, "initializer_range": 0.02,
        "max_position_embeddings": c.max_position_embeddings, "num_attention_heads": c.num_attention_heads,
        "num_hidden_layers": c.num_hidden_layers, "rms_norm_eps": c.rms_norm_eps,
        "rotary": {"base": c.rope_parameters["rope_theta"], "type": "dynamic"}, "tie_word_embeddings": False,
        "use_cache": True, "vocab_size": c.vocab_size,
    } | overrides


def logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def assert_one_line(err: pytest.ExceptionInfo, *needles: str) -> None:
    msg = str(err.value)
    assert "\n" not in msg, msg
    for needle in needles:
        assert needle in msg, msg


# --- InternLM2: weights mapped, logits equal -----------------------------------------------------------------


def test_wqkv_split_follows_internlm2s_forward():
    """modeling_internlm2 views ``x @ wqkv.T`` as [.., kv_heads, groups + 2, head_dim]: queries, then key, value."""
    cfg = LlamaConfig(hidden_size=HIDDEN, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM)
    wqkv = torch.randn((HEADS + 2 * KV_HEADS) * HEAD_DIM, HIDDEN)
    x = torch.randn(3, HIDDEN)
    states = (x @ wqkv.T).view(3, KV_HEADS, HEADS // KV_HEADS + 2, HEAD_DIM)
    q, k, v = split_wqkv(wqkv, cfg, "wqkv")
    torch.testing.assert_close((x @ q.T).view(3, HEADS, HEAD_DIM), states[:, :, :-2].reshape(3, HEADS, HEAD_DIM))
    torch.testing.assert_close((x @ k.T).view(3, KV_HEADS, HEAD_DIM), states[:, :, -2])
    torch.testing.assert_close((x @ v.T).view(3, KV_HEADS, HEAD_DIM), states[:, :, -1])


@pytest.mark.parametrize(("fmt", "shards"), [("safetensors", 1), ("safetensors", 2), ("bin", 1), ("bin", 2)])
def test_internlm2_loads_as_llama_with_equal_logits(tmp_path, sp_dir, fmt, shards):
    ref = reference()
    folder = write_checkpoint(tmp_path / "internlm2-chat", internlm2_tensors(ref), internlm2_config(ref), sp_dir,
                              fmt=fmt, shards=shards)
    lm = load_model(str(folder), device="cpu")
    assert isinstance(lm, LoadedModel) and isinstance(lm.model, LlamaForCausalLM) and not lm.model.training
    assert lm.model.config._attn_implementation == "kvq" and lm.dtype == torch.float32
    assert (lm.num_layers, lm.num_heads, lm.num_kv_heads, lm.head_dim, lm.max_positions) == (LAYERS, HEADS, KV_HEADS, HEAD_DIM, 64)
    assert lm.name == "internlm2-chat" and lm.source == str(folder)
    assert lm.config.rms_norm_eps == 1e-5 and lm.config.rope_parameters["rope_theta"] == 50000.0
    torch.testing.assert_close(logits(lm.model), logits(ref), rtol=1e-6, atol=1e-6)


def test_internlm2_bf16_weights(tmp_path, sp_dir, monkeypatch):
    ref = reference()
    folder = write_checkpoint(tmp_path / "bf16", internlm2_tensors(ref), internlm2_config(ref), sp_dir, dtype=torch.bfloat16)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    lm = load_model(str(folder), device="cpu")  # CPU: fp32 whatever the checkpoint's dtype
    assert lm.dtype == torch.float32
    torch.testing.assert_close(logits(lm.model), logits(ref), rtol=1e-6, atol=1e-6)
    lm16 = load_model(str(folder), device="cpu", dtype=torch.bfloat16)
    assert lm16.dtype == torch.bfloat16
    assert torch.equal(lm16.model.model.layers[1].self_attn.k_proj.weight.float(), ref.model.layers[1].self_attn.k_proj.weight)
    # on a GPU with bf16 the checkpoint's dtype is kept, as for any other family
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    config = llama_config(json.loads((folder / "config.json").read_text()), folder)
    assert model_loader._default_dtype(config, torch.device("cuda")) == torch.bfloat16


@pytest.mark.parametrize("kind", ["dynamic", "linear"])
def test_internlm2_rope_scaling_is_mapped(tmp_path, sp_dir, kind):
    """Past max_position_embeddings (16) the scaled RoPE changes the logits; the loaded model follows it."""
    rope = {"rope_type": kind, "rope_theta": 50000.0, "factor": 2.0}
    ref, plain = reference(rope=rope, max_pos=16), reference(max_pos=16)
    folder = write_checkpoint(tmp_path / kind, internlm2_tensors(ref),
                              internlm2_config(ref, rope_scaling={"type": kind, "factor": 2.0}), sp_dir)
    lm = load_model(str(folder), device="cpu")
    ids = torch.arange(40)[None] % VOCAB
    got = logits(lm.model, ids)
    torch.testing.assert_close(got, logits(ref, ids), rtol=1e-6, atol=1e-6)
    assert (got - logits(plain, ids)).abs().max() > 1e-3  # the scaling is really in play
    if kind == "dynamic":  # InternLM2DynamicNTKScalingRotaryEmbedding's base at 40 positions
        base = 50000.0 * ((2.0 * 40 / 16) - 1.0) ** (HEAD_DIM / (HEAD_DIM - 2))
        expected = 1.0 / base ** (torch.arange(0, HEAD_DIM, 2).float() / HEAD_DIM)
        torch.testing.assert_close(lm.model.model.rotary_emb.inv_freq, expected)


def test_internlm2_tied_embeddings(tmp_path, sp_dir):
    ref = reference(tie=True)
    tensors = internlm2_tensors(ref)
    assert "output.weight" not in tensors
    lm = load_model(str(write_checkpoint(tmp_path / "tied", tensors, internlm2_config(ref), sp_dir)), device="cpu")
    assert lm.model.lm_head.weight.data_ptr() == lm.model.model.embed_tokens.weight.data_ptr()
    torch.testing.assert_close(logits(lm.model), logits(ref), rtol=1e-6, atol=1e-6)


# --- InternLM v1: Llama names, biases on q/k/v/o --------------------------------------------------------------


@pytest.mark.parametrize(("fmt", "shards"), [("safetensors", 1), ("bin", 2)])
def test_internlm_v1_with_biases(tmp_path, sp_dir, fmt, shards):
    ref = reference(kv_heads=HEADS, bias=True)
    tensors = {k: v.clone() for k, v in ref.state_dict().items()}
    assert tensors["model.layers.0.self_attn.o_proj.bias"].abs().min() > 0
    for i in range(LAYERS):  # old .bin files carry the persistent RoPE buffer
        tensors[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = torch.ones(HEAD_DIM // 2)
    folder = write_checkpoint(tmp_path / "internlm-chat", tensors, internlm_v1_config(ref), sp_dir, fmt=fmt, shards=shards)
    lm = load_model(str(folder), device="cpu")
    assert lm.config.attention_bias and lm.num_kv_heads == HEADS
    assert lm.config.rope_parameters == {"rope_type": "dynamic", "rope_theta": 50000.0, "factor": 1.0}
    torch.testing.assert_close(logits(lm.model), logits(ref), rtol=1e-6, atol=1e-6)
    without_bias = {k: v for k, v in tensors.items() if not k.endswith("bias")}
    folder = write_checkpoint(tmp_path / "nobias", without_bias, internlm_v1_config(ref, bias=False), sp_dir)
    assert not load_model(str(folder), device="cpu").config.attention_bias


def test_internlm_v1_chat_template_and_stop_token(tmp_path, sp_dir):
    """A v1 folder without a chat template gets InternLM-Chat's <|User|>/<|Bot|> format, and <eoa> ends a reply."""
    ref = reference(kv_heads=HEADS, bias=True)
    folder = write_checkpoint(tmp_path / "v1", ref.state_dict(), internlm_v1_config(ref), sp_dir)
    tok_cfg = json.loads((folder / "tokenizer_config.json").read_text())
    del tok_cfg["chat_template"]
    tok_cfg["additional_special_tokens"] = ["<eoa>"]  # not in the sp vocab: added after it
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    lm = load_model(str(folder), device="cpu")
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"}, {"role": "user", "content": "bye"}]
    rendered = lm.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert rendered == "<s><|System|>:Be brief.\n<|User|>:hi\n<|Bot|>:hello<eoa>\n<|User|>:bye\n<|Bot|>:"
    eoa = lm.tokenizer.convert_tokens_to_ids("<eoa>")
    assert eoa == VOCAB and eoa in eos_ids(lm.tokenizer, lm.model)


# --- the tokenizer ------------------------------------------------------------------------------------------


def test_tokenizer_is_sentencepiece_with_the_special_tokens(sp_dir):
    tok = InternLMTokenizer.from_pretrained(sp_dir)
    sp = spm.SentencePieceProcessor(model_file=str(sp_dir / "tokenizer.model"))
    for text in ["Hello world", " Hello  world, 2+2=4", "你好，世界！", "tabs\tand\nnewlines ∑ é", "Hi . ok , it's"]:
        ids = tok(text, add_special_tokens=False).input_ids
        assert ids == sp.encode(text), text
        assert tok.decode(ids) == text  # the exact inverse, no clean-up of spaces before punctuation
    assert tok("hi").input_ids == [1, *sp.encode("hi")]  # add_bos_token
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id) == (1, 2, 2, 0)
    chat = "<|im_start|>user\nhi<|im_end|>"
    ids = tok(chat, add_special_tokens=False).input_ids
    assert ids == [3, *sp.encode("user\nhi"), 4]  # special tokens split off, the text between goes through sp
    assert tok.decode(ids) == chat and tok.decode(ids, skip_special_tokens=True) == "user\nhi"


def test_chat_template_renders_through_the_loaded_tokenizer(tmp_path, sp_dir):
    ref = reference()
    folder = write_checkpoint(tmp_path / "m", internlm2_tensors(ref), internlm2_config(ref), sp_dir)
    tok = load_model(str(folder), device="cpu").tokenizer
    assert isinstance(tok, InternLMTokenizer)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == "<s><|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    ids = tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True)["input_ids"]
    assert ids[:2] == [1, 3] and ids.count(3) == 3 and ids.count(4) == 2 and ids.count(1) == 1


def test_folder_with_tokenizer_json_loads_through_it(tmp_path, sp_dir):
    ref = reference()
    folder = write_checkpoint(tmp_path / "m", internlm2_tensors(ref), internlm2_config(ref), sp_dir)
    (folder / "tokenizer.model").unlink()
    words = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "hello", "world"]
    wl = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    wl.pre_tokenizer = Whitespace()
    wl.save(str(folder / "tokenizer.json"))
    tok = load_model(str(folder), device="cpu").tokenizer
    assert tok.is_fast and not isinstance(tok, InternLMTokenizer)
    assert tok("hello world nope", add_special_tokens=False).input_ids == [5, 6, 0]
    assert tok.chat_template == CHATML


@pytest.mark.filterwarnings("ignore:`rope_scaling` is deprecated:FutureWarning")  # AutoConfig on the raw config
def test_remote_tokenizer_code_runs_only_when_trusted(tmp_path, sp_dir):
    ref = reference()
    folder = write_checkpoint(tmp_path / "m", internlm2_tensors(ref), internlm2_config(ref), sp_dir)
    (folder / "tokenization_internlm2.py").write_text(
        "from kvcache.models.internlm import InternLMTokenizer\n\nclass InternLM2Tokenizer(InternLMTokenizer):\n    pass\n"
    )
    assert type(load_model(str(folder), device="cpu").tokenizer) is InternLMTokenizer
    assert type(load_model(str(folder), device="cpu", trust_remote_code=True).tokenizer).__name__ == "InternLM2Tokenizer"
    (folder / "tokenization_internlm2.py").write_text("from transformers.tokenization_utils_fast_v4 import X\n")
    with pytest.raises(ModelLoadError) as err:
        load_model(str(folder), device="cpu", trust_remote_code=True)
    assert_one_line(err, "tokenizer cannot be loaded", "drop --trust-remote-code")


# --- the rest of the project runs on it ----------------------------------------------------------------------


def test_calibrate_and_evaluate_match_the_reference_llama(tmp_path, sp_dir):
    from calib.calibrate import calibrate
    from kvcache.measure.evaluate import evaluate

    ref = reference()
    lm = load_model(str(write_checkpoint(tmp_path / "m", internlm2_tensors(ref), internlm2_config(ref), sp_dir)), device="cpu")
    twin = LoadedModel(ref, lm.tokenizer, "ref", "ref", lm.device, lm.dtype)
    windows = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    stats = [torch.load(calibrate(m, windows=windows, work_dir=tmp_path / n, bar=False) / "key_stats.pth", weights_only=True)
             for m, n in ((lm, "a"), (twin, "b"))]
    assert list(stats[0]["absmax"]) == [f"model.layers.{i}.self_attn" for i in range(LAYERS)]
    assert stats[0]["absmax"]["model.layers.1.self_attn"].shape == (KV_HEADS, HEAD_DIM)
    for name, t in stats[0]["absmax"].items():
        torch.testing.assert_close(t, stats[1]["absmax"][name])
    kw = dict(seqlen=24, samples=2, batch_size=2, greedy_prompts=1, greedy_tokens=4)
    ours, theirs = evaluate(lm, TEXT * 4, ["fp16", "int8-dynamic"], **kw), evaluate(twin, TEXT * 4, ["fp16"], **kw)
    assert ours["results"][0]["ppl"] == pytest.approx(theirs["results"][0]["ppl"], rel=1e-5)
    assert 0 < ours["results"][1]["kl_vs_fp16"] < 0.05


# --- errors: one line each, through load_model and through the CLI ------------------------------------------


def _broken(tmp_path, sp_dir, case: str) -> tuple[Path, tuple[str, ...]]:
    ref = reference()
    tensors, config = internlm2_tensors(ref), internlm2_config(ref)
    shards = 1
    if case == "wqkv rows":
        tensors["model.layers.1.attention.wqkv.weight"] = tensors["model.layers.1.attention.wqkv.weight"][:-HEAD_DIM]
        needles = ("model.layers.1.attention.wqkv.weight", "[56, 32]", "[64, 32]", "do not match their config.json")
    elif case == "bias":
        config["bias"] = True
        needles = ("bias: true", "bias: false")
    elif case == "missing shard":
        shards = 2
        needles = ("model-00002-of-00002.safetensors", "model.safetensors.index.json", "download the whole checkpoint")
    elif case == "rope type":
        config["rope_scaling"] = {"type": "yarn", "factor": 4.0}
        needles = ("'yarn'", "rope_scaling", "dynamic, linear")
    elif case == "missing tensor":
        del tensors["model.layers.0.ffn_norm.weight"]
        needles = ("model.layers.0.post_attention_layernorm.weight", "incomplete")
    elif case == "reward model":
        config["architectures"] = ["InternLM2ForRewardModel"]
        needles = ("InternLM2ForRewardModel", "not the causal LM InternLM2ForCausalLM")
    elif case == "no tokenizer":
        needles = ("neither tokenizer.model nor tokenizer.json",)
    folder = write_checkpoint(tmp_path / "bad", tensors, config, sp_dir, shards=shards)
    if case == "missing shard":
        (folder / "model-00002-of-00002.safetensors").unlink()
    if case == "no tokenizer":
        (folder / "tokenizer.model").unlink()
    return folder, needles


CASES = ["wqkv rows", "bias", "missing shard", "rope type", "missing tensor", "reward model", "no tokenizer"]


@pytest.mark.parametrize("case", CASES)
def test_bad_checkpoints_are_one_line(tmp_path, sp_dir, case, capsys):
    folder, needles = _broken(tmp_path, sp_dir, case)
    with pytest.raises(ModelLoadError) as err:
        load_model(str(folder), device="cpu")
    assert_one_line(err, *needles)
    assert main(["evaluate", "--model", str(folder)]) == 2
    out = capsys.readouterr().err.strip()
    assert out == f"error: {err.value}", out


def test_unknown_v1_rotary_type(tmp_path, sp_dir):
    ref = reference(kv_heads=HEADS, bias=True)
    config = internlm_v1_config(ref, rotary={"base": 10000, "type": "ntk-by-parts"})
    folder = write_checkpoint(tmp_path / "v1", ref.state_dict(), config, sp_dir)
    with pytest.raises(ModelLoadError) as err:
        load_model(str(folder), device="cpu")
    assert_one_line(err, "'ntk-by-parts'", "rotary", "origin, dynamic")


def test_unknown_remote_code_only_model_type(tmp_path):
    config = {"model_type": "internlmxcomposer2", "architectures": ["InternLMXComposer2ForCausalLM"],
              "auto_map": {"AutoModelForCausalLM": "modeling_internlm_xcomposer2.InternLMXComposer2ForCausalLM"}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError) as err:
        load_model(str(tmp_path), device="cpu", trust_remote_code=True)
    assert_one_line(err, "'internlmxcomposer2'", "own Python code", "internlm2", "llama")
    # the real command line, once: one line on stderr, exit 2
    run = subprocess.run([sys.executable, "-m", "kvcache", "evaluate", "--model", str(tmp_path)],
                         capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent, timeout=120)
    assert run.returncode == 2 and run.stderr.strip() == f"error: {err.value}", run.stderr
