"""Numerical parity of the JAX decoder with PyTorch / transformers on tiny awkward checkpoints.

For every architecture (and the four llama rope-scaling variants) a checkpoint is built offline, loaded
with ``jaxlens.load_model`` and run on a right-padded batch of two prompts of different lengths (the long
one at least twice the sliding window). Each prompt is also run UNPADDED through the torch model, and at
every real token we compare: every raw residual stream, the logits, and the norm-lens distribution of
every layer (KL in bits).

The ``test_factory_*`` tests check the checkpoint factory itself (no jaxlens needed): that each awkward
feature really changes the torch model's output, so parity is not vacuous.
"""
from __future__ import annotations

import zlib

import numpy as np
import pytest

import hf_factory as F

RESID_RTOL = 1e-4    # max |Δ| relative to max |residual| of that layer (per prompt)
LOGIT_RTOL = 1e-4    # max |Δ| <= LOGIT_RTOL * max(1, max |logit|)
KL_BITS_TOL = 1e-6   # per position, per layer
SHARD_RTOL = 1e-5    # sharded vs single-device forward

LONG, SHORT, TINY = 17, 9, 1  # prompt lengths (tokens, incl. BOS where the tokenizer adds one)
# The parity batch: short row first, the long one (sets T) in the middle, a single-token row last.
BATCH_PROMPTS = [F.PROMPTS[1], F.PROMPTS[0], F.PROMPTS[2]]
BATCH_LENGTHS = (SHORT, LONG, TINY)


def _jnp():
    import jax.numpy as jnp

    return jnp


def _forward_case(name: str, path: str, *, mesh=None):
    """Build, load and run one case. Returns everything the tests compare."""
    import jaxlens

    torch_model = F.build_checkpoint(name, path, seed=zlib.crc32(name.encode()) % 1000)
    model = jaxlens.load_model(path, dtype="float32", mesh=mesh) if mesh is not None else \
        jaxlens.load_model(path, dtype="float32")
    seqs = F.encode_prompts(model.tokenizer, BATCH_LENGTHS, BATCH_PROMPTS)
    ids, mask = F.right_pad(seqs)
    jnp = _jnp()
    fw = model.forward(jnp.asarray(ids), jnp.asarray(mask))
    lens = np.asarray(jaxlens.lens_logits(model, fw, lens="norm"), dtype=np.float32)
    refs = [F.torch_reference(torch_model, np.asarray(s)[None]) for s in seqs]
    return dict(
        name=name, path=path, torch_model=torch_model, model=model, seqs=seqs, ids=ids, mask=mask,
        residuals=np.asarray(fw.residuals, dtype=np.float32), logits=np.asarray(fw.logits),
        logits_dtype=fw.logits.dtype, lens=lens, refs=refs,
    )


@pytest.fixture(scope="module", params=F.CASES)
def case(request, tmp_path_factory):
    path = str(tmp_path_factory.mktemp(f"parity-{request.param}"))
    return _forward_case(request.param, path)


# --------------------------------------------------------------------------------------------------
# jaxlens vs torch
# --------------------------------------------------------------------------------------------------

def test_spec_and_shapes(case):
    cfg = case["torch_model"].config
    spec = case["model"].spec
    n = cfg.num_hidden_layers
    b, t = case["ids"].shape
    assert spec.arch == cfg.model_type
    assert spec.n_layers == n
    assert spec.d_model == cfg.hidden_size
    assert spec.vocab_size == cfg.vocab_size
    assert case["residuals"].shape == (n + 1, b, t, cfg.hidden_size)
    assert case["logits"].shape == (b, t, cfg.vocab_size)
    assert str(case["logits_dtype"]) == "float32"
    assert case["lens"].shape == (n + 1, b, t, cfg.vocab_size)
    sw = F.sliding_window_of(cfg)
    assert sw is None or LONG >= 2 * sw, "the long prompt must span at least two sliding windows"


def test_tokenizer_matches_hf(case):
    from transformers import AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(case["path"])
    for text in F.PROMPTS:
        assert list(case["model"].tokenizer(text)["input_ids"]) == list(hf_tok(text)["input_ids"])
    # the family's BOS habit survives loading
    base, _ = F.variant_arch(case["name"])
    starts_with_bos = case["seqs"][0][0] == F.BOS_ID
    assert starts_with_bos == (base in F.BOS_ARCHS)




