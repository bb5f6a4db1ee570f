"""Tuned-lens training at scale: the (data, fsdp, tensor) mesh, the vocabulary-parallel loss, several processes.

* ``vocab_parallel_ce`` (W split over ``tensor``, rows over data x fsdp, online statistics merged by pmax /
  psum) equals the dense computation, loss and gradients, with a vocabulary no shard count divides;
* training on 8 fake devices with data=2,fsdp=4 and data=2,fsdp=2,tensor=2 gives the one-device losses and
  lens (fp32, <= 1e-5), with the lens / optimizer state / model really split (per-device bytes);
* a run stopped on 8 devices resumes on 4 and ends with the uninterrupted lens; a mesh that cannot run the
  checkpoint's micro-batches is refused with a sentence;
* two processes x 4 devices (gloo, coordinator on 127.0.0.1) equal one process, and kill -9 of one process +
  ``--resume`` on both ends with exactly the uninterrupted two-process lens (and one process resuming the
  same checkpoint ends with it to <= 1e-5);
* ``--layer-groups`` (layers scored a group at a time) gives the same lens;
* ``--plan-only`` reports per-device memory from abstract parameters (Llama-3-8B shape).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import numpy as np
import pytest

import hf_factory as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KW = dict(seq_len=32, tokens_per_step=8 * 32, progress=False, log=lambda m: None, lens_matmul="float32")


def _need8():
    import jax

    if len(jax.devices()) < 8:
        pytest.skip("needs 8 (fake) devices: XLA_FLAGS=--xla_force_host_platform_device_count=8")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny Qwen3 (3 layers, d 64, V 1000) and training text generated here."""
    import jaxlens
    from jaxlens.demo.corpus import generate

    root = tmp_path_factory.mktemp("tuned-mesh")
    ckpt = str(root / "qwen3")
    F.build_checkpoint("qwen3", ckpt, seed=21)
    train = root / "train.txt"
    train.write_text("\n\n".join(generate(seed=1, n_docs=400)))
    return dict(root=root, ckpt=ckpt, train=str(train), model=jaxlens.load_model(ckpt))


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def _lens_rel(r, ref) -> dict:
    return {k: _rel(r.lens.arrays()[k], v) for k, v in ref.lens.arrays().items()}


@pytest.mark.parametrize("shape,softcap,temp,bias", [((1, 1, 8), None, True, True), ((2, 1, 4), 2.5, False, False),
                                                     ((2, 2, 2), 2.5, True, True), ((1, 8, 1), None, False, False)])
def test_vocab_parallel_loss_and_gradient_match_dense(shape, softcap, temp, bias):
    import jax
    import jax.numpy as jnp

    from jaxlens.models.sharding import make_mesh
    from train_tuned.loss import dense_ce, vocab_parallel_ce

    _need8()
    mesh = make_mesh(*shape)
    k = jax.random.split(jax.random.key(5), 6)
    T, R, d, V = 32, 3, 16, 997                      # 997 is prime: no vocabulary shard count divides it
    x = jax.random.normal(k[0], (T, R, d))
    t = jax.random.normal(k[1], (T, d))
    W = 0.6 * jax.random.normal(k[2], (d, V))
    b = jax.random.normal(k[3], (V,)) if bias else None
    it = (1.0 + 0.2 * jax.random.normal(k[4], (R,))) if temp else None
    wts = jnp.cos(jnp.arange(T * R, dtype=jnp.float32).reshape(T, R))

    def run(fn, **kw):
        def f(x, it):
            ce, H = fn(x, t, W, b, it, softcap=softcap, **kw)
            return jnp.sum(wts * ce) + jnp.sum(H)
        argnums = (0, 1) if temp else (0,)
        return jax.jit(jax.value_and_grad(f, argnums=argnums))(x, it)

    (got, g_got), (want, g_want) = run(vocab_parallel_ce, mesh=mesh, chunk=64), run(dense_ce)
    assert abs(float(got) - float(want)) <= 1e-5 * abs(float(want))
    for a, b_ in zip(g_got, g_want):
        assert _rel(a, b_) <= 1e-5
    ce, H = jax.jit(lambda: vocab_parallel_ce(x, t, W, b, it, mesh=mesh, softcap=softcap, chunk=64))()
    ce0, H0 = dense_ce(x, t, W, b, it, softcap=softcap)
    assert _rel(ce, ce0) <= 1e-5 and _rel(H, H0) <= 1e-5


