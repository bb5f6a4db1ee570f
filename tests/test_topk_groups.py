"""Exact streaming top-k (jaxlens.lens.stream, "extract" and "merge") on adversarial logits, and `jaxlens bench`.

The logits are planted directly: every lens row is a one-hot vector, so row i's logits are exactly row i of W
(fp32 products with 1 and 0, whatever the GEMM's order). Planted values are dyadic, so temperatures that are
powers of two and dyadic biases keep them exact, and ties are real ties. The oracle is NumPy in float64:
top-k by (value desc, id asc), logsumexp, rank, entropy and both KLs from the full logits.
"""
import json
import math

import jax
import numpy as np
import pytest
from jax.sharding import AxisType

from jaxlens.lens import stream as S

LN2 = math.log(2.0)
K = 20
G = S.TOPK_GROUP


def oracle(z, zf, gold, k):
    """float64 statistics of logits z [T, R, V] with teacher logits zf [T, V] and gold ids [T]."""
    z = np.asarray(z, np.float64)
    zf = np.asarray(zf, np.float64)
    T, R, V = z.shape

    def lse(x):
        m = x.max(-1, keepdims=True)
        return (m + np.log(np.exp(x - m).sum(-1, keepdims=True)))[..., 0]

    l, lf = lse(z), lse(zf)
    lp, lpf = z - l[..., None], (zf - lf[:, None])[:, None, :]
    p, pf = np.exp(lp), np.exp(lpf)
    ids = np.arange(V)
    top = np.empty((T, R, k), np.int64)
    for t in range(T):
        for r in range(R):
            top[t, r] = np.lexsort((ids, -z[t, r]))[:k]
    g = z[np.arange(T), :, gold]
    return dict(
        lse=l, entropy_bits=-(p * lp).sum(-1) / LN2,
        kl_to_final_bits=(p * (lp - lpf)).sum(-1) / LN2, kl_final_to_layer_bits=(pf * (lpf - lp)).sum(-1) / LN2,
        gold_rank=1 + ((z > g[..., None]) & (ids != gold[:, None, None])).sum(-1), gold_prob=np.exp(g - l),
        top_ids=top, top_probs=np.take_along_axis(p, top, -1))


def planted_rows(V, rng):
    """[n, V] float32 adversarial logit rows (all dyadic)."""
    base = lambda: rng.integers(-256, 0, size=V) / 64.0  # noqa: E731 - values in [-4, 0)
    rows = []
    # 1. every group's maximum is the same value M (at a random place in the group): the top-k are the k
    #    lowest ids holding M, one per group -- ties between group maxima decide everything
    z = base()
    for s in range(0, V, G):
        z[s + rng.integers(0, min(G, V - s))] = 3.0
    rows.append(z)
    # 2. the same, but two groups hold M twice, and one late group holds it G times
    z = base()
    for s in range(0, V, G):
        z[s + rng.integers(0, min(G, V - s))] = 3.0
    z[[5, 6, 3 * G + 1, 3 * G + 2]] = 3.0
    z[V - G:] = 3.0
    rows.append(z)
    # 3. the top-(k-1) in one late group; the k-th value theta also sits in three early groups, so the early
    #    (lower-id) copy must win the last slot over the late group's own theta
    z = base()
    s = V - 2 * G + 3
    vals = 10.0 - 0.25 * np.arange(K)
    z[s:s + K] = vals
    theta = vals[-1]
    z[[G + 4, 4 * G, 7 * G + 9]] = theta
    rows.append(z)
    # 4. every top-k entry in one single group, whose maximum ties with an earlier group's only large entry
    z = base()
    z[2 * G: 2 * G + K] = 8.0 - 0.5 * np.arange(K)
    z[G - 1] = 8.0
    rows.append(z)
    # 5. strictly increasing with the id (every chunk displaces the whole buffer) and decreasing
    rows.append(np.arange(V) / 64.0 - V / 128.0)
    rows.append(-np.arange(V) / 64.0)
    # 6. constant row: all V logits tie; top-k = ids 0..k-1
    rows.append(np.zeros(V))
    # 7. three values only: massive ties everywhere
    rows.append(rng.integers(-1, 2, size=V).astype(np.float64))
    # 8. duplicates of the maximum across chunk borders (64, 100, 131) and in the last (clamped) chunk
    z = base()
    z[[63, 64, 99, 100, 130, 131, 262, V - 2, V - 1]] = 2.5
    z[[0, V - 3]] = 2.25
    rows.append(z)
    return np.stack(rows).astype(np.float32)


