"""GGUF checkpoints (llama.cpp's single-file format), dequantised by the ``gguf`` package (llama.cpp's own).

A GGUF file carries no ``config.json`` and no tokenizer files: its metadata is both. This module turns one
into what the rest of jaxlens reads from a Hugging Face directory, following transformers' GGUF integration
(``transformers.modeling_gguf_pytorch_utils`` and ``transformers.integrations.ggml``), and is proved by
parity against it (``tests/test_gguf.py``, ``tests/test_real_models.py``):

* **config**: the metadata keys of :data:`CONFIG_KEYS` (llama.cpp's names) become the HF config fields,
  passed to the transformers config class of the family, so every field the file does not state takes the
  same default transformers gives it. ``to_dict()`` of that config is then read by
  :func:`jaxlens.models.spec.spec_from_config` like any published config. transformers' config module
  imports torch (~250 MB resident), so unless this process has imported it already the config is built by
  a short-lived child interpreter, with torch hidden from transformers there (:func:`hf_config_dict`).
* **tensors**: :data:`TENSOR_NAMES` maps llama.cpp tensor names onto HF names, so the declarative weight
  tables of :mod:`jaxlens.models.convert` serve GGUF files too. Each tensor is dequantised (every type the
  ``gguf`` package can: F32, F16, BF16, Q8_0, Q4_0/1, Q5_0/1, the K- and I-quants) only when the loader asks
  for it, in row blocks read with plain file reads (no memory map: mapped pages would count against the
  process), straight into the parameter's final buffer where no conversion step needs the whole tensor.
* **the file** is parsed here (:class:`_Header`, the layout gguf-py's ``GGUFReader`` reads, its checks and
  its values): metadata arrays (the vocabulary, merges, scores) are located but decoded only when asked for,
  so the parsed file is well under 1 MB while the weights load, where ``GGUFReader`` held one numpy view per
  token (~690 MB for Gemma-3's 262k tokens). ``tests/test_load_memory.py`` compares it with ``GGUFReader``.
* **what llama.cpp's converter changed** is undone (:data:`UNDO`): the llama-family Q/K row permutation of
  its rotary layout, and Gemma's ``1 + w`` norm gains, which the converter stores with the 1 added.
* **tokenizer**: built from the metadata by transformers' own GGUF tokenizer builders
  (``transformers.integrations.gguf.gguf_tokenizer_mapping``), without torch.

``gguf`` is an optional extra: ``pip install "jaxlens[gguf]"``.
"""
from __future__ import annotations

import functools
import io
import mmap
import os
import pickle
import re
import struct
import subprocess
import sys
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


# ------------------------------------------------------------------------------------------------
# the file: header, metadata and tensor table (the layout and checks of gguf-py's GGUFReader)

# metadata value types (gguf.GGUFValueType)
_U8, _I8, _U16, _I16, _U32, _I32, _F32, _BOOL, _STRING, _ARRAY, _U64, _I64, _F64 = range(13)
_SCALAR = {_U8: "B", _I8: "b", _U16: "H", _I16: "h", _U32: "I", _I32: "i", _F32: "f", _BOOL: "?",
           _U64: "Q", _I64: "q", _F64: "d"}
_LAZY = object()                    # an array value not decoded yet
# tensor types GGUFReader gives a typed (not byte) view of
_TYPED = {"F16": np.float16, "F32": np.float32, "F64": np.float64, "I8": np.int8, "I16": np.int16,
          "I32": np.int32, "I64": np.int64}


class _Field:
    """One metadata value. ``types`` and ``n_items`` are GGUFReader's ``field.types`` and ``len(field.data)``;
    arrays of scalars or strings stay in the file (``span``) until :meth:`_Header.contents` decodes them."""

    __slots__ = ("types", "value", "n_items", "span")

    def __init__(self, types, value, n_items=1, span=None):
        self.types, self.value, self.n_items, self.span = types, value, n_items, span


