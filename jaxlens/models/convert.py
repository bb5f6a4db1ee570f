"""Weight conversion as data: one table per family, HF tensor name -> jaxlens parameter path + transform.

A rule is ``(hf_pattern, [(our_path, ops), ...])``. ``{i}`` in a pattern is the layer index (the target is
then the i-th slice of a stacked ``blocks`` parameter). ``ops`` is a tuple of small, invertible steps:

* ``"T"``            transpose a matrix (torch Linear stores [out, in]; we store [in, out])
* ``"out:H"``        split the last axis into (H, head_dim)   (``"out:K"`` for kv heads)
* ``"in:H"``         split the first axis into (H, head_dim)
* ``("rows", a, b)`` / ``("cols", a, b)``  slice a fused tensor (sizes are expressions in d, H, K, hd, F)
* ``("neox", j)``    GPT-NeoX's per-head interleaved fused qkv: [.., H*3*hd] -> [.., H, 3, hd][.., j, :]

The same table drives loading (HF -> jaxlens) and export (jaxlens -> HF, unfused families only).
"""
from __future__ import annotations

import re

import numpy as np

from jaxlens.errors import JaxlensError
from jaxlens.models.spec import ArchSpec

_ATTN = [
    ("{p}layers.{i}.self_attn.q_proj.weight", [("blocks.wq", ("T", "out:H"))]),
    ("{p}layers.{i}.self_attn.k_proj.weight", [("blocks.wk", ("T", "out:K"))]),
    ("{p}layers.{i}.self_attn.v_proj.weight", [("blocks.wv", ("T", "out:K"))]),
    ("{p}layers.{i}.self_attn.o_proj.weight", [("blocks.wo", ("T", "in:H"))]),
    ("{p}layers.{i}.self_attn.q_proj.bias", [("blocks.bq", ("out:H",))]),
    ("{p}layers.{i}.self_attn.k_proj.bias", [("blocks.bk", ("out:K",))]),
    ("{p}layers.{i}.self_attn.v_proj.bias", [("blocks.bv", ("out:K",))]),
    ("{p}layers.{i}.self_attn.o_proj.bias", [("blocks.bo", ())]),
    ("{p}layers.{i}.self_attn.q_norm.weight", [("blocks.q_norm.scale", ())]),
    ("{p}layers.{i}.self_attn.k_norm.weight", [("blocks.k_norm.scale", ())]),
]
_GATED_MLP = [
    ("{p}layers.{i}.mlp.gate_proj.weight", [("blocks.w_gate", ("T",))]),
    ("{p}layers.{i}.mlp.up_proj.weight", [("blocks.w_up", ("T",))]),
    ("{p}layers.{i}.mlp.down_proj.weight", [("blocks.w_down", ("T",))]),
    ("{p}layers.{i}.mlp.gate_proj.bias", [("blocks.b_gate", ())]),
    ("{p}layers.{i}.mlp.up_proj.bias", [("blocks.b_up", ())]),
    ("{p}layers.{i}.mlp.down_proj.bias", [("blocks.b_down", ())]),
]
_EDGES = [
    ("{p}embed_tokens.weight", [("embed", ())]),
    ("{p}norm.weight", [("final_norm.scale", ())]),
    ("lm_head.weight", [("lm_head", ("T",))]),
]
_LLAMA = _ATTN + _GATED_MLP + _EDGES + [
    ("{p}layers.{i}.input_layernorm.weight", [("blocks.ln1.scale", ())]),
    ("{p}layers.{i}.post_attention_layernorm.weight", [("blocks.ln2.scale", ())]),
]
_SANDWICH = _ATTN + _GATED_MLP + _EDGES + [   # Gemma-2/3: pre and post norms around attention and MLP
    ("{p}layers.{i}.input_layernorm.weight", [("blocks.ln1.scale", ())]),
    ("{p}layers.{i}.post_attention_layernorm.weight", [("blocks.post_attn_norm.scale", ())]),
    ("{p}layers.{i}.pre_feedforward_layernorm.weight", [("blocks.ln2.scale", ())]),
    ("{p}layers.{i}.post_feedforward_layernorm.weight", [("blocks.post_mlp_norm.scale", ())]),
]
_OLMO2 = _ATTN + _GATED_MLP + _EDGES + [      # OLMo-2: norms after attention / MLP only
    ("{p}layers.{i}.post_attention_layernorm.weight", [("blocks.post_attn_norm.scale", ())]),
    ("{p}layers.{i}.post_feedforward_layernorm.weight", [("blocks.post_mlp_norm.scale", ())]),
]
_PHI3 = [r for r in _LLAMA if ".q_proj." not in r[0] and ".k_proj." not in r[0] and ".v_proj." not in r[0]
         and "gate_proj" not in r[0] and "up_proj" not in r[0]] + [
    ("{p}layers.{i}.self_attn.qkv_proj.weight", [
        ("blocks.wq", (("rows", "0", "H*hd"), "T", "out:H")),
        ("blocks.wk", (("rows", "H*hd", "(H+K)*hd"), "T", "out:K")),
        ("blocks.wv", (("rows", "(H+K)*hd", "(H+2*K)*hd"), "T", "out:K"))]),
    ("{p}layers.{i}.mlp.gate_up_proj.weight", [
        ("blocks.w_gate", (("rows", "0", "F"), "T")),
        ("blocks.w_up", (("rows", "F", "2*F"), "T"))]),
]
_GPT2 = [
    ("{p}wte.weight", [("embed", ())]),
    ("{p}wpe.weight", [("pos_embed", ())]),
    ("{p}h.{i}.ln_1.weight", [("blocks.ln1.scale", ())]),
    ("{p}h.{i}.ln_1.bias", [("blocks.ln1.bias", ())]),
    ("{p}h.{i}.ln_2.weight", [("blocks.ln2.scale", ())]),
    ("{p}h.{i}.ln_2.bias", [("blocks.ln2.bias", ())]),
    ("{p}h.{i}.attn.c_attn.weight", [          # Conv1D: stored [in, out]
        ("blocks.wq", (("cols", "0", "d"), "out:H")),
        ("blocks.wk", (("cols", "d", "2*d"), "out:H")),
        ("blocks.wv", (("cols", "2*d", "3*d"), "out:H"))]),
    ("{p}h.{i}.attn.c_attn.bias", [
        ("blocks.bq", (("rows", "0", "d"), "out:H")),
        ("blocks.bk", (("rows", "d", "2*d"), "out:H")),
        ("blocks.bv", (("rows", "2*d", "3*d"), "out:H"))]),
    ("{p}h.{i}.attn.c_proj.weight", [("blocks.wo", ("in:H",))]),
    ("{p}h.{i}.attn.c_proj.bias", [("blocks.bo", ())]),
    ("{p}h.{i}.mlp.c_fc.weight", [("blocks.w_up", ())]),
    ("{p}h.{i}.mlp.c_fc.bias", [("blocks.b_up", ())]),
    ("{p}h.{i}.mlp.c_proj.weight", [("blocks.w_down", ())]),
    ("{p}h.{i}.mlp.c_proj.bias", [("blocks.b_down", ())]),
    ("{p}ln_f.weight", [("final_norm.scale", ())]),
    ("{p}ln_f.bias", [("final_norm.bias", ())]),
    ("lm_head.weight", [("lm_head", ("T",))]),
]
_NEOX = [
    ("{p}embed_in.weight", [("embed", ())]),
    ("embed_out.weight", [("lm_head", ("T",))]),
    ("{p}layers.{i}.input_layernorm.weight", [("blocks.ln1.scale", ())]),
    ("{p}layers.{i}.input_layernorm.bias", [("blocks.ln1.bias", ())]),
    ("{p}layers.{i}.post_attention_layernorm.weight", [("blocks.ln2.scale", ())]),
    ("{p}layers.{i}.post_attention_layernorm.bias", [("blocks.ln2.bias", ())]),
    ("{p}layers.{i}.attention.query_key_value.weight", [
        ("blocks.wq", ("T", ("neox", 0))), ("blocks.wk", ("T", ("neox", 1))), ("blocks.wv", ("T", ("neox", 2)))]),
    ("{p}layers.{i}.attention.query_key_value.bias", [
        ("blocks.bq", (("neox", 0),)), ("blocks.bk", (("neox", 1),)), ("blocks.bv", (("neox", 2),))]),
    ("{p}layers.{i}.attention.dense.weight", [("blocks.wo", ("T", "in:H"))]),
    ("{p}layers.{i}.attention.dense.bias", [("blocks.bo", ())]),
    ("{p}layers.{i}.mlp.dense_h_to_4h.weight", [("blocks.w_up", ("T",))]),
    ("{p}layers.{i}.mlp.dense_h_to_4h.bias", [("blocks.b_up", ())]),
    ("{p}layers.{i}.mlp.dense_4h_to_h.weight", [("blocks.w_down", ("T",))]),
    ("{p}layers.{i}.mlp.dense_4h_to_h.bias", [("blocks.b_down", ())]),
    ("{p}final_layer_norm.weight", [("final_norm.scale", ())]),
    ("{p}final_layer_norm.bias", [("final_norm.bias", ())]),
]

