"""``jaxlens.lens_stats`` (streaming) against independent oracles on tiny checkpoints of every architecture.

Oracles: float64 numpy statistics of the dense lens logits (``lens_logits``), the dense ``dense=True`` path
(ranks and top-k ids must agree exactly), and the PyTorch model's own norm lens (KL to final per layer).
The vocabularies (997 / 1000 / 1003) are not divisible by the chunk size used here (256).
"""
from __future__ import annotations

import zlib

import numpy as np
import pytest

import hf_factory as F

CHUNK = 256
REL = 1e-5
KL_ATOL = 1e-5   # bits; KLs near 0 cannot be compared relatively
P_ATOL = 1e-12  # probabilities of ~1e-31 carry fp32 logit rounding (|z| ~ 70) of ~1e-5 relative


def _log_softmax(z):
    z = np.asarray(z, np.float64)
    m = z.max(-1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))


def _oracle(z, zf, gold):
    """float64 entropy / KLs / gold prob and rank from dense logits z [R,B,T,V], final zf [B,T,V]."""
    lp, lf = _log_softmax(z), _log_softmax(zf)[None]
    p, pf = np.exp(lp), np.exp(lf)
    H = -(p * lp).sum(-1) / np.log(2)
    kl = (p * (lp - lf)).sum(-1) / np.log(2)
    klr = (pf * (lf - lp)).sum(-1) / np.log(2)
    g = np.broadcast_to(gold[None, :, None, None], z.shape[:3] + (1,))
    zg = np.take_along_axis(np.asarray(z, np.float64), g, -1)
    rank = 1 + (np.asarray(z, np.float64) > zg).sum(-1)
    return H, kl, klr, np.exp(np.take_along_axis(lp, g, -1)[..., 0]), rank


@pytest.fixture(scope="module", params=F.ARCHS)
def loaded(request, tmp_path_factory):
    import jax.numpy as jnp

    import jaxlens

    name = request.param
    path = str(tmp_path_factory.mktemp(f"lens-{name}"))
    torch_model = F.build_checkpoint(name, path, seed=zlib.crc32(name.encode()) % 1000 + 7)
    model = jaxlens.load_model(path)
    seqs = F.encode_prompts(model.tokenizer, (9, 6), F.PROMPTS[:2])
    ids, mask = F.right_pad(seqs)
    fw = model.forward(jnp.asarray(ids), jnp.asarray(mask))
    return dict(name=name, model=model, fw=fw, seqs=seqs, mask=mask.astype(bool), torch_model=torch_model)


