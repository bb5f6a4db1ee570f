"""Tuned-lens training (``train_tuned``, ``jaxlens train-lens`` / ``eval-lens``).

* the streaming loss and its custom VJP against a dense computation (<= 1e-5);
* the optax recipe against PyTorch's SGD semantics (clip -> coupled weight decay -> Nesterov, linear LR);
* data packing, seeded order and the content hash;
* a short run lowers held-out KL below the logit lens at every layer but the last (and eval-lens reports it);
* the reference recipe runs with its Q7 bookkeeping fixed;
* ``--stop-at`` + ``--resume`` and ``kill -9`` + ``--resume`` end with exactly the uninterrupted lens;
* 8-device data parallelism gives the 1-device losses.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import hf_factory as F

STEPS = 24


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny Qwen3 checkpoint, training text and held-out text generated here (the demo corpus generator)."""
    import jaxlens
    from jaxlens.demo.corpus import generate

    root = tmp_path_factory.mktemp("tuned-train")
    ckpt = str(root / "qwen3")
    F.build_checkpoint("qwen3", ckpt, seed=21)
    train = root / "train.txt"
    train.write_text("\n\n".join(generate(seed=1, n_docs=1500)))
    held = root / "heldout.txt"
    held.write_text("\n\n".join(generate(seed=2, n_docs=300)))
    model = jaxlens.load_model(ckpt)
    return dict(root=root, ckpt=ckpt, train=str(train), held=str(held), model=model)


# ------------------------------------------------------------------------------------------------
# streaming loss


@pytest.mark.parametrize("softcap,temp,bias", [(None, True, True), (2.5, True, False), (None, False, False)])
def test_stream_loss_and_gradient_match_dense(softcap, temp, bias):
    import jax

    from train_tuned.loss import dense_ce, stream_ce

    k = jax.random.split(jax.random.key(7), 6)
    T, R, d, V = 29, 3, 16, 997                      # V not a multiple of the chunk; T not of the token block
    x = jax.random.normal(k[0], (T, R, d))
    t = jax.random.normal(k[1], (T, d))
    W = 0.6 * jax.random.normal(k[2], (d, V))
    b = jax.random.normal(k[3], (V,)) if bias else None
    it = (1.0 / (0.5 + jax.random.uniform(k[4], (T, R)))) if temp else None
    g = jax.random.normal(k[5], (T, R))

    def run(fn):
        def f(x, it):
            ce, H = fn(x, t, W, b, it, softcap=softcap)
            return ce - H[:, None]

        out, vjp = jax.vjp(f, x, it)
        return out, vjp(g)

    stream = lambda *a, **kw: stream_ce(*a, chunk=128, token_block=8, **kw)   # noqa: E731
    (got, g_s), (want, g_d) = jax.jit(lambda: run(stream))(), jax.jit(lambda: run(dense_ce))()
    two_pass = lambda *a, **kw: stream_ce(*a, chunk=128, token_block=8, fused_grad=False, **kw)   # noqa: E731
    _, g_2 = jax.jit(lambda: run(two_pass))()
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)
    for grads in (g_s, g_2):                           # fused (default) and two-pass custom VJPs
        for a, e in zip(jax.tree.leaves(grads), jax.tree.leaves(g_d)):
            a, e = np.asarray(a), np.asarray(e)
            assert np.max(np.abs(a - e)) <= 1e-5 * max(1.0, np.max(np.abs(e))), np.max(np.abs(a - e))
    assert (g_s[1] is None) == (not temp)


# ------------------------------------------------------------------------------------------------
# recipes and optimizer


