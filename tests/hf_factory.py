"""Tiny, deliberately awkward Hugging Face checkpoints built offline, plus a PyTorch reference.

Pure torch / transformers / tokenizers: nothing here imports jaxlens, so the factory can be used (and
checked) on its own.

- ``make_tokenizer``: a byte-level BPE trained in-process on generated text, saved as a complete HF
  tokenizer directory (loads with ``AutoTokenizer.from_pretrained`` offline).
- ``ARCHS`` / ``make_config`` / ``LLAMA_ROPE_VARIANTS``: tiny configs for the 11 supported families with
  shapes chosen to catch shortcuts (vocab not a power of two, GQA/MQA, explicit ``head_dim`` != hidden/heads,
  sliding windows shorter than the test prompts, partial rotary, biases, softcaps, q/k norms, rope scaling).
- ``build_checkpoint``: a randomly perturbed model saved as safetensors / 2-shard index / pytorch_model.bin /
  HF Flax msgpack, with the tokenizer beside it.
- ``torch_reference``: raw residual streams, logits and the norm-lens logits computed in PyTorch.
- ``kl_bits``: KL(P || Q) in bits, float64.
"""
from __future__ import annotations

import atexit
import copy
import json
import math
import os
import shutil
import tempfile
import threading

import numpy as np

# --------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------

BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|eos|>"
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = [BOS_TOKEN, EOS_TOKEN, PAD_TOKEN]  # ids 0, 1, 2
BOS_ID, EOS_ID, PAD_ID = 0, 1, 2

_COUNTRIES = [
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"),
    ("Portugal", "Lisbon"), ("Japan", "Tokyo"), ("China", "Beijing"), ("Egypt", "Cairo"),
    ("Kenya", "Nairobi"), ("Peru", "Lima"), ("Chile", "Santiago"), ("Canada", "Ottawa"),
    ("Norway", "Oslo"), ("Sweden", "Stockholm"), ("Finland", "Helsinki"), ("Poland", "Warsaw"),
    ("Greece", "Athens"), ("Turkey", "Ankara"), ("India", "New Delhi"), ("Russia", "Moscow"),
    ("Austria", "Vienna"), ("Hungary", "Budapest"), ("Ireland", "Dublin"), ("Cuba", "Havana"),
    ("Mexico", "Mexico City"), ("Brazil", "Brasilia"), ("Argentina", "Buenos Aires"),
    ("Australia", "Canberra"), ("Thailand", "Bangkok"), ("Vietnam", "Hanoi"),
]
_NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
            "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
            "nineteen", "twenty"]

# Prompts used by the tests (each encodes to well over 20 tokens with any vocab size used here).
PROMPTS = [
    "The capital of France is Paris, and the capital of Germany is Berlin. Give the capital of Japan:",
    "Seven plus eight is fifteen. The capital of Kenya is Nairobi and",
    "Q: What is the capital of Peru? A: Lima",
]


def corpus_text() -> str:
    """A deterministic little corpus about capitals and numbers."""
    lines = []
    for i, (country, capital) in enumerate(_COUNTRIES):
        lines.append(f"The capital of {country} is {capital}.")
        lines.append(f"{capital} is the capital city of {country}, and {country} is a country.")
        lines.append(f"Q: What is the capital of {country}? A: {capital}")
        lines.append(f"Give the capital of {country}: {capital}")
    for a in range(0, 11):
        for b in range(0, 10, 3):
            lines.append(f"{_NUMBERS[a].capitalize()} plus {_NUMBERS[b]} is {_NUMBERS[a + b]}. {a} + {b} = {a + b}")
    for i in range(100):
        lines.append(f"Number {i} comes after {i - 1} and before {i + 1}.")
    return "\n".join(lines)


_TOKENIZER_CACHE: dict[tuple, str] = {}
_TOKENIZER_LOCK = threading.Lock()
_CACHE_ROOT: str | None = None


def _cache_root() -> str:
    global _CACHE_ROOT
    if _CACHE_ROOT is None:
        _CACHE_ROOT = tempfile.mkdtemp(prefix="jaxlens-test-tok-")
        atexit.register(shutil.rmtree, _CACHE_ROOT, ignore_errors=True)
    return _CACHE_ROOT


