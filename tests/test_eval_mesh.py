"""``eval-lens`` on a mesh (``evaluate_lens(mesh=...)``, ``jaxlens eval-lens --mesh``) and over two processes.

The demo model and its bundled tuned lens (tuned-lens family), plus a random reference-family lens (translators
on the norm lens's rows, with temperatures: the norm lens is evaluated too), on held-out demo text. Batches of
6 sequences (11 sequences: 6 + 5) divide neither 8 nor 4 batch shards, so every batch is padded with dummy
rows that the sums leave out. Every per-layer CE / entropy / KL equals the one-device result to 1e-5 relative
(fp32 rounding of the sharded contractions is ~1e-7); the KL at layer n, the model against itself (~1e-8 nats,
rounding only), is compared in absolute terms.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

SEQ, BATCH = 64, 6
METRICS = ("ce_nats", "entropy_nats", "kl_nats")


def _demo_lens() -> str:
    import jaxlens.demo

    return os.path.join(os.path.dirname(jaxlens.demo.__file__), "tuned_lens")


def _lowrank(model, seed=5, rank=8):
    """A random reference-family lens for ``model`` (translators on the normalised rows, temperatures)."""
    from jaxlens.lens.tuned import LowRankLens

    n, d = model.spec.n_layers, model.spec.d_model
    rng = np.random.default_rng(seed)
    return LowRankLens(U=(0.1 * rng.normal(size=(n - 1, d, rank))).astype(np.float32),
                       V=(0.1 * rng.normal(size=(n - 1, d, rank))).astype(np.float32),
                       c=(0.05 * rng.normal(size=(n - 1, d))).astype(np.float32),
                       theta=rng.normal(size=(n - 1,)).astype(np.float32), n_layers=n)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    import jaxlens
    from jaxlens.demo.corpus import generate
    from train_tuned.evaluate import evaluate_lens

    root = tmp_path_factory.mktemp("eval-mesh")
    held = root / "held.txt"
    held.write_text("\n\n".join(generate(seed=2, n_docs=40)))
    model = jaxlens.load_model("demo")
    one = evaluate_lens(model, _demo_lens(), str(held), seq_len=SEQ, batch_seqs=BATCH, progress=False)
    assert one["data"]["sequences_evaluated"] == 11 and one["mesh"] is None and one["processes"] == 1
    return dict(root=root, held=str(held), model=model, one=one)


def _compare(one: dict, other: dict, lenses=("logit", "tuned")) -> dict:
    """Assert equality (1e-5 relative; layer n's KL, ~0, to 1e-6 nats); returns each lens's max relative
    difference."""
    worst = {}
    for name in lenses:
        for k in METRICS:
            a, b = np.asarray(one[name][k]), np.asarray(other[name][k])
            if k == "kl_nats":
                assert abs(a[-1]) < 1e-6 and abs(b[-1] - a[-1]) < 1e-6, (name, a[-1], b[-1])
                a, b = a[:-1], b[:-1]
            rel = float(np.max(np.abs(a - b) / np.abs(a)))
            assert rel <= 1e-5, (name, k, rel)
            worst[name] = max(worst.get(name, 0.0), rel)
    assert other["data"]["tokens_evaluated"] == one["data"]["tokens_evaluated"]
    assert other["baseline"]["ce_nats"] == pytest.approx(one["baseline"]["ce_nats"], rel=1e-5)
    return worst


@pytest.mark.parametrize("mesh", ["data=2,fsdp=4", "data=2,fsdp=2,tensor=2"])
def test_mesh_equals_one_device(setup, mesh):
    import jax

    from train_tuned.evaluate import evaluate_lens

    if jax.device_count() != 8:
        pytest.skip("needs the test session's 8 fake devices")
    res = evaluate_lens("demo", _demo_lens(), setup["held"], seq_len=SEQ, batch_seqs=BATCH, progress=False, mesh=mesh)
    sizes = dict(kv.split("=") for kv in mesh.split(","))
    assert res["mesh"] == {a: int(sizes.get(a, 1)) for a in ("data", "fsdp", "tensor")}
    print(f"{mesh}: max relative differences {_compare(setup['one'], res)}")


def test_reference_lens_and_norm_lens_on_a_mesh(setup):
    """A lens on the norm lens's rows (so the norm lens is evaluated too) with per-layer temperatures: its arrays
    are replicated over the mesh."""
    import jax

    import jaxlens
    from jaxlens.models.sharding import make_mesh
    from train_tuned.evaluate import evaluate_lens

    if jax.device_count() != 8:
        pytest.skip("needs the test session's 8 fake devices")
    kw = dict(seq_len=SEQ, batch_seqs=BATCH, progress=False)
    one = evaluate_lens(setup["model"], _lowrank(setup["model"]), setup["held"], **kw)
    mesh = make_mesh(2, 2, 2)
    sharded = jaxlens.load_model("demo", mesh=mesh)
    res = evaluate_lens(sharded, _lowrank(sharded), setup["held"], **kw)              # the model's own mesh
    assert res["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}
    print(f"reference-family lens, data=2,fsdp=2,tensor=2: max relative differences "
          f"{_compare(one, res, lenses=('logit', 'tuned', 'norm'))}")
    with pytest.raises(Exception, match="loaded with that mesh"):
        evaluate_lens(setup["model"], _lowrank(setup["model"]), setup["held"], mesh=mesh, **kw)


def test_cli_mesh_flag_and_errors(setup, tmp_path, capsys):
    from jaxlens.cli import main

    out = tmp_path / "eval.json"
    rc = main(["eval-lens", "--lens", _demo_lens(), "--data", setup["held"], "--seq-len", str(SEQ), "--batch",
               str(BATCH), "--mesh", "data=-1", "--out", str(out), "--quiet"])
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["mesh"] == {"data": 8, "fsdp": 1, "tensor": 1}
    _compare(setup["one"], res)
    capsys.readouterr()
    for mesh, words in (("data=x", "not an integer"), ("rows=2", "expected data=N"), ("data=3", "covers 3 devices")):
        assert main(["eval-lens", "--lens", _demo_lens(), "--data", setup["held"], "--mesh", mesh]) == 2
        err = capsys.readouterr().err
        assert err.startswith("jaxlens: error: --mesh") and words in err and "Traceback" not in err, err


def test_two_processes_equal_one_device(setup, tmp_path):
    """``jaxlens eval-lens`` under jax.distributed: two processes on 127.0.0.1 x 4 fake CPU devices (gloo), mesh
    data=1,fsdp=2,tensor=4 (the parameters and each batch split across the processes). Process 0 alone writes
    the JSON and prints the table; the numbers are the one-device run's."""
    import multiproc as MP

    out = tmp_path / "eval.json"
    cmd = ["-m", "jaxlens.cli", "eval-lens", "--model", "demo", "--lens", _demo_lens(), "--data",
           setup["held"], "--seq-len", str(SEQ), "--batch", str(BATCH), "--out", str(out), "--quiet",
           "--mesh", "data=1,fsdp=2,tensor=4", "--coordinator", f"127.0.0.1:{MP.free_port()}", "--num-processes", "2"]
    res = MP.finish(MP.launch(cmd), timeout=240)
    assert str(out) in res[0][0] and "baseline (model)" in res[0][0]
    assert "baseline (model)" not in res[1][0] and str(out) not in res[1][0]       # process 1: no table, no path
    two = json.loads(out.read_text())
    assert two["processes"] == 2 and two["mesh"] == {"data": 1, "fsdp": 2, "tensor": 4}
    print(f"two processes: max relative differences {_compare(setup['one'], two)}")