class _Tensor:
    """One tensor-table entry: GGUFReader's ReaderTensor fields, less the data (read on demand)."""

    __slots__ = ("name", "tensor_type", "shape", "n_elements", "n_bytes", "data_offset", "data_dtype",
                 "data_shape")

    def __init__(self, **kw):
        for k, v in kw.items():
            setattr(self, k, v)


class _Cursor:
    """Little reads from a buffer with GGUFReader's byte order; past the end is a ValueError."""

    def __init__(self, buf, order: str):
        self.buf, self.order, self.pos, self.end = buf, order, 0, len(buf)

    def take(self, n: int) -> int:
        p = self.pos
        if n < 0 or p + n > self.end:
            raise ValueError("data runs past the end of the file")
        self.pos = p + n
        return p

    def scalar(self, code: str):
        p = self.take(struct.calcsize(code))
        return struct.unpack_from(self.order + code, self.buf, p)[0]

    def string(self) -> str:
        n = self.scalar("Q")
        p = self.take(n)
        return str(self.buf[p:p + n], "utf-8")

    def skip_strings(self, count: int) -> None:
        unpack, buf, pos = struct.Struct(self.order + "Q").unpack_from, self.buf, self.pos
        for _ in range(count):
            pos += 8 + unpack(buf, pos)[0]           # struct.error past the end
        if pos > self.end:
            raise ValueError("data runs past the end of the file")
        self.pos = pos


def _decode_array(buf, order: str, etype: int, count: int) -> list:
    """``count`` values of type ``etype`` from the start of ``buf``, as GGUFReader's ``contents()``."""
    if etype == _STRING:
        cur = _Cursor(buf, order)
        return [cur.string() for _ in range(count)]
    return np.frombuffer(buf, np.dtype(order + _SCALAR[etype]) if etype != _BOOL else np.bool_,
                         count).tolist()


