"""Tuned-lens formats: the tuned-lens package's (config.json + params.pt), the reference probe's
(weights.pt + provenance.json) and jaxlens's own, read by ``jaxlens.load_lens`` and decoded by ``lens_stats``.

Oracles are independent of jaxlens's translator code: the tuned-lens lens is applied by hand in PyTorch with
the HF model's own final norm and head (``lm_head(norm(h + h W^T + b))`` on ``output_hidden_states``), the
reference lens in float64 numpy on jaxlens's norm-lens rows. Translator weights are deliberately
non-symmetric, so a loader that forgets torch's [out, in] transpose fails.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

import hf_factory as F


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny GPT-2 (LayerNorm with bias: the final norm's bias matters) and its torch twin."""
    import jax.numpy as jnp

    import jaxlens

    path = str(tmp_path_factory.mktemp("tuned-fmt-gpt2"))
    torch_model = F.build_checkpoint("gpt2", path, seed=11)
    model = jaxlens.load_model(path)
    ids = np.asarray(F.encode_prompts(model.tokenizer, (12,), F.PROMPTS[:1])[0])[None]
    fw = model.forward(jnp.asarray(ids))
    return dict(path=path, torch_model=torch_model, model=model, ids=ids, fw=fw)


def _write_tuned_lens_package(path, n, d, seed=0, scale=0.2):
    """A lens in the tuned-lens package's layout, written with torch (as TunedLens.save does)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k in range(n):
        w = scale * torch.randn(d, d, generator=g)
        assert not torch.allclose(w, w.T)
        sd[f"{k}.weight"] = w
        sd[f"{k}.bias"] = scale * torch.randn(d, generator=g)
    os.makedirs(path, exist_ok=True)
    torch.save(sd, os.path.join(path, "params.pt"))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"base_model_name_or_path": "tiny-gpt2", "d_model": d, "num_hidden_layers": n, "bias": True,
                   "base_model_revision": None, "unemebd_hash": "ignored", "lens_type": "linear_tuned_lens"}, f)
    return sd


def test_tuned_lens_package_format_matches_torch_by_hand(tiny, tmp_path):
    import torch

    import jaxlens

    model, fw, tm = tiny["model"], tiny["fw"], tiny["torch_model"]
    n, d = model.spec.n_layers, model.spec.d_model
    sd = _write_tuned_lens_package(str(tmp_path / "tl"), n, d)
    lens = jaxlens.load_lens(str(tmp_path / "tl"), model=model)
    # an unbound lens (no model given) takes the model's final norm inside lens_stats (lens.normalise binds
    # it): the same numbers as the bound lens
    free = jaxlens.load_lens(str(tmp_path / "tl"))
    assert lens.bound and not free.bound
    unbound = jaxlens.lens_stats(model, fw, lens=free, top_k=0, cosine=False)
    bound = jaxlens.lens_stats(model, fw, lens=lens, top_k=0, cosine=False)
    for field in ("entropy_bits", "kl_to_final_bits", "kl_final_to_layer_bits", "lse"):
        np.testing.assert_array_equal(np.asarray(getattr(unbound, field)), np.asarray(getattr(bound, field)))
    assert not free.bound                                # lens_stats bound a copy, not the caller's lens

    with torch.no_grad():
        out = tm(torch.as_tensor(tiny["ids"]), output_hidden_states=True)
        hs = out.hidden_states
        want = []
        for k in range(n):                       # the package's TunedLens.forward: unembed(h + translator_k(h))
            h = hs[k]
            want.append(tm.lm_head(tm.transformer.ln_f(h + h @ sd[f"{k}.weight"].T + sd[f"{k}.bias"])))
        want.append(out.logits)                  # layer n: the model itself
        want = torch.stack(want).numpy()
    got = np.asarray(jaxlens.lens_logits(model, fw, lens))
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-4)

    # the streaming decode uses the same lens: KL(final || lens) from lens_stats equals the dense one
    st = jaxlens.lens_stats(model, fw, lens=lens, top_k=0, cosine=False)
    lp = torch.log_softmax(torch.as_tensor(want, dtype=torch.float64), -1)
    lf = lp[-1:]
    kl = (lf.exp() * (lf - lp)).sum(-1).numpy() / np.log(2)
    np.testing.assert_allclose(np.asarray(st.kl_final_to_layer_bits), kl, atol=2e-4, rtol=1e-4)
    assert np.abs(np.asarray(st.kl_final_to_layer_bits)[n]).max() < 1e-5


def test_round_trip_jaxlens_tuned_lens_jaxlens_is_exact(tiny, tmp_path):
    import jax.numpy as jnp

    import jaxlens
    from jaxlens.lens.tuned import FullRankLens

    model, fw = tiny["model"], tiny["fw"]
    n, d = model.spec.n_layers, model.spec.d_model
    rng = np.random.default_rng(3)
    W = jnp.asarray(rng.normal(0, 0.1, (n, d, d)).astype(np.float32))
    b = jnp.asarray(rng.normal(0, 0.1, (n, d)).astype(np.float32))
    lens = FullRankLens(W, b, card={"model": {"id": "tiny-gpt2", "revision": "abc"}}).bind(model)
    a = jaxlens.save_lens(lens, str(tmp_path / "a"))
    l1 = jaxlens.load_lens(a)                                  # jaxlens format: decodes without binding
    jaxlens.save_lens(l1, str(tmp_path / "b"), format="tuned-lens")
    cfg = json.load(open(tmp_path / "b" / "config.json"))
    assert cfg["num_hidden_layers"] == n and cfg["d_model"] == d and cfg["base_model_name_or_path"] == "tiny-gpt2"
    l2 = jaxlens.load_lens(str(tmp_path / "b"), model=model)
    jaxlens.save_lens(l2, str(tmp_path / "c"))
    l3 = jaxlens.load_lens(str(tmp_path / "c"))
    for other in (l1, l2, l3):
        assert np.array_equal(np.asarray(other.W), np.asarray(W))
        assert np.array_equal(np.asarray(other.b), np.asarray(b))
    z0 = np.asarray(jaxlens.lens_logits(model, fw, lens))
    for other in (l1, l2, l3):
        assert np.array_equal(np.asarray(jaxlens.lens_logits(model, fw, other)), z0)
    # the torch file holds the [out, in] weight
    import torch

    sd = torch.load(tmp_path / "b" / "params.pt", weights_only=True)
    assert np.array_equal(sd["1.weight"].numpy(), np.asarray(W[1]).T)


def test_reference_format_matches_numpy_by_hand(tiny, tmp_path):
    import torch

    import jaxlens
    from jaxlens.lens.stats import normalise
    from jaxlens.lens.tuned import reference_rank

    model, fw = tiny["model"], tiny["fw"]
    n, d = model.spec.n_layers, model.spec.d_model
    k = reference_rank(d)
    g = torch.Generator().manual_seed(5)
    sd = {}
    for i in range(n - 1):
        sd[f"layers.{i}.U"] = 0.1 * torch.randn(d, k, generator=g)
        sd[f"layers.{i}.V"] = 0.1 * torch.randn(d, k, generator=g)
        sd[f"layers.{i}.c"] = 0.1 * torch.randn(d, generator=g)
    sd[f"layers.{n - 1}.c"] = torch.zeros(d)                       # the frozen identity keeps its (zero) bias
    sd["log_tau"] = torch.tensor([0.3, -0.7, 1.1][: n - 1] + [0.54])
    path = tmp_path / "ref"
    path.mkdir()
    torch.save(sd, path / "weights.pt")
    prov = {"model_id": "tiny-gpt2", "translator": {"num_layers": n, "d_model": d, "rank": k, "final_identity": True,
                                                      "has_preconditioner": False}}
    (path / "provenance.json").write_text(json.dumps(prov))
    lens = jaxlens.load_lens(str(path))
    assert lens.base == "norm" and lens.rank == k

    rows = np.asarray(normalise(model, fw.residuals, "norm"), np.float64)       # [n+1, 1, T, d]
    W, bias = model.unembedding()
    W = np.asarray(W, np.float64)
    want = []
    for layer in range(n + 1):
        x = rows[layer]
        tau = 1.0
        if 1 <= layer <= n - 1:
            i = layer - 1
            U, V, c = (sd[f"layers.{i}.{p}"].double().numpy() for p in "UVc")
            x = x + (x @ U) @ V.T + c
            tau = np.log1p(np.exp(float(sd["log_tau"][i]))) + 1e-3
        z = x @ W + (0 if bias is None else np.asarray(bias))
        want.append(z / tau)
    want = np.stack(want)
    got = np.asarray(jaxlens.lens_logits(model, fw, lens), np.float64)
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-4)
    np.testing.assert_allclose(got[-1], np.asarray(fw.logits), atol=2e-4)    # layer n: the model's own logits
    temps = np.asarray(lens.temperatures(np.arange(n + 1)))
    assert temps[0] == 1.0 and temps[-1] == 1.0

    # jaxlens format round trip of the reference family
    jaxlens.save_lens(lens, str(tmp_path / "ref-jl"))
    back = jaxlens.load_lens(str(tmp_path / "ref-jl"))
    assert np.array_equal(np.asarray(jaxlens.lens_logits(model, fw, back)), np.asarray(jaxlens.lens_logits(
        model, fw, lens)))
    with pytest.raises(jaxlens.JaxlensError, match="full-rank"):
        jaxlens.save_lens(lens, str(tmp_path / "nope"), format="tuned-lens")


def test_bad_lens_directories(tiny, tmp_path):
    import torch

    import jaxlens

    model = tiny["model"]
    n, d = model.spec.n_layers, model.spec.d_model
    with pytest.raises(jaxlens.JaxlensError, match="does not exist"):
        jaxlens.load_lens(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(jaxlens.JaxlensError, match="holds no tuned lens"):
        jaxlens.load_lens(str(tmp_path / "empty"))
    sd = _write_tuned_lens_package(str(tmp_path / "short"), n - 1, d)
    del sd
    with pytest.raises(jaxlens.JaxlensError, match="layers"):
        jaxlens.load_lens(str(tmp_path / "short"), model=model)            # wrong layer count for this model
    _write_tuned_lens_package(str(tmp_path / "bad"), n, d)
    sd = torch.load(tmp_path / "bad" / "params.pt", weights_only=True)
    del sd["0.bias"]
    torch.save(sd, tmp_path / "bad" / "params.pt")
    with pytest.raises(jaxlens.JaxlensError, match="missing"):
        jaxlens.load_lens(str(tmp_path / "bad"))
    (tmp_path / "bad" / "params.pt").write_bytes(b"not a torch file")
    with pytest.raises(jaxlens.JaxlensError, match="torch.load"):
        jaxlens.load_lens(str(tmp_path / "bad"))


def test_logit_base_lowrank_lens(tiny, tmp_path):
    """A reference-family lens on the logit lens (base "logit", the SmolLM2 recipe): its translators act on the
    final-normed residual, so the identity lens reproduces the logit lens (not the norm lens) at every layer;
    the base survives save / load; a random one matches h + (N_final(h) U) V^T + c by hand."""
    import jax.numpy as jnp

    import jaxlens
    from jaxlens.lens.tuned import LowRankLens

    model, fw = tiny["model"], tiny["fw"]
    n, d, k = model.spec.n_layers, model.spec.d_model, 4
    z = np.zeros((n - 1, d, k), np.float32)
    ident = LowRankLens(jnp.asarray(z), jnp.asarray(z), jnp.zeros((n - 1, d)), None, n_layers=n, base="logit")
    a = np.asarray(jaxlens.lens_logits(model, fw, lens=ident))
    b = np.asarray(jaxlens.lens_logits(model, fw, lens="logit"))
    nl = np.asarray(jaxlens.lens_logits(model, fw, lens="norm"))
    np.testing.assert_allclose(a[1:], b[1:], rtol=0, atol=1e-5)         # layers 1..n: the logit lens
    np.testing.assert_allclose(a[0], nl[0], rtol=0, atol=1e-5)          # layer 0 (no translator): the norm lens
    assert not np.allclose(a[1:n], nl[1:n], atol=1e-3) and not np.allclose(a[0], b[0], atol=1e-3)
    rng = np.random.default_rng(3)
    U, V = (0.1 * rng.standard_normal((2, n - 1, d, k))).astype(np.float32)
    c = (0.1 * rng.standard_normal((n - 1, d))).astype(np.float32)
    lens = LowRankLens(jnp.asarray(U), jnp.asarray(V), jnp.asarray(c), None, n_layers=n, base="logit")
    out = str(tmp_path / "lens")
    jaxlens.save_lens(lens, out)
    back = jaxlens.load_lens(out, model=model)
    assert back.base == "logit"
    got = np.asarray(jaxlens.lens_logits(model, fw, lens=back))
    x = np.asarray(jaxlens.lens.normalise(model, fw.residuals, lens="logit"), np.float64)     # [n+1, 1, T, d]
    W, bias = (np.asarray(t, np.float64) if t is not None else None for t in model.unembedding())
    for layer in range(1, n):
        y = x[layer] + (x[layer] @ U[layer - 1]) @ V[layer - 1].T + c[layer - 1]
        want = y @ W + (bias if bias is not None else 0.0)
        np.testing.assert_allclose(got[layer], want, rtol=1e-4, atol=1e-4)