@pytest.fixture(scope="module")
def one_device(setup, tmp_path_factory):
    from train_tuned.train import train_lens

    return train_lens(setup["model"], setup["train"], str(tmp_path_factory.mktemp("one") / "lens"), steps=3,
                      devices=1, checkpoint_every=3, **KW)


@pytest.mark.parametrize("mesh", ["data=2,fsdp=4", "data=2,fsdp=2,tensor=2"])
def test_mesh_training_equals_one_device(setup, one_device, tmp_path, mesh):
    from train_tuned.train import train_lens

    _need8()
    r = train_lens(setup["ckpt"], setup["train"], str(tmp_path / "lens"), steps=3, mesh=mesh, checkpoint_every=3, **KW)
    want = dict(kv.split("=") for kv in mesh.split(","))
    assert r.card["training"]["mesh"] == {a: int(want.get(a, 1)) for a in ("data", "fsdp", "tensor")}
    assert r.card["training"]["micro_batch_seqs"] == one_device.card["training"]["micro_batch_seqs"] == 8
    assert _rel(r.card["loss_curve"], one_device.card["loss_curve"]) <= 1e-5
    for h, h1 in zip(r.history, one_device.history):
        assert _rel(h["kl"], h1["kl"]) <= 1e-5 and _rel(h["grad_norm"], h1["grad_norm"]) <= 1e-5
    assert max(_lens_rel(r, one_device).values()) <= 1e-5


def test_reference_recipe_on_mesh_gives_one_device_losses(setup, tmp_path):
    """Low rank + temperatures + AdamW + sampled layers / positions: the same losses on data=2,fsdp=4 (the lens
    itself is compared only loosely: AdamW's first steps are sign-like for gradients near 0)."""
    from train_tuned.train import train_lens

    _need8()
    kw = dict(KW, tokens_per_step=32 * 32, recipe="reference", steps=3, checkpoint_every=3)
    r1 = train_lens(setup["model"], setup["train"], str(tmp_path / "one"), devices=1, **kw)
    r8 = train_lens(setup["ckpt"], setup["train"], str(tmp_path / "mesh"), mesh="data=2,fsdp=4", **kw)
    assert r8.card["training"]["micro_batches"] == r1.card["training"]["micro_batches"] == 4
    assert _rel(r8.card["loss_curve"], r1.card["loss_curve"]) <= 1e-5
    for h, h1 in zip(r8.history, r1.history):
        assert _rel(h["kl"], h1["kl"]) <= 1e-5


def test_layer_groups_give_the_same_lens(setup, one_device, tmp_path):
    """Scoring the 3 translators in 3 groups (one differentiated at a time) = all at once; a non-divisor is refused."""
    from jaxlens.errors import JaxlensError
    from train_tuned.train import train_lens

    assert one_device.card["recipe"]["plan"]["layer_groups"] == 1          # auto: 3 layers fit in one group
    r = train_lens(setup["model"], setup["train"], str(tmp_path / "g3"), steps=3, devices=1, checkpoint_every=3,
                   layer_groups=3, **KW)
    assert r.card["recipe"]["plan"]["layer_groups"] == 3
    assert _rel(r.card["loss_curve"], one_device.card["loss_curve"]) <= 1e-6
    assert max(_lens_rel(r, one_device).values()) <= 1e-6
    with pytest.raises(JaxlensError, match="must divide the 3 layers"):
        train_lens(setup["model"], setup["train"], str(tmp_path / "g2"), steps=1, layer_groups=2, **KW)