class _Header:
    """A GGUF file's metadata and tensor table, parsed from a temporary read-only map of the file (its pages
    are released when the parse ends). Raises ValueError / struct.error on anything GGUFReader refuses."""

    def __init__(self, path: str):
        self.path = path
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            if struct.unpack_from("<I", mm, 0)[0] != 0x46554747:
                raise ValueError("GGUF magic invalid")
            version = struct.unpack_from("<I", mm, 4)[0]
            # a version with its low half zero was written with the other byte order (as GGUFReader decides)
            self.order = ">" if version & 0xFFFF == 0 else "<"
            cur = _Cursor(mm, self.order)
            cur.take(4)
            version = cur.scalar("I")
            if version not in (2, 3):
                raise ValueError(f"file appears to be GGUF version {version}, which is not supported")
            n_tensors, n_kv = cur.scalar("Q"), cur.scalar("Q")
            self.fields: dict[str, _Field] = {
                "GGUF.version": _Field([_U32], version), "GGUF.tensor_count": _Field([_U64], n_tensors),
                "GGUF.kv_count": _Field([_U64], n_kv)}
            for _ in range(n_kv):
                key = cur.string()
                if key in self.fields:
                    raise ValueError(f"duplicate metadata key {key}")
                self.fields[key] = self._value(cur, cur.scalar("I"))
            infos = []
            for _ in range(n_tensors):
                name = cur.string()
                n_dims = cur.scalar("I")
                dims = struct.unpack_from(f"{self.order}{n_dims}Q", mm, cur.take(8 * n_dims))
                infos.append((name, dims, cur.scalar("I"), cur.scalar("Q")))
            align = 32
            if "general.alignment" in self.fields:
                fa = self.fields["general.alignment"]
                if fa.types != [_U32]:
                    raise ValueError("bad type for general.alignment")
                align = fa.value
                if align == 0 or align & (align - 1):
                    raise ValueError("invalid alignment: must be a non-zero power of two")
            self.data_offset = cur.pos + (-cur.pos) % align
        self.tensors = self._tensors(infos)

    def _value(self, cur: _Cursor, vtype: int) -> _Field:
        if vtype == _STRING:
            return _Field([_STRING], cur.string())
        if vtype in _SCALAR:
            return _Field([vtype], cur.scalar(_SCALAR[vtype]))
        if vtype != _ARRAY:
            raise ValueError(f"unknown metadata value type {vtype}")
        etype, count = cur.scalar("I"), cur.scalar("Q")
        if etype in _SCALAR or etype == _STRING:
            start = cur.pos
            if etype == _STRING:
                cur.skip_strings(count)
            else:
                cur.take(struct.calcsize(_SCALAR[etype]) * count)
            return _Field([_ARRAY, etype] if count else [_ARRAY], _LAZY, count, (start, cur.pos, etype))
        if etype != _ARRAY:
            raise ValueError(f"unknown metadata value type {etype}")
        # arrays of arrays (llama.cpp writes none): flattened, as GGUFReader's contents() gives them
        types, values, n = [_ARRAY], [], 0
        for i in range(count):
            sub = self._value(cur, etype)
            if i == 0:
                types += sub.types
            if sub.value is _LAZY:
                a, b, et = sub.span
                values += _decode_array(cur.buf[a:b], self.order, et, sub.n_items)
            else:
                values += sub.value
            n += sub.n_items
        return _Field(types, values, n)

    def _tensors(self, infos) -> dict:
        gguf = _gguf_module()
        out = {}
        for name, dims, raw_type, offset in infos:
            if name in out:
                raise ValueError(f"duplicated tensor {name}")
            qtype = gguf.GGMLQuantizationType(raw_type)
            n_elems = int(np.prod(dims, dtype=np.int64)) if dims else 1
            block, type_size = gguf.GGML_QUANT_SIZES[qtype]
            data_shape = tuple(int(x) for x in reversed(dims))
            if qtype.name in _TYPED:
                dtype = np.dtype(_TYPED[qtype.name])
            else:
                dtype = np.dtype(np.uint8)
                if not data_shape or data_shape[-1] % block:
                    raise ValueError(f"tensor {name}: row size {data_shape[-1:]} is not a multiple of "
                                     f"{qtype.name} block size {block}")
                data_shape = (*data_shape[:-1], data_shape[-1] // block * type_size)
            out[name] = _Tensor(name=name, tensor_type=qtype, shape=tuple(int(x) for x in dims),
                                n_elements=n_elems, n_bytes=n_elems * type_size // block,
                                data_offset=self.data_offset + int(offset),
                                data_dtype=dtype.newbyteorder(self.order), data_shape=data_shape)
        return out

    def contents(self, key: str):
        f = self.fields[key]
        if f.value is not _LAZY:
            return f.value
        a, b, etype = f.span
        with open(self.path, "rb") as fh:
            buf = os.pread(fh.fileno(), b - a, a)
        if len(buf) != b - a:
            raise JaxlensError(f"{os.path.basename(self.path)} changed or was truncated while open")
        return _decode_array(buf, self.order, etype, f.n_items)

    def read(self, t: _Tensor, fh, rows: tuple[int, int] | None = None) -> np.ndarray:
        """Tensor ``t``'s data as GGUFReader's ``t.data`` gives it (or rows ``[r0, r1)`` of it), by one read."""
        offset, nbytes, shape = t.data_offset, t.n_bytes, t.data_shape
        if rows is not None:
            row_bytes = t.n_bytes // t.data_shape[0]
            offset += rows[0] * row_bytes
            nbytes = (rows[1] - rows[0]) * row_bytes
            shape = (rows[1] - rows[0],) + t.data_shape[1:]
        buf = os.pread(fh.fileno(), nbytes, offset)
        if len(buf) != nbytes:
            raise JaxlensError(f"{os.path.basename(self.path)} changed or was truncated while open")
        return np.frombuffer(buf, t.data_dtype).reshape(shape)


class _NoGlobals(pickle.Unpickler):
    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"unexpected {module}.{name} in a config")


