"""``jaxlens.load_model``: a HF checkpoint (local directory, hub id, or ``demo``) -> a :class:`Model`.

Loading is streamed: the conversion plan is checked against tensor *shapes* first (every problem reported
together), then each jaxlens parameter is written from its HF tensors straight into one host buffer of its
final dtype, placed on its device / sharding, and released before the next one is read. Peak host memory is
about one copy of the parameters (on the CPU backend the placed buffer *is* the parameter) plus the format
reader's read / dequantisation blocks (a few MB); ``benchmarks/load_memory.py`` measures it.
"""
from __future__ import annotations

import json
import mmap
import os
from functools import cached_property

import jax
import jax.numpy as jnp
import numpy as np

from jaxlens.models import convert
from jaxlens.models import decoder
from jaxlens.models import packaged
from jaxlens.models.checkpoint import open_checkpoint
from jaxlens.models.gguf import GGUFFile, find_gguf
from jaxlens.errors import JaxlensError
from jaxlens.models.sharding import shard_batch, sharding_for
from jaxlens.models.spec import ArchSpec, spec_from_config

DTYPES = {"float32": jnp.float32, "fp32": jnp.float32, "bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16,
          "float16": jnp.float16, "fp16": jnp.float16}
DEMO_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "demo")
DEMO_TUNED_LENS_DIR = os.path.join(DEMO_DIR, "tuned_lens")   # a trained tuned lens for the demo (RECIPE.md)
_HUB_FILES = ["config.json", "*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin",
              "pytorch_model.bin.index.json", "flax_model.msgpack", "tokenizer*", "special_tokens_map.json",
              "vocab.json", "merges.txt", "generation_config.json", "*.model"]


def resolve_source(source: str) -> str:
    """Local path for ``source``: ``demo``, a packaged real model (:mod:`jaxlens.models.packaged`), an existing
    directory or ``.gguf`` file, or a hub id via the HF cache."""
    if source == "demo":
        if not os.path.exists(os.path.join(DEMO_DIR, "config.json")):
            raise JaxlensError("the bundled demo model is missing from this installation "
                               f"({DEMO_DIR}); regenerate it with: python -m jaxlens.demo.train")
        return DEMO_DIR
    if source in packaged.ALIASES:
        return packaged.resolve(source)
    expanded = os.path.expanduser(source)
    if os.path.isdir(expanded):
        return expanded
    if os.path.exists(expanded):
        if expanded.endswith(".gguf"):
            return expanded
        raise JaxlensError(f"{source} is a file; pass the model directory that contains config.json "
                           "(or a .gguf file)")
    if source.endswith(".gguf"):
        raise JaxlensError(f"GGUF file {source} does not exist")
    looks_like_path = source.startswith(("/", ".", "~")) or source.count("/") > 1 or os.sep + os.sep in source
    if looks_like_path or source.count("/") != 1:
        raise JaxlensError(f"model directory {source} does not exist")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover - a declared dependency
        raise JaxlensError(f"{source} is not a local directory and huggingface_hub is not installed")
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    try:
        return snapshot_download(source, allow_patterns=_HUB_FILES, local_files_only=offline)
    except Exception as e:  # noqa: BLE001 - hub errors come in many classes
        where = "in the local Hugging Face cache" if offline else "locally or on the Hugging Face Hub"
        raise JaxlensError(f"model {source} was not found {where} ({e.__class__.__name__})")


def read_config(directory: str) -> dict:
    path = os.path.join(directory, "config.json")
    if not os.path.exists(path):
        raise JaxlensError(f"{directory} has no config.json (not a Hugging Face model directory)")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise JaxlensError(f"{path} is not valid JSON (line {e.lineno}: {e.msg})")