def test_state_is_split_per_device(setup):
    """Per-device bytes from the compiled step's shardings: lens and optimizer state 1/fsdp, the model split."""
    from train_tuned.memory import plan_memory

    _need8()
    r = plan_memory(setup["ckpt"], mesh="data=2,fsdp=4", tokens_per_step=8 * 32, seq_len=32, lens_matmul="float32")
    pd, tot = r["per_device_bytes"], r["total_bytes"]
    spec = setup["model"].spec
    assert tot["lens_params"] == 4 * (spec.n_layers * spec.d_model * (spec.d_model + 1))
    assert pd["lens_params"] * 4 == tot["lens_params"]
    # the SGD momentum trace is lens-shaped (split the same way); a replicated step count adds a few bytes
    assert 0 <= tot["optimizer_state"] - tot["lens_params"] <= 16
    assert 0 <= pd["optimizer_state"] - pd["lens_params"] <= 16
    assert pd["model_params"] < 0.3 * tot["model_params"]
    rt = plan_memory(setup["ckpt"], mesh="data=2,fsdp=2,tensor=2", tokens_per_step=8 * 32, seq_len=32)
    assert rt["per_device_bytes"]["model_params"] < 0.3 * rt["total_bytes"]["model_params"]
    assert rt["per_device_bytes"]["lens_params"] * 2 == rt["total_bytes"]["lens_params"]
    assert rt["per_device_bytes"]["peak_estimate"] > rt["per_device_bytes"]["arguments"] > 0