TABLES = {
    "llama": ("model.", _LLAMA), "mistral": ("model.", _LLAMA), "qwen2": ("model.", _LLAMA),
    "qwen3": ("model.", _LLAMA), "gemma": ("model.", _LLAMA), "gemma2": ("model.", _SANDWICH),
    "gemma3_text": ("model.", _SANDWICH), "olmo2": ("model.", _OLMO2), "phi3": ("model.", _PHI3),
    "gpt2": ("transformer.", _GPT2), "gpt_neox": ("gpt_neox.", _NEOX),
}

# Buffers some checkpoints carry that are not parameters.
_IGNORED = re.compile(r"(.*rotary_emb\.inv_freq|.*attn\.masked_bias|.*attn\.bias|.*attention\.bias|"
                      r".*attention\.masked_bias)$")


def _compile(spec: ArchSpec):
    """[(regex, [(path, ops)], is_layer)] for a family; the prefix ("model.") is optional."""
    prefix, rules = TABLES[spec.arch]
    out = []
    for pat, targets in rules:
        is_layer = "{i}" in pat
        rx = re.escape(pat).replace(re.escape("{p}"), f"(?:{re.escape(prefix)})?").replace(
            re.escape("{i}"), r"(\d+)")
        out.append((re.compile("^" + rx + "$"), targets, is_layer, pat))
    return out


