"""The one-pass CPU kernel of the streaming lens statistics (jaxlens.lens.cpu_kernel / cpu_stats.cc).

Oracles: NumPy float64 on planted logits (tests/test_topk_groups.py: one-hot rows, dyadic values, real ties)
and the pure-XLA path of the same function (ids and ranks must be identical; floats agree to fp32 rounding).
"""
import shutil

import jax
import numpy as np
import pytest

from jaxlens.lens import cpu_kernel
from jaxlens.lens import stream as S
from tests.test_topk_groups import K, check, logits, oracle, planted_case

needs_compiler = pytest.mark.skipif(not (shutil.which("c++") or shutil.which("g++")),
                                    reason="no C++ compiler")


def _hlo(**kw):
    case = planted_case(0, T=3, R=2, V=300)
    return jax.jit(lambda h, W: S.stream_stats(h, W, top_k=5, chunk=64, **kw)).lower(
        case["h"], case["W"]).as_text()


@needs_compiler
def test_the_kernel_builds_and_is_what_the_cpu_decode_runs():
    assert cpu_kernel.available()
    assert "jaxlens_chunk_stats" in _hlo()
    assert "jaxlens_chunk_stats" not in _hlo(cpu_kernel_path=False)
    assert "jaxlens_chunk_stats" not in _hlo(topk_method="merge")  # merge stays the XLA top-k
    with pytest.raises(ValueError, match="cpu_kernel_path=True"):
        _hlo(topk_method="merge", cpu_kernel_path=True)


@needs_compiler
@pytest.mark.parametrize("chunk,ks", [(64, (K, 1, 40)), (131, (K,)), (7, (K,)), (None, (K, 0))])
def test_kernel_equals_xla_path_and_float64_oracle(chunk, ks):
    case = planted_case(10, T=6, R=4, V=1000)
    z, zf = logits(case)
    ref = oracle(z, zf, case["gold"], 40)
    for k in ks:
        got = S.stream_stats(top_k=k, chunk=chunk, **case)
        xla = S.stream_stats(top_k=k, chunk=chunk, cpu_kernel_path=False, **case)
        if k:
            check(got, ref, k)
            np.testing.assert_array_equal(np.asarray(got["top_ids"]), np.asarray(xla["top_ids"]))
        np.testing.assert_array_equal(np.asarray(got["gold_rank"]), np.asarray(xla["gold_rank"]))
        for key in ("lse", "entropy_bits", "kl_to_final_bits", "kl_final_to_layer_bits", "gold_prob"):
            np.testing.assert_allclose(np.asarray(got[key]), np.asarray(xla[key]), rtol=1e-5, atol=2e-6,
                                       err_msg=key)
    # the teacher as one of the lens rows, with a bias and per-row power-of-two temperatures
    rng = np.random.default_rng(11)
    bias = (rng.integers(-64, 64, size=1000) / 32.0).astype(np.float32)
    got = S.stream_stats(case["h"], case["W"], bias=bias, teacher_row=-1, gold=case["gold"], top_k=K,
                         chunk=chunk)
    z, zf = logits(dict(case, teacher_h=case["h"][:, -1]), bias=bias)
    check(got, oracle(z, zf, case["gold"], K), K)


@needs_compiler
def test_kernel_on_random_logits_with_a_real_scale():
    # logits of a real model's size (|z| up to ~30) through a GEMM, against float64 of the same fp32 logits
    rng = np.random.default_rng(12)
    T, R, d, V = 8, 5, 64, 3001
    h = rng.standard_normal((T, R, d)).astype(np.float32)
    W = (rng.standard_normal((d, V)) * 0.6).astype(np.float32)
    gold = rng.integers(0, V, T).astype(np.int32)
    got = S.stream_stats(h, W, teacher_row=-1, gold=gold, top_k=K, chunk=256)
    zz = np.einsum("trd,dv->trv", h, W).astype(np.float64)
    ref = oracle(zz, zz[:, -1], gold, K)
    assert np.abs(zz).max() > 20
    np.testing.assert_array_equal(np.asarray(got["top_ids"]), ref["top_ids"])
    for key in ("lse", "entropy_bits", "kl_to_final_bits", "kl_final_to_layer_bits"):
        np.testing.assert_allclose(np.asarray(got[key]), ref[key], rtol=2e-5, atol=2e-5, err_msg=key)


def test_fallback_when_disabled_or_the_compiler_fails(monkeypatch, tmp_path):
    monkeypatch.setenv("JAXLENS_CPU_KERNEL", "0")
    assert cpu_kernel.available.__wrapped__() is False
    monkeypatch.setenv("JAXLENS_CPU_KERNEL", "1")
    monkeypatch.setenv("CXX", "false")  # a "compiler" that always fails
    monkeypatch.setenv("JAXLENS_KERNEL_CACHE", str(tmp_path))
    with pytest.warns(UserWarning, match="CPU lens kernel unavailable"):
        assert cpu_kernel.available.__wrapped__() is False
    assert list(tmp_path.iterdir()) == []  # no half-written library is left behind