@pytest.mark.parametrize("lens", ["norm", "logit", "raw"])
def test_stream_matches_dense_oracle(loaded, lens):
    import jaxlens

    model, fw, mask = loaded["model"], loaded["fw"], loaded["mask"]
    V = model.spec.vocab_size
    gold = np.array([V - 1, 3])     # the last id sits in the ragged final chunk
    st = jaxlens.lens_stats(model, fw, lens, gold_ids=gold, top_k=12, chunk=CHUNK).numpy()
    dn = jaxlens.lens_stats(model, fw, lens, gold_ids=gold, top_k=12, dense=True).numpy()
    z = np.asarray(jaxlens.lens_logits(model, fw, lens))
    H, kl, klr, gp, rank = _oracle(z, np.asarray(fw.logits), gold)
    v = np.broadcast_to(mask[None], H.shape)
    # fp32 logits themselves carry ~eps32*|z| absolute error (two GEMMs of different shapes round
    # differently); the raw lens has logits in the hundreds, so the floor scales with the logit size.
    rel = max(REL, 8 * np.finfo(np.float32).eps * float(np.abs(z).max()))
    np.testing.assert_allclose(st.entropy_bits[v], H[v], rtol=rel, atol=KL_ATOL)
    np.testing.assert_allclose(st.kl_to_final_bits[v], kl[v], rtol=rel, atol=KL_ATOL)
    np.testing.assert_allclose(st.kl_final_to_layer_bits[v], klr[v], rtol=rel, atol=KL_ATOL)
    np.testing.assert_allclose(st.gold_prob[v], gp[v], rtol=rel, atol=1e-12)
    # exact agreement with the dense path (same fp32 logits up to GEMM shape), and with the float64
    # oracle up to near-ties closer than fp32 rounding of these logits
    np.testing.assert_array_equal(st.gold_rank, dn.gold_rank)
    np.testing.assert_array_equal(st.top_ids, dn.top_ids)
    tol = rel * max(1.0, float(np.abs(z).max()))
    g = np.take_along_axis(np.asarray(z, np.float64), np.broadcast_to(gold[None, :, None, None],
                                                                      z.shape[:3] + (1,)), -1)
    lo = 1 + (z > g + tol).sum(-1)
    hi = 1 + (z > g - tol).sum(-1) - 1
    assert ((st.gold_rank >= lo) & (st.gold_rank <= np.maximum(hi, lo)))[v].all()
    assert (rank == st.gold_rank)[v].mean() > 0.95
    order = np.argsort(-z, axis=-1, kind="stable")[..., :12]     # descending, ties by lower id
    np.testing.assert_allclose(np.take_along_axis(z, st.top_ids, -1)[v], np.take_along_axis(z, order, -1)[v],
                               atol=tol)
    assert (st.top_ids == order)[v].mean() > 0.95
    np.testing.assert_allclose(st.top_probs[v], np.take_along_axis(np.exp(_log_softmax(z)), order, -1)[v],
                               rtol=rel, atol=1e-9)
    if lens != "raw":
        # the lens applies the model's head transform (bias, Gemma-2 softcap): last layer == the model
        assert np.abs(st.kl_to_final_bits[-1][mask]).max() < 1e-5
        assert np.abs(st.entropy_bits[-1] - st.teacher_entropy_bits)[mask].max() < 1e-4


def test_norm_lens_kl_matches_torch(loaded):
    """Per-layer KL(P_layer || P_final) from the streaming pass equals the PyTorch norm lens's."""
    import jaxlens

    model, fw = loaded["model"], loaded["fw"]
    st = jaxlens.lens_stats(model, fw, "norm", top_k=0, chunk=CHUNK).numpy()
    for b, seq in enumerate(loaded["seqs"]):
        ref = F.torch_reference(loaded["torch_model"], np.asarray(seq)[None])
        lp = _log_softmax(ref["norm_lens_logits"][:, 0])
        lf = _log_softmax(ref["logits"][0])[None]
        kl = (np.exp(lp) * (lp - lf)).sum(-1) / np.log(2)
        n = len(seq)
        np.testing.assert_allclose(st.kl_to_final_bits[:, b, :n], kl, rtol=1e-4, atol=KL_ATOL)


def test_cosine_to_final(loaded):
    """cos_to_final from the d-space identity equals the direct vocab-space cosine (spec §2.2)."""
    import jaxlens

    model, fw = loaded["model"], loaded["fw"]
    st = jaxlens.lens_stats(model, fw, "norm", top_k=0, positions="last").numpy()
    W, b = model.unembedding()
    rows = np.asarray(jaxlens.lens.normalise(model, fw.residuals), np.float64)
    v = rows @ np.asarray(W, np.float64)                                  # bias-free lens logits
    zf = np.asarray(fw.logits, np.float64) - (0 if b is None else np.asarray(b, np.float64))
    last = st.positions[:, 0]
    for bi, t in enumerate(last):
        vv, ff = v[:, bi, t], zf[bi, t]
        cos = (vv / (np.linalg.norm(vv, axis=-1, keepdims=True) + 1e-12)) @ (ff / (np.linalg.norm(ff) + 1e-12))
        np.testing.assert_allclose(st.cos_to_final[:, bi, 0], cos, rtol=1e-4, atol=1e-5)


