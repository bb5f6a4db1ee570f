"""GGUF checkpoints (llama.cpp's single-file format), read with the ``gguf`` package (llama.cpp's own reader).

A GGUF file carries no ``config.json`` and no tokenizer files: its metadata is both. This module turns one
into what the rest of jaxlens reads from a Hugging Face directory, following transformers' GGUF integration
(``transformers.modeling_gguf_pytorch_utils`` and ``transformers.integrations.ggml``), and is proved by
parity against it (``tests/test_gguf.py``, ``tests/test_real_models.py``):

* **config**: the metadata keys of :data:`CONFIG_KEYS` (llama.cpp's names) become the HF config fields,
  passed to the transformers config class of the family, so every field the file does not state takes the
  same default transformers gives it. ``to_dict()`` of that config is then read by
  :func:`jaxlens.models.spec.spec_from_config` like any published config.
* **tensors**: :data:`TENSOR_NAMES` maps llama.cpp tensor names onto HF names, so the declarative weight
  tables of :mod:`jaxlens.models.convert` serve GGUF files too. Each tensor is dequantised (every type the
  ``gguf`` package can: F32, F16, BF16, Q8_0, Q4_0/1, Q5_0/1, the K- and I-quants) only when the loader asks
  for it, so host memory holds one dequantised tensor at a time on top of the parameters being built.
* **what llama.cpp's converter changed** is undone (:data:`UNDO`): the llama-family Q/K row permutation of
  its rotary layout, and Gemma's ``1 + w`` norm gains, which the converter stores with the 1 added.
* **tokenizer**: built from the metadata by transformers' own GGUF tokenizer builders
  (``transformers.integrations.gguf.gguf_tokenizer_mapping``), without torch.

``gguf`` is an optional extra: ``pip install "jaxlens[gguf]"``.
"""
from __future__ import annotations

import os
import re
from typing import Any, Callable

import numpy as np

from jaxlens.errors import JaxlensError

#: llama.cpp architecture name -> transformers ``model_type`` (Mistral files say "llama", and run as llama).
ARCHS = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma2": "gemma2", "gemma3": "gemma3_text"}

_COMMON_KEYS = {
    "context_length": "max_position_embeddings",
    "block_count": "num_hidden_layers",
    "feed_forward_length": "intermediate_size",
    "embedding_length": "hidden_size",
    "rope.freq_base": "rope_theta",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "vocab_size": "vocab_size",
}
#: ``<arch>.<key>`` metadata -> HF config field, per architecture (transformers' GGUF_CONFIG_MAPPING).
#: Keys llama.cpp writes that transformers does not read are listed as None; any other key of the
#: architecture's namespace that would change the math is refused (see :func:`gguf_config`).
CONFIG_KEYS = {
    "llama": dict(_COMMON_KEYS, **{"rope.dimension_count": "head_dim"}),
    "qwen2": dict(_COMMON_KEYS),
    "qwen3": dict(_COMMON_KEYS, **{"attention.key_length": "head_dim", "attention.value_length": None}),
    "gemma2": dict(_COMMON_KEYS, **{"attention.key_length": "head_dim", "attention.value_length": None,
                                    "attention.sliding_window": "sliding_window",
                                    "attn_logit_softcapping": "attn_logit_softcapping",
                                    "final_logit_softcapping": "final_logit_softcapping"}),
    "gemma3": dict(_COMMON_KEYS, **{"attention.key_length": "head_dim", "attention.value_length": None,
                                    "attention.sliding_window": "sliding_window", "rope.dimension_count": None}),
}
# metadata keys that describe the file, not the math
_IGNORED_PREFIXES = ("general.", "GGUF.", "tokenizer.", "quantize.", "split.")
# llama.cpp keys whose value is implied by the family: accepted at these values only
_NOOP_KEYS = {"rope.scaling.type": ("none",), "expert_count": (0,), "expert_used_count": (0,)}
# per-head widths llama.cpp may write where the family derives them (hidden_size / heads): accepted when equal
_IMPLIED_HEAD_DIM = ("attention.key_length", "attention.value_length", "rope.dimension_count")