def _train_tokenizer(out_dir: str, vocab_size: int, bos: bool) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus_text().split("\n"), trainer=trainer)
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [BOS_ID, EOS_ID, PAD_ID]
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{BOS_TOKEN} $A",
            pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B:1",
            special_tokens=[(BOS_TOKEN, BOS_ID)],
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        add_bos_token=bos,
        add_eos_token=False,
        model_max_length=4096,
    )
    fast.save_pretrained(out_dir)
    # Older readers (and jaxlens' own loader, if it wants) understand this class name.
    cfg_path = os.path.join(out_dir, "tokenizer_config.json")
    with open(cfg_path) as f:
        tcfg = json.load(f)
    tcfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    with open(cfg_path, "w") as f:
        json.dump(tcfg, f, indent=2)


def make_tokenizer(out_dir: str, vocab_size: int = 512, bos: bool = False) -> str:
    """Train (once per session and argument set) a byte-level BPE and save it into ``out_dir``.

    Special tokens: ``<|bos|>`` = 0, ``<|eos|>`` = 1, ``<|pad|>`` = 2. With ``bos=True`` encoding with
    ``add_special_tokens=True`` prepends ``<|bos|>``; with ``bos=False`` nothing is added.
    """
    key = (int(vocab_size), bool(bos))
    with _TOKENIZER_LOCK:
        src = _TOKENIZER_CACHE.get(key)
        if src is None or not os.path.isdir(src):
            src = os.path.join(_cache_root(), f"tok-{vocab_size}-{int(bos)}")
            os.makedirs(src, exist_ok=True)
            _train_tokenizer(src, vocab_size, bos)
            _TOKENIZER_CACHE[key] = src
    os.makedirs(out_dir, exist_ok=True)
    for name in os.listdir(src):
        shutil.copy2(os.path.join(src, name), os.path.join(out_dir, name))
    return out_dir


# --------------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------------

ARCHS = ["gpt2", "gpt_neox", "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text",
         "phi3", "olmo2"]

GEMMA_ARCHS = ("gemma", "gemma2", "gemma3_text")

# Archs whose tokenizer prepends BOS (as the real families do).
BOS_ARCHS = ("llama", "gemma", "gemma2", "gemma3_text")

_COMMON_IDS = dict(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)

_BASE_CONFIGS: dict[str, dict] = {
    "gpt2": dict(
        vocab_size=997, n_positions=64, n_embd=64, n_layer=3, n_head=4, n_inner=176,
        activation_function="gelu_new", layer_norm_epsilon=1e-5,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    ),
    "gpt_neox": dict(
        vocab_size=1000, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=176,
        hidden_act="gelu", max_position_embeddings=128, layer_norm_eps=1e-5, use_parallel_residual=True,
        attention_bias=True, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
    ),
    # llama: GQA 4/2, head_dim 24 != 64/4, attention + mlp biases (as some llama derivatives have).
    "llama": dict(
        vocab_size=997, hidden_size=64, intermediate_size=176, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=24, hidden_act="silu", max_position_embeddings=128, rms_norm_eps=1e-5,
        attention_bias=True, mlp_bias=True, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    ),
    "mistral": dict(
        vocab_size=1003, hidden_size=64, intermediate_size=176, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=20, hidden_act="silu", max_position_embeddings=128, rms_norm_eps=1e-5,
        sliding_window=4, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    ),
    # qwen2: q/k/v bias (always on in Qwen2), sliding window on layers >= max_window_layers.
    "qwen2": dict(
        vocab_size=997, hidden_size=64, intermediate_size=176, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, hidden_act="silu", max_position_embeddings=128, rms_norm_eps=1e-6,
        use_sliding_window=True, sliding_window=5, max_window_layers=1, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1000.0},
    ),
    # qwen3: q/k norm over head_dim, head_dim 24 != 64/4, tied embeddings (like the small Qwen3 models).
    "qwen3": dict(
        vocab_size=1000, hidden_size=64, intermediate_size=176, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=24, hidden_act="silu", max_position_embeddings=128, rms_norm_eps=1e-6,
        tie_word_embeddings=True, use_sliding_window=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
    ),
    # gemma: MQA (1 kv head), head_dim 24, (1 + w) norms, sqrt(d) embedding scale, tied head.
    "gemma": dict(
        vocab_size=997, hidden_size=64, intermediate_size=176, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=1, head_dim=24, hidden_act="gelu_pytorch_tanh", max_position_embeddings=128,
        rms_norm_eps=1e-6, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    ),
    # gemma2: 4 layers alternating sliding/global, small softcaps so tanh really bends,
    # query_pre_attn_scalar != head_dim.
    "gemma2": dict(
        vocab_size=1000, hidden_size=64, intermediate_size=176, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=24, hidden_activation="gelu_pytorch_tanh", max_position_embeddings=128,
        rms_norm_eps=1e-6, tie_word_embeddings=True, query_pre_attn_scalar=40, sliding_window=4,
        attn_logit_softcapping=5.0, final_logit_softcapping=6.0,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    ),
    # gemma3_text: local/global layer mix (not strictly alternating), separate local rope base,
    # linear rope scaling on the global layers (as the 4B+ Gemma-3 checkpoints have), q/k norms.
    "gemma3_text": dict(
        vocab_size=1003, hidden_size=64, intermediate_size=176, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=24, hidden_activation="gelu_pytorch_tanh", max_position_embeddings=128,
        rms_norm_eps=1e-6, tie_word_embeddings=True, query_pre_attn_scalar=32, sliding_window=5,
        layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={
            "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1000000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
        },
    ),
    # phi3: fused qkv / gate_up, GQA, sliding window, partial rotary (as Phi-4-mini).
    "phi3": dict(
        vocab_size=997, hidden_size=64, intermediate_size=176, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, hidden_act="silu", max_position_embeddings=128, original_max_position_embeddings=128,
        rms_norm_eps=1e-5, sliding_window=5, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.75},
    ),
    # olmo2: no input norm (post-norms only), q/k norm over the whole projection.
    "olmo2": dict(
        vocab_size=1000, hidden_size=64, intermediate_size=176, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, hidden_act="silu", max_position_embeddings=128, rms_norm_eps=1e-6,
        tie_word_embeddings=False, attention_bias=False,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
    ),
}