def planted_case(seed, T, R, V):
    """One-hot rows h [T, R, d] (d = T*R) and W [d, V] whose rows are planted / random dyadic logits."""
    rng = np.random.default_rng(seed)
    n = T * R
    pl = planted_rows(V, rng)
    W = (rng.integers(-256, 256, size=(n, V)) / 64.0).astype(np.float32)
    W[:min(n, len(pl))] = pl[:n]
    perm = rng.permutation(n)  # planted rows land in different tokens / lens rows
    W = W[perm]
    h = np.eye(n, dtype=np.float32).reshape(T, R, n)
    teacher = h[:, -1].copy()
    gold = rng.integers(0, V, size=T).astype(np.int32)
    return dict(h=h, W=W, teacher_h=teacher, gold=gold)


def logits(case, bias=None, temp=None):
    z = np.einsum("trd,dv->trv", case["h"].astype(np.float64), case["W"].astype(np.float64))
    zf = case["teacher_h"].astype(np.float64) @ case["W"].astype(np.float64)
    if bias is not None:
        z, zf = z + bias, zf + bias
    if temp is not None:
        z = z / np.asarray(temp, np.float64)[..., None]
    return z, zf


def check(got, ref, k, float_keys=("lse", "entropy_bits", "kl_to_final_bits", "kl_final_to_layer_bits",
                                     "gold_prob", "top_probs")):
    np.testing.assert_array_equal(np.asarray(got["top_ids"]), ref["top_ids"][..., :k])
    np.testing.assert_array_equal(np.asarray(got["gold_rank"]), ref["gold_rank"])
    for key in float_keys:
        r = ref[key][..., :k] if key == "top_probs" else ref[key]
        np.testing.assert_allclose(np.asarray(got[key]), r, rtol=2e-5, atol=2e-6, err_msg=key)


def test_planted_rows_are_adversarial():
    """The planted data really has the ties the tests rely on."""
    pl = planted_rows(1000, np.random.default_rng(0))
    gm = pl[:, :992].reshape(len(pl), -1, G).max(-1)
    assert (gm[0] == 3.0).all()                     # every group maximum ties
    top3 = np.lexsort((np.arange(1000), -pl[2].astype(np.float64)))[:K]
    assert G + 4 in top3 and 1000 - 2 * G + 3 + K - 1 not in top3   # the early theta beats the late one
    assert (np.diff(pl[4]) > 0).all() and (pl[6] == 0).all()


@pytest.mark.parametrize("chunk,ks", [(64, (K, 1, 40)), (131, (K,)), (7, (K,)), (None, (K,))])
def test_extract_planted_single_device(chunk, ks):
    # V=1000: chunks 64 / 131 (prime: padded groups) / 7 (< k) / default (clamped to V) never divide it;
    # k = 40 > the group size, k = 1
    case = planted_case(0, T=6, R=4, V=1000)
    z, zf = logits(case)
    ref = oracle(z, zf, case["gold"], 40)
    for k in ks:
        got = S.stream_stats(top_k=k, chunk=chunk, topk_method="extract", **case)
        check(got, ref, k)
    if chunk is None:  # teacher as a lens row: the same top-k
        got = S.stream_stats(case["h"], case["W"], teacher_row=-1, gold=case["gold"], top_k=K)
        np.testing.assert_array_equal(np.asarray(got["top_ids"]), ref["top_ids"][..., :K])


@pytest.mark.parametrize("kw", [dict(topk_method="merge"), dict(topk_group=1), dict(topk_group=(4, 2))])
def test_merge_planted_single_device(kw):
    case = planted_case(1, T=6, R=4, V=1000)
    z, zf = logits(case)
    got = S.stream_stats(top_k=K, chunk=128, **kw, **case)
    check(got, oracle(z, zf, case["gold"], K), K)