def test_recipes_and_sgd_convention(setup):
    import jax.numpy as jnp

    from train_tuned.train import load_recipe, make_optimizer, make_plan

    model = setup["model"]
    tl = make_plan(model, load_recipe("tuned-lens"), steps=250, tokens_per_step=262144)
    assert tl.optimizer["lr"] == pytest.approx(0.1) and tl.trained_layers == list(range(model.spec.n_layers))
    assert tl.seq_len == model.spec.max_positions and tl.seq_len_reason.startswith("capped")
    ref = make_plan(model, load_recipe("reference"))
    assert ref.micro_batches == 4 and ref.steps == 1954 and ref.rank == 64 and ref.trained_layers == [1, 2]
    assert ref.positions == "sampled" and ref.position_window == [76, 122]
    auto = make_plan(model, load_recipe("tuned-lens"))
    assert auto.tokens_per_step < 262144 and "auto" in auto.tokens_per_step_reason

    # optax chain == torch.optim.SGD(nesterov, momentum 0.9, coupled wd 1e-3) after global-norm clipping,
    # with LambdaLR linear decay (lr_t = 0.1 (1 - t / steps)), written out in numpy
    opt = make_optimizer(tl)
    rng = np.random.default_rng(0)
    p = {"W": rng.normal(size=(3, 4)).astype(np.float32), "b": rng.normal(size=(4,)).astype(np.float32)}
    jp = {k: jnp.asarray(v) for k, v in p.items()}
    st = opt.init(jp)
    buf = None
    for t in range(4):
        g = {k: rng.normal(scale=2.0, size=v.shape).astype(np.float32) for k, v in p.items()}
        norm = np.sqrt(sum((v.astype(np.float64) ** 2).sum() for v in g.values()))
        gc = {k: v * min(1.0, 1.0 / (norm + 1e-6)) if norm > 1.0 else v for k, v in g.items()}
        dp = {k: gc[k] + 1e-3 * p[k] for k in p}
        buf = dp if buf is None else {k: 0.9 * buf[k] + dp[k] for k in p}
        lr = 0.1 * (1 - t / 250)
        p = {k: p[k] - lr * (dp[k] + 0.9 * buf[k]) for k in p}
        upd, st = opt.update({k: jnp.asarray(v) for k, v in g.items()}, st, jp)
        jp = {k: jp[k] + upd[k] for k in jp}
    for k in p:
        np.testing.assert_allclose(np.asarray(jp[k]), p[k], rtol=2e-5, atol=1e-6)


def test_data_packing_order_and_hash(setup):
    from train_tuned import data as D

    tok = setup["model"].tokenizer
    src = D.FileData(setup["train"], tok, 32, join_eos=True, seed=5, shuffle=True)
    assert src.chunks.flat[0] == tok.eos_token_id                 # the stream starts with EOS
    a = src.batch(0, src.n_sequences + 3)                        # crosses into epoch 1
    assert np.array_equal(np.concatenate([src.batch(0, 5), src.batch(5, src.n_sequences - 2)]), a)
    assert sorted(map(bytes, a[: src.n_sequences])) == sorted(map(bytes, src.chunks))   # a permutation
    again = D.FileData(setup["train"], tok, 32, join_eos=True, seed=5, shuffle=True)
    assert np.array_equal(again.batch(0, 7), src.batch(0, 7))
    other = D.FileData(setup["train"], tok, 32, join_eos=True, seed=6, shuffle=True)
    assert not np.array_equal(other.batch(0, 7), src.batch(0, 7))
    h1 = D.chain_hash(D.chain_hash(D.EMPTY_HASH, a[:4]), a[4:8])
    assert h1 == D.chain_hash(D.chain_hash(D.EMPTY_HASH, src.batch(0, 4)), src.batch(4, 4))
    plain = D.FileData(setup["train"], tok, 32, join_eos=False, shuffle=False)
    assert tok.eos_token_id not in plain.chunks[:3]
    assert plain.nats_to_bpb == pytest.approx(plain.n_tokens_total / plain.n_bytes / np.log(2))


# ------------------------------------------------------------------------------------------------
# training runs