# Llama variants with rope scaling, spelled the transformers-5 way (``rope_parameters``). Every variant
# is chosen so the scaling really changes the rotation angles at the test prompt lengths (< 20 tokens).
LLAMA_ROPE_VARIANTS: dict[str, dict] = {
    "llama3": dict(
        max_position_embeddings=128,
        rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
    ),
    "linear": dict(
        rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.5},
    ),
    # dynamic NTK only kicks in beyond max_position_embeddings: the long test prompt is longer than 12,
    # the short one is not (so the two rows of a padded batch need different frequencies).
    "dynamic": dict(
        max_position_embeddings=12,
        rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 3.0},
    ),
    "yarn": dict(
        max_position_embeddings=256,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                         "original_max_position_embeddings": 64, "beta_fast": 32.0, "beta_slow": 1.0},
    ),
}

# The llama rope variants are otherwise plain llama: no biases, GQA, head_dim 24.
_LLAMA_VARIANT_BASE = dict(attention_bias=False, mlp_bias=False)


def variant_arch(name: str) -> tuple[str, dict]:
    """``"llama-rope-yarn"`` -> ("llama", overrides); a plain arch name -> (name, {})."""
    if name in _BASE_CONFIGS:
        return name, {}
    if name.startswith("llama-rope-"):
        kind = name[len("llama-rope-"):]
        return "llama", {**_LLAMA_VARIANT_BASE, **copy.deepcopy(LLAMA_ROPE_VARIANTS[kind])}
    raise KeyError(name)


CASES = ARCHS + [f"llama-rope-{k}" for k in LLAMA_ROPE_VARIANTS]


def make_config(arch: str, **overrides):
    """A tiny transformers config for ``arch`` (an HF model_type or a ``llama-rope-*`` case name)."""
    from transformers import AutoConfig

    arch, extra = variant_arch(arch)
    kw = {**_COMMON_IDS, **copy.deepcopy(_BASE_CONFIGS[arch]), **extra, **overrides}
    cfg = AutoConfig.for_model(arch, **kw)
    cfg._attn_implementation = "eager"
    # sanity: what the factory promises
    assert cfg.vocab_size & (cfg.vocab_size - 1) != 0, "vocab must not be a power of two"
    return cfg


