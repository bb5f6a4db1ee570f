"""Reduced-precision compute (bf16 / fp16): forward and lens statistics stay close to fp32, and every
lens statistic is returned in fp32 whatever the model dtype."""
from __future__ import annotations

import numpy as np
import pytest

import hf_factory as F


def _log_softmax(z):
    z = np.asarray(z, np.float64)
    m = z.max(-1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_close_to_fp32(arch, dtype, tmp_path):
    import jax.numpy as jnp

    import jaxlens

    F.build_checkpoint(arch, str(tmp_path), seed=3)
    m32 = jaxlens.load_model(str(tmp_path))
    mlo = jaxlens.load_model(str(tmp_path), dtype=dtype)
    assert mlo.params["blocks"]["wq"].dtype == jnp.dtype(dtype)
    seqs = F.encode_prompts(m32.tokenizer, (9, 6), F.PROMPTS[:2])
    ids, mask = F.right_pad(seqs)
    f32, flo = m32.forward(ids, mask), mlo.forward(ids, mask)
    assert flo.logits.dtype == jnp.float32 and flo.residuals.dtype == jnp.dtype(dtype)
    valid = mask.astype(bool)
    p = _log_softmax(np.asarray(f32.logits))
    q = _log_softmax(np.asarray(flo.logits))
    kl = (np.exp(p) * (p - q)).sum(-1)[valid] / np.log(2)
    assert kl.max() < 0.05, kl.max()          # bf16 has ~3 significant digits
    s32 = jaxlens.lens_stats(m32, f32, "norm", gold_ids=np.array([3, 4]), top_k=5).numpy()
    slo = jaxlens.lens_stats(mlo, flo, "norm", gold_ids=np.array([3, 4]), top_k=5).numpy()
    for f in ("entropy_bits", "kl_to_final_bits", "gold_prob", "lse"):
        assert getattr(slo, f).dtype == np.float32, f
    v = np.broadcast_to(valid[None], s32.entropy_bits.shape)
    dH = np.abs(slo.entropy_bits - s32.entropy_bits)[v]
    assert dH.mean() < 0.05 and dH.max() < 0.3, (dH.mean(), dH.max())   # measured: mean 0.02, max 0.18
    assert np.abs(slo.kl_to_final_bits[-1][valid]).max() < 1e-3    # the last layer is still the model's head