@pytest.fixture(scope="module")
def trained(setup):
    from train_tuned.train import train_lens

    out = str(setup["root"] / "lens-tl")
    res = train_lens(setup["model"], setup["train"], out, steps=STEPS, seq_len=32, tokens_per_step=1024,
                     checkpoint_every=8, progress=False, log=lambda m: None)
    return dict(out=out, res=res)


def test_trained_lens_card(setup, trained):
    import jaxlens

    out = trained["out"]
    assert trained["res"].complete
    card = json.load(open(os.path.join(out, "lens_card.json")))
    assert card["training"]["steps_done"] == STEPS and card["training"]["tokens"] == STEPS * 1024
    assert card["data"]["content_hash"] != card["data"]["sha256"] and card["data"]["sequences_consumed"] == STEPS * 32
    assert card["layer_convention"]["translator_index_to_layer"].startswith("translator k decodes jaxlens layer l = k")
    assert card["model"]["fingerprint"] and card["recipe"]["name"] == "tuned-lens"
    first, last = card["final_losses"]["first_step"]["kl_nats"], card["final_losses"]["final_step"]["kl_nats"]
    assert all(b < a for a, b in zip(first, last))
    lens = jaxlens.load_lens(out)                          # the jaxlens format decodes without binding
    assert lens.family == "tuned-lens" and lens.bound