# the child: transformers only (importing jaxlens would import jax). With ``hide_torch`` torch is made
# unimportable first: transformers then runs as it does where torch is not installed, which it supports for
# configurations (and which skips torch's ~2 s import); tests/test_load_memory.py checks the dicts are equal.
# Exit 3 if the dict holds anything but plain values (the parent could not unpickle it without imports).
_CONFIG_CHILD = r"""
import pickle, sys
path, model_type, fields, hide_torch = pickle.loads(sys.stdin.buffer.read())
sys.path[:] = path
if hide_torch:
    sys.modules["torch"] = None
from transformers import AutoConfig
def plain(x):
    if isinstance(x, dict):
        return all(type(k) in (str, int) and plain(v) for k, v in x.items())
    if isinstance(x, (list, tuple)):
        return all(plain(v) for v in x)
    return x is None or type(x) in (str, int, float, bool)
cfg = AutoConfig.for_model(model_type, **fields).to_dict()
if not plain(cfg):
    sys.exit(3)
sys.stdout.buffer.write(pickle.dumps(cfg, protocol=4))
"""
_CONFIG_CACHE: dict[bytes, bytes] = {}


def config_in_child(model_type: str, fields: dict, hide_torch: bool | None = None) -> dict | None:
    """``AutoConfig.for_model(model_type, **fields).to_dict()`` computed by a child interpreter of this
    environment, so this process imports neither transformers nor torch; None if that fails. The child
    first runs with torch hidden from transformers, then (if that fails) as is; ``hide_torch`` forces one."""
    if not sys.executable:
        return None
    for hide in ((True, False) if hide_torch is None else (hide_torch,)):
        try:
            r = subprocess.run([sys.executable, "-c", _CONFIG_CHILD],
                               input=pickle.dumps((list(sys.path), model_type, fields, hide), protocol=4),
                               capture_output=True, timeout=600)
            if r.returncode == 0:
                return _NoGlobals(io.BytesIO(r.stdout)).load()      # plain values only: nothing is imported
        except (OSError, subprocess.SubprocessError, pickle.UnpicklingError, EOFError, ValueError):
            pass
    return None


