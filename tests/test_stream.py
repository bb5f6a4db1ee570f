"""jaxlens.lens.stream: streaming lens statistics against the dense oracle and brute-force numpy.

Most cases use *dyadic* data (small integers over powers of two): every logit is then an exact
fp32 number whatever the GEMM's summation order, so ranks and top-k ids can be compared exactly
and planted ties are real ties.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType

from jaxlens.lens import stream as S
from jaxlens.lens import pairwise as PW

LN2 = math.log(2.0)
FLOAT_KEYS = ("entropy_bits", "lse", "kl_to_final_bits", "kl_final_to_layer_bits", "gold_prob",
              "gold_logit", "top_probs", "teacher_entropy_bits", "teacher_lse")
EXACT_KEYS = ("gold_rank", "top_ids")


def dyadic(rng, shape, lo, hi, denom):
    return (rng.integers(lo, hi + 1, size=shape) / denom).astype(np.float32)


def make_case(seed, T, R, d, V, *, bias=False):
    """Dyadic h [T, R, d], W [d, V], teacher [T, d], gold [T] (+ bias [V]); exact fp32 dots."""
    rng = np.random.default_rng(seed)
    case = dict(
        h=dyadic(rng, (T, R, d), -32, 32, 16),
        W=dyadic(rng, (d, V), -32, 32, 64),
        teacher_h=dyadic(rng, (T, d), -32, 32, 16),
        gold=rng.integers(0, V, size=T).astype(np.int32),
    )
    # make the last lens row of each token the teacher itself (KL must then be ~0)
    case["h"][:, -1] = case["teacher_h"]
    if bias:
        case["bias"] = dyadic(rng, (V,), -64, 64, 32)
    return case


def assert_stats_close(got, ref, *, rtol=1e-5, atol=1e-5, exact=True, keys=None):
    assert set(got) == set(ref), (sorted(got), sorted(ref))
    for k in keys or ref:
        g = np.asarray(got[k])
        r = np.asarray(ref[k])
        assert g.shape == r.shape, (k, g.shape, r.shape)
        if k in EXACT_KEYS:
            if exact:
                np.testing.assert_array_equal(g, r, err_msg=k)
        else:
            np.testing.assert_allclose(g, r, rtol=rtol, atol=atol, err_msg=k)


# ----------------------------------------------------------------------------------------------
# brute-force numpy reference (float64) with the documented definitions


def numpy_reference(h, W, teacher_h, gold, top_k, bias=None, softcap=None, temperature=None):
    h = np.asarray(h, np.float64)
    W = np.asarray(W, np.float64)

    def head(x):
        z = x @ W
        if bias is not None:
            z = z + np.asarray(bias, np.float64)
        if softcap is not None:
            z = softcap * np.tanh(z / softcap)
        return z

    z = head(h)
    if temperature is not None:
        z = z / np.asarray(temperature, np.float64)[..., None]
    zf = head(np.asarray(teacher_h, np.float64))
    lse = np.log(np.sum(np.exp(z - z.max(-1, keepdims=True)), -1)) + z.max(-1)
    lsef = np.log(np.sum(np.exp(zf - zf.max(-1, keepdims=True)), -1)) + zf.max(-1)
    lp = z - lse[..., None]
    lpf = (zf - lsef[:, None])[:, None, :]
    p, pf = np.exp(lp), np.exp(lpf)
    T, R, V = z.shape
    g = np.take_along_axis(z, np.broadcast_to(gold[:, None, None], (T, R, 1)), -1)[..., 0]
    ids = np.arange(V)
    rank = 1 + np.sum((z > g[..., None]) & (ids != gold[:, None, None]), -1)
    top = np.empty((T, R, top_k), np.int64)
    for t in range(T):
        for r in range(R):
            top[t, r] = np.lexsort((ids, -z[t, r]))[:top_k]  # value desc, then lower id
    return dict(
        lse=lse,
        entropy_bits=-np.sum(p * lp, -1) / LN2,
        kl_to_final_bits=np.sum(p * (lp - lpf), -1) / LN2,
        kl_final_to_layer_bits=np.sum(pf * (lpf - lp), -1) / LN2,
        teacher_lse=lsef,
        teacher_entropy_bits=-np.sum(pf * lpf, -1)[:, 0] / LN2,
        gold_rank=rank,
        gold_prob=np.exp(g - lse),
        gold_logit=g,
        top_ids=top,
        top_probs=np.take_along_axis(p, top, -1),
    )


# ----------------------------------------------------------------------------------------------
# single device


@pytest.mark.parametrize(
    "V,chunk,bias",
    [(1000, 256, False), (1000, 300, True), (1000, 4096, False), (50257, 4096, True)],
)
def test_matches_dense_and_numpy(V, chunk, bias):
    case = make_case(0, T=6, R=4, d=64, V=V, bias=bias)
    kw = dict(top_k=10, **case)
    got = S.stream_stats(chunk=chunk, **kw)
    ref = S.dense_stats(**kw)
    assert_stats_close(got, ref)
    npref = numpy_reference(top_k=10, **case)
    assert_stats_close(got, npref, rtol=2e-5, atol=2e-5)
    # the teacher row itself: KL 0 both ways, same entropy as the teacher
    np.testing.assert_allclose(got["kl_to_final_bits"][:, -1], 0.0, atol=1e-5)
    np.testing.assert_allclose(got["kl_final_to_layer_bits"][:, -1], 0.0, atol=1e-5)
    np.testing.assert_allclose(got["entropy_bits"][:, -1], got["teacher_entropy_bits"], rtol=1e-5)
    assert got["top_ids"].dtype == jnp.int32 and got["gold_rank"].dtype == jnp.int32
    assert got["entropy_bits"].dtype == jnp.float32


def test_chunk_and_block_invariance():
    case = make_case(1, T=9, R=3, d=32, V=1000)
    base = S.stream_stats(top_k=8, chunk=1000, **case)
    for kw in (dict(chunk=333, token_block=2, topk_group=1),
               dict(chunk=256, topk_group=(4, 4), unroll=2), dict(chunk=64, block_elems=1)):
        assert_stats_close(S.stream_stats(top_k=8, **kw, **case), base, rtol=1e-5, atol=1e-5)


def test_teacher_row_equals_teacher_h():
    case = make_case(14, T=5, R=3, d=32, V=700, bias=True)  # case["h"][:, -1] is the teacher
    kw = dict(top_k=5, chunk=256, softcap=5.0, h=case["h"], W=case["W"], bias=case["bias"],
              gold=case["gold"])
    got = S.stream_stats(teacher_row=-1, **kw)
    assert_stats_close(got, S.stream_stats(teacher_h=case["teacher_h"], **kw))
    assert_stats_close(got, S.dense_stats(teacher_row=2, **kw))
    assert (np.asarray(got["kl_to_final_bits"][:, -1]) == 0).all()
    with pytest.raises(ValueError):
        S.stream_stats(teacher_row=0, temperature=2.0, **kw)


def test_random_normal_floats():
    """Un-quantised data: floats agree with the oracle (exact ids are checked on dyadic data)."""
    k = jax.random.split(jax.random.key(3), 4)
    T, R, d, V = 8, 5, 64, 3000
    h = jax.random.normal(k[0], (T, R, d))
    W = jax.random.normal(k[1], (d, V)) * 0.4
    kw = dict(h=h, W=W, teacher_h=jax.random.normal(k[2], (T, d)),
              gold=jax.random.randint(k[3], (T,), 0, V), top_k=5)
    got = S.stream_stats(chunk=512, **kw)
    ref = numpy_reference(**kw)
    assert_stats_close(got, ref, rtol=2e-5, atol=2e-5, exact=False)
    # fp32 GEMMs of different shapes may round differently, so only near-ties could differ
    assert np.mean(np.asarray(got["top_ids"]) == ref["top_ids"]) > 0.99


def test_planted_ties():
    """Exact ties: duplicated columns, the gold tied with others, ties across chunk borders."""
    rng = np.random.default_rng(7)
    T, R, d, V = 5, 3, 8, 200
    h = rng.integers(-2, 3, size=(T, R, d)).astype(np.float32)
    W = rng.integers(-1, 2, size=(d, V)).astype(np.float32)  # few distinct logits: many ties
    W[:, 150] = W[:, 3]  # duplicates across chunks (chunk 64)
    W[:, 64] = W[:, 63]  # across a chunk border
    W[:, 199] = W[:, 0]  # into the clamped, overlapping last chunk
    teacher = h[:, -1].copy()
    gold = np.array([3, 150, 63, 0, 199], np.int32)
    # one row where the gold is the unique maximum
    h[1, 0] = 0.0
    h[1, 0, 0] = 1.0
    W[:, 150] = 0.0
    W[0, 150] = 5.0
    case = dict(h=h, W=W, teacher_h=teacher, gold=gold)
    k = 20
    ref = numpy_reference(top_k=k, **case)
    for kw in (dict(chunk=64), dict(chunk=64, topk_group=1), dict(chunk=7)):
        got = S.stream_stats(top_k=k, **kw, **case)
        np.testing.assert_array_equal(got["gold_rank"], ref["gold_rank"])
        np.testing.assert_array_equal(got["top_ids"], ref["top_ids"])
        np.testing.assert_allclose(got["gold_prob"], ref["gold_prob"], rtol=1e-5)
    dense = S.dense_stats(top_k=k, **case)
    np.testing.assert_array_equal(dense["gold_rank"], ref["gold_rank"])
    np.testing.assert_array_equal(dense["top_ids"], ref["top_ids"])
    assert got["gold_rank"][1, 0] == 1
    # sanity: the data really has ties at the gold and inside the top-k
    z = np.einsum("trd,dv->trv", h, W)
    g = z[np.arange(T), :, gold]
    assert np.sum(z == g[..., None]) > 2 * T * R
    assert (np.diff(np.take_along_axis(z, ref["top_ids"], -1), axis=-1) == 0).any()


def test_softcap_temperature_bias():
    case = make_case(2, T=5, R=4, d=64, V=1000, bias=True)
    temp_r = np.array([0.5, 1.0, 2.0, 1.0], np.float32)
    temp_tr = np.random.default_rng(0).uniform(0.5, 2.0, size=(5, 4)).astype(np.float32)
    for extra in (dict(softcap=4.0, temperature=temp_r), dict(softcap=2.5, temperature=temp_tr)):
        kw = dict(top_k=12, **case, **extra)
        got = S.stream_stats(chunk=256, **kw)
        assert_stats_close(got, S.dense_stats(**kw))
        npref = numpy_reference(top_k=12, **case, **extra)
        assert_stats_close(got, npref, rtol=2e-5, atol=2e-5, keys=FLOAT_KEYS + ("gold_rank",))
    # softcap saturation makes exact ties at the top; ids still follow (value desc, lower id)
    # (fp32 saturation differs from float64's, so the reference is the fp32 dense oracle)
    sat = S.stream_stats(top_k=12, chunk=256, softcap=0.05, **case)
    sat_ref = S.dense_stats(top_k=12, softcap=0.05, **case)
    np.testing.assert_array_equal(sat["top_ids"], sat_ref["top_ids"])
    np.testing.assert_array_equal(sat["gold_rank"], sat_ref["gold_rank"])
    tp, ti = np.asarray(sat["top_probs"]), np.asarray(sat["top_ids"])
    tied = tp[..., 1:] == tp[..., :-1]
    assert tied.sum() > 100 and (np.diff(ti, axis=-1)[tied] > 0).all()
    assert (np.diff(tp, axis=-1) <= 0).all()


def test_bf16_inputs():
    case = make_case(4, T=6, R=3, d=64, V=1000, bias=True)
    bf = {k: (jnp.asarray(v, jnp.bfloat16) if k in ("h", "W", "teacher_h") else v)
          for k, v in case.items()}
    got = S.stream_stats(top_k=10, chunk=256, **bf)
    assert got["entropy_bits"].dtype == jnp.float32
    assert_stats_close(got, S.dense_stats(top_k=10, **bf), rtol=1e-4, atol=1e-4)
    # dyadic values are exact in bf16: the bf16 x bf16 -> fp32 GEMM gives the exact logits
    assert_stats_close(got, numpy_reference(top_k=10, **case), rtol=2e-5, atol=2e-5)
    # genuinely rounded bf16 data against the fp32 oracle of the same (rounded) values
    k = jax.random.split(jax.random.key(5), 3)
    h = jax.random.normal(k[0], (6, 3, 64), jnp.bfloat16)
    W = (jax.random.normal(k[1], (64, 1000)) * 0.3).astype(jnp.bfloat16)
    t = jax.random.normal(k[2], (6, 64), jnp.bfloat16)
    a = S.stream_stats(h, W, teacher_h=t, chunk=256)
    b = S.dense_stats(h.astype(jnp.float32), W.astype(jnp.float32), teacher_h=t.astype(jnp.float32))
    assert_stats_close(a, b, rtol=1e-3, atol=1e-3)


def test_optional_outputs_gold_padding_and_2d_rows():
    case = make_case(6, T=4, R=2, d=16, V=300)
    out = S.stream_stats(case["h"], case["W"], chunk=128)
    assert set(out) == {"lse", "entropy_bits"}
    gold = case["gold"].copy()
    gold[1] = -1  # padding token: no gold
    gold[2] = 300  # out of range
    out = S.stream_stats(case["h"], case["W"], gold=gold, chunk=128)
    assert (out["gold_rank"][1:3] == -1).all() and np.isnan(out["gold_prob"][1:3]).all()
    assert (out["gold_rank"][np.array([0, 3])] >= 1).all()
    # [T, d] rows: outputs [T]
    h2 = case["h"][:, 0]
    o2 = S.stream_stats(h2, case["W"], teacher_h=case["teacher_h"], gold=case["gold"], top_k=3)
    o3 = S.stream_stats(h2[:, None], case["W"], teacher_h=case["teacher_h"], gold=case["gold"],
                        top_k=3)
    assert o2["entropy_bits"].shape == (4,) and o2["top_ids"].shape == (4, 3)
    np.testing.assert_array_equal(o2["top_ids"], o3["top_ids"][:, 0])
    with pytest.raises(ValueError):
        S.stream_stats(case["h"], case["W"], top_k=301)


# ----------------------------------------------------------------------------------------------
# multi-device (8 fake CPU devices from conftest)


def _mesh(shape, names, axis_type):
    return jax.make_mesh(shape, names, axis_types=(axis_type,) * len(shape))


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices")
@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit])
def test_sharded_equals_single_device(axis_type):
    # T=13 not divisible by 8; V=1000 not divisible by 8*chunk (some vocab shards hold padding)
    case = make_case(8, T=13, R=3, d=32, V=1000, bias=True)
    kw = dict(top_k=10, chunk=64, softcap=6.0, **case)
    ref = S.stream_stats(**kw)
    m1 = _mesh((8,), ("x",), axis_type)
    m2 = _mesh((2, 4), ("rows", "vocab"), axis_type)  # both modes at once
    if axis_type == AxisType.Auto:
        modes = [dict(mesh=m1, row_axis="x"), dict(mesh=m1, vocab_axis="x")]
    else:
        modes = [dict(mesh=m2, row_axis="rows", vocab_axis="vocab")]
    for mkw in modes:
        got = S.stream_stats(**mkw, **kw)
        assert_stats_close(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices")
@pytest.mark.parametrize("vocab_major", [False, True])
def test_vocab_parallel_all_padding_shards_and_ties(vocab_major):
    # V=20 over 8 shards of 3 columns: shards 6-7 hold padding only; ties cross shards; W also as
    # stored in a tied embedding ([V, d], vocab_major)
    rng = np.random.default_rng(9)
    h = rng.integers(-1, 2, size=(4, 2, 4)).astype(np.float32)
    W = rng.integers(-1, 2, size=(4, 20)).astype(np.float32)
    gold = np.array([0, 5, 10, 19], np.int32)
    case = dict(h=h, W=W, teacher_h=h[:, 0], gold=gold)
    ref = numpy_reference(top_k=6, **case)
    Wk = np.ascontiguousarray(W.T) if vocab_major else W
    got = S.stream_stats(top_k=6, chunk=2, mesh=_mesh((8,), ("v",), AxisType.Auto),
                         vocab_axis="v", vocab_major=vocab_major, **{**case, "W": Wk})
    np.testing.assert_array_equal(got["top_ids"], ref["top_ids"])
    np.testing.assert_array_equal(got["gold_rank"], ref["gold_rank"])
    np.testing.assert_allclose(got["entropy_bits"], ref["entropy_bits"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["kl_final_to_layer_bits"], ref["kl_final_to_layer_bits"],
                               rtol=1e-5, atol=1e-5)


def test_vocab_major_w_equals_dv_w():
    # W given as [V, d] (a tied embedding as stored): the same chunks, so the same numbers bit for
    # bit; V=1000 with chunk 64 ends in a clamped, masked chunk
    case = make_case(12, T=13, R=3, d=32, V=1000, bias=True)
    kw = dict(top_k=10, chunk=64, softcap=6.0, **case)
    ref = S.stream_stats(**kw)
    got = S.stream_stats(**{**kw, "W": np.ascontiguousarray(case["W"].T)}, vocab_major=True)
    for k in ref:
        np.testing.assert_array_equal(got[k], ref[k], err_msg=k)
    dense = S.dense_stats(**{**kw, "W": case["W"].T}, vocab_major=True)
    assert_stats_close(got, dense, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"\[V, d\]"):
        S.stream_stats(**kw, vocab_major=True)  # a [d, V] W with the flag is refused


# ----------------------------------------------------------------------------------------------
# memory: never [T, R, V]


def _temp_bytes(T, R, d, V, **kw):
    sds = jax.ShapeDtypeStruct

    def fn(h, W, t, g):
        return S.stream_stats(h, W, teacher_h=t, gold=g, top_k=20, **kw)

    c = jax.jit(fn).lower(sds((T, R, d), jnp.float32), sds((d, V), jnp.float32),
                          sds((T, d), jnp.float32), sds((T,), jnp.int32)).compile()
    return c.memory_analysis().temp_size_in_bytes


def test_memory_does_not_scale_with_vocab():
    T, R, d, V = 2048, 25, 768, 50257
    dense = T * R * V * 4
    t1 = _temp_bytes(T, R, d, V)
    t2 = _temp_bytes(T, R, d, 2 * V)
    assert t1 < 0.10 * dense, (t1, dense)
    assert t2 <= t1 * 1.01 + (1 << 20), (t1, t2)


# ----------------------------------------------------------------------------------------------
# pairwise statistics and helpers


def test_pair_stats():
    rng = np.random.default_rng(11)
    M, d, V = 12, 32, 1000
    hA = dyadic(rng, (M, d), -32, 32, 16)
    hB = dyadic(rng, (M, d), -32, 32, 16)
    W = dyadic(rng, (d, V), -32, 32, 64)
    bias = dyadic(rng, (V,), -32, 32, 32)
    for sc in (None, 3.0):
        lseA = S.stream_stats(hA, W, bias=bias, softcap=sc)["lse"]
        lseB = S.stream_stats(hB, W, bias=bias, softcap=sc)["lse"]
        got = PW.pair_stats(hA, hB, W, bias, sc, lseA, lseB, chunk=256)
        zA = hA.astype(np.float64) @ W + bias
        zB = hB.astype(np.float64) @ W + bias
        if sc is not None:
            zA, zB = sc * np.tanh(zA / sc), sc * np.tanh(zB / sc)
        lpA = zA - np.log(np.exp(zA).sum(-1, keepdims=True))
        lpB = zB - np.log(np.exp(zB).sum(-1, keepdims=True))
        pA, pB = np.exp(lpA), np.exp(lpB)
        mid = 0.5 * (pA + pB)
        want = dict(
            kl_ab_bits=np.sum(pA * (lpA - lpB), -1) / LN2,
            kl_ba_bits=np.sum(pB * (lpB - lpA), -1) / LN2,
            js_bits=0.5 * np.sum(pA * np.log(pA / mid) + pB * np.log(pB / mid), -1) / LN2,
            l1=np.abs(pA - pB).sum(-1),
        )
        for k, v in want.items():
            np.testing.assert_allclose(got[k], v, rtol=2e-5, atol=2e-6, err_msg=k)
        assert np.all(np.asarray(got["js_bits"]) <= 1.0)
    # same lens twice: all zero
    same = PW.pair_stats(hA, hA, W, chunk=300)
    for k in same:
        np.testing.assert_allclose(same[k], 0.0, atol=1e-6, err_msg=k)


def test_gather_logits_set_mass_and_topk_helpers():
    case = make_case(12, T=4, R=3, d=32, V=500, bias=True)
    h, W, bias = case["h"], case["W"], case["bias"]
    z = np.einsum("trd,dv->trv", h.astype(np.float64), W) + bias
    ids = np.array([[1, 7, -1], [499, 0, 3], [5, 5, -1], [-1, -1, -1]], np.int32)
    gl = np.asarray(PW.gather_logits(h, W, ids, bias))
    assert gl.shape == (4, 3, 3)
    assert np.isneginf(gl[0, :, 2]).all() and np.isneginf(gl[3]).all()
    np.testing.assert_allclose(gl[1], z[1][:, [499, 0, 3]], rtol=1e-6)
    st = S.stream_stats(h, W, bias=bias, top_k=500)
    mass = np.asarray(PW.set_mass(h, W, ids, st["lse"], bias))
    p = np.exp(z - np.log(np.exp(z).sum(-1, keepdims=True)))
    want = np.stack([p[0][:, [1, 7]].sum(-1), p[1][:, [499, 0, 3]].sum(-1), p[2][:, 5],
                     np.zeros(3)])  # the duplicate 5 counts once
    np.testing.assert_allclose(mass, want, rtol=1e-5, atol=1e-7)
    # with top_k = V the in-top-k mass is the full set mass
    np.testing.assert_allclose(PW.set_mass_in_topk(st["top_ids"], st["top_probs"], ids), want,
                               rtol=1e-5, atol=1e-7)
    st3 = S.stream_stats(h, W, bias=bias, top_k=3)
    m3 = np.asarray(PW.set_mass_in_topk(st3["top_ids"], st3["top_probs"], ids))
    assert np.all(m3 <= want + 1e-6)
    a = np.array([[1, 2, 3, 4], [1, 2, 3, 4], [5, 6, -1, -1]])
    b = np.array([[4, 3, 2, 1], [1, 9, 8, 7], [-1, -1, -1, -1]])
    np.testing.assert_allclose(PW.topk_jaccard(a, b), [1.0, 1 / 7, 0.0])


def test_gram_cosine():
    rng = np.random.default_rng(13)
    d, V = 16, 300
    W = rng.normal(size=(d, V)).astype(np.float32)
    hA = rng.normal(size=(5, 2, d)).astype(np.float32)
    hB = rng.normal(size=(5, 2, d)).astype(np.float32)
    zA = hA.astype(np.float64) @ W
    zB = hB.astype(np.float64) @ W
    want = (zA * zB).sum(-1) / np.linalg.norm(zA, axis=-1) / np.linalg.norm(zB, axis=-1)
    np.testing.assert_allclose(PW.gram_cosine(hA, hB, W), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(PW.gram_cosine(hA, hB, G=PW.gram(W)), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(PW.gram_cosine(hA, hA, W), 1.0, rtol=1e-6)