_BLOCK = [
    ("attn_norm", "input_layernorm"),
    ("attn_q", "self_attn.q_proj"), ("attn_k", "self_attn.k_proj"), ("attn_v", "self_attn.v_proj"),
    ("attn_output", "self_attn.o_proj"),
    ("attn_q_norm", "self_attn.q_norm"), ("attn_k_norm", "self_attn.k_norm"),
    ("ffn_gate", "mlp.gate_proj"), ("ffn_up", "mlp.up_proj"), ("ffn_down", "mlp.down_proj"),
]
#: llama.cpp tensor name -> HF tensor name, per architecture. ``{i}`` is the block index.
TENSOR_NAMES = {
    arch: {**{"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"},
           **{f"blk.{{i}}.{g}": f"model.layers.{{i}}.{h}" for g, h in _BLOCK},
           # Llama-style blocks have one norm before the MLP; Gemma-2/3 sandwich both sublayers
           **({"blk.{i}.ffn_norm": "model.layers.{i}.post_attention_layernorm"} if arch in ("llama", "qwen2", "qwen3")
              else {"blk.{i}.post_attention_norm": "model.layers.{i}.post_attention_layernorm",
                    "blk.{i}.ffn_norm": "model.layers.{i}.pre_feedforward_layernorm",
                    "blk.{i}.post_ffw_norm": "model.layers.{i}.post_feedforward_layernorm"})}
    for arch in ARCHS
}


def _unpermute_rotary(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's ``permute`` of Q/K rows (HF's rotate-half layout -> its interleaved one)."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def _minus_one(w: np.ndarray, cfg: dict) -> np.ndarray:
    return w - np.float32(1.0)


#: Per architecture: (regex on the llama.cpp tensor name, function(array, config) -> array).
UNDO = {
    "llama": [(r"\.attn_q\.weight$", lambda w, c: _unpermute_rotary(w, c["num_attention_heads"])),
              (r"\.attn_k\.weight$", lambda w, c: _unpermute_rotary(w, c["num_key_value_heads"]))],
    "gemma2": [(r"norm\.weight$", _minus_one)],
    "gemma3": [(r"norm\.weight$", _minus_one)],
}


def _gguf_module():
    try:
        import gguf
    except ImportError:
        raise JaxlensError('reading GGUF files needs the gguf package: pip install "jaxlens[gguf]"') from None
    return gguf