def sliding_window_of(cfg) -> int | None:
    """The sliding window HF really applies on at least one layer (None when no layer slides)."""
    sw = getattr(cfg, "sliding_window", None)
    if sw is None:
        return None
    lt = getattr(cfg, "layer_types", None)
    if lt is not None and "sliding_attention" not in lt:
        return None
    return int(sw)


# --------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------

FORMATS = ("safetensors", "sharded", "bin", "msgpack")


def _perturb_(model, arch: str, seed: int) -> None:
    """Overwrite every parameter with random values of a useful scale (nothing trivially 0 or 1)."""
    import torch

    gen = torch.Generator().manual_seed(seed + 12345)
    gemma = arch in GEMMA_ARCHS
    with torch.no_grad():
        for name, p in model.named_parameters():
            shape = p.shape
            leaf = name.rsplit(".", 1)[-1]
            is_embed = "embed" in name or name.endswith(("wte.weight", "wpe.weight")) or "embed_out" in name \
                or name.startswith("lm_head")
            if leaf == "bias":
                new = 0.1 * torch.randn(shape, generator=gen)
            elif p.ndim == 1:  # norm gains
                if gemma:
                    new = 0.3 * torch.randn(shape, generator=gen)  # used as (1 + w)
                else:
                    new = 1.0 + 0.3 * torch.randn(shape, generator=gen)
            elif is_embed:
                if name.endswith("wpe.weight"):
                    new = 0.3 * torch.randn(shape, generator=gen)
                elif gemma:  # scaled by sqrt(d) on input; also the (tied) head
                    new = 0.25 * torch.randn(shape, generator=gen)
                else:
                    new = 0.5 * torch.randn(shape, generator=gen)
            else:  # projections: std ~ 1.2 / sqrt(fan_in)
                fan_in = shape[0] if arch == "gpt2" else shape[1]  # gpt2 Conv1D stores [in, out]
                new = (1.2 / math.sqrt(fan_in)) * torch.randn(shape, generator=gen)
            p.copy_(new.to(p.dtype))


def _flax_tree_from_state_dict(model, state: dict) -> dict:
    """HF PyTorch -> Flax naming rules: nested dict by module path (layer index as a string key);
    2-D Linear / Conv1D ``weight`` -> ``kernel`` (transposed); Embedding ``weight`` -> ``embedding``;
    LayerNorm ``weight`` -> ``scale``; RMSNorm ``weight`` stays ``weight``; ``bias`` stays ``bias``."""
    import torch

    modules = dict(model.named_modules())
    tree: dict = {}
    for key, value in state.items():
        parts = key.split(".")
        mod = modules.get(".".join(parts[:-1]))
        leaf = parts[-1]
        arr = np.ascontiguousarray(np.asarray(value, dtype=np.float32))
        if leaf == "weight":
            if isinstance(mod, torch.nn.Embedding):
                leaf = "embedding"
            elif isinstance(mod, torch.nn.LayerNorm):
                leaf = "scale"
            elif arr.ndim == 2:
                leaf = "kernel"
                arr = np.ascontiguousarray(arr.T)
            # else: 1-D RMSNorm-style weight stays "weight"
        node = tree
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        assert leaf not in node, key
        node[leaf] = arr
    return tree


def _saved_state(out_dir: str) -> dict:
    from safetensors.numpy import load_file

    return load_file(os.path.join(out_dir, "model.safetensors"))