def test_demo_short_run_beats_logit_lens_on_heldout(setup, tmp_path, capsys):
    """On the demo model (the tiny checkpoint if the demo is not installed), with text generated here."""
    import jaxlens
    from jaxlens.cli import main
    from train_tuned.train import train_lens

    try:
        model, source = jaxlens.load_model("demo"), "demo"
    except jaxlens.JaxlensError:
        model, source = setup["model"], setup["ckpt"]
    n = model.spec.n_layers
    out = str(tmp_path / "demo-lens")
    train_lens(model, setup["train"], out, steps=16, seq_len=64, tokens_per_step=768, progress=False,
               log=lambda m: None)
    res_path = str(tmp_path / "eval.json")
    rc = main(["eval-lens", "--model", source, "--lens", out, "--data", setup["held"], "--out", res_path,
               "--tokens", "3072", "--quiet"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "baseline (model)" in printed and res_path in printed
    res = json.load(open(res_path))
    logit, tuned = np.array(res["logit"]["kl_nats"]), np.array(res["tuned"]["kl_nats"])
    assert (tuned[:n] < logit[:n]).all(), (logit, tuned)          # every layer but the last (n: the model)
    assert abs(tuned[n]) < 1e-5 and abs(logit[n]) < 1e-5
    assert res["tuned"]["kl_bpb"][0] == pytest.approx(tuned[0] * res["nats_to_bpb"])
    assert res["baseline"]["ce_nats"] == pytest.approx(res["tuned"]["ce_nats"][n])


def test_stop_at_then_resume_equals_uninterrupted(setup, trained, tmp_path):
    from safetensors.numpy import load_file

    from train_tuned.train import train_lens

    out = str(tmp_path / "lens")
    kw = dict(steps=STEPS, seq_len=32, tokens_per_step=1024, checkpoint_every=8, progress=False, log=lambda m: None)
    r1 = train_lens(setup["model"], setup["train"], out, stop_at=10, **kw)
    assert not r1.complete and r1.step == 10
    assert json.load(open(os.path.join(out, "lens_card.json")))["training"]["complete"] is False
    r2 = train_lens(setup["model"], setup["train"], out, resume=True, **kw)
    assert r2.complete
    a, b = load_file(os.path.join(trained["out"], "lens.safetensors")), load_file(os.path.join(out, "lens.safetensors"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    ca, cb = (json.load(open(os.path.join(d, "lens_card.json"))) for d in (trained["out"], out))
    assert ca["final_losses"] == cb["final_losses"] and ca["loss_curve"] == cb["loss_curve"]
    assert ca["data"]["content_hash"] == cb["data"]["content_hash"]


def test_bf16_model_and_bf16_lens_matmul_keep_fp32_lens(setup, tmp_path):
    import jax
    import jax.numpy as jnp

    import jaxlens
    from train_tuned.loss import dense_ce, stream_ce
    from train_tuned.train import train_lens

    # bf16 GEMM operands: values close to the fp32 oracle, gradient returned in float32
    k = jax.random.split(jax.random.key(3), 3)
    x, t, W = jax.random.normal(k[0], (16, 2, 16)), jax.random.normal(k[1], (16, 16)), jax.random.normal(k[2], (16, 300))
    f = jax.jit(lambda x: stream_ce(x, t, W, compute_dtype=jnp.bfloat16, chunk=128)[0])
    np.testing.assert_allclose(np.asarray(f(x)), np.asarray(dense_ce(x, t, W)[0]), rtol=3e-2, atol=3e-2)
    gx = jax.jit(jax.grad(lambda x: jnp.sum(stream_ce(x, t, W, compute_dtype=jnp.bfloat16, chunk=128)[0])))(x)
    assert gx.dtype == jnp.float32
    # a bf16 model trains an fp32 lens
    model = jaxlens.load_model(setup["ckpt"], dtype="bfloat16")
    res = train_lens(model, setup["train"], str(tmp_path / "bf16"), steps=2, seq_len=32, tokens_per_step=256,
                     progress=False, log=lambda m: None)
    assert res.card["training"]["model_dtype"] == "bfloat16" and np.isfinite(res.card["loss_curve"]).all()
    assert all(np.asarray(v).dtype == np.float32 for v in res.lens.arrays().values())


def test_reference_recipe_runs_with_q7_fixed(setup, tmp_path):
    import jaxlens
    from train_tuned.train import train_lens

    out = str(tmp_path / "ref")
    res = train_lens(setup["model"], setup["train"], out, recipe="reference", steps=3, seq_len=32,
                     tokens_per_step=256, progress=False, log=lambda m: None)
    tr = res.card["training"]
    assert tr["micro_batches"] == 4 and tr["micro_batch_seqs"] == 2 and tr["tokens"] == 3 * 256
    plan = res.card["recipe"]["plan"]
    assert plan["optimizer"]["warmup_steps"] == 0 and plan["optimizer"]["decay_temperatures"] is False
    lens = jaxlens.load_lens(out, model=setup["model"])
    assert lens.family == "reference" and lens.base == "norm"
    assert np.abs(np.asarray(lens.V)).max() > 0          # the U ~ N(0, 1/d) init leaves the zero/zero saddle
    # stop + resume restores the (masked) AdamW state exactly
    out2 = str(tmp_path / "ref2")
    kw = dict(recipe="reference", steps=3, seq_len=32, tokens_per_step=256, progress=False, log=lambda m: None)
    train_lens(setup["model"], setup["train"], out2, stop_at=1, **kw)
    res2 = train_lens(setup["model"], setup["train"], out2, resume=True, **kw)
    for k, v in res.lens.arrays().items():
        assert np.array_equal(np.asarray(res2.lens.arrays()[k]), np.asarray(v)), k


def _cli(args, **kw):
    return subprocess.Popen([sys.executable, "-m", "jaxlens", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def _latest_complete(ckpt_dir):
    if not os.path.isdir(ckpt_dir):
        return 0
    steps = [int(n) for n in os.listdir(ckpt_dir) if n.isdigit()
             and os.path.exists(os.path.join(ckpt_dir, n, "_CHECKPOINT_METADATA"))]
    return max(steps, default=0)


def test_kill9_then_resume_is_exact(setup, trained, tmp_path):
    """kill -9 a CLI run during training, resume it: the lens equals the uninterrupted (in-process) run's."""
    from safetensors.numpy import load_file

    cut = str(tmp_path / "cut")
    args = ["train-lens", "--model", setup["ckpt"], "--data", setup["train"], "--out", cut, "--steps", str(STEPS),
            "--seq-len", "32", "--tokens-per-step", "1024", "--checkpoint-every", "8", "--quiet"]
    env = dict(os.environ, JAX_DEFAULT_MATMUL_PRECISION="highest")   # what conftest sets in this process
    b = _cli(args, env=dict(env, JAXLENS_TRAIN_STEP_SLEEP="0.25"))
    t0 = time.time()
    while _latest_complete(os.path.join(cut, "checkpoints")) < 8:
        assert b.poll() is None and time.time() - t0 < 120, b.communicate()
        time.sleep(0.02)
    b.send_signal(signal.SIGKILL)                          # kill -9 during training (steps 9.. are running)
    b.wait()
    assert b.returncode == -signal.SIGKILL
    assert not os.path.exists(os.path.join(cut, "lens.safetensors"))
    assert _latest_complete(os.path.join(cut, "checkpoints")) < STEPS
    c = _cli(args + ["--resume"], env=env)
    _, err = c.communicate(timeout=300)
    assert c.returncode == 0, err
    full = trained["out"]
    x, y = load_file(os.path.join(full, "lens.safetensors")), load_file(os.path.join(cut, "lens.safetensors"))
    assert x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)
    cx, cy = (json.load(open(os.path.join(d, "lens_card.json"))) for d in (full, cut))
    assert cx["final_losses"] == cy["final_losses"] and cx["data"]["content_hash"] == cy["data"]["content_hash"]


def test_data_parallel_8_devices_matches_1(setup, tmp_path):
    import jax

    from train_tuned.train import train_lens

    if len(jax.devices()) < 8:
        pytest.skip("needs 8 (fake) devices: XLA_FLAGS=--xla_force_host_platform_device_count=8")
    # fp32 vocabulary GEMMs (not the recipe's bf16), so that only the data-parallel reduction can differ
    kw = dict(steps=2, seq_len=32, tokens_per_step=8 * 32, checkpoint_every=2, progress=False, log=lambda m: None,
              lens_matmul="float32")
    r1 = train_lens(setup["model"], setup["train"], str(tmp_path / "one"), devices=1, micro_batch=8, **kw)
    r8 = train_lens(setup["model"], setup["train"], str(tmp_path / "eight"), devices=8, micro_batch=1, **kw)
    assert r1.card["training"]["devices"] == 1 and r8.card["training"]["devices"] == 8
    np.testing.assert_allclose(r8.card["loss_curve"], r1.card["loss_curve"], rtol=1e-5)
    for h1, h8 in zip(r1.history, r8.history):
        np.testing.assert_allclose(h8["kl"], h1["kl"], rtol=1e-5)
    for k, v in r1.lens.arrays().items():
        np.testing.assert_allclose(np.asarray(r8.lens.arrays()[k]), np.asarray(v), rtol=1e-4, atol=1e-6)


def test_cli_errors(setup, tmp_path, capsys):
    from jaxlens.cli import main

    common = ["--model", setup["ckpt"], "--data", setup["train"], "--seq-len", "32", "--tokens-per-step", "512"]
    assert main(["train-lens", *common, "--out", str(tmp_path / "x"), "--recipe", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown recipe 'nope'" in err
    assert main(["train-lens", *common, "--out", str(tmp_path / "y"), "--data", str(tmp_path / "none.txt")]) == 2
    assert "does not exist" in capsys.readouterr().err
    out = str(tmp_path / "z")
    assert main(["train-lens", *common, "--out", out, "--steps", "2", "--quiet"]) == 0
    capsys.readouterr()
    assert main(["train-lens", *common, "--out", out, "--steps", "2", "--quiet"]) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(["train-lens", *common, "--out", out, "--steps", "3", "--resume", "--quiet"]) == 2
    assert "plan.steps" in capsys.readouterr().err
