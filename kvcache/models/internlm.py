"""Checkpoint conversion of InternLM (v1) and InternLM2/2.5 to Llama, in memory, without their remote code.

Both families exist only as ``trust_remote_code`` checkpoints, whose attention classes would bypass ``kvq``.
Their networks are Llama's under other names (InternLM v1 adds biases to q/k/v/o; InternLM2 packs q/k/v into
one ``wqkv``), so we build a ``LlamaConfig``, rename and split the tensors while reading the shards, check them
against the shapes the config implies, and hand them to ``LlamaForCausalLM.from_pretrained``: the same mapping
InternLM's ``tools/convert2llama.py`` writes to disk, done at load time, never importing the checkpoint's Python.
Errors are :class:`ConversionError`, one line each; ``model_loader`` shows them as ``ModelLoadError``.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import pickle
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from transformers import (
    AutoTokenizer,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)
from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

logger = logging.getLogger(__name__)

MODEL_TYPES: dict[str, str] = {"internlm": "InternLM", "internlm2": "InternLM2"}
_ARCHITECTURES = {"internlm": "InternLMForCausalLM", "internlm2": "InternLM2ForCausalLM"}

# The defaults of InternLMConfig / InternLM2Config, which the remote code applies to keys a config.json leaves out.
_DEFAULTS = dict(
    vocab_size=103168, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
    hidden_act="silu", max_position_embeddings=2048, initializer_range=0.02, rms_norm_eps=1e-6, pad_token_id=0,
    bos_token_id=1, eos_token_id=2, tie_word_embeddings=False, bias=True,
)

# InternLM2 layer tensors -> Llama's; InternLM v1 already uses Llama's names.
_INTERNLM2_LAYER_NAMES = {
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_INTERNLM2_NAMES = {"model.tok_embeddings.weight": "model.embed_tokens.weight", "output.weight": "lm_head.weight"}
_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)$")

# Used only when the folder's tokenizer carries no chat template. v1: the format LMDeploy serves InternLM-Chat
# with (replies end in <eoa>); v2: the ChatML template InternLM2-Chat checkpoints ship.
_CHAT_TEMPLATES = {
    "internlm": (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{{ '<|System|>:' + m['content'] + '\n' }}"
        "{% elif m['role'] == 'user' %}{{ '<|User|>:' + m['content'] + '\n' }}"
        "{% else %}{{ '<|Bot|>:' + m['content'] + '<eoa>\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|Bot|>:' }}{% endif %}"
    ),
    "internlm2": (
        "{{ bos_token }}{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
}
_STOP_TOKENS = {"internlm": "<eoa>", "internlm2": "<|im_end|>"}


class ConversionError(ValueError):
    """An InternLM checkpoint that cannot be mapped to Llama; the message is one line that says what to do."""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# --- config ------------------------------------------------------------------------------------------------


def llama_config(raw: dict, where: Path) -> LlamaConfig:
    """The ``LlamaConfig`` of an InternLM/InternLM2 ``config.json``, or a ConversionError for what has no Llama twin."""
    family = raw["model_type"]
    arch = raw.get("architectures") or [_ARCHITECTURES[family]]
    if arch != [_ARCHITECTURES[family]]:
        raise ConversionError(
            f"{where.name} is {'/'.join(arch)}, not the causal LM {_ARCHITECTURES[family]}: "
            "KVQ Studio maps only InternLM/InternLM2 chat and base models (reward and vision variants are not supported)"
        )
    get = {**_DEFAULTS, **{k: v for k, v in raw.items() if v is not None}}.get
    heads, hidden = get("num_attention_heads"), get("hidden_size")
    kv_heads = get("num_key_value_heads") or heads
    if hidden % heads or heads % kv_heads:
        raise ConversionError(
            f"{where.name}'s config.json has hidden_size {hidden}, {heads} heads and {kv_heads} KV heads: "
            "hidden_size must divide by the heads and the heads by the KV heads"
        )
    if family == "internlm2" and get("bias"):
        raise ConversionError(
            f"{where.name} is an InternLM2 with biases (bias: true in config.json), which has no Llama layout: "
            "use a checkpoint with bias: false (all published InternLM2/2.5 models)"
        )
    return LlamaConfig(
        vocab_size=get("vocab_size"), hidden_size=hidden, intermediate_size=get("intermediate_size"),
        num_hidden_layers=get("num_hidden_layers"), num_attention_heads=heads,
        num_key_value_heads=kv_heads, head_dim=hidden // heads,
        hidden_act=get("hidden_act"), max_position_embeddings=get("max_position_embeddings"),
        initializer_range=get("initializer_range"), rms_norm_eps=get("rms_norm_eps"),
        pad_token_id=get("pad_token_id"), bos_token_id=get("bos_token_id"), eos_token_id=get("eos_token_id"),
        tie_word_embeddings=get("tie_word_embeddings"), attention_bias=family == "internlm" and bool(get("bias")),
        mlp_bias=False, rope_parameters=_rope_parameters(raw, where), dtype=get("torch_dtype") or get("dtype"),
        architectures=["LlamaForCausalLM"],
    )


def _rope_parameters(raw: dict, where: Path) -> dict:
    """transformers' ``rope_parameters`` for InternLM2's ``rope_theta``/``rope_scaling`` or v1's ``rotary``.

    Both families' dynamic NTK is transformers' "dynamic" (same formula: the base grows only past
    max_position_embeddings). v1's ``rotary.type`` "origin" is plain RoPE; a v1 config without ``rotary`` predates
    the dynamic variant and is read as plain RoPE, base 10000.
    """
    if raw["model_type"] == "internlm2":
        theta, scaling = raw.get("rope_theta") or 10000.0, raw.get("rope_scaling")
        kind = scaling and (scaling.get("type") or scaling.get("rope_type"))
        factor = scaling and scaling.get("factor")
        known = {"dynamic": "dynamic", "linear": "linear"}
        field = "rope_scaling"
    else:
        rotary = raw.get("rotary") or {"type": "origin"}
        theta, kind, factor = rotary.get("base", 10000.0), rotary.get("type"), rotary.get("scaling_factor", 1.0)
        known = {"origin": "default", "dynamic": "dynamic"}
        field = "rotary"
    if not kind or known.get(kind) == "default":
        return {"rope_type": "default", "rope_theta": float(theta)}
    if kind not in known:
        raise ConversionError(
            f"{where.name}'s config.json asks for rope type '{kind}' ({field}), which {MODEL_TYPES[raw['model_type']]} "
            f"does not define: use a checkpoint whose {field} type is one of {', '.join(known)}"
        )
    if not isinstance(factor, (int, float)) or factor < 1:
        raise ConversionError(f"{where.name}'s config.json has {field} factor {factor!r}: it must be a number >= 1")
    return {"rope_type": known[kind], "rope_theta": float(theta), "factor": float(factor)}


# --- weights -----------------------------------------------------------------------------------------------


def weight_files(path: Path) -> list[Path]:
    """The checkpoint's shards: safetensors before ``.bin``, through the index when there is one."""
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        index = path / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                files = [path / name for name in dict.fromkeys(weight_map.values())]
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
                raise ConversionError(f"{index} is unreadable ({_first_line(exc)}): re-download it") from None
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise ConversionError(
                    f"{missing[0]} (listed in {index_name}) is missing from {path}"
                    f"{f' with {len(missing) - 1} more' if len(missing) > 1 else ''}: download the whole checkpoint"
                )
            return files
        if (path / single).is_file():
            return [path / single]
    raise ConversionError(
        f"{path} has no weights (model.safetensors, pytorch_model.bin or a sharded index): download the whole checkpoint"
    )


