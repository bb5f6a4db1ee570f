"""Tuned lenses: translator parameterisations, the ``lens_stats`` lens interface, and three on-disk formats.

Two translator families (both identity-initialised, both plug into :func:`jaxlens.lens_stats`):

* :class:`FullRankLens` -- the tuned-lens package's (AlignmentResearch/tuned-lens) lens. Translator k acts
  on the **raw** residual of jaxlens layer k (k = 0..n-1; 0 = embeddings) and the model's *final norm* and
  head follow: ``logits = head(final_norm(h + h @ W_k + b_k))``. Layer n has no translator (it is the
  model's own output). ``W_k`` is stored here in row-vector orientation ``[in, out]``; the package stores
  the torch ``nn.Linear`` weight ``[out, in] = W_k.T``. Because it ends with the final norm, the lens needs
  the model's final-norm parameters: the jaxlens format stores a copy; a lens read from the tuned-lens
  format (which stores none) must be bound with ``load_lens(path, model=model)`` or ``lens.bind(model)``.
* :class:`LowRankLens` -- the reference probe's lens (spec/probe.md §3.1). Translator i acts on the
  **normalised** residual of jaxlens layer l = i + 1 (the norm lens's normaliser, spec §1.5):
  ``x + (x U_i) V_i^T + c_i``, logits divided by ``tau_i = softplus(theta_i) + 0.001``; the last
  translator (l = n) is a frozen identity with tau = 1, and layer 0 has none (the norm lens is used).

Layer conventions (jaxlens layer l: 0 = embeddings, l = output of block l-1, n = last block output):

==================  ==========================  ===========================================
format              translator index            jaxlens layer
==================  ==========================  ===========================================
tuned-lens package  k = 0..n-1                  l = k          (l = n: model output, no lens)
reference probe     i = 0..n-1 (n-1 frozen id)  l = i + 1      (l = 0: no lens)
jaxlens             same as the family's        stored in ``lens_card.json["layer_convention"]``
==================  ==========================  ===========================================

Formats read by :func:`load_lens` (detected from the files present):

* jaxlens:     ``lens_card.json`` + ``lens.safetensors`` (fp32 arrays; see :func:`save_lens`)
* tuned-lens:  ``config.json`` + ``params.pt`` (``{k}.weight`` [d, d] torch [out, in], ``{k}.bias`` [d])
* reference:   ``weights.pt`` (``layers.{i}.U|V|c``, optional ``log_tau``, ``_precond_*`` buffers) +
  ``provenance.json`` (``translator.{num_layers, d_model, rank, final_identity}``), optional ``precond.pt``

``.pt`` files need PyTorch (``pip install "jaxlens[torch]"``).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxlens.models.decoder import apply_norm
from jaxlens.errors import JaxlensError

F32 = jnp.float32
TEMPERATURE_EPS = 1e-3
#: theta such that softplus(theta) + 0.001 == 1.0 (the reference's temperature init)
THETA_INIT = math.log(math.expm1(1.0 - TEMPERATURE_EPS))

JAXLENS_FORMAT = "jaxlens-tuned-lens"
FORMAT_VERSION = 1
CARD_FILE = "lens_card.json"
ARRAYS_FILE = "lens.safetensors"
#: tuned lenses jaxlens ships for the packaged real models (jaxlens.models.packaged), one folder per alias
PACKAGED_LENSES_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "packaged")

LAYER_CONVENTIONS = {
    "tuned-lens": {
        "jaxlens_layers": "0 = embeddings (stream entering block 0), l = output of block l-1, n = last block",
        "translator_index_to_layer": "translator k decodes jaxlens layer l = k, k = 0..n-1",
        "input": "raw residual; the model's final norm and head follow the translator",
        "layer_n": "no translator: the model's own logits",
        "tuned_lens_package": "identical indices (package layer k = hidden_states[k])",
    },
    "reference": {
        "jaxlens_layers": "0 = embeddings (stream entering block 0), l = output of block l-1, n = last block",
        "translator_index_to_layer": "translator i decodes jaxlens layer l = i + 1, i = 0..n-1",
        "input": "normalised residual (norm lens: block l's input norm, the final norm at l = n)",
        "layer_0": "no translator: the norm lens",
        "layer_n": "translator n-1 is a frozen identity with temperature 1 (the model's own logits)",
    },
}


def reference_rank(d_model: int) -> int:
    """The reference's rank rule (spec/probe.md §3.1): clip(d/32, 64, 256), 256 for d >= 4096."""
    if d_model >= 4096:
        return 256
    return int(max(64, min(max(1, d_model // 32), 256)))


class NormSpec(NamedTuple):
    """The fields of :class:`jaxlens.models.spec.ArchSpec` that :func:`jaxlens.models.decoder.apply_norm` reads."""

    norm: str
    norm_eps: float
    norm_offset: float
    norm_scale_in_fp32: bool

    @classmethod
    def of(cls, spec) -> "NormSpec":
        return cls(str(spec.norm), float(spec.norm_eps), float(spec.norm_offset), bool(spec.norm_scale_in_fp32))


# --------------------------------------------------------------------------------------------------
# Pure translator functions (used by the lens objects and by the trainer)


def _bcast(x, ndim):
    """[R, d] -> [R, 1, ..., 1, d] for rows of rank ``ndim``."""
    return x.reshape((x.shape[0],) + (1,) * (ndim - 2) + (x.shape[-1],))


def fullrank_translate(W, b, h, idx, valid, precision=None):
    """h + h @ W[idx] + b[idx] where ``valid`` (per row), else h. h [R, ..., d] (fp32 math), idx/valid [R]."""
    hf = h.astype(F32)
    Wl = jnp.take(W, idx, axis=0).astype(F32)                                   # [R, d, d]
    bl = jnp.take(b, idx, axis=0).astype(F32)                                   # [R, d]
    delta = jnp.einsum("r...d,rde->r...e", hf, Wl, precision=precision) + _bcast(bl, h.ndim)
    keep = jnp.asarray(valid).reshape((-1,) + (1,) * (h.ndim - 1))
    return hf + jnp.where(keep, delta, 0.0)


def lowrank_translate(U, V, c, h, idx, valid, precond=None, precision=None):
    """x + (x U[idx]) V[idx]^T + c[idx] where ``valid``, else x; optionally in a preconditioned basis.

    ``precond``: None or dict(mean [d], inv_scale [d], rotation [d, d] or None): the translator acts on
    pre(x) = ((x - mean) * inv_scale) @ rotation^T and the result is mapped back with
    post(y) = (y @ rotation) / inv_scale + mean (0 where inv_scale == 0), as the reference does.
    """
    x = h.astype(F32)
    z = x
    if precond is not None:
        z = (x - precond["mean"]) * precond["inv_scale"]
        if precond.get("rotation") is not None:
            z = jnp.einsum("...d,ed->...e", z, precond["rotation"], precision=precision)
    Ul = jnp.take(U, idx, axis=0).astype(F32)                                   # [R, d, k]
    Vl = jnp.take(V, idx, axis=0).astype(F32)
    cl = jnp.take(c, idx, axis=0).astype(F32)
    low = jnp.einsum("r...d,rdk->r...k", z, Ul, precision=precision)
    y = z + jnp.einsum("r...k,rek->r...e", low, Vl, precision=precision) + _bcast(cl, h.ndim)
    if precond is not None:
        if precond.get("rotation") is not None:
            y = jnp.einsum("...e,ed->...d", y, precond["rotation"], precision=precision)
        inv = precond["inv_scale"]
        scale = jnp.where(inv == 0, 0.0, 1.0 / jnp.where(inv == 0, 1.0, inv))
        y = y * scale + precond["mean"]
    keep = jnp.asarray(valid).reshape((-1,) + (1,) * (h.ndim - 1))
    return jnp.where(keep, y, x)


def softplus_temperature(theta):
    return jax.nn.softplus(theta.astype(F32)) + TEMPERATURE_EPS


# --------------------------------------------------------------------------------------------------
# Lens objects (duck-typed lens interface of jaxlens.lens: base, translate(rows, layers), temperatures)


@dataclasses.dataclass
class FullRankLens:
    """The tuned-lens package's translators: ``final_norm(h + h @ W_k + b_k)`` at jaxlens layer k < n.

    ``W`` [n, d, d] row-vector orientation (torch weight = ``W[k].T``), ``b`` [n, d]. ``norm_spec`` /
    ``norm_params`` are the model's final norm (None until bound, see :meth:`bind`).
    """

    W: Any
    b: Any
    norm_spec: NormSpec | None = None
    norm_params: dict | None = None
    card: dict = dataclasses.field(default_factory=dict)
    base: str = "raw"
    name: str = "tuned"
    family: str = "tuned-lens"

    @property
    def n_layers(self) -> int:
        return int(self.W.shape[0])

    @property
    def d_model(self) -> int:
        return int(self.W.shape[-1])

    @property
    def bound(self) -> bool:
        return self.norm_params is not None and self.norm_spec is not None

    def bind(self, model) -> "FullRankLens":
        """A copy using ``model``'s final norm (checks the layer count and width)."""
        _check_model(self, model)
        fn = jax.tree.map(lambda a: jnp.asarray(a, F32), dict(model.params["final_norm"]))
        return dataclasses.replace(self, norm_spec=NormSpec.of(model.spec), norm_params=fn)

    def translate(self, rows: jax.Array, layers) -> jax.Array:
        if not self.bound:
            raise JaxlensError("this tuned-lens-format lens stores no final norm: load it with "
                               "jaxlens.load_lens(path, model=model) or call lens.bind(model) first")
        layers = np.asarray(layers, np.int64).reshape(-1)
        n = self.n_layers
        if layers.size and layers.max() > n:
            raise JaxlensError(f"the lens has {n} translators (a model with {n} layers); got layer {layers.max()}")
        valid = layers < n
        idx = np.minimum(layers, n - 1)
        y = fullrank_translate(self.W, self.b, rows, idx, valid)
        return apply_norm(self.norm_spec, self.norm_params, y).astype(rows.dtype)

    def temperatures(self, layers):
        return None

    def arrays(self) -> dict:
        out = {"W": self.W, "b": self.b}
        if self.norm_params is not None:
            out.update({f"final_norm.{k}": v for k, v in self.norm_params.items()})
        return out


@dataclasses.dataclass
class LowRankLens:
    """The reference probe's translators on the normalised residual, with per-layer temperatures.

    Trainable translators i = 0..n-2 (jaxlens layers 1..n-1): ``U``/``V`` [n-1, d, k], ``c`` [n-1, d],
    ``theta`` [n-1] (tau = softplus(theta) + 0.001) or None (no temperature). The frozen identity for
    layer n and the absent translator at layer 0 are implicit. ``precond``: optional dict
    (mean, inv_scale, rotation) of the reference's Prism preconditioner.
    """

    U: Any
    V: Any
    c: Any
    theta: Any = None
    n_layers: int = 0
    precond: dict | None = None
    card: dict = dataclasses.field(default_factory=dict)
    base: str = "norm"
    name: str = "tuned"
    family: str = "reference"

    def __post_init__(self):
        if not self.n_layers:
            self.n_layers = int(self.U.shape[0]) + 1

    @property
    def base_layer0(self) -> str:
        """Layer 0 has no translator and is always the norm lens (the family's convention), whatever ``base``
        the translators of layers 1..n-1 sit on."""
        return "norm"

    @property
    def d_model(self) -> int:
        return int(self.U.shape[1])

    @property
    def rank(self) -> int:
        return int(self.U.shape[2])

    def bind(self, model) -> "LowRankLens":
        _check_model(self, model)
        return self

    def _index(self, layers):
        layers = np.asarray(layers, np.int64).reshape(-1)
        n = self.n_layers
        if layers.size and layers.max() > n:
            raise JaxlensError(f"the lens has {n} translators (a model with {n} layers); got layer {layers.max()}")
        nt = int(self.U.shape[0])
        valid = (layers >= 1) & (layers <= nt)
        return np.clip(layers - 1, 0, max(nt - 1, 0)), valid

    def translate(self, rows: jax.Array, layers) -> jax.Array:
        idx, valid = self._index(layers)
        if int(self.U.shape[0]) == 0:
            return rows
        return lowrank_translate(self.U, self.V, self.c, rows, idx, valid, self.precond).astype(rows.dtype)

    def temperatures(self, layers):
        if self.theta is None:
            return None
        idx, valid = self._index(layers)
        if int(self.U.shape[0]) == 0:
            return jnp.ones(len(idx), F32)
        tau = softplus_temperature(jnp.take(jnp.asarray(self.theta), idx))
        return jnp.where(jnp.asarray(valid), tau, 1.0)

    def temperature_table(self) -> np.ndarray:
        """tau for translators 0..n-1 (the last is 1.0), as the reference's provenance lists them."""
        t = np.ones(self.n_layers, np.float32)
        if self.theta is not None and self.U.shape[0]:
            t[: self.U.shape[0]] = np.asarray(softplus_temperature(jnp.asarray(self.theta)))
        return t

    def arrays(self) -> dict:
        out = {"U": self.U, "V": self.V, "c": self.c}
        if self.theta is not None:
            out["theta"] = self.theta
        if self.precond is not None:
            out.update({f"precond.{k}": v for k, v in self.precond.items() if v is not None})
        return out


def _check_model(lens, model) -> None:
    n, d = model.spec.n_layers, model.spec.d_model
    if lens.n_layers != n or lens.d_model != d:
        raise JaxlensError(f"the lens was made for {lens.n_layers} layers of width {lens.d_model}, but the model "
                           f"has {n} layers of width {d}")


# --------------------------------------------------------------------------------------------------
# Loading


def load_lens(path: str, model=None):
    """Read a trained tuned lens: jaxlens's format, the tuned-lens package's or the reference probe's.

    ``model``: optional; binds the lens to the model (checks its shape; a tuned-lens-format lens needs
    it, or a later ``lens.bind(model)``, because that format stores no final norm).
    """
    path = os.path.expanduser(str(path))
    if not os.path.isdir(path):
        raise JaxlensError(f"lens directory {path} does not exist")
    has = lambda f: os.path.exists(os.path.join(path, f))  # noqa: E731
    if has(CARD_FILE) and has(ARRAYS_FILE):
        lens = _load_jaxlens(path)
    elif has("params.pt") and has("config.json"):
        lens = _load_tuned_lens_package(path)
    elif has("weights.pt") and has("provenance.json"):
        lens = _load_reference(path)
    else:
        raise JaxlensError(f"{path} holds no tuned lens: expected {CARD_FILE} + {ARRAYS_FILE} (jaxlens), "
                           "config.json + params.pt (tuned-lens) or weights.pt + provenance.json (reference)")
    return lens.bind(model) if model is not None else lens


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except json.JSONDecodeError as e:
        raise JaxlensError(f"{path} is not valid JSON (line {e.lineno}: {e.msg})")
    if not isinstance(obj, dict):
        raise JaxlensError(f"{path} must hold a JSON object")
    return obj


def _torch_load(path: str) -> dict:
    try:
        import torch
    except ImportError:
        raise JaxlensError(f"reading {os.path.basename(path)} needs PyTorch: pip install 'jaxlens[torch]'")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any torch failure means the file is unusable
        msg = str(e).splitlines()[0] if str(e) else e.__class__.__name__
        raise JaxlensError(f"{path} could not be read by torch.load: {msg}")
    if not isinstance(obj, dict):
        raise JaxlensError(f"{path} must hold a state dict (a dict of tensors); got {type(obj).__name__}")
    out = {}
    for k, v in obj.items():
        if v is None:
            out[k] = None
        elif hasattr(v, "detach"):
            out[k] = v.detach().to(torch.float32).cpu().numpy()
        else:
            raise JaxlensError(f"{path}: entry {k!r} is not a tensor")
    return out


def _load_jaxlens(path: str):
    from safetensors.numpy import load_file

    card = _read_json(os.path.join(path, CARD_FILE))
    if card.get("format") != JAXLENS_FORMAT:
        raise JaxlensError(f"{os.path.join(path, CARD_FILE)}: format must be {JAXLENS_FORMAT!r}")
    if int(card.get("format_version", 0)) > FORMAT_VERSION:
        raise JaxlensError(f"{os.path.join(path, CARD_FILE)}: format_version {card.get('format_version')} is newer "
                           f"than this jaxlens reads ({FORMAT_VERSION})")
    try:
        arr = load_file(os.path.join(path, ARRAYS_FILE))
    except Exception as e:  # noqa: BLE001
        raise JaxlensError(f"{os.path.join(path, ARRAYS_FILE)} is not a readable safetensors file "
                           f"({e.__class__.__name__})")
    family = card.get("family")
    try:
        if family == "tuned-lens":
            norm = None
            params = {k.split(".", 1)[1]: jnp.asarray(v) for k, v in arr.items() if k.startswith("final_norm.")}
            if card.get("final_norm") and params:
                fn = card["final_norm"]
                norm = NormSpec(fn["norm"], float(fn["eps"]), float(fn["offset"]), bool(fn["scale_in_fp32"]))
            lens = FullRankLens(jnp.asarray(arr["W"]), jnp.asarray(arr["b"]), norm, params or None, card=card)
            _check_fullrank_shapes(lens, path)
            return lens
        if family == "reference":
            pre = {k.split(".", 1)[1]: jnp.asarray(v) for k, v in arr.items() if k.startswith("precond.")}
            if pre:
                pre.setdefault("rotation", None)
            lens = LowRankLens(jnp.asarray(arr["U"]), jnp.asarray(arr["V"]), jnp.asarray(arr["c"]),
                               jnp.asarray(arr["theta"]) if "theta" in arr else None,
                               n_layers=int(card["n_layers"]), precond=pre or None, card=card,
                               base=str(card.get("base", "norm")))
            if lens.base not in ("norm", "logit"):
                raise JaxlensError(f"{os.path.join(path, CARD_FILE)}: translator base {lens.base!r} is not supported")
            return lens
    except KeyError as e:
        raise JaxlensError(f"{path}: the lens lacks {e.args[0]!r}")
    raise JaxlensError(f"{os.path.join(path, CARD_FILE)}: unknown translator family {family!r}")


def _check_fullrank_shapes(lens: FullRankLens, path: str) -> None:
    W, b = lens.W, lens.b
    if W.ndim != 3 or W.shape[1] != W.shape[2] or b.shape != (W.shape[0], W.shape[1]):
        raise JaxlensError(f"{path}: translator weights must be [n, d, d] and biases [n, d]; got "
                           f"{tuple(W.shape)} and {tuple(b.shape)}")


def _load_tuned_lens_package(path: str) -> FullRankLens:
    cfg = _read_json(os.path.join(path, "config.json"))
    sd = _torch_load(os.path.join(path, "params.pt"))
    if any(k.startswith(("input_translator", "layer_translators.", "unembedding")) for k in sd):
        raise JaxlensError(f"{path}/params.pt is in the legacy (tuned-lens <= 0.0.5) layout, which jaxlens does "
                           "not read; convert it with the tuned-lens package's migration script first")
    lens_type = cfg.get("lens_type", "linear_tuned_lens")
    if lens_type != "linear_tuned_lens":
        raise JaxlensError(f"{path}/config.json: lens_type {lens_type!r} is not supported (only linear_tuned_lens)")
    for key in ("d_model", "num_hidden_layers"):
        if key not in cfg:
            raise JaxlensError(f"{path}/config.json lacks {key!r}")
    n, d = int(cfg["num_hidden_layers"]), int(cfg["d_model"])
    expected = {f"{k}.{p}" for k in range(n) for p in ("weight", "bias")}
    if not cfg.get("bias", True):
        expected = {f"{k}.weight" for k in range(n)}
    missing, extra = sorted(expected - set(sd)), sorted(set(sd) - expected)
    if missing or extra:
        raise JaxlensError(f"{path}/params.pt does not match config.json ({n} translators): "
                           f"missing {missing[:4]}, unexpected {extra[:4]}")
    W = np.zeros((n, d, d), np.float32)
    b = np.zeros((n, d), np.float32)
    for k in range(n):
        w = sd[f"{k}.weight"]
        if w.shape != (d, d):
            raise JaxlensError(f"{path}/params.pt: {k}.weight has shape {w.shape}, expected ({d}, {d})")
        W[k] = w.T                                              # torch Linear [out, in] -> h @ W
        if f"{k}.bias" in sd:
            if sd[f"{k}.bias"].shape != (d,):
                raise JaxlensError(f"{path}/params.pt: {k}.bias has shape {sd[f'{k}.bias'].shape}, expected ({d},)")
            b[k] = sd[f"{k}.bias"]
    card = {"format": "tuned-lens", "source": path, "family": "tuned-lens",
            "model": {"id": cfg.get("base_model_name_or_path"), "revision": cfg.get("base_model_revision")},
            "layer_convention": LAYER_CONVENTIONS["tuned-lens"], "tuned_lens_config": cfg}
    return FullRankLens(jnp.asarray(W), jnp.asarray(b), card=card)


_REF_PRECOND_KEYS = {"_precond_mean": "mean", "_precond_inv_scale": "inv_scale", "_precond_rotation": "rotation"}


def _load_reference(path: str) -> LowRankLens:
    prov = _read_json(os.path.join(path, "provenance.json"))
    meta = prov.get("translator")
    if not isinstance(meta, dict):
        raise JaxlensError(f"{path}/provenance.json lacks the 'translator' block")
    missing = sorted({"num_layers", "d_model", "rank", "final_identity"} - set(meta))
    if missing:
        raise JaxlensError(f"{path}/provenance.json: translator lacks {missing}")
    n, d, k = int(meta["num_layers"]), int(meta["d_model"]), int(meta["rank"])
    final_identity = bool(meta["final_identity"])
    sd = _torch_load(os.path.join(path, "weights.pt"))
    nt = n - 1 if final_identity else n
    if not final_identity:
        raise JaxlensError(f"{path}: a reference lens without a frozen final identity is not supported")
    expected = {f"layers.{i}.{p}" for i in range(nt) for p in ("U", "V", "c")} | {f"layers.{n - 1}.c"}
    optional = {"log_tau"} | set(_REF_PRECOND_KEYS)
    missing = sorted(expected - set(sd))
    extra = sorted(set(sd) - expected - optional)
    if missing or extra:
        raise JaxlensError(f"{path}/weights.pt does not match provenance.json ({n} translators, rank {k}): "
                           f"missing {missing[:4]}, unexpected {extra[:4]}")
    U = np.zeros((nt, d, k), np.float32)
    V = np.zeros((nt, d, k), np.float32)
    c = np.zeros((nt, d), np.float32)
    for i in range(nt):
        for name, dst, shape in (("U", U, (d, k)), ("V", V, (d, k)), ("c", c, (d,))):
            a = sd[f"layers.{i}.{name}"]
            if a.shape != shape:
                raise JaxlensError(f"{path}/weights.pt: layers.{i}.{name} has shape {a.shape}, expected {shape}")
            dst[i] = a
    if np.any(sd[f"layers.{n - 1}.c"] != 0):
        raise JaxlensError(f"{path}/weights.pt: the frozen final translator has a non-zero bias")
    theta = None
    if sd.get("log_tau") is not None:
        lt = np.asarray(sd["log_tau"], np.float32).reshape(-1)
        if lt.shape[0] not in (n, nt):
            raise JaxlensError(f"{path}/weights.pt: log_tau has {lt.shape[0]} entries, expected {n}")
        theta = lt[:nt]
    precond = None
    if meta.get("has_preconditioner"):
        pre = {v: sd.get(k) for k, v in _REF_PRECOND_KEYS.items()}
        ppath = os.path.join(path, "precond.pt")
        if os.path.exists(ppath):
            pre.update({key: val for key, val in _torch_load(ppath).items() if val is not None})
        if pre.get("mean") is None or pre.get("inv_scale") is None:
            raise JaxlensError(f"{path}: has_preconditioner is set but no mean / inv_scale was found")
        precond = {key: (None if val is None else jnp.asarray(val, F32)) for key, val in pre.items()}
    card = {"format": "reference", "source": path, "family": "reference",
            "model": {"id": prov.get("model_id"), "revision": prov.get("model_commit")},
            "layer_convention": LAYER_CONVENTIONS["reference"], "provenance": prov}
    return LowRankLens(jnp.asarray(U), jnp.asarray(V), jnp.asarray(c),
                       None if theta is None else jnp.asarray(theta), n_layers=n, precond=precond, card=card)


# --------------------------------------------------------------------------------------------------
# Saving


def save_lens(lens, path: str, format: str = "jaxlens", card: dict | None = None) -> str:  # noqa: A002
    """Write ``lens`` into directory ``path`` atomically (all files appear together or none).

    ``format``: "jaxlens" (``lens_card.json`` + ``lens.safetensors``; the card is ``card`` or the lens's
    own, completed with the structural fields) or "tuned-lens" (``config.json`` + ``params.pt`` for the
    tuned-lens package; :class:`FullRankLens` only; needs PyTorch). Returns ``path``.
    """
    from jaxlens.writers import OutputSet

    if format == "jaxlens":
        from safetensors.numpy import save

        card = dict(lens.card if card is None else card)
        card.update(structural_card(lens))
        arrays = {k: np.ascontiguousarray(np.asarray(v, np.float32)) for k, v in lens.arrays().items()}
        data = save(arrays)
        with OutputSet(path) as out:
            out.binary(ARRAYS_FILE, data)
            out.json(CARD_FILE, card)
        return path
    if format == "tuned-lens":
        if not isinstance(lens, FullRankLens):
            raise JaxlensError("only a full-rank (tuned-lens family) lens can be written in the tuned-lens format; "
                               "the reference family acts on a different normaliser and has temperatures")
        try:
            import io

            import torch
        except ImportError:
            raise JaxlensError("writing the tuned-lens format needs PyTorch: pip install 'jaxlens[torch]'")
        W = np.asarray(lens.W, np.float32)
        b = np.asarray(lens.b, np.float32)
        sd = {}
        for k in range(W.shape[0]):
            sd[f"{k}.weight"] = torch.from_numpy(np.array(W[k].T))
            sd[f"{k}.bias"] = torch.from_numpy(np.array(b[k]))
        buf = io.BytesIO()
        torch.save(sd, buf)
        meta = (card or lens.card or {}).get("model") or {}
        cfg = {"base_model_name_or_path": meta.get("id") or "unknown", "d_model": int(W.shape[1]),
               "num_hidden_layers": int(W.shape[0]), "bias": True,
               "base_model_revision": meta.get("revision"), "lens_type": "linear_tuned_lens"}
        with OutputSet(path) as out:
            out.binary("params.pt", buf.getvalue())
            out.json("config.json", cfg)
        return path
    raise JaxlensError(f"unknown lens format {format!r} (use 'jaxlens' or 'tuned-lens')")


def structural_card(lens) -> dict:
    """The card fields that describe the arrays (always rewritten by :func:`save_lens`)."""
    out = {"format": JAXLENS_FORMAT, "format_version": FORMAT_VERSION, "family": lens.family,
           "n_layers": int(lens.n_layers), "d_model": int(lens.d_model), "base": lens.base,
           "layer_convention": LAYER_CONVENTIONS[lens.family]}
    if isinstance(lens, FullRankLens):
        out["final_norm"] = None if lens.norm_spec is None else {
            "norm": lens.norm_spec.norm, "eps": lens.norm_spec.norm_eps, "offset": lens.norm_spec.norm_offset,
            "scale_in_fp32": lens.norm_spec.norm_scale_in_fp32,
            "note": "a copy of the model's final norm, so the lens decodes without binding"}
    else:
        out["rank"] = lens.rank
        out["temperatures"] = [float(t) for t in lens.temperature_table()]
        out["temperature_eps"] = TEMPERATURE_EPS
        out["has_preconditioner"] = lens.precond is not None
    return out