def pad_batch(seqs, pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad token id lists for :meth:`Model.forward`: (input_ids [B, T] int32, attention_mask [B, T] int32)."""
    T = max(len(s) for s in seqs)
    ids = np.full((len(seqs), T), pad_id, np.int32)
    mask = np.zeros((len(seqs), T), np.int32)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = s
        mask[i, :len(s)] = 1
    return ids, mask


class Model:
    """A loaded checkpoint: ``spec``, ``params``, ``tokenizer``, and a jitted ``forward``."""

    def __init__(self, spec: ArchSpec, params: dict, *, path: str | None = None, source: str | None = None,
                 config: dict | None = None, mesh=None, tokenizer=None):
        self.spec = spec
        self._tokenizer_factory = tokenizer   # callable building the tokenizer (GGUF metadata), else the directory's
        self.decoder = decoder.Decoder(spec, params)
        self.path = path
        self.source = source or path or "<in-memory>"
        self.config = config or {}
        self.mesh = mesh

    @property
    def params(self) -> dict:
        return self.decoder.values()

    @property
    def dtype(self):
        return self.params["embed"].dtype

    @property
    def name(self) -> str:
        """Last path component of the source (the reference's 'clean' model name)."""
        src = self.source.rstrip("/")
        if src == DEMO_DIR.rstrip("/"):
            return "demo"
        base = os.path.basename(src) or src
        return base[:-len(".gguf")] if base.endswith(".gguf") else base

    @cached_property
    def tokenizer(self):
        if self._tokenizer_factory is not None:
            return self._tokenizer_factory()
        if self.path is None:
            raise JaxlensError("this model was built in memory and has no tokenizer")
        import logging

        from transformers import AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        logging.getLogger("transformers").setLevel(logging.ERROR)
        try:
            return AutoTokenizer.from_pretrained(self.path)
        except Exception as e:  # noqa: BLE001
            raise JaxlensError(f"no usable tokenizer in {self.path} ({e.__class__.__name__}: "
                               f"{str(e).splitlines()[0] if str(e) else ''})")

    def forward(self, input_ids, attention_mask=None, *, unroll: int = 1) -> decoder.ForwardOutput:
        """Jitted forward: raw residuals [n_layers+1, B, T, d] and float32 logits [B, T, V]."""
        ids = np.asarray(input_ids) if not isinstance(input_ids, jax.Array) else input_ids
        if ids.ndim != 2:
            raise JaxlensError(f"input_ids must be [batch, tokens], got shape {tuple(ids.shape)}")
        if isinstance(ids, np.ndarray) and ids.size and (ids.min() < 0 or ids.max() >= self.spec.vocab_size):
            raise JaxlensError(f"input_ids contain id {int(ids.max())} outside the vocabulary "
                               f"(size {self.spec.vocab_size})")
        if self.spec.positional == "learned" and ids.shape[1] > self.spec.max_positions:
            raise JaxlensError(f"sequence of {ids.shape[1]} tokens exceeds the model's "
                               f"{self.spec.max_positions} learned positions")
        ids = shard_batch(jnp.asarray(ids, jnp.int32), self.mesh)
        mask = None if attention_mask is None else shard_batch(jnp.asarray(attention_mask, jnp.int32), self.mesh)
        return decoder.jitted_apply(self.spec, unroll)(self.params, ids, mask)

    def unembedding(self):
        """(W [d, V], bias [V] or None) of the model's head."""
        return decoder.unembedding(self.spec, self.params)

    def __repr__(self):
        s = self.spec
        return (f"Model({self.name}: {s.arch}, {s.n_layers} layers, d={s.d_model}, V={s.vocab_size}, "
                f"{jnp.dtype(self.dtype).name})")


def _host_buffer(shape: tuple, dtype) -> np.ndarray:
    """An uninitialised C-contiguous array whose data starts on a 64-byte boundary, which the CPU backend
    adopts on ``jax.device_put`` instead of copying (an unaligned one is copied). Buffers of 4 MiB and more are
    private anonymous maps (page-aligned), not ``np.empty``: numpy advises transparent huge pages for those,
    and with the kernel's default ``defrag=madvise`` every first touch may compact memory synchronously, which
    made filling a model's worth of fresh buffers several times slower than the dequantisation itself."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if nbytes >= 1 << 22 and hasattr(mmap, "MAP_PRIVATE"):
        return np.frombuffer(mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE), dtype).reshape(shape)
    align = 64
    raw = np.empty(nbytes + align, np.uint8)
    off = (-raw.ctypes.data) % align
    return raw[off:off + nbytes].view(dtype).reshape(shape)


def _source_view(target: np.ndarray, ops, spec=None) -> np.ndarray | None:
    """A view ``v`` of ``target`` in the checkpoint tensor's layout, such that writing a tensor ``x`` into ``v``
    writes ``convert.apply_ops(x, ops)`` into ``target`` (:func:`convert.invert_ops` applied to the target);
    None where ``ops`` is not a pure relabelling (slices of fused tensors) or would need a copy."""
    try:
        v = convert.invert_ops(target, ops, spec)
    except JaxlensError:                              # fused tensors: no view
        return None
    return v if np.may_share_memory(v, target) else None          # a reshape that fell back to a copy


def load_params(spec: ArchSpec, directory, dtype, mesh=None) -> dict:
    """Stream-convert a checkpoint (a HF directory, or an opened :class:`~jaxlens.models.checkpoint.TensorSource`)
    into the jaxlens parameter tree.

    Each parameter gets one host buffer of its final dtype and shape (:func:`_host_buffer`), which every source
    tensor is written into directly (``TensorSource.fill``, through a transposed / reshaped view of its slot);
    only slices of fused tensors go through a converted copy. The buffer is then placed: on the CPU backend
    without a mesh ``device_put`` adopts it, so the loaded parameters are the only copy; on an accelerator
    or a mesh it is copied to the devices and freed before the next parameter is read."""
    src = open_checkpoint(directory) if isinstance(directory, (str, os.PathLike)) else directory
    layout = convert.flatten(decoder.param_layout(spec), "")  # dotted path -> (shape, axes)
    # flatten() stops at tuples, so layout values are (shape, axes) pairs
    expected = {k: tuple(v[0]) for k, v in layout.items()}
    assign = convert.plan(spec, src.shapes, expected)
    out = {}
    for path, (shape, axes) in layout.items():
        sharding = sharding_for(shape, axes, mesh) if mesh is not None else None
        host = _host_buffer(tuple(shape), jnp.dtype(dtype))
        cache_key, cache_val = None, None
        for layer, key, ops in assign[path]:
            target = host if layer is None else host[layer]
            view = _source_view(target, ops, spec)
            if view is not None and view.shape == tuple(src.shapes[key]):
                src.fill(key, view)
                continue
            if key != cache_key:                       # fused tensors: read whole, slice, copy in
                cache_key, cache_val = key, src.get(key)
            target[...] = convert.apply_ops(cache_val, ops, spec)
        del cache_val
        arr = jax.device_put(host, sharding) if sharding is not None else jax.device_put(host)
        out[path] = jax.block_until_ready(arr)        # host freed (or adopted) before the next parameter
        del host, arr
    return convert.unflatten(out)


def load_model(source: str = "demo", dtype: str = "float32", mesh=None) -> Model:
    """Load a Hugging Face causal LM for jaxlens. See the README's "Python" section.

    source: ``"demo"``, a local HF directory, or a hub id (resolved through the HF cache).
    dtype:  compute dtype of weights and activations: "float32", "bfloat16" or "float16".
    mesh:   optional (data, fsdp, tensor) mesh from :func:`jaxlens.models.sharding.make_mesh`; each tensor is
            placed on its sharding as it is read.
    """
    if dtype not in DTYPES:
        raise JaxlensError(f"dtype {dtype!r} is not supported (use float32, bfloat16 or float16)")
    path = resolve_source(source)
    gguf_path = path if path.endswith(".gguf") and os.path.isfile(path) else \
        (find_gguf(path) if os.path.isdir(path) else None)
    if gguf_path is not None:
        gf = GGUFFile(gguf_path)
        config = gf.config()
        spec = spec_from_config(config, where=gf.name)
        params = load_params(spec, gf.tensor_source(config), DTYPES[dtype], mesh)
        tokenizer = gf.tokenizer_factory()
        del gf                                          # the reader and its parsed metadata
        return Model(spec, params, path=gguf_path, source=source, config=config, mesh=mesh, tokenizer=tokenizer)
    config = read_config(path)
    spec = spec_from_config(config)
    params = load_params(spec, path, DTYPES[dtype], mesh)
    return Model(spec, params, path=path, source=source, config=config, mesh=mesh)