def hf_config_dict(model_type: str, fields: dict) -> dict:
    """``AutoConfig.for_model(model_type, **fields).to_dict()``.

    transformers' config module imports torch, which adds ~250 MB to the resident memory of a process that
    otherwise never needs it (jaxlens builds GGUF tokenizers without torch). Unless this process has
    imported that module already, the dict is therefore computed by :func:`config_in_child`; if the child
    fails for any reason the call is made here, so errors are transformers' own. Results are cached per
    (model_type, fields)."""
    key = pickle.dumps((model_type, sorted(fields.items())), protocol=4)
    if key not in _CONFIG_CACHE:
        cfg = None
        if "transformers.configuration_utils" not in sys.modules:
            cfg = config_in_child(model_type, fields)
        if cfg is None:
            from transformers import AutoConfig

            cfg = AutoConfig.for_model(model_type, **fields).to_dict()
        _CONFIG_CACHE[key] = pickle.dumps(cfg, protocol=4)
    return pickle.loads(_CONFIG_CACHE[key])


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
        _gguf_module()
        try:
            self.header = _Header(self.path)
        except Exception as e:  # noqa: BLE001 - ValueError / struct.error / UnicodeDecodeError on a bad file
            raise JaxlensError(f"{self.name} is truncated or corrupt ({e.__class__.__name__}: "
                               f"{str(e).splitlines()[0] if str(e) else 'unreadable'})") from None
        self.arch = self.value("general.architecture")
        if self.arch not in ARCHS:
            raise JaxlensError(f"{self.name}: GGUF architecture {self.arch!r} is not supported by jaxlens "
                               f"(supported: {', '.join(ARCHS)})")
        self.tensors = self.header.tensors
        size = os.path.getsize(self.path)
        for t in self.tensors.values():
            if int(t.data_offset) + int(t.n_bytes) > size:
                raise JaxlensError(f"{self.name} is truncated: tensor {t.name} ends past the end of the file")

    # metadata ----------------------------------------------------------------------------------
    def value(self, key: str, default: Any = None) -> Any:
        if key not in self.header.fields:
            return default
        return self.header.contents(key)

    def metadata(self) -> dict:
        """Every metadata key with its value; arrays of strings other than the vocabulary and merges are
        given as their length, as transformers' reader does."""
        out = {}
        for key, f in self.header.fields.items():
            if (f.types and f.types[0] == _ARRAY and len(f.types) > 1 and f.types[-1] == _STRING
                    and key not in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges")):
                out[key] = f.n_items
            else:
                out[key] = self.header.contents(key)
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
        for key in self.header.fields:
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
            tokens = self.header.fields.get("tokenizer.ggml.tokens")
            if tokens is None:
                raise JaxlensError(f"{self.name}: no vocab_size and no tokenizer.ggml.tokens in the metadata")
            fields["vocab_size"] = tokens.n_items
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
        model_type = self.model_type()
        cfg = hf_config_dict(model_type, fields)
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
        """The file's tensors under HF names. ``get`` dequantises a whole tensor to float32; ``fill`` writes
        one into a caller's array (any float dtype, any strides) one row block at a time, so no float32 copy
        of the whole tensor exists unless an :data:`UNDO` step needs it."""
        from jaxlens.models.checkpoint import TensorSource

        gguf = _gguf_module()
        names = self.hf_names()
        undo: list[tuple[Any, Callable]] = [(re.compile(rx), fn) for rx, fn in UNDO.get(self.arch, [])]
        shapes = {hf: tuple(int(x) for x in reversed(self.tensors[g].shape)) for hf, g in names.items()}
        header = self.header

        def dequantize(t: _Tensor, data: np.ndarray) -> np.ndarray:
            try:
                return gguf.dequantize(data, t.tensor_type)
            except NotImplementedError:
                raise JaxlensError(f"{self.name}: tensor {t.name} has type {t.tensor_type.name}, which the gguf "
                                   "package cannot dequantise") from None

        def row_blocks(t: _Tensor, shape: tuple):
            """(start, stop, float32 rows) of a 2-D tensor, ~1M values per block (the dequantiser's
            temporaries stay small)."""
            step = max(1, (1 << 20) // max(1, shape[1]))
            with open(self.path, "rb") as fh:
                for i in range(0, shape[0], step):
                    j = min(shape[0], i + step)
                    yield i, j, dequantize(t, header.read(t, fh, (i, j))).reshape(-1, shape[1])

        def blockwise(t: _Tensor, shape: tuple) -> bool:
            return len(shape) == 2 and len(t.data_shape) == 2 and t.data_shape[0] == shape[0]

        def get(hf: str) -> np.ndarray:
            t = self.tensors[names[hf]]
            shape = shapes[hf]
            if blockwise(t, shape):
                w = np.empty(shape, np.float32)
                for i, j, rows in row_blocks(t, shape):
                    w[i:j] = rows
            else:
                with open(self.path, "rb") as fh:
                    w = np.asarray(dequantize(t, header.read(t, fh)), np.float32).reshape(shape)
            for rx, fn in undo:
                if rx.search(t.name):
                    w = fn(w, config)
            return w

        def fill(hf: str, out: np.ndarray) -> None:
            t = self.tensors[names[hf]]
            shape = shapes[hf]
            if out.shape != shape:
                raise ValueError(f"fill({hf}): out has shape {out.shape}, the tensor {shape}")
            if not blockwise(t, shape) or any(rx.search(t.name) for rx, _ in undo):
                out[...] = get(hf)
                return
            for i, j, rows in row_blocks(t, shape):
                out[i:j] = np.asarray(rows, np.float32)      # the cast to out's dtype, as from a float32 copy

        types = sorted({t.tensor_type.name for t in self.tensors.values()})
        return TensorSource(shapes, get, f"{self.name} (GGUF {', '.join(types)})", fill=fill)

    # tokenizer ---------------------------------------------------------------------------------
    def tokenizer(self):
        """The HF fast tokenizer the metadata describes (transformers' GGUF builders; no torch needed)."""
        return build_tokenizer(self.metadata(), self.arch, self.name)

    def tokenizer_factory(self) -> Callable:
        """A function building :meth:`tokenizer` later from the metadata alone (decoded now, after the
        weights, so the file need not stay open)."""
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
