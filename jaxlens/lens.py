"""Lenses: how a raw residual stream is mapped into the model's head.

* ``"norm"``  the reference probe's normaliser: layer 0 through block 0's input norm, layer l (1..n-1)
  through block l's input norm (the *next* block's), layer n through the final norm. A family without
  input norms (OLMo-2) passes layers 0..n-1 through unchanged, as the reference does for a missing module.
* ``"logit"`` the final norm at every layer.
* ``"raw"``   no normalisation.
* an affine lens object (tuned / Prism): anything with ``.translate(spec, params, normed) -> rows`` and
  optional ``.temperature`` (see :class:`AffineLens`).

Every lens then goes through the model's own head (bias, Gemma-2's final softcap), so the last layer of
the norm / logit lens reproduces the model's logits exactly.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from .decoder import apply_norm, head
from .errors import JaxlensError

BUILTIN = ("norm", "logit", "raw")


def normalise(model, residuals: jax.Array, lens="norm") -> jax.Array:
    """Apply the lens's normaliser to residuals [n+1, ..., d] (same leading layer axis)."""
    spec, params = model.spec, model.params
    if isinstance(lens, str) and lens not in BUILTIN:
        raise JaxlensError(f"unknown lens {lens!r} (use one of {', '.join(BUILTIN)} or a lens object)")
    if lens == "raw":
        return residuals
    final = params["final_norm"]
    if lens == "logit":
        return jax.vmap(lambda h: apply_norm(spec, final, h))(residuals)
    n = spec.n_layers
    body = residuals[:n]
    if spec.pre_attn_norm:
        body = jax.vmap(lambda p, h: apply_norm(spec, p, h))(params["blocks"]["ln1"], body)
    last = apply_norm(spec, final, residuals[n])
    out = jnp.concatenate([body, last[None]], axis=0)
    if not isinstance(lens, str):
        out = lens.translate(model, out)
    return out


def lens_logits(model, fw, lens="norm", layers=None) -> jax.Array:
    """Dense lens logits [n+1, B, T, V] float32. A test oracle and debugging aid: never used by default."""
    res = fw.residuals if layers is None else fw.residuals[jnp.asarray(layers)]
    if layers is not None and lens != "raw":
        raise JaxlensError("dense lens_logits with a layer subset supports only the raw lens")
    rows = normalise(model, fw.residuals, lens) if layers is None else res
    z = head(model.spec, model.params, rows)
    temp = getattr(lens, "temperature", None)
    if temp is not None:
        z = z / jnp.asarray(temp, jnp.float32).reshape((-1,) + (1,) * (z.ndim - 1))
    return z
