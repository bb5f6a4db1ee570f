"""Prism: one shared whitening + orthogonal map decoding every layer (spec/probe.md §4), as a lens object.

At layer l (0..n), with ``N_l`` the norm lens's normaliser (block l's input norm, the final norm at l = n)::

    logits_l = ((N_l(h) - mean) / sqrt(var + eps)) . Q . W_U + b_U

``mean`` and ``var`` [d] are the whitening statistics, ``Q`` [d, d] is the matrix the decoder
**right-multiplies** (row vectors), ``W_U`` [d, V] / ``b_U`` the model's head. The whitening and Q form one
affine translator shared by every layer, so :class:`PrismLens` plugs into :func:`jaxlens.lens_stats` and
:func:`jaxlens.lens.multi.multi_lens_stats` like a tuned lens and decodes inside the same streaming pass
over the vocabulary as the other lenses (no [layers x tokens x vocab] array).

A Prism directory holds one or both of two formats (``jaxlens fit-prism`` writes both; :func:`load_prism`
prefers jaxlens's, which needs no PyTorch):

* the reference's: ``whiten.pt`` = ``{"mean": [d], "var": [d], "eps": float}`` (fp32 tensors),
  ``Q_prism.pt`` = a [d, d] fp32 tensor, ``provenance.json`` = {method, k, layers, tokens_seen, reservoir,
  seed, date, device, dtype, d_model, d_vocab, n_layers, orthogonality_error, notes} (jaxlens adds a
  ``jaxlens`` block: the recipe, the data, the sign convention, throughput);
* jaxlens's: ``prism.safetensors`` (``mean``, ``var``, ``Q``; optionally the fitted bases ``basis_pca`` /
  ``basis_unembed`` [d, k] and their spectra) + ``prism_card.json`` (``eps``, the provenance).

Both formats hold the same Q; the decode formula is the same for every artifact. What the reference got
wrong (Q6) is the *fit*: its Q solves Q . E_k ~ U_k in column convention but is right-multiplied, and its
statistics are of raw, not normalised, residuals; see :mod:`train_tuned.prism` and docs/prism.md.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxlens.errors import JaxlensError

F32 = jnp.float32
_HI = jax.lax.Precision.HIGHEST

JAXLENS_FORMAT = "jaxlens-prism"
FORMAT_VERSION = 1
CARD_FILE = "prism_card.json"
ARRAYS_FILE = "prism.safetensors"
REF_WHITEN = "whiten.pt"
REF_Q = "Q_prism.pt"
REF_PROVENANCE = "provenance.json"
DEFAULT_EPS = 1e-8


@dataclasses.dataclass(eq=False)
class PrismLens:
    """The Prism decoder: rows_l = ((N_l(h) - mean) * inv_scale) @ Q with inv_scale = 1 / sqrt(var + eps).

    A lens in the sense of :func:`jaxlens.lens.normalise` (``base`` "norm", :meth:`translate`,
    :meth:`temperatures`), the same map at every layer 0..n. ``provenance`` is the artifacts'
    ``provenance.json`` (None for a Prism built in memory); ``extras`` holds optional fitted arrays
    (the PCA / unembedding bases) that jaxlens's format stores alongside.
    """

    mean: Any
    var: Any
    Q: Any
    eps: float = DEFAULT_EPS
    provenance: dict | None = None
    path: str | None = None
    format: str = "memory"
    extras: dict = dataclasses.field(default_factory=dict)
    base: str = "norm"
    name: str = "prism"

    def __post_init__(self):
        self.mean = np.asarray(self.mean, np.float32)
        self.var = np.asarray(self.var, np.float32)
        self.Q = np.asarray(self.Q, np.float32)
        self.eps = float(self.eps)
        where = self.path or "the Prism"
        check_shapes(self.mean.shape, self.var.shape, self.Q.shape, where)
        for nm, a in (("mean", self.mean), ("var", self.var), ("Q", self.Q)):
            if not np.all(np.isfinite(a)):
                raise JaxlensError(f"{where}: {nm} contains NaN or infinite values")
        if np.any(self.var + self.eps <= 0):
            raise JaxlensError(f"{where}: var + eps must be positive in every entry")
        self._dev = None

    # -- the lens interface --------------------------------------------------------------------------
    @property
    def d_model(self) -> int:
        return int(self.mean.shape[0])

    @property
    def inv_scale(self) -> np.ndarray:
        return (1.0 / np.sqrt(self.var.astype(np.float64) + self.eps)).astype(np.float32)

    def _device_arrays(self):
        if self._dev is None:
            self._dev = (jnp.asarray(self.mean, F32), jnp.asarray(self.inv_scale, F32), jnp.asarray(self.Q, F32))
        return self._dev

    def place(self) -> None:
        """Move the arrays onto the default device now (so a placement failure shows before any decode)."""
        jax.block_until_ready(self._device_arrays())

    def translate(self, rows: jax.Array, layers) -> jax.Array:
        """rows [R, ..., d] (normalised residuals of any layers) -> the whitened, rotated rows (rows' dtype).

        Computed as ((x - mean) * inv_scale) @ Q in fp32 at full precision: the same affine map as
        :meth:`folded` but without the cancellation x @ A - (mean * inv_scale) @ Q would risk."""
        mean, inv, Q = self._device_arrays()
        x = (rows.astype(F32) - mean) * inv
        return jnp.einsum("...d,de->...e", x, Q, precision=_HI).astype(rows.dtype)

    def temperatures(self, layers):
        return None

    def check(self, model) -> str | None:
        """None when the Prism fits ``model`` (d entries, d x d), else the reason, one sentence."""
        D = int(model.spec.d_model)
        if self.d_model != D:
            where = self.path or "this Prism"
            return (f"the Prism in {where} does not fit {getattr(model, 'name', 'the model')}: its mean has "
                    f"{self.d_model} entries and Q is {self.Q.shape[0]} x {self.Q.shape[1]}, but the model's "
                    f"d_model is {D} (d entries and d x d are required)")
        return None

    def bind(self, model) -> "PrismLens":
        """Check the compatibility with ``model`` (JaxlensError if it does not fit); returns self."""
        err = self.check(model)
        if err:
            raise JaxlensError(err)
        return self

    # -- views ---------------------------------------------------------------------------------------
    def folded(self) -> tuple[np.ndarray, np.ndarray]:
        """(A [d, d], c [d]) with rows = N_l(h) @ A + c: A = diag(inv_scale) Q, c = -(mean * inv_scale) @ Q."""
        inv = self.inv_scale.astype(np.float64)
        Q = self.Q.astype(np.float64)
        A = inv[:, None] * Q
        c = -(self.mean.astype(np.float64) * inv) @ Q
        return A.astype(np.float32), c.astype(np.float32)

    def as_affine(self, n_layers: int):
        """The same lens as a :class:`jaxlens.lens.stats.AffineLens` ([n+1, d, d]; memory n+1 times Q's)."""
        from jaxlens.lens.stats import AffineLens

        A, c = self.folded()
        return AffineLens(A=np.broadcast_to(A, (n_layers + 1,) + A.shape).copy(),
                          c=np.broadcast_to(c, (n_layers + 1,) + c.shape).copy(), base="norm", name="prism")

    @property
    def k(self):
        return None if not self.provenance else self.provenance.get("k")

    @property
    def layers(self):
        return None if not self.provenance else self.provenance.get("layers")

    @property
    def recipe(self) -> str | None:
        """"jaxlens" (Q6 fixed), "reference" (fitted with the reference's recipe) or None (unknown: an
        artifact from the reference itself, or built in memory)."""
        jx = (self.provenance or {}).get("jaxlens")
        return jx.get("recipe") if isinstance(jx, dict) else None

    def arrays(self) -> dict:
        out = {"mean": self.mean, "var": self.var, "Q": self.Q}
        out.update({k: np.asarray(v, np.float32) for k, v in self.extras.items()})
        return out


def check_shapes(mean_shape, var_shape, q_shape, where: str) -> None:
    """The artifacts' compatibility among themselves: mean and var have d entries, Q is d x d."""
    mean_shape, var_shape, q_shape = tuple(mean_shape), tuple(var_shape), tuple(q_shape)
    ok = (len(mean_shape) == 1 and var_shape == mean_shape and len(q_shape) == 2
          and q_shape[0] == q_shape[1] == mean_shape[0] and mean_shape[0] > 0)
    if not ok:
        raise JaxlensError(f"{where}: the Prism arrays do not fit together (mean {mean_shape}, var {var_shape}, "
                           f"Q {q_shape}; expected d entries, d entries and d x d)")


# --------------------------------------------------------------------------------------------------
# loading


def find_format(path: str) -> str | None:
    """"jaxlens", "reference" or None: which Prism format ``path`` holds (jaxlens's first)."""
    has = lambda f: os.path.isfile(os.path.join(path, f))  # noqa: E731
    if has(CARD_FILE) and has(ARRAYS_FILE):
        return "jaxlens"
    if has(REF_WHITEN) and has(REF_Q):
        return "reference"
    return None


def load_prism(path: str, model=None, *, format: str | None = None) -> PrismLens:  # noqa: A002
    """Read a Prism directory (jaxlens's ``prism.safetensors`` + ``prism_card.json``, or the reference's
    ``whiten.pt`` + ``Q_prism.pt`` + ``provenance.json``). ``model``: optional; checks that the Prism fits it
    (mean with d entries, Q d x d) and raises a one-sentence :class:`JaxlensError` if not. ``format``:
    "jaxlens" / "reference" to read one of the two when a directory holds both (default: jaxlens's).

    The result is a lens for :func:`jaxlens.lens_stats` (``lens=prism``)."""
    path = os.path.expanduser(str(path))
    if not os.path.isdir(path):
        raise JaxlensError(f"Prism directory {path} does not exist")
    fmt = format or find_format(path)
    if fmt == "jaxlens":
        lens = _load_jaxlens(path)
    elif fmt == "reference":
        lens = _load_reference(path)
    else:
        raise JaxlensError(f"{path} holds no Prism: expected {ARRAYS_FILE} + {CARD_FILE} (jaxlens) or "
                           f"{REF_WHITEN} + {REF_Q} (+ {REF_PROVENANCE}) (reference)")
    return lens.bind(model) if model is not None else lens


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except json.JSONDecodeError as e:
        raise JaxlensError(f"{path} is not valid JSON (line {e.lineno}: {e.msg})")
    except OSError as e:
        raise JaxlensError(f"{path} could not be read ({e.strerror})")
    if not isinstance(obj, dict):
        raise JaxlensError(f"{path} must hold a JSON object")
    return obj


def _load_jaxlens(path: str) -> PrismLens:
    from safetensors.numpy import load_file

    card_path = os.path.join(path, CARD_FILE)
    card = _read_json(card_path)
    if card.get("format") != JAXLENS_FORMAT:
        raise JaxlensError(f"{card_path}: format must be {JAXLENS_FORMAT!r}")
    if int(card.get("format_version", 0)) > FORMAT_VERSION:
        raise JaxlensError(f"{card_path}: format_version {card.get('format_version')} is newer than this jaxlens "
                           f"reads ({FORMAT_VERSION})")
    try:
        arr = load_file(os.path.join(path, ARRAYS_FILE))
    except Exception as e:  # noqa: BLE001
        raise JaxlensError(f"{os.path.join(path, ARRAYS_FILE)} is not a readable safetensors file "
                           f"({e.__class__.__name__})")
    missing = [k for k in ("mean", "var", "Q") if k not in arr]
    if missing:
        raise JaxlensError(f"{os.path.join(path, ARRAYS_FILE)} lacks {', '.join(missing)}")
    eps = card.get("eps", DEFAULT_EPS)
    if not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise JaxlensError(f"{card_path}: eps must be a non-negative number; got {eps!r}")
    extras = {k: v for k, v in arr.items() if k not in ("mean", "var", "Q")}
    return PrismLens(arr["mean"], arr["var"], arr["Q"], float(eps), provenance=card.get("provenance"),
                     path=os.path.abspath(path), format="jaxlens", extras=extras)


def _torch_load(path: str):
    try:
        import torch
    except ImportError:
        raise JaxlensError(f"reading {os.path.basename(path)} needs PyTorch: pip install 'jaxlens[torch]'")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any torch failure means the file is unusable
        msg = str(e).splitlines()[0] if str(e) else e.__class__.__name__
        raise JaxlensError(f"{path} could not be read by torch.load: {msg[:200]}")


def _as_array(x, where: str) -> np.ndarray:
    if hasattr(x, "detach"):
        import torch

        return x.detach().to(torch.float32).cpu().numpy()
    if isinstance(x, np.ndarray):
        return x.astype(np.float32)
    raise JaxlensError(f"{where} is not a tensor (got {type(x).__name__})")


def _load_reference(path: str) -> PrismLens:
    wpath, qpath = os.path.join(path, REF_WHITEN), os.path.join(path, REF_Q)
    w = _torch_load(wpath)
    if not isinstance(w, dict) or "mean" not in w or "var" not in w:
        raise JaxlensError(f"{wpath} must hold a dict with 'mean', 'var' (and 'eps') tensors")
    mean = _as_array(w["mean"], f"{wpath}: mean")
    var = _as_array(w["var"], f"{wpath}: var")
    eps = w.get("eps", DEFAULT_EPS)
    if hasattr(eps, "item"):
        eps = eps.item()
    if not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise JaxlensError(f"{wpath}: eps must be a non-negative number; got {eps!r}")
    q = _torch_load(qpath)
    if isinstance(q, dict):                      # tolerate {"Q": tensor}
        q = q.get("Q", q.get("Q_prism"))
        if q is None:
            raise JaxlensError(f"{qpath} must hold the [d, d] tensor Q")
    Q = _as_array(q, qpath)
    prov_path = os.path.join(path, REF_PROVENANCE)
    prov = _read_json(prov_path) if os.path.isfile(prov_path) else None
    return PrismLens(mean, var, Q, float(eps), provenance=prov, path=os.path.abspath(path), format="reference")


# --------------------------------------------------------------------------------------------------
# saving


def save_prism(prism: PrismLens, path: str, format: str = "both", card: dict | None = None) -> str:  # noqa: A002
    """Write ``prism`` into directory ``path`` atomically (all files appear together or none).

    ``format``: "both" (default; what ``jaxlens fit-prism`` writes), "jaxlens" (``prism.safetensors`` +
    ``prism_card.json``) or "reference" (``whiten.pt`` + ``Q_prism.pt`` + ``provenance.json``; needs
    PyTorch). ``card``: extra fields for jaxlens's card. Returns ``path``."""
    from jaxlens.writers import OutputSet

    if format not in ("both", "jaxlens", "reference"):
        raise JaxlensError(f"unknown Prism format {format!r} (use 'both', 'jaxlens' or 'reference')")
    files: dict[str, bytes] = {}
    jsons: dict[str, dict] = {}
    if format in ("both", "jaxlens"):
        from safetensors.numpy import save

        arrays = {k: np.ascontiguousarray(v, np.float32) for k, v in prism.arrays().items()}
        files[ARRAYS_FILE] = save(arrays)
        jsons[CARD_FILE] = dict(card or {}, format=JAXLENS_FORMAT, format_version=FORMAT_VERSION,
                                d_model=prism.d_model, eps=prism.eps, k=prism.k, layers=prism.layers,
                                formula="logits_l = ((N_l(h) - mean) / sqrt(var + eps)) . Q . W_U + b_U "
                                        "(Q right-multiplies row vectors; N_l = the norm lens's normaliser)",
                                arrays=sorted(arrays), provenance=prism.provenance)
    if format in ("both", "reference"):
        try:
            import io

            import torch
        except ImportError:
            raise JaxlensError("writing the reference's Prism format needs PyTorch: pip install 'jaxlens[torch]'")

        def pt(obj) -> bytes:
            buf = io.BytesIO()
            torch.save(obj, buf)
            return buf.getvalue()

        files[REF_WHITEN] = pt({"mean": torch.from_numpy(np.array(prism.mean, np.float32)),
                                "var": torch.from_numpy(np.array(prism.var, np.float32)), "eps": float(prism.eps)})
        files[REF_Q] = pt(torch.from_numpy(np.array(prism.Q, np.float32)))
        jsons[REF_PROVENANCE] = prism.provenance or {}
    with OutputSet(path) as out:
        for name, data in files.items():
            out.binary(name, data)
        for name, obj in jsons.items():
            out.json(name, obj)
    return path