def build_checkpoint(arch: str, out_dir: str, *, seed: int = 0, fmt: str = "safetensors",
                     config_overrides: dict | None = None, tokenizer_bos: bool | None = None,
                     tokenizer_vocab: int = 512):
    """Build a randomly perturbed tiny ``arch`` model and save it (plus a tokenizer) into ``out_dir``.

    ``arch`` is an HF model_type from ARCHS or a ``llama-rope-<kind>`` case. ``fmt``: "safetensors"
    (single file), "sharded" (``model.safetensors.index.json`` + >= 2 shards), "bin"
    (``pytorch_model.bin``) or "msgpack" (HF Flax ``flax_model.msgpack``). ``tokenizer_bos`` defaults to
    the family's habit (BOS for llama / gemma*). Returns the torch model (eval, float32).
    """
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
    base_arch, _ = variant_arch(arch)
    if tokenizer_bos is None:
        tokenizer_bos = base_arch in BOS_ARCHS
    cfg = make_config(arch, **(config_overrides or {}))
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager", dtype=torch.float32)
    _perturb_(model, base_arch, seed)
    model.eval()
    os.makedirs(out_dir, exist_ok=True)

    if fmt == "sharded":
        total = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        model.save_pretrained(out_dir, max_shard_size=int(total * 0.55))
        index_path = os.path.join(out_dir, "model.safetensors.index.json")
        assert os.path.exists(index_path), os.listdir(out_dir)
        with open(index_path) as f:
            shards = set(json.load(f)["weight_map"].values())
        assert len(shards) >= 2, shards
    else:
        model.save_pretrained(out_dir)
        if fmt in ("bin", "msgpack"):
            state = _saved_state(out_dir)
            os.remove(os.path.join(out_dir, "model.safetensors"))
            if fmt == "bin":
                torch.save({k: torch.from_numpy(v.copy()) for k, v in state.items()},
                           os.path.join(out_dir, "pytorch_model.bin"))
            else:
                from flax.serialization import msgpack_serialize

                tree = _flax_tree_from_state_dict(model, state)
                with open(os.path.join(out_dir, "flax_model.msgpack"), "wb") as f:
                    f.write(msgpack_serialize(tree))
    make_tokenizer(out_dir, vocab_size=tokenizer_vocab, bos=tokenizer_bos)
    return model


def to_legacy_config(cfg: dict) -> dict:
    """Rewrite a transformers-5 ``config.json`` dict in the older (v4) spelling: top-level ``rope_theta`` +
    ``rope_scaling`` (Gemma-3: ``rope_local_base_freq``; GPT-NeoX: ``rotary_pct`` / ``rotary_emb_base``;
    Phi-3: top-level ``partial_rotary_factor``) and ``torch_dtype`` instead of ``dtype``."""
    cfg = copy.deepcopy(cfg)
    if "dtype" in cfg:
        cfg["torch_dtype"] = cfg.pop("dtype")
    rp = cfg.pop("rope_parameters", None)
    if rp is None:
        return cfg
    mt = cfg.get("model_type")
    if "full_attention" in rp or "sliding_attention" in rp:  # gemma3 style, per layer type
        full = dict(rp.get("full_attention", {}))
        local = dict(rp.get("sliding_attention", {}))
        cfg["rope_theta"] = full.pop("rope_theta")
        if "rope_theta" in local:
            cfg["rope_local_base_freq"] = local.pop("rope_theta")
        if full.get("rope_type", "default") != "default":
            cfg["rope_scaling"] = full
        return cfg
    rp = dict(rp)
    theta = rp.pop("rope_theta", None)
    partial = rp.pop("partial_rotary_factor", None)
    if mt == "gpt_neox":
        if theta is not None:
            cfg["rotary_emb_base"] = theta
        if partial is not None:
            cfg["rotary_pct"] = partial
    else:
        if theta is not None:
            cfg["rope_theta"] = theta
        if partial is not None:
            cfg["partial_rotary_factor"] = partial
    kind = rp.get("rope_type", "default")
    if kind != "default":
        if kind in ("linear", "dynamic"):  # the oldest spelling: {"type": ..., "factor": ...}
            rp["type"] = rp.pop("rope_type")
        cfg["rope_scaling"] = rp
    return cfg


# --------------------------------------------------------------------------------------------------
# PyTorch reference
# --------------------------------------------------------------------------------------------------

def _parts(model):
    """(decoder layers, per-layer input norms (None = identity), final norm, head module)."""
    base = model.base_model
    layers = None
    for attr in ("layers", "h"):
        if hasattr(base, attr):
            layers = list(getattr(base, attr))
            break
    if layers is None:
        raise ValueError(f"cannot find decoder layers of {type(model).__name__}")
    in_norms = []
    for layer in layers:
        norm = None
        for attr in ("input_layernorm", "ln_1"):
            if hasattr(layer, attr):
                norm = getattr(layer, attr)
                break
        in_norms.append(norm)
    final = None
    for attr in ("norm", "ln_f", "final_layer_norm"):
        if hasattr(base, attr):
            final = getattr(base, attr)
            break
    if final is None:
        raise ValueError(f"cannot find the final norm of {type(model).__name__}")
    head = model.get_output_embeddings()
    return layers, in_norms, final, head