def test_default_method_is_extract_on_cpu_and_both_agree():
    case = planted_case(2, T=5, R=3, V=777)
    # the XLA "extract" path (the CPU kernel agrees to fp32 rounding: tests/test_cpu_kernel.py)
    a = S.stream_stats(top_k=K, chunk=64, cpu_kernel_path=False, **case)
    b = S.stream_stats(top_k=K, chunk=64, topk_method="merge", **case)
    for key in a:
        np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]), err_msg=key)
    with pytest.raises(ValueError):
        S.stream_stats(top_k=K, topk_method="sort", **case)


def test_extract_bias_power_of_two_temperatures():
    case = planted_case(3, T=6, R=4, V=1000)
    rng = np.random.default_rng(3)
    bias = (rng.integers(-64, 64, size=1000) / 32.0).astype(np.float32)
    bias[[5, 6, 3 * G + 1]] = 0.0
    temp = np.array([[0.5, 1.0, 2.0, 4.0]] * 6, np.float32)  # exact divisions
    z, zf = logits(case, bias=bias, temp=temp)
    got = S.stream_stats(top_k=K, chunk=100, bias=bias, temperature=temp, **case)
    check(got, oracle(z, zf, case["gold"], K), K)


def test_extract_softcap_saturation_ties():
    """Softcap saturation makes many exactly equal top logits; ids must still follow (value desc, id asc).

    fp32 tanh saturates differently from float64's, so the reference here is the fp32 dense oracle (full
    logits, lax.top_k); the float statistics are also checked against float64 on the same fp32 logits.
    """
    case = planted_case(4, T=6, R=4, V=1000)
    for sc in (0.05, 2.0):
        got = S.stream_stats(top_k=K, chunk=64, softcap=sc, **case)
        dense = S.dense_stats(top_k=K, softcap=sc, **case)
        np.testing.assert_array_equal(np.asarray(got["top_ids"]), np.asarray(dense["top_ids"]))
        np.testing.assert_array_equal(np.asarray(got["gold_rank"]), np.asarray(dense["gold_rank"]))
        np.testing.assert_allclose(np.asarray(got["entropy_bits"]), np.asarray(dense["entropy_bits"]),
                                   rtol=1e-5, atol=1e-5)
        if sc == 0.05:
            tp = np.asarray(got["top_probs"])
            tied = tp[..., 1:] == tp[..., :-1]
            assert tied.sum() > 200 and (np.diff(np.asarray(got["top_ids"]), axis=-1)[tied] > 0).all()


def test_extract_bf16_planted():
    """bf16 operands: the one-hot products are exact, so the oracle is float64 on the bf16-rounded W
    (rounding merges some planted values into new ties)."""
    import jax.numpy as jnp

    case = planted_case(5, T=4, R=3, V=600)
    Wb = jnp.asarray(case["W"], jnp.bfloat16)
    z, zf = logits(dict(case, W=np.asarray(Wb.astype(jnp.float32))))
    bf = dict(case, h=jnp.asarray(case["h"], jnp.bfloat16), W=Wb,
              teacher_h=jnp.asarray(case["teacher_h"], jnp.bfloat16))
    got = S.stream_stats(top_k=K, chunk=64, **bf)
    check(got, oracle(z, zf, case["gold"], K), K)