def test_residuals_match_torch(case):
    failures = []
    for b, (seq, ref) in enumerate(zip(case["seqs"], case["refs"])):
        n = len(seq)
        got = case["residuals"][:, b, :n]
        want = ref["residuals"][:, 0, :n]
        for layer in range(want.shape[0]):
            scale = float(np.abs(want[layer]).max())
            err = np.abs(got[layer] - want[layer])
            rel = float(err.max()) / max(scale, 1e-6)
            if not rel <= RESID_RTOL:
                pos = int(np.unravel_index(np.argmax(err), err.shape)[0])
                failures.append(f"prompt {b} (len {n}) residual[{layer}]: max|Δ|={float(err.max()):.3e} "
                                f"scale={scale:.3g} rel={rel:.3e} worst position {pos}")
    assert not failures, f"{case['name']}: residual streams differ from torch:\n" + "\n".join(failures)


def test_logits_match_torch(case):
    failures = []
    for b, (seq, ref) in enumerate(zip(case["seqs"], case["refs"])):
        n = len(seq)
        got = case["logits"][b, :n]
        want = ref["logits"][0, :n]
        scale = max(1.0, float(np.abs(want).max()))
        err = np.abs(got - want)
        if not float(err.max()) <= LOGIT_RTOL * scale:
            pos = int(np.unravel_index(np.argmax(err), err.shape)[0])
            failures.append(f"prompt {b} (len {n}): max|Δlogit|={float(err.max()):.3e} (scale {scale:.3g}) "
                            f"worst position {pos}; per-position max "
                            f"{np.array2string(err.max(-1), precision=2)}")
    assert not failures, f"{case['name']}: logits differ from torch:\n" + "\n".join(failures)


def test_norm_lens_kl_to_torch(case):
    failures = []
    for b, (seq, ref) in enumerate(zip(case["seqs"], case["refs"])):
        n = len(seq)
        got = case["lens"][:, b, :n]
        want = ref["norm_lens_logits"][:, 0, :n]
        kl = F.kl_bits(want, got)  # KL(P_torch || P_jax), [L+1, n]
        for layer in range(kl.shape[0]):
            worst = float(kl[layer].max())
            if not worst <= KL_BITS_TOL:
                failures.append(f"prompt {b} (len {n}) layer {layer}: max KL={worst:.3e} bits at position "
                                f"{int(kl[layer].argmax())}")
    assert not failures, f"{case['name']}: norm-lens distributions differ from torch:\n" + "\n".join(failures)


def test_norm_lens_last_layer_is_model_output(case):
    """The norm lens at layer L is the model's own head: same distribution as fw.logits."""
    mask = case["mask"].astype(bool)
    kl = F.kl_bits(case["logits"], case["lens"][-1])[mask]
    assert float(kl.max()) <= KL_BITS_TOL


UNMASKED_CASES = ["gpt2", "gemma3_text", "llama-rope-dynamic"]


@pytest.mark.parametrize("name", UNMASKED_CASES)
def test_single_prompt_without_mask(name, tmp_path):
    """attention_mask=None on an unpadded [1, T] batch."""
    import jaxlens

    path = str(tmp_path)
    torch_model = F.build_checkpoint(name, path, seed=7)
    model = jaxlens.load_model(path)
    (seq,) = F.encode_prompts(model.tokenizer, (LONG,), prompts=F.PROMPTS[:1])
    ids = np.asarray(seq, dtype=np.int32)[None]
    fw = model.forward(_jnp().asarray(ids))
    ref = F.torch_reference(torch_model, ids)
    got, want = np.asarray(fw.logits), ref["logits"]
    scale = max(1.0, float(np.abs(want).max()))
    assert float(np.abs(got - want).max()) <= LOGIT_RTOL * scale
    res = np.asarray(fw.residuals)
    for layer in range(res.shape[0]):
        scale = float(np.abs(ref["residuals"][layer]).max())
        assert float(np.abs(res[layer] - ref["residuals"][layer]).max()) <= RESID_RTOL * scale, layer


LEGACY_CASES = ["gemma3_text", "gpt_neox", "phi3", "mistral"] + [f"llama-rope-{k}" for k in F.LLAMA_ROPE_VARIANTS]