def _sizes(spec: ArchSpec) -> dict:
    return dict(d=spec.d_model, H=spec.n_heads, K=spec.n_kv_heads, hd=spec.head_dim, F=spec.d_ff)


def apply_ops(x: np.ndarray, ops, spec: ArchSpec) -> np.ndarray:
    sz = _sizes(spec)
    for op in ops:
        if op == "T":
            x = x.T
        elif isinstance(op, str) and op.startswith("out:"):
            x = x.reshape(x.shape[:-1] + (sz[op[4:]], spec.head_dim))
        elif isinstance(op, str) and op.startswith("in:"):
            x = x.reshape((sz[op[3:]], spec.head_dim) + x.shape[1:])
        elif op[0] == "rows":
            x = x[eval(op[1], {}, sz):eval(op[2], {}, sz)]  # noqa: S307 - table-internal size expressions
        elif op[0] == "cols":
            x = x[:, eval(op[1], {}, sz):eval(op[2], {}, sz)]  # noqa: S307
        elif op[0] == "neox":
            x = x.reshape(x.shape[:-1] + (spec.n_heads, 3, spec.head_dim))[..., op[1], :]
        else:  # pragma: no cover
            raise ValueError(op)
    return x


def invert_ops(y: np.ndarray, ops, spec: ArchSpec) -> np.ndarray:
    """Inverse of :func:`apply_ops` for unfused rules (export)."""
    for op in reversed(ops):
        if op == "T":
            y = y.T
        elif isinstance(op, str) and op.startswith("out:"):
            y = y.reshape(y.shape[:-2] + (-1,))
        elif isinstance(op, str) and op.startswith("in:"):
            y = y.reshape((-1,) + y.shape[2:])
        else:
            raise JaxlensError(f"export of fused tensors ({op[0]}) is not supported for "
                               f"{getattr(spec, 'arch', 'this architecture')}")
    return y