def _mesh(shape, names):
    return jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(shape))


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices")
def test_extract_planted_sharded_modes():
    # T=6 rows over 8 devices (padding); V=1000 over 8 shards of 125 with chunk 64 (clamped last chunks)
    case = planted_case(6, T=6, R=4, V=1000)
    rng = np.random.default_rng(6)
    bias = (rng.integers(-64, 64, size=1000) / 32.0).astype(np.float32)
    temp = np.array([1.0, 2.0, 0.5, 1.0], np.float32)
    z, zf = logits(case, bias=bias, temp=np.broadcast_to(temp, (6, 4)))
    ref = oracle(z, zf, case["gold"], K)
    m1 = _mesh((8,), ("x",))
    m2 = _mesh((2, 4), ("rows", "vocab"))
    for mkw in (dict(mesh=m1, row_axis="x"), dict(mesh=m1, vocab_axis="x"),
                dict(mesh=m2, row_axis="rows", vocab_axis="vocab")):
        got = S.stream_stats(top_k=K, chunk=64, bias=bias, temperature=temp, topk_method="extract", **mkw,
                             **case)
        check(got, ref, K)


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices")
def test_extract_vocab_shards_with_fewer_columns_than_k():
    # V=20 over 8 shards of 3 columns (shards 6-7 padding only), k=6 > every shard's width; ties cross shards
    rng = np.random.default_rng(9)
    T, R, V = 4, 2, 20
    n = T * R
    W = rng.integers(-1, 2, size=(n, V)).astype(np.float32)
    h = np.eye(n, dtype=np.float32).reshape(T, R, n)
    case = dict(h=h, W=W, teacher_h=h[:, 0].copy(), gold=np.array([0, 5, 10, 19], np.int32))
    z, zf = logits(case)
    got = S.stream_stats(top_k=6, chunk=2, mesh=_mesh((8,), ("v",)), vocab_axis="v", **case)
    check(got, oracle(z, zf, case["gold"], 6), 6)


def test_extract_groups_choice():
    assert S._extract_groups(2048) == (32, 64, 2048)
    assert S._extract_groups(7) == (7, 1, 7)
    G_, n_, Cp = S._extract_groups(131)       # prime: padded to whole groups
    assert G_ * n_ == Cp >= 131 and G_ == S.TOPK_GROUP
    G_, n_, Cp = S._extract_groups(1000)
    assert Cp == 1000 and 1000 % G_ == 0


# ----------------------------------------------------------------------------------------------
# jaxlens bench (not timed: only the document's shape and its internal consistency)


def test_bench_json_on_the_demo_model(capsys):
    from jaxlens import bench
    from jaxlens.cli import main

    rc = main(["--no-compile-cache", "bench", "--model", "demo", "--tokens", "8", "--repeats", "1", "--json"])
    assert rc == 0
    doc = json.loads(capsys.readouterr().out)
    assert set(bench.KEYS) <= set(doc)
    m = doc["model"]
    assert (m["name"], m["layers"], m["d_model"], m["vocab"]) == ("demo", 8, 128, 2048)
    assert doc["shape"] == {"batch": 1, "tokens": 8, "streams": 9} and doc["rows"] == 72
    assert doc["lens"] == "norm" and doc["top_k"] == 20 and doc["device"]["platform"] == jax.default_backend()
    fw, dec, gm = doc["forward_s"], doc["decode_s"], doc["gemm_s"]
    assert min(fw, dec, gm) > 0 and all(v >= 0 for v in doc["compile_s"].values())
    assert doc["decode_gflop"] == pytest.approx(2 * 72 * 128 * 2048 / 1e9, rel=1e-12)
    assert doc["decode_gflops"] == pytest.approx(doc["decode_gflop"] / dec, rel=1e-9)
    assert doc["gemm_gflops"] == pytest.approx(doc["decode_gflop"] / gm, rel=1e-9)
    assert doc["rows_per_s"] == pytest.approx(72 / dec, rel=1e-9)
    assert doc["floor_ratio"] == pytest.approx((fw + dec) / (fw + gm), rel=1e-9)
    assert doc["decode_vs_gemm"] == pytest.approx(dec / gm, rel=1e-9)
    if doc["device"]["platform"] == "cpu":
        assert doc["peak_device_bytes"] is None and doc["decode_temp_bytes"] > 0
    text = bench.format_report(doc)
    assert "rows/s" in text and "floor" in text and "GFLOP/s" in text


def test_bench_rejects_a_bad_lens(capsys):
    from jaxlens.cli import main

    assert main(["--no-compile-cache", "bench", "--model", "demo", "--lens", "/nonexistent/lens"]) == 2
    assert "--lens" in capsys.readouterr().err