@pytest.mark.parametrize("name", LEGACY_CASES)
def test_legacy_config_spelling(name, tmp_path):
    """The same checkpoint with a v4-style config.json (rope_theta + rope_scaling, rope_local_base_freq,
    rotary_pct, torch_dtype) gives the same model, in transformers and in jaxlens."""
    import json
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    import jaxlens

    new, old = tmp_path / "v5", tmp_path / "v4"
    torch_model = F.build_checkpoint(name, str(new), seed=21)
    shutil.copytree(new, old)
    cfg = json.loads((new / "config.json").read_text())
    legacy = F.to_legacy_config(cfg)
    assert "rope_parameters" not in legacy
    (old / "config.json").write_text(json.dumps(legacy, indent=2))

    ids = np.asarray(F.encode_prompts(jaxlens.load_model(str(new)).tokenizer, (LONG,), F.PROMPTS[:1]), np.int32)
    # the legacy directory means the same model to transformers ...
    hf_old = AutoModelForCausalLM.from_pretrained(str(old), attn_implementation="eager", dtype=torch.float32)
    want = F.torch_reference(torch_model, ids)["logits"]
    np.testing.assert_allclose(F.torch_reference(hf_old, ids)["logits"], want, rtol=0, atol=1e-5)
    # ... and to jaxlens
    m_new, m_old = jaxlens.load_model(str(new)), jaxlens.load_model(str(old))
    got_new = np.asarray(m_new.forward(_jnp().asarray(ids)).logits)
    got_old = np.asarray(m_old.forward(_jnp().asarray(ids)).logits)
    np.testing.assert_array_equal(got_old, got_new)
    assert float(np.abs(got_new - want).max()) <= LOGIT_RTOL * max(1.0, float(np.abs(want).max()))


# --------------------------------------------------------------------------------------------------
# Sharded forward (8 fake CPU devices)
# --------------------------------------------------------------------------------------------------

SHARDED_ARCHS = ["gpt2", "llama", "gemma2"]


@pytest.mark.parametrize("name", SHARDED_ARCHS)
def test_sharded_forward_matches_single_device(name, tmp_path):
    import jax

    import jaxlens
    from jaxlens.models.sharding import make_mesh

    if len(jax.devices()) < 8:
        pytest.skip(f"needs 8 devices, have {len(jax.devices())} (XLA_FLAGS set too late?)")
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    assert tuple(mesh.axis_names) == ("data", "fsdp", "tensor")
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}

    path = str(tmp_path)
    F.build_checkpoint(name, path, seed=3)
    single = jaxlens.load_model(path)
    sharded = jaxlens.load_model(path, mesh=mesh)

    leaves = jax.tree.leaves(sharded.params)
    assert any(not leaf.sharding.is_fully_replicated for leaf in leaves), \
        "no parameter is sharded across the mesh"
    seqs = F.encode_prompts(single.tokenizer, (LONG, SHORT))
    ids, mask = F.right_pad(seqs)
    jnp = _jnp()
    fw1 = single.forward(jnp.asarray(ids), jnp.asarray(mask))
    fw8 = sharded.forward(jnp.asarray(ids), jnp.asarray(mask))
    lens1 = np.asarray(jaxlens.lens_logits(single, fw1, lens="norm"))
    lens8 = np.asarray(jaxlens.lens_logits(sharded, fw8, lens="norm"))
    real = mask.astype(bool)

    r1, r8 = np.asarray(fw1.residuals), np.asarray(fw8.residuals)
    for layer in range(r1.shape[0]):
        a, b = r1[layer][real], r8[layer][real]
        scale = max(1.0, float(np.abs(a).max()))
        assert float(np.abs(a - b).max()) <= SHARD_RTOL * scale, f"residual[{layer}]"
    a, b = np.asarray(fw1.logits)[real], np.asarray(fw8.logits)[real]
    assert float(np.abs(a - b).max()) <= SHARD_RTOL * max(1.0, float(np.abs(a).max())), "logits"
    a, b = lens1[:, real], lens8[:, real]
    assert float(np.abs(a - b).max()) <= SHARD_RTOL * max(1.0, float(np.abs(a).max())), "norm lens"


# --------------------------------------------------------------------------------------------------
# The factory really exercises what it claims (torch only)
# --------------------------------------------------------------------------------------------------