def plan(spec: ArchSpec, hf_shapes: dict[str, tuple], expected: dict[str, tuple]) -> dict:
    """Match checkpoint tensor names to parameters; check every shape; raise once listing all problems.

    ``expected`` maps our dotted param path -> full shape (with the leading L axis for blocks).
    Returns {our_path: [(layer or None, hf_key, ops), ...]} covering every expected parameter.
    """
    rules = _compile(spec)
    assign: dict[str, list] = {k: [] for k in expected}
    problems: list[str] = []
    seen: dict[tuple, str] = {}
    bad_shape: set[tuple] = set()
    for key, shape in hf_shapes.items():
        for rx, targets, is_layer, _ in rules:
            m = rx.match(key)
            if not m:
                continue
            layer = int(m.group(1)) if is_layer else None
            for path, ops in targets:
                if path == "lm_head" and spec.tie_embeddings:
                    break  # a redundant copy of the tied embedding
                if path not in expected:
                    problems.append(f"unexpected tensor {key} (this {spec.arch} config has no {path})")
                    break
                if layer is not None and layer >= spec.n_layers:
                    problems.append(f"unexpected tensor {key} (config has {spec.n_layers} layers)")
                    break
                want = expected[path][1:] if layer is not None else expected[path]
                try:
                    got = apply_ops(np.empty(shape, np.uint8), ops, spec).shape
                except (ValueError, IndexError):
                    got = None
                if got != tuple(want):
                    problems.append(f"tensor {key} has shape {tuple(shape)}, expected one that maps to "
                                    f"{path} {tuple(want)}")
                    bad_shape.add((path, layer))
                    continue
                if (path, layer) in seen:
                    problems.append(f"tensors {seen[(path, layer)]} and {key} both map to {path}")
                seen[(path, layer)] = key
                assign[path].append((layer, key, ops))
            break
        else:
            if not _IGNORED.match(key):
                problems.append(f"unexpected tensor {key}")
    for path, items in assign.items():
        layers = {lay for lay, _, _ in items}
        layers |= {lay for p, lay in bad_shape if p == path}
        if path.startswith("blocks."):
            missing = [i for i in range(spec.n_layers) if i not in layers]
            if missing:
                names = _hf_names_for(spec, path, missing[:3])
                more = f" (and {len(missing) - 3} more layers)" if len(missing) > 3 else ""
                problems.append(f"missing tensor {names}{more}")
        elif not items and (path, None) not in bad_shape:
            problems.append(f"missing tensor {_hf_names_for(spec, path, [None])}")
    if problems:
        head = problems[:12]
        more = f"; and {len(problems) - 12} more" if len(problems) > 12 else ""
        raise JaxlensError("checkpoint does not match the config: " + "; ".join(head) + more)
    return assign


def _hf_names_for(spec: ArchSpec, path: str, layers) -> str:
    prefix, rules = TABLES[spec.arch]
    for pat, targets in rules:
        if any(p == path for p, _ in targets):
            names = [pat.replace("{p}", prefix).replace("{i}", str(i)) for i in layers]
            return ", ".join(names)
    return path


def export_state_dict(spec: ArchSpec, params: dict) -> dict[str, np.ndarray]:
    """jaxlens params -> HF state dict (numpy), for families whose tensors are not fused."""
    prefix, rules = TABLES[spec.arch]
    flat = flatten(params)
    out: dict[str, np.ndarray] = {}
    for pat, targets in rules:
        if len(targets) != 1:
            raise JaxlensError(f"export is not supported for {spec.arch} (fused tensors)")
        path, ops = targets[0]
        if path not in flat or (path == "lm_head" and spec.tie_embeddings):
            continue
        arr = np.asarray(flat[path])
        name = pat.replace("{p}", prefix)
        if "{i}" in pat:
            for i in range(spec.n_layers):
                out[name.replace("{i}", str(i))] = np.ascontiguousarray(invert_ops(arr[i], ops, spec))
        else:
            out[name] = np.ascontiguousarray(invert_ops(arr, ops, spec))
    return out


def flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def unflatten(flat: dict) -> dict:
    out: dict = {}
    for k, v in flat.items():
        node = out
        parts = k.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = v
    return out