class GGUFFile:
    """One opened GGUF file: its metadata as the HF config and tokenizer, and its tensors under HF names."""

    def __init__(self, path: str):
        self.path = os.path.abspath(os.path.expanduser(path))
        self.name = os.path.basename(self.path)
        if not os.path.isfile(self.path):
            raise JaxlensError(f"GGUF file {path} does not exist")
        with open(self.path, "rb") as f:
            magic = f.read(4)
        if magic != b"GGUF":
            raise JaxlensError(f"{self.name} is not a GGUF file (it does not start with the GGUF magic bytes)")
        gguf = _gguf_module()
        try:
            self.reader = gguf.GGUFReader(self.path, "r")
        except Exception as e:  # noqa: BLE001 - the reader raises ValueError / IndexError / struct errors
            raise JaxlensError(f"{self.name} is truncated or corrupt ({e.__class__.__name__}: "
                               f"{str(e).splitlines()[0] if str(e) else 'unreadable'})") from None
        self.arch = self.value("general.architecture")
        if self.arch not in ARCHS:
            raise JaxlensError(f"{self.name}: GGUF architecture {self.arch!r} is not supported by jaxlens "
                               f"(supported: {', '.join(ARCHS)})")
        self.tensors = {t.name: t for t in self.reader.tensors}
        size = os.path.getsize(self.path)
        for t in self.reader.tensors:
            if int(t.data_offset) + int(t.n_bytes) > size:
                raise JaxlensError(f"{self.name} is truncated: tensor {t.name} ends past the end of the file")

    # metadata ----------------------------------------------------------------------------------
    def value(self, key: str, default: Any = None) -> Any:
        f = self.reader.fields.get(key)
        if f is None:
            return default
        return f.contents()

    def metadata(self) -> dict:
        """Every metadata key with its value; arrays of strings other than the vocabulary and merges are
        given as their length, as transformers' reader does."""
        gguf = _gguf_module()
        out = {}
        for key, f in self.reader.fields.items():
            if (f.types and f.types[0] == gguf.GGUFValueType.ARRAY and len(f.types) > 1
                    and f.types[-1] == gguf.GGUFValueType.STRING
                    and key not in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges")):
                out[key] = len(f.data)
            else:
                out[key] = f.contents()
        return out

    def model_type(self) -> str:
        # Mistral files say "llama" and llama.cpp runs them as llama (no sliding window); so does jaxlens
        return ARCHS[self.arch]

    def config(self) -> dict:
        """The HF config of the file, as transformers' config class for the family writes it."""
        keys = CONFIG_KEYS[self.arch]
        fields: dict = {}
        prefix = self.arch + "."
        unknown = []
        for key in self.reader.fields:
            if key.startswith(_IGNORED_PREFIXES):
                continue
            if not key.startswith(prefix):
                unknown.append(key)
                continue
            sub = key[len(prefix):]
            if sub in keys:
                if keys[sub] is not None:
                    fields[keys[sub]] = self.value(key)
            elif sub in _IMPLIED_HEAD_DIM:
                d = self.value(prefix + "embedding_length")
                h = self.value(prefix + "attention.head_count")
                if not d or not h or int(self.value(key)) != int(d) // int(h):
                    raise JaxlensError(f"{self.name}: GGUF metadata {key}={self.value(key)!r} differs from "
                                       "embedding_length / head_count, which this family implies")
            elif sub in _NOOP_KEYS:
                if self.value(key) not in _NOOP_KEYS[sub]:
                    raise JaxlensError(f"{self.name}: GGUF metadata {key}={self.value(key)!r} changes the model "
                                       "and is not handled by jaxlens")
            else:
                unknown.append(key)
        if unknown:
            raise JaxlensError(f"{self.name}: GGUF metadata {unknown[0]!r} is not handled by jaxlens "
                               "(it may change the model's math; refusing to ignore it)")
        if "vocab_size" not in fields:
            tokens = self.reader.fields.get("tokenizer.ggml.tokens")
            if tokens is None:
                raise JaxlensError(f"{self.name}: no vocab_size and no tokenizer.ggml.tokens in the metadata")
            fields["vocab_size"] = len(tokens.data)
        fields["tie_word_embeddings"] = "output.weight" not in self.tensors
        if self.arch == "llama":
            # llama.cpp applies whatever biases the file holds; the config has to say so
            fields["attention_bias"] = "blk.0.attn_q.bias" in self.tensors
            fields["mlp_bias"] = "blk.0.ffn_up.bias" in self.tensors
        for hf, gg in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                       ("pad_token_id", "padding_token_id")):
            v = self.value(f"tokenizer.ggml.{gg}")
            if v is not None:
                fields[hf] = int(v)
        from transformers import AutoConfig

        model_type = self.model_type()
        cfg = AutoConfig.for_model(model_type, **fields).to_dict()
        cfg["model_type"] = model_type
        return cfg

    # tensors -----------------------------------------------------------------------------------
    def hf_names(self) -> dict:
        """HF tensor name -> llama.cpp tensor name, for every tensor of the file."""
        table = TENSOR_NAMES[self.arch]
        pats = [(re.compile("^" + re.escape(g).replace(r"\{i\}", r"(\d+)") + r"\.(weight|bias)$"), h)
                for g, h in table.items()]
        out = {}
        for name in self.tensors:
            for rx, h in pats:
                m = rx.match(name)
                if m:
                    groups = m.groups()
                    hf = h.replace("{i}", groups[0]) if "{i}" in h else h
                    out[f"{hf}.{groups[-1]}"] = name
                    break
            else:
                if name.startswith(("rope_freqs", "rope_factors")):
                    raise JaxlensError(f"{self.name}: tensor {name} (rope frequency factors) is not handled "
                                       "by jaxlens")
                raise JaxlensError(f"{self.name}: tensor {name} has no place in a {self.arch} model")
        return out

    def tensor_source(self, config: dict):
        from jaxlens.models.checkpoint import TensorSource

        gguf = _gguf_module()
        names = self.hf_names()
        undo: list[tuple[Any, Callable]] = [(re.compile(rx), fn) for rx, fn in UNDO.get(self.arch, [])]
        shapes = {hf: tuple(int(x) for x in reversed(self.tensors[g].shape)) for hf, g in names.items()}

        def get(hf: str) -> np.ndarray:
            t = self.tensors[names[hf]]
            shape = shapes[hf]
            data = t.data                                  # a view of the memory-mapped file
            try:
                if data.ndim == 2 and data.shape[0] == shape[0] and len(shape) == 2:
                    # row blocks into one float32 buffer: the dequantiser's temporaries stay small
                    w = np.empty(shape, np.float32)
                    step = max(1, (1 << 20) // max(1, shape[1]))
                    for i in range(0, shape[0], step):
                        w[i:i + step] = gguf.dequantize(data[i:i + step], t.tensor_type).reshape(-1, shape[1])
                else:
                    w = np.asarray(gguf.dequantize(data, t.tensor_type), np.float32).reshape(shape)
            except NotImplementedError:
                raise JaxlensError(f"{self.name}: tensor {t.name} has type {t.tensor_type.name}, which the gguf "
                                   "package cannot dequantise") from None
            for rx, fn in undo:
                if rx.search(t.name):
                    w = fn(w, config)
            return w

        types = sorted({t.tensor_type.name for t in self.tensors.values()})
        return TensorSource(shapes, get, f"{self.name} (GGUF {', '.join(types)})")

    # tokenizer ---------------------------------------------------------------------------------
    def tokenizer(self):
        """The HF fast tokenizer the metadata describes (transformers' GGUF builders; no torch needed)."""
        return build_tokenizer(self.metadata(), self.arch, self.name)

    def tokenizer_factory(self) -> Callable:
        """A function building :meth:`tokenizer` later from the metadata alone, so the reader (whose parsed
        vocabulary is the largest thing in memory after the weights: ~690 MB for Gemma-3's 262k tokens)
        can be dropped once the weights are loaded."""
        import functools

        return functools.partial(build_tokenizer, self.metadata(), self.arch, self.name)


def build_tokenizer(md: dict, arch: str, file_name: str):
    """The HF fast tokenizer from a GGUF file's metadata (:meth:`GGUFFile.metadata`)."""
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.gguf.gguf_tokenizer_mapping import (
        _SPECIAL_TOKENS, GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer)

    grouped = {group: {field: md[f"tokenizer.{key}"] for key, field in renames.items() if f"tokenizer.{key}" in md}
               for group, renames in GGUF_TOKENIZER_MAPPING.items()}
    tok_dict, tok_config = grouped["tokenizer"], grouped["tokenizer_config"]
    if "tokens" not in tok_dict:
        raise JaxlensError(f"{file_name} has no tokenizer in its metadata (tokenizer.ggml.tokens)")
    if tok_dict.get("tokenizer_type") == "llama":
        tok_config.setdefault("add_bos_token", True)
    for special, key in _SPECIAL_TOKENS.items():
        token_id = md.get(f"tokenizer.ggml.{key}")
        tok_config[special] = tok_dict["tokens"][token_id] if token_id is not None else None
    try:
        backend, extra = convert_gguf_tokenizer(arch, tok_dict)
    except ValueError as e:
        raise JaxlensError(f"{file_name}: {e}") from None
    kwargs = {k: v for k, v in {**tok_config, **extra}.items() if v is not None}
    return PreTrainedTokenizerFast(tokenizer_object=backend, **kwargs)


def find_gguf(directory: str) -> str | None:
    """The one ``.gguf`` file of a directory without ``config.json`` (None if there is none)."""
    if os.path.exists(os.path.join(directory, "config.json")):
        return None
    files = sorted(f for f in os.listdir(directory) if f.endswith(".gguf"))
    if len(files) > 1:
        raise JaxlensError(f"{directory} holds {len(files)} .gguf files ({', '.join(files)}); pass one of them")
    return os.path.join(directory, files[0]) if files else None