def _read_shard(file: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of one shard, on the CPU (safetensors one at a time; ``.bin`` whole, without running pickled
    code)."""
    try:
        if file.suffix == ".safetensors":
            with safe_open(file, framework="pt", device="cpu") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                    yield key, f.get_tensor(key)
        else:
            yield from torch.load(file, map_location="cpu", weights_only=True).items()
    except (OSError, RuntimeError, SafetensorError, pickle.UnpicklingError, AttributeError) as exc:
        raise ConversionError(f"{file.name} cannot be read ({_first_line(exc)}): re-download it") from None


def split_wqkv(wqkv: torch.Tensor, config: LlamaConfig, key: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """InternLM2's packed ``wqkv`` -> Llama's q/k/v weights.

    The rows are grouped per KV head: its ``num_heads // num_kv_heads`` query heads, then its key, then its value,
    ``head_dim`` rows each (modeling_internlm2's ``(h gs d)`` view with ``gs = groups + 2``). Query head
    ``h * groups + g`` is the g-th of KV head h, which is how Llama's ``repeat_kv`` pairs them.
    """
    heads, kv_heads, head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    groups = heads // kv_heads
    rows = (heads + 2 * kv_heads) * head_dim
    if wqkv.dim() != 2 or tuple(wqkv.shape) != (rows, config.hidden_size):
        raise ConversionError(
            f"{key} has shape {list(wqkv.shape)}, but config.json ({heads} heads, {kv_heads} KV heads, head_dim "
            f"{head_dim}, hidden_size {config.hidden_size}) implies [{rows}, {config.hidden_size}]: "
            "the weights do not match their config.json"
        )
    per_kv_head = wqkv.view(kv_heads, groups + 2, head_dim, config.hidden_size)
    q = per_kv_head[:, :groups].reshape(heads * head_dim, config.hidden_size)
    k = per_kv_head[:, groups].reshape(kv_heads * head_dim, config.hidden_size)
    v = per_kv_head[:, groups + 1].reshape(kv_heads * head_dim, config.hidden_size)
    return q, k, v


def _llama_tensors(family: str, key: str, tensor: torch.Tensor, config: LlamaConfig) -> list[tuple[str, torch.Tensor]]:
    """The Llama tensor(s) one checkpoint tensor becomes; [] for buffers the Llama code recomputes."""
    if key.endswith("rotary_emb.inv_freq"):  # v1 .bin files saved the RoPE buffer
        return []
    if family == "internlm":
        return [(key, tensor)]
    layer = _LAYER_KEY.match(key)
    if layer is None:
        return [(_INTERNLM2_NAMES.get(key, key), tensor)]
    prefix, tail = f"model.layers.{layer[1]}.", layer[2]
    if tail == "attention.wqkv.weight":
        q, k, v = split_wqkv(tensor, config, key)
        return [(f"{prefix}self_attn.{n}_proj.weight", t) for n, t in zip("qkv", (q, k, v))]
    return [(prefix + _INTERNLM2_LAYER_NAMES.get(tail, tail), tensor)]


def read_state_dict(path: Path, family: str, config: LlamaConfig, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Llama's state dict, on the CPU in ``dtype``, from the checkpoint's shards (cast as they are read).

    It stays on the CPU (one copy of the model in RAM while loading) so that ``from_pretrained`` places it on the
    device as it does any checkpoint: tensors already there would sit beside its allocator warm-up, doubling the
    device memory the load needs.
    """
    state: dict[str, torch.Tensor] = {}
    for file in weight_files(path):
        for key, tensor in _read_shard(file):
            tensor = tensor.to(dtype) if tensor.is_floating_point() else tensor
            state.update(_llama_tensors(family, key, tensor, config))
    _check_state(state, config, path)
    return state


def _check_state(state: dict[str, torch.Tensor], config: LlamaConfig, where: Path) -> None:
    """Every tensor the Llama needs, with its shape, and nothing else: else transformers would re-initialise
    missing ones at random and only warn."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in LlamaForCausalLM(config).state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
        state.pop("lm_head.weight", None)
    missing = [k for k in expected if k not in state]
    if missing:
        raise ConversionError(
            f"{where.name}'s weights lack {missing[0]}{f' and {len(missing) - 1} more' if len(missing) > 1 else ''} "
            "(after mapping to Llama names): the checkpoint is incomplete or not a plain InternLM causal LM"
        )
    unexpected = [k for k in state if k not in expected]
    if unexpected:
        raise ConversionError(
            f"{where.name} has weights with no Llama counterpart ({unexpected[0]}"
            f"{f' and {len(unexpected) - 1} more' if len(unexpected) > 1 else ''}): not a plain InternLM causal LM"
        )
    for key, shape in expected.items():
        if tuple(state[key].shape) != shape:
            raise ConversionError(
                f"{key} has shape {list(state[key].shape)}, config.json implies {list(shape)}: "
                "the weights do not match their config.json"
            )


def load_llama(
    path: Path, family: str, config: LlamaConfig, tokenizer: PreTrainedTokenizerBase, *,
    device: torch.device, dtype: torch.dtype, attn_implementation: str,
) -> LlamaForCausalLM:
    """The checkpoint as a ``LlamaForCausalLM`` on ``device``, with its generation config and the chat stop token."""
    state = read_state_dict(path, family, config, dtype)
    model = LlamaForCausalLM.from_pretrained(
        None, config=config, state_dict=state, dtype=dtype, device_map={"": device},
        attn_implementation=attn_implementation,
    )
    if (path / "generation_config.json").is_file():
        try:
            model.generation_config = GenerationConfig.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as exc:
            logger.warning("ignoring %s/generation_config.json (%s)", path, _first_line(exc))
    stop = tokenizer.get_vocab().get(_STOP_TOKENS[family])
    eos = model.generation_config.eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    if stop is not None and stop not in eos:
        model.generation_config.eos_token_id = [*eos, stop]
    return model


# --- tokenizer ---------------------------------------------------------------------------------------------


class InternLMTokenizer(SentencePieceBackend):
    """InternLM's sentencepiece tokenizer (``tokenizer.model``), in place of the checkpoint's InternLM(2)Tokenizer.

    Encoding is the remote slow class's: added/special tokens are split off first and each stretch of text between
    them goes through ``sp.encode`` as is; BOS/EOS follow ``add_bos_token``/``add_eos_token``. Decoding is
    ``sp.decode`` of each stretch with special tokens kept verbatim: the exact inverse of the encoding. The remote slow
    class differs in that (a) it always applies ``clean_up_tokenization`` (" ." -> ".", " ," -> ",", " 's" -> "'s",
    " n't" -> "n't", ...) whatever ``clean_up_tokenization_spaces`` says; (b) when special tokens are kept it writes a
    space before each special token that does not follow another one, in front of the text before it ("▁a <|im_end|>"
    -> " a<|im_end|>", "<|im_start|> ▁user" -> " <|im_start|>user"); (c) its BOS/EOS ids are the sp model's, not
    the configured tokens' (the same in published checkpoints). With ``skip_special_tokens=True``, as chat decodes,
    only (a) remains. The remote fast class (what ``AutoTokenizer`` picks when trusted) re-implements sp as a
    tokenizers BPE with only "prepend ▁, spaces -> ▁" as normalizer, ignoring the model's own normalisation rules
    (e.g. ``remove_extra_whitespaces``), and its decoder strips one leading space from every decode.
    """

    def __init__(self, vocab_file: str | None = None, *, add_bos_token: bool = True, add_eos_token: bool = False,
                 sp_model_kwargs: dict | None = None, **kwargs):
        self.add_bos_token, self.add_eos_token = add_bos_token, add_eos_token
        kwargs.pop("legacy", None)  # legacy=True: plain sp.encode, no protobuf surgery on the model
        super().__init__(vocab_file=vocab_file, sp_model_kwargs=sp_model_kwargs or {}, legacy=True,
                         add_bos_token=add_bos_token, add_eos_token=add_eos_token, **kwargs)

    def build_inputs_with_special_tokens(self, token_ids_0: list[int], token_ids_1: list[int] | None = None) -> list[int]:
        bos = [self.bos_token_id] if self.add_bos_token else []
        eos = [self.eos_token_id] if self.add_eos_token else []
        return bos + token_ids_0 + (token_ids_1 or []) + eos

    def get_special_tokens_mask(self, token_ids_0: list[int], token_ids_1: list[int] | None = None,
                                already_has_special_tokens: bool = False) -> list[int]:
        if already_has_special_tokens:
            return super().get_special_tokens_mask(token_ids_0, token_ids_1, already_has_special_tokens=True)
        body = [0] * (len(token_ids_0) + len(token_ids_1 or []))
        return [1] * self.add_bos_token + body + [1] * self.add_eos_token

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        verbatim = set(self.all_special_tokens) | set(self._added_tokens_encoder)
        out, run = [], []
        for token in tokens:
            if token in verbatim:
                out.append(self.sp_model.decode_pieces(run) if run else "")
                out.append(token)
                run = []
            else:
                run.append(token)
        out.append(self.sp_model.decode_pieces(run) if run else "")
        return "".join(out)


def load_tokenizer(path: Path, family: str, *, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The folder's ``tokenizer.json`` if it has one, else :class:`InternLMTokenizer` over ``tokenizer.model``;
    the checkpoint's own tokenizer code only with ``trust_remote_code``. A chat template is filled in if missing."""
    try:
        if trust_remote_code:
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=True)
        elif (path / "tokenizer.json").is_file():
            tokenizer = PreTrainedTokenizerFast.from_pretrained(path, local_files_only=True)
        elif (path / "tokenizer.model").is_file():
            if importlib.util.find_spec("sentencepiece") is None:
                raise ConversionError(
                    f"{path.name}'s tokenizer.model needs the sentencepiece package: pip install sentencepiece"
                )
            tokenizer = InternLMTokenizer.from_pretrained(path, local_files_only=True)
        else:
            raise ConversionError(
                f"{path} has neither tokenizer.model nor tokenizer.json: copy the tokenizer files of the original "
                "checkpoint into it"
            )
    except (OSError, ValueError, RuntimeError, ImportError) as exc:
        if isinstance(exc, ConversionError):
            raise
        hint = (": drop --trust-remote-code to use KVQ Studio's own sentencepiece tokenizer" if trust_remote_code
                else ": check its tokenizer files")
        raise ConversionError(f"{path.name}'s tokenizer cannot be loaded ({_first_line(exc)}){hint}") from None
    if not tokenizer.chat_template:
        logger.info("%s has no chat template; using %s's", path, MODEL_TYPES[family])
        tokenizer.chat_template = _CHAT_TEMPLATES[family]
    return tokenizer