def _reset_dynamic_rope(model) -> None:
    """HF's dynamic NTK rotary embedding keeps state between calls; reset it so every call behaves as a
    freshly loaded model would."""
    for m in model.modules():
        rt = getattr(m, "rope_type", None)
        if isinstance(rt, str) and "dynamic" in rt and hasattr(m, "original_inv_freq"):
            m.inv_freq = m.original_inv_freq.clone()
            m.max_seq_len_cached = m.original_max_seq_len


def _head_logits(model, head, x):
    import torch

    logits = head(x)
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    return logits


def torch_reference(model, input_ids, attention_mask=None) -> dict:
    """Run ``model`` in float32 and return numpy float32 arrays:

    - ``residuals`` [L+1, B, T, d]: raw stream entering each block, then the raw output of the last block
      (HF's own last hidden state is post-final-norm; the raw one is captured with a forward hook);
    - ``logits`` [B, T, V];
    - ``norm_lens_logits`` [L+1, B, T, V]: layer 0 through block 0's input norm, layer l in 1..L-1 through
      block l's input norm (identity where a block has none, e.g. OLMo-2), layer L through the final norm;
      then the model's head (incl. bias) and final logit softcap.
    """
    import torch

    layers, in_norms, final_norm, head = _parts(model)
    n = len(layers)
    ids = torch.as_tensor(np.asarray(input_ids), dtype=torch.long)
    if ids.ndim == 1:
        ids = ids[None]
    mask = None if attention_mask is None else torch.as_tensor(np.asarray(attention_mask), dtype=torch.long)
    if mask is not None and mask.ndim == 1:
        mask = mask[None]

    captured = {}

    def last_hook(_module, _args, output):
        captured["last"] = output[0] if isinstance(output, (tuple, list)) else output

    handle = layers[-1].register_forward_hook(last_hook)
    _reset_dynamic_rope(model)
    try:
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
    finally:
        handle.remove()
    hs = out.hidden_states
    assert len(hs) == n + 1, (len(hs), n)
    residuals = [h.float() for h in hs[:n]] + [captured["last"].float()]
    with torch.no_grad():
        lens = []
        for l, r in enumerate(residuals):
            norm = in_norms[l] if l < n else final_norm
            x = norm(r) if norm is not None else r
            lens.append(_head_logits(model, head, x).float())
        # self-check: the final-norm path reproduces the model's logits
        final_check = lens[-1]
    logits = out.logits.float()
    if not torch.allclose(final_check, logits, atol=1e-4 * max(1.0, float(logits.abs().max())), rtol=0):
        raise AssertionError("torch_reference: final norm + head does not reproduce the model's logits")
    return {
        "residuals": torch.stack(residuals).numpy().astype(np.float32),
        "logits": logits.numpy().astype(np.float32),
        "norm_lens_logits": torch.stack(lens).numpy().astype(np.float32),
    }


# --------------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------------

def log_softmax64(x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    m = x.max(axis=-1, keepdims=True)
    z = x - m
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def kl_bits(p_logits, q_logits) -> np.ndarray:
    """KL(P || Q) in bits over the last axis, P = softmax(p_logits), Q = softmax(q_logits), float64."""
    lp = log_softmax64(p_logits)
    lq = log_softmax64(q_logits)
    kl = (np.exp(lp) * (lp - lq)).sum(axis=-1) / math.log(2.0)
    return np.maximum(kl, 0.0)


def encode_prompts(tokenizer, lengths=(17, 9), prompts=PROMPTS):
    """Token id lists of the test prompts, truncated to ``lengths`` (with BOS if the tokenizer adds one)."""
    out = []
    for text, n in zip(prompts, lengths):
        ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
        if len(ids) < n:
            raise AssertionError(f"prompt {text!r} has only {len(ids)} tokens, need {n}")
        out.append(ids[:n])
    return out


def right_pad(seqs, pad_id: int = PAD_ID):
    """(input_ids [B, T] int32, attention_mask [B, T] int32), right-padded."""
    t = max(len(s) for s in seqs)
    ids = np.full((len(seqs), t), pad_id, dtype=np.int32)
    mask = np.zeros((len(seqs), t), dtype=np.int32)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = s
        mask[i, :len(s)] = 1
    return ids, mask