def _torch_logits(name, seqs, **overrides):
    import torch
    from transformers import AutoModelForCausalLM

    cfg = F.make_config(name, **overrides)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    F._perturb_(model, F.variant_arch(name)[0], 0)
    model.eval()
    return [F.torch_reference(model, np.asarray(s)[None])["logits"] for s in seqs]


@pytest.fixture(scope="module")
def factory_prompts(tmp_path_factory):
    from transformers import AutoTokenizer

    d = str(tmp_path_factory.mktemp("factory-tok"))
    F.make_tokenizer(d, bos=True)
    return F.encode_prompts(AutoTokenizer.from_pretrained(d), (LONG, SHORT))


def _max_diff(a, b):
    return max(float(np.abs(x - y).max()) for x, y in zip(a, b))


FEATURE_TOGGLES = [
    ("mistral", dict(sliding_window=1000)),
    ("qwen2", dict(sliding_window=1000)),
    ("gemma2", dict(sliding_window=1000)),
    ("gemma3_text", dict(sliding_window=1000)),
    ("phi3", dict(sliding_window=1000)),
    ("gemma2", dict(attn_logit_softcapping=None)),
    ("gemma2", dict(final_logit_softcapping=None)),
    ("gemma2", dict(query_pre_attn_scalar=24)),
    ("gemma3_text", dict(rope_parameters={
        "full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
        "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}})),
    ("gemma3_text", dict(rope_parameters={
        "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1000000.0},
        "sliding_attention": {"rope_type": "default", "rope_theta": 1000000.0}})),
    ("gpt_neox", dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                        "partial_rotary_factor": 1.0})),
    ("phi3", dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 1.0})),
] + [(f"llama-rope-{k}", dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0}))
     for k in F.LLAMA_ROPE_VARIANTS]


@pytest.mark.parametrize("name,overrides", FEATURE_TOGGLES,
                         ids=[f"{n}-{next(iter(o))}" for n, o in FEATURE_TOGGLES])
def test_factory_feature_changes_output(name, overrides, factory_prompts):
    base = _torch_logits(name, factory_prompts)
    toggled = _torch_logits(name, factory_prompts, **overrides)
    assert _max_diff(base, toggled) > 0.05, f"{name}: {overrides} does not change the logits"


def test_factory_dynamic_rope_only_beyond_max_positions(factory_prompts):
    """Dynamic NTK leaves the short prompt (<= max_position_embeddings) alone and changes the long one,
    so the padded batch needs per-row frequencies to match the unpadded sequences."""
    base = _torch_logits("llama-rope-dynamic", factory_prompts,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    dyn = _torch_logits("llama-rope-dynamic", factory_prompts)
    cfg = F.make_config("llama-rope-dynamic")
    assert SHORT <= cfg.max_position_embeddings < LONG
    assert float(np.abs(base[0] - dyn[0]).max()) > 0.05
    assert float(np.abs(base[1] - dyn[1]).max()) == 0.0


def test_factory_reference_is_consistent(tmp_path):
    """hidden_states[0..L-1] are the block inputs; the hook's last entry is the raw last block output."""
    import torch

    model = F.build_checkpoint("olmo2", str(tmp_path))
    layers, in_norms, final_norm, head = F._parts(model)
    assert in_norms == [None] * len(layers)  # OLMo-2 has no input norm: lens is identity there
    inputs = []
    hooks = [layer.register_forward_pre_hook(
        lambda _m, a, k: inputs.append((a[0] if a else k["hidden_states"]).detach().clone()), with_kwargs=True)
        for layer in layers]
    ids = np.arange(3, 15)[None]
    try:
        ref = F.torch_reference(model, ids)
    finally:
        for h in hooks:
            h.remove()
    for i, x in enumerate(inputs):
        np.testing.assert_array_equal(ref["residuals"][i], x.numpy())
    with torch.no_grad():
        out = model(input_ids=torch.as_tensor(ids), output_hidden_states=True)
        normed = final_norm(torch.as_tensor(ref["residuals"][-1]))
    np.testing.assert_allclose(normed.numpy(), out.hidden_states[-1].numpy(), rtol=0, atol=1e-5)
    assert F.kl_bits(ref["logits"], ref["logits"]).max() == 0.0
    assert ref["norm_lens_logits"].shape[0] == len(layers) + 1