def test_subsets_last_position_and_affine_lens(loaded):
    """Layer subset + last position + an affine (tuned-style) lens with temperatures vs the dense path."""
    import jaxlens

    model, fw = loaded["model"], loaded["fw"]
    n, d = model.spec.n_layers, model.spec.d_model
    rng = np.random.default_rng(0)
    A = np.eye(d)[None] + 0.05 * rng.standard_normal((n + 1, d, d))
    c = 0.1 * rng.standard_normal((n + 1, d))
    tau = 0.5 + rng.random(n + 1)
    lens = jaxlens.AffineLens(A=A.astype(np.float32), c=c.astype(np.float32), temperature=tau.astype(np.float32))
    layers = [0, n - 1, n] if n > 1 else [0, n]
    st = jaxlens.lens_stats(model, fw, lens, gold_ids=np.array([5, 9]), top_k=5, positions="last",
                            layers=layers, chunk=CHUNK).numpy()
    full = np.asarray(jaxlens.lens_logits(model, fw, lens))                 # [n+1, B, T, V]
    last = st.positions[:, 0]
    z = np.stack([full[layers][:, b, t] for b, t in enumerate(last)], axis=1)[:, :, None]   # [R, B, 1, V]
    zf = np.stack([np.asarray(fw.logits)[b, t] for b, t in enumerate(last)])[:, None]
    H, kl, klr, gp, rank = _oracle(z, zf, np.array([5, 9]))
    np.testing.assert_allclose(st.entropy_bits, H, rtol=REL, atol=KL_ATOL)
    np.testing.assert_allclose(st.kl_to_final_bits, kl, rtol=REL, atol=KL_ATOL)
    np.testing.assert_allclose(st.kl_final_to_layer_bits, klr, rtol=REL, atol=KL_ATOL)
    np.testing.assert_allclose(st.gold_prob, gp, rtol=REL, atol=P_ATOL)
    np.testing.assert_array_equal(st.gold_rank, rank)
    np.testing.assert_array_equal(st.top_ids, np.argsort(-z, axis=-1, kind="stable")[..., :5])


@pytest.mark.parametrize("mode", ["rows", "vocab"])
def test_multi_device_modes(loaded, mode):
    """8 fake CPU devices: rows sharded (unembedding replicated) or the unembedding sharded on vocab."""
    import jax
    from jax.sharding import Mesh

    import jaxlens

    if loaded["name"] not in ("llama", "gemma2", "gpt2"):
        pytest.skip("sharded decode is checked on three families")
    devs = jax.devices()
    assert len(devs) == 8
    mesh = Mesh(np.asarray(devs), ("x",))
    model, fw = loaded["model"], loaded["fw"]
    gold = np.array([4, 11])
    kw = dict(gold_ids=gold, top_k=7, chunk=CHUNK)
    one = jaxlens.lens_stats(model, fw, "norm", **kw).numpy()
    axis = {"row_axis": "x"} if mode == "rows" else {"vocab_axis": "x"}
    many = jaxlens.lens_stats(model, fw, "norm", mesh=mesh, **axis, **kw).numpy()
    for f in ("entropy_bits", "kl_to_final_bits", "kl_final_to_layer_bits", "gold_prob"):
        np.testing.assert_allclose(getattr(many, f), getattr(one, f), rtol=REL, atol=KL_ATOL, err_msg=f)
    np.testing.assert_array_equal(many.gold_rank, one.gold_rank)
    np.testing.assert_array_equal(many.top_ids, one.top_ids)


def test_bad_arguments(loaded):
    import jaxlens

    model, fw = loaded["model"], loaded["fw"]
    with pytest.raises(jaxlens.JaxlensError, match="top_k"):
        jaxlens.lens_stats(model, fw, top_k=65)
    with pytest.raises(jaxlens.JaxlensError, match="unknown lens"):
        jaxlens.lens_stats(model, fw, lens="tuned?")
    with pytest.raises(jaxlens.JaxlensError, match="layers"):
        jaxlens.lens_stats(model, fw, layers=[model.spec.n_layers + 1])