def test_resume_on_another_mesh(setup, tmp_path):
    """Stopped on 8 devices (data=2,fsdp=4), resumed on 4 (fsdp=4): the uninterrupted lens; 3 devices refused."""
    import jax

    from jaxlens.errors import JaxlensError
    from jaxlens.models.sharding import make_mesh
    from train_tuned.train import train_lens

    _need8()
    kw = dict(KW, steps=4, checkpoint_every=2)
    full = train_lens(setup["ckpt"], setup["train"], str(tmp_path / "full"), mesh="data=2,fsdp=4", **kw)
    out = str(tmp_path / "cut")
    part = train_lens(setup["ckpt"], setup["train"], out, mesh="data=2,fsdp=4", stop_at=2, **kw)
    assert part.step == 2 and not part.complete
    with pytest.raises(JaxlensError, match="do not split over the 3 data x fsdp shards"):
        train_lens(setup["ckpt"], setup["train"], out, mesh=make_mesh(3, 1, 1), resume=True, **kw)
    four = make_mesh(1, 4, 1, devices=jax.devices()[:4])
    res = train_lens(setup["ckpt"], setup["train"], out, mesh=four, resume=True, **kw)
    assert res.complete and res.card["training"]["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
    assert res.card["data"]["content_hash"] == full.card["data"]["content_hash"]
    assert _rel(res.card["loss_curve"], full.card["loss_curve"]) <= 1e-5
    assert max(_lens_rel(res, full).values()) <= 1e-5


# ------------------------------------------------------------------------------------------------
# two processes


def _latest_complete(ckpt_dir):
    if not os.path.isdir(ckpt_dir):
        return 0
    steps = [int(n) for n in os.listdir(ckpt_dir) if n.isdigit()
             and os.path.exists(os.path.join(ckpt_dir, n, "_CHECKPOINT_METADATA"))]
    return max(steps, default=0)


def _two(setup, out, *extra, sleep=None):
    import multiproc as MP

    cmd = ["-m", "jaxlens", "train-lens", "--model", setup["ckpt"], "--data", setup["train"],
           "--out", str(out), "--steps", "6", "--seq-len", "32", "--tokens-per-step", "256", "--checkpoint-every", "2",
           "--lens-matmul", "float32", "--mesh", "data=2,fsdp=2,tensor=2", "--coordinator",
           f"127.0.0.1:{MP.free_port()}", "--num-processes", "2", "--quiet", *extra]
    extra_env = {"JAX_DEFAULT_MATMUL_PRECISION": "highest"}
    if sleep:
        extra_env["JAXLENS_TRAIN_STEP_SLEEP"] = sleep
    return MP.launch(cmd, **extra_env)


def _finish(procs, timeout=300):
    import multiproc as MP

    return MP.finish(procs, timeout)


def test_two_processes_equal_one_and_kill9_resume_is_exact(setup, tmp_path):
    from safetensors.numpy import load_file

    from train_tuned.train import train_lens

    _need8()
    two = tmp_path / "two"
    _finish(_two(setup, two))
    one = train_lens(setup["ckpt"], setup["train"], str(tmp_path / "one"), steps=6, checkpoint_every=2,
                     mesh="data=2,fsdp=2,tensor=2", **KW)
    a = load_file(str(two / "lens.safetensors"))
    card = json.load(open(two / "lens_card.json"))
    assert card["training"]["processes"] == 2 and card["training"]["devices"] == 8
    assert _rel(card["loss_curve"], one.card["loss_curve"]) <= 1e-5
    for k, v in one.lens.arrays().items():
        assert _rel(a[k], v) <= 1e-5, k
    # kill -9 one process mid-run; the other cannot go on (its collectives have no peer): stop it too, resume both
    cut = tmp_path / "cut"
    procs = _two(setup, cut, sleep=0.5)
    t0 = time.time()
    while _latest_complete(str(cut / "checkpoints")) < 2:
        assert all(p.poll() is None for p in procs) and time.time() - t0 < 240, procs[1].communicate()[1][-3000:]
        time.sleep(0.02)
    procs[1].send_signal(signal.SIGKILL)
    procs[1].wait()
    assert procs[1].returncode == -signal.SIGKILL
    try:
        procs[0].wait(timeout=20)
    except subprocess.TimeoutExpired:
        procs[0].kill()
        procs[0].wait()
    assert not (cut / "lens.safetensors").exists()
    assert _latest_complete(str(cut / "checkpoints")) < 6
    import shutil

    alone = tmp_path / "alone"                            # the same checkpoint, resumed by one process
    shutil.copytree(cut, alone)
    _finish(_two(setup, cut, "--resume"))
    b = load_file(str(cut / "lens.safetensors"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    cb = json.load(open(cut / "lens_card.json"))
    assert cb["loss_curve"] == card["loss_curve"] and cb["data"]["content_hash"] == card["data"]["content_hash"]
    # a two-process checkpoint resumed by one process (8 devices, the same mesh shape): the same lens
    res = train_lens(setup["ckpt"], setup["train"], str(alone), steps=6, checkpoint_every=2, resume=True,
                     mesh="data=2,fsdp=2,tensor=2", **KW)
    assert res.complete and res.card["training"]["processes"] == 1
    assert res.card["data"]["content_hash"] == card["data"]["content_hash"]
    assert _rel(res.card["loss_curve"], card["loss_curve"]) <= 1e-5
    for k in a:
        assert _rel(res.lens.arrays()[k], a[k]) <= 1e-5, k


# ------------------------------------------------------------------------------------------------
# --plan-only


def test_plan_only_llama3_8b_shape(capsys):
    from jaxlens.cli import main

    _need8()
    cfg = os.path.join(ROOT, "configs", "shapes", "llama-3-8b")
    assert main(["train-lens", "--plan-only", "--model", cfg, "--mesh", "data=2,fsdp=4", "--dtype", "bfloat16",
                 "--json"]) == 0
    out = capsys.readouterr().out
    r = json.loads(out[out.index("\n{") + 1:])
    pd, tot = r["per_device_bytes"], r["total_bytes"]
    # 32 full-rank 4096 x 4096 translators + biases, fp32: 2 GiB; over fsdp=4: a quarter per device
    assert tot["lens_params"] == 32 * 4096 * 4097 * 4 and pd["lens_params"] * 4 == tot["lens_params"]
    assert r["plan"]["tokens_per_step"] == 262144                     # the recipe's, not the CPU-scaled default
    # bf16 Llama-3-8B: 8.03e9 parameters; the model is split 4 ways over fsdp (norms replicated)
    assert 8.0e9 < tot["model_params"] / 2 < 8.1e9
    assert abs(pd["model_params"] * 4 / tot["model_params"] - 1) < 1e-3
    assert "lens" in out and "peak estimate" in out
    assert main(["train-lens", "--plan-only", "--model", cfg, "--mesh", "data=8,fsdp=8"]) == 2
    assert "add --fake-devices" in capsys.readouterr().err
