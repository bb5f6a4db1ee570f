"""``jaxlens sweep`` sharded and on JAX's multi-controller runtime.

* two processes on 127.0.0.1, 4 fake CPU devices each, gloo CPU collectives, the demo model's parameters sharded
  across both processes (mesh data=1, fsdp=2, tensor=4: the fsdp axis spans the processes). Each process feeds
  its half of every global batch and writes its own shards; process 0 writes the manifest. The tables equal a
  single-process run's up to fp32 rounding (the sharded contractions sum in another order);
* a mesh data=2, fsdp=2, tensor=2 over the 8 fake devices of the test session with a tuned lens (--tuned DIR), a
  fitted Prism (--prism DIR) and --positions all: the same rows as one device; on a mesh too a prompt's rows do
  not depend on its bucket, window or company;
* kill -9 of a two-process sweep, then --resume as one process, and the opposite (the resuming processes found by
  --distributed auto in a one-node SLURM environment): the finished directory holds every window, nothing stray,
  and each window's rows are those of the run that computed it;
* --distributed auto without a cluster: one sentence, exit status 2.
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

pa = pytest.importorskip("pyarrow")

import multiproc as MP  # noqa: E402

BT = 256
WORDS = "the capital of France is Paris and Germany Berlin one two three plus is called simply a city".split()


def _write_prompts(path, *, seed: int, n: int, max_words: int, prefix: str) -> list:
    """n seeded prompts of 2..max_words-1 words (ids prefix0..), each with an answer, written as JSONL."""
    rng = np.random.default_rng(seed)
    rows = [{"id": f"{prefix}{i}", "prompt": " ".join(rng.choice(WORDS, int(rng.integers(2, max_words)))),
             "answer": str(rng.choice(["Paris", "Berlin", "two"]))} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def test_two_processes_equal_one(tmp_path):
    import jaxlens
    from jaxlens.sweep import read_manifest, read_table

    prompts = tmp_path / "p.jsonl"
    _write_prompts(prompts, seed=11, n=20, max_words=20, prefix="q")
    out = tmp_path / "two"
    cmd = ["-m", "jaxlens.cli", "sweep", "--model", "demo", "--prompts", str(prompts),
           "--out", str(out), "--lens", "norm,raw", "--batch-tokens", str(BT), "--window", "8", "--buckets", "32",
           "--mesh", "data=1,fsdp=2,tensor=4", "--coordinator", f"127.0.0.1:{MP.free_port()}", "--num-processes", "2",
           "--quiet"]
    MP.finish(MP.launch(cmd), timeout=240)
    one = jaxlens.sweep("demo", str(prompts), None, lenses="norm,raw", batch_tokens=BT, window=8, buckets=[32],
                        progress=False)

    m = read_manifest(out / "demo")
    assert m["status"] == "complete" and m["processes"] == 2 and len(m["windows_done"]) == 3
    st = m["stats"]
    assert st["processes"] == 2 and st["params_fully_addressable"] is False        # the model spans both processes
    assert st["global_devices"] == 8
    by_proc = {s["process"] for s in m["shards"] if s["table"] == "layers"}
    assert by_proc == {0, 1}                                                       # each process wrote its rows
    two = read_table(out / "demo", "layers")
    ref = one.table()
    assert two.num_rows == ref.num_rows == 20 * 2 * 9
    a, b = ref.to_pydict(), two.to_pydict()
    for c in ("prompt_index", "prompt_id", "lens", "layer", "pos"):
        assert a[c] == b[c], c
    for c, f in zip(ref.column_names, ref.schema):
        if not pa.types.is_floating(f.type):
            continue
        x = np.array([np.nan if v is None else v for v in a[c]], np.float64)
        y = np.array([np.nan if v is None else v for v in b[c]], np.float64)
        assert np.array_equal(np.isnan(x), np.isnan(y)), c
        ok = ~np.isnan(x)
        tol = 1e-3 * np.abs(x[ok]) if c == "mass_ratio_ans_over_prompt" else 1e-4 * np.maximum(1.0, np.abs(x[ok]))
        assert np.all(np.abs(x[ok] - y[ok]) <= tol), (c, float(np.max(np.abs(x[ok] - y[ok]))))
    for c in ("answer_rank", "top1", "is_answer", "copy_collapse"):
        same = np.mean([u == v for u, v in zip(a[c], b[c])])
        assert same >= 0.99, (c, same)                                             # near-ties may flip
    pa_, pb = one.table(table="prompts").to_pydict(), read_table(out / "demo", "prompts").to_pydict()
    assert pa_["prompt_id"] == pb["prompt_id"] and pa_["status"] == pb["status"]


def _floats_close(ref, got, rel, skip=()):
    """Every float column of two tables (same row order) within ``rel`` * max(1, |x|), blanks in the same cells;
    every other column equal; returns the largest difference per float column."""
    a, b = ref.to_pydict(), got.to_pydict()
    assert ref.column_names == got.column_names
    worst = {}
    for c, f in zip(ref.column_names, ref.schema):
        if c in skip:
            continue
        if not pa.types.is_floating(f.type):
            if c in ("prompt_index", "prompt_id", "lens", "layer", "pos", "status"):
                assert a[c] == b[c], c
            else:              # ranks, tokens, flags, milestone layers: near-ties may flip, nothing else
                same = np.mean([u == v for u, v in zip(a[c], b[c])])
                assert same >= 0.99, (c, same)
            continue
        x = np.array([np.nan if v is None else v for v in a[c]], np.float64)
        y = np.array([np.nan if v is None else v for v in b[c]], np.float64)
        assert np.array_equal(np.isnan(x), np.isnan(y)), c
        ok = ~np.isnan(x)
        d = np.abs(x[ok] - y[ok]) / np.maximum(1.0, np.abs(x[ok]))
        worst[c] = float(d.max()) if d.size else 0.0
        assert worst[c] <= rel, (c, worst[c])
    return worst


# --------------------------------------------------------------------------------------------------
# a (data, fsdp, tensor) mesh with a tuned lens and a Prism


def test_mesh_with_tuned_and_prism_equals_one_device(tmp_path):
    """data=2, fsdp=2, tensor=2 on the session's 8 fake devices, --tuned DIR (the demo's packaged lens) and --prism
    DIR (fitted here), --positions all: every row of every lens equals the unsharded sweep's within
    1e-5 * max(1, |x|) (measured: layers 6.1e-6, p_answer; prompts 3.0e-6; positions 6.8e-6),
    tokens / ranks / flags / milestones the same (>= 99 % of the cells: near-ties may flip; measured 100 %)."""
    import jax

    import jaxlens
    from jaxlens.models.loader import DEMO_TUNED_LENS_DIR
    from train_tuned.prism import fit_prism

    assert jax.device_count() == 8
    model = jaxlens.load_model("demo")
    prism_dir = str(tmp_path / "prism")
    fit_prism(model, prism_dir, tokens=512, reservoir=256, progress=False, log=lambda m: None)
    prompts = tmp_path / "p.jsonl"
    _write_prompts(prompts, seed=0, n=12, max_words=30, prefix="q")
    kw = dict(lenses="norm,logit", tuned=DEMO_TUNED_LENS_DIR, prism=prism_dir, batch_tokens=BT, window=8,
              positions="all", progress=False)
    one = jaxlens.sweep("demo", str(prompts), None, **kw)
    sharded = jaxlens.sweep("demo", str(prompts), str(tmp_path / "mesh"), mesh="data=2,fsdp=2,tensor=2", **kw)
    m = sharded.models["demo"]["manifest"]
    assert m["identity"]["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2} and m["stats"]["global_devices"] == 8
    assert [x["name"] for x in m["identity"]["lenses"]] == ["norm", "logit", "tuned", "prism"]
    assert all(len(x["sha256"]) == 64 for x in m["identity"]["lenses"][2:])        # read from their directories
    t1, t8 = one.table(), sharded.table()
    assert t1.num_rows == t8.num_rows == 12 * (9 + 9 + 8 + 9)
    worst = _floats_close(t1, t8, 1e-5, skip=("mass_ratio_ans_over_prompt",))
    # p_answer / (echo mass + 1e-9): echo masses of ~1e-9 turn fp32 rounding into large absolute changes
    _floats_close(t1.select(["mass_ratio_ans_over_prompt"]), t8.select(["mass_ratio_ans_over_prompt"]), 1e-3)
    assert max(worst.values()) > 0                                                   # it did run sharded
    wp = _floats_close(one.table(table="prompts"), sharded.table(table="prompts"), 1e-5)
    p1, p8 = one.table(table="positions"), sharded.table(table="positions")
    assert p1.num_rows == p8.num_rows > t1.num_rows
    wpos = _floats_close(p1, p8, 1e-5)                          # --positions all: every layer at every position
    print("mesh vs one device, worst per column:", worst, wp, wpos)


def test_mesh_rows_bucket_invariant(tmp_path):
    """On a mesh too a prompt's rows do not depend on its bucket or company: with 8192 padded tokens per batch a
    16-token bucket holds 512 sequences, more than the decode's 64 per batch shard (256), so the last-position
    decode runs in blocks of 256 sequences (strided over the batch: every device keeps its rows; a lax.map
    even for one block). Before, it ran one block of max(B, 256) sequences, and a prompt's rows changed between
    buckets 16/32/64 and 64 only (measured on 20 such prompts: cos_to_final in 280 cells by <= 3.3e-7, KL in 23
    by <= 5.7e-6)."""
    import jaxlens
    from jaxlens.models.loader import DEMO_TUNED_LENS_DIR

    prompts = tmp_path / "p.jsonl"
    rows = _write_prompts(prompts, seed=2, n=20, max_words=12, prefix="b")
    alone = tmp_path / "alone.jsonl"
    alone.write_text(json.dumps(rows[4]) + "\n")
    kw = dict(lenses="norm,raw", tuned=DEMO_TUNED_LENS_DIR, mesh="data=2,fsdp=2,tensor=2", batch_tokens=8192,
              progress=False)
    ref = jaxlens.sweep("demo", str(prompts), None, **kw)
    assert ref.models["demo"]["manifest"]["stats"]["buckets"]["16"] == 512
    key = [("prompt_id", "ascending"), ("lens", "ascending"), ("layer", "ascending")]
    for name, src, extra in (("buckets 64", prompts, {"buckets": [64]}), ("window 7", prompts, {"window": 7}),
                             ("alone, bucket 128", alone, {"buckets": [128]})):
        got = jaxlens.sweep("demo", str(src), None, **kw, **extra)
        for table in ("layers", "prompts"):
            t = got.table(table=table)
            r = ref.table(table=table)
            r = r.filter(pa.compute.is_in(r.column("prompt_id"), t.column("prompt_id")))
            k = key if table == "layers" else key[:2]
            a, b = r.sort_by(k).to_pydict(), t.sort_by(k).to_pydict()
            bad = [c for c in a if c != "prompt_index" and not all(_same(u, v) for u, v in zip(a[c], b[c]))]
            assert bad == [], (name, table, bad)


# --------------------------------------------------------------------------------------------------
# kill -9, then --resume with another number of processes


def _env(**extra):
    return MP.env(4, **extra)                  # no cluster variables around unless ``extra`` sets them


def _sweep_cli(args, env):
    return subprocess.Popen([sys.executable, "-m", "jaxlens.cli", "sweep"] + args, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _kill_when_done(procs, manifest, windows, timeout=240) -> None:
    """kill -9 every process once ``manifest`` lists at least ``windows`` finished windows."""
    t0 = time.time()
    try:
        while time.time() - t0 < timeout and all(p.poll() is None for p in procs):
            try:
                done = len(json.loads(manifest.read_text())["windows_done"])
            except (OSError, ValueError, KeyError):
                done = 0
            if done >= windows:
                for p in procs:
                    os.kill(p.pid, signal.SIGKILL)
                break
            time.sleep(0.01)
    finally:
        outs = [p.communicate(timeout=60) for p in procs]
    for p, (_, e) in zip(procs, outs):
        assert p.returncode == -signal.SIGKILL, f"the sweep ended before it was killed ({p.returncode}): {e[-2000:]}"


def _wait_ok(procs, timeout=240) -> None:
    MP.finish(procs, timeout)


def _resume_prompts(tmp_path, n=16):
    p = tmp_path / "p.jsonl"
    _write_prompts(p, seed=5, n=n, max_words=20, prefix="r")
    return str(p)


def _same(u, v) -> bool:
    return u == v or (isinstance(u, float) and isinstance(v, float) and np.isnan(u) and np.isnan(v))


def _check_resumed(root, ref, n_windows, first_windows, first_exact, window, procs_first, procs_second):
    """The finished directory: complete, every window, nothing stray; the rows of the windows the first run
    committed are that run's (bit for bit when it was one unsharded process like ``ref``, else within fp32
    rounding), the rows of the resumed windows are the resuming run's."""
    from jaxlens.sweep import read_manifest, read_table

    m = read_manifest(root)
    assert m["status"] == "complete" and m["windows_done"] == list(range(n_windows))
    assert m["stats"]["windows_resumed"] == len(first_windows) and m["processes"] == len(procs_second)
    by_window: dict = {}
    for s in m["shards"]:
        by_window.setdefault(s["window"], set()).add(s["process"])
    assert all(by_window[w] == set(procs_first) for w in first_windows), by_window
    assert all(by_window[w] == set(procs_second) for w in set(by_window) - set(first_windows)), by_window
    listed = {s["file"] for s in m["shards"]}
    on_disk = {os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs} - {"manifest.json"}
    assert on_disk == listed                                  # the killed run's partial windows and parts/ removed
    worst = {}
    for table in ("layers", "prompts"):
        got, want = read_table(root, table), ref.table(table=table)
        assert got.num_rows == want.num_rows
        first = pa.array([int(i) // window in set(first_windows) for i in want.column("prompt_index").to_pylist()])
        for part, exact in ((first, first_exact), (pa.compute.invert(first), not first_exact)):
            a, b = want.filter(part).to_pydict(), got.filter(part).to_pydict()
            assert list(a) == list(b) and len(a["lens"]) > 0
            if exact:                                         # the same program on the same shapes: bit for bit
                bad = [c for c in a if not all(_same(u, v) for u, v in zip(a[c], b[c]))]
                assert bad == [], (table, bad)
            else:
                worst[table] = _floats_close(want.filter(part), got.filter(part), 2e-5,
                                             skip=("mass_ratio_ans_over_prompt",))
    return worst


def test_resume_two_processes_with_one(tmp_path):
    """kill -9 of a two-process sweep (parameters spanning both) after >= 2 of 8 windows, then --resume as ONE
    process without a mesh: windows are numbered from the start of the prompt set and depend on neither the
    process count nor the mesh, so the resume computes the missing ones, deletes process 1's partial files and
    completes. Windows of the first run: within fp32 rounding of one device (<= 2e-5 * max(1, |x|), measured
    4.7e-6); resumed windows: bit for bit one device's."""
    import jaxlens

    prompts = _resume_prompts(tmp_path)
    out = tmp_path / "out"
    common = ["--model", "demo", "--prompts", prompts, "--out", str(out), "--lens", "norm,raw", "--batch-tokens",
              str(BT), "--window", "2", "--buckets", "32", "--quiet"]
    port = MP.free_port()
    dist = ["--mesh", "data=1,fsdp=2,tensor=4", "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2"]
    procs = [_sweep_cli(common + dist + ["--process-id", str(i)], _env()) for i in range(2)]
    _kill_when_done(procs, out / "demo" / "manifest.json", 2)
    from jaxlens.sweep import read_manifest

    m = read_manifest(out / "demo")
    first = list(m["windows_done"])
    assert m["status"] == "running" and m["processes"] == 2 and 2 <= len(first) < 8
    root = out / "demo"
    stray = {os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs} - \
        {s["file"] for s in m["shards"]} - {"manifest.json"}
    assert any(f.startswith("parts/") and f.endswith("-p1.json") for f in stray), stray   # process 1's accounts
    _wait_ok([_sweep_cli(common + ["--resume"], _env())])
    ref = jaxlens.sweep("demo", prompts, None, lenses="norm,raw", batch_tokens=BT, window=2, buckets=[32],
                        progress=False)
    worst = _check_resumed(out / "demo", ref, 8, first, False, 2, (0, 1), (0,))
    print("two processes then one:", first, {t: max(w.values()) for t, w in worst.items()})


def test_resume_one_process_with_two_found_by_distributed_auto(tmp_path):
    """The opposite: kill -9 of a one-process sweep after >= 2 of 8 windows, then --resume as TWO processes on a
    data=2,fsdp=2,tensor=2 mesh that join through --distributed auto: JAX's own SLURM detection, given a
    one-node, two-task SLURM environment (SLURM_NTASKS=2, SLURM_PROCID, SLURM_STEP_NODELIST=localhost;
    JAX_COORDINATOR_PORT picks the port). Windows of the first run: bit for bit one device's; resumed windows
    (each process wrote its half): within fp32 rounding (<= 2e-5 * max(1, |x|), measured 6.5e-6)."""
    import jaxlens

    prompts = _resume_prompts(tmp_path)
    out = tmp_path / "out"
    common = ["--model", "demo", "--prompts", prompts, "--out", str(out), "--lens", "norm,raw", "--batch-tokens",
              str(BT), "--window", "2", "--buckets", "32", "--quiet"]
    _kill_when_done([_sweep_cli(common, _env())], out / "demo" / "manifest.json", 2)
    from jaxlens.sweep import read_manifest

    first = list(read_manifest(out / "demo")["windows_done"])
    assert 2 <= len(first) < 8
    port = str(MP.free_port())
    slurm = dict(SLURM_JOB_ID="4242", SLURM_STEP_NODELIST="localhost", SLURM_NTASKS="2", JAX_COORDINATOR_PORT=port)
    procs = [_sweep_cli(common + ["--resume", "--mesh", "data=2,fsdp=2,tensor=2", "--distributed", "auto"],
                        _env(SLURM_PROCID=str(i), SLURM_LOCALID=str(i), **slurm)) for i in range(2)]
    _wait_ok(procs)
    m = read_manifest(out / "demo")
    assert m["stats"]["processes"] == 2 and m["stats"]["global_devices"] == 8
    assert m["identity"]["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}
    ref = jaxlens.sweep("demo", prompts, None, lenses="norm,raw", batch_tokens=BT, window=2, buckets=[32],
                        progress=False)
    worst = _check_resumed(out / "demo", ref, 8, first, True, 2, (0,), (0, 1))
    print("one process then two:", first, {t: max(w.values()) for t, w in worst.items()})


# --------------------------------------------------------------------------------------------------
# --distributed auto without a cluster


def test_distributed_auto_without_a_cluster_is_one_sentence(tmp_path):
    """jax.distributed.initialize() with nothing to detect raises "coordinator_address should be defined."
    (measured: at once, no hang); jaxlens.distributed.initialize checks first with JAX's own detectors and says
    what it looked for: exit status 2, one line, no traceback, nothing written."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "The capital of France is", "answer": "Paris"}\n')
    base = [sys.executable, "-m", "jaxlens.cli", "sweep", "--model", "demo", "--prompts", str(prompts),
            "--out", str(tmp_path / "o")]
    cases = [(["--distributed", "auto"], {}, ["--distributed auto found no cluster to join", "SLURM_JOB_ID",
                                             "SLURM_PROCID", "OMPI_MCA_orte_hnp_uri", "Cloud TPU", "--coordinator"]),
             (["--distributed", "auto"], {"SLURM_JOB_ID": "7"},
              ["SLURM_JOB_ID set but not SLURM_STEP_NODELIST, SLURM_NTASKS, SLURM_PROCID, SLURM_LOCALID", "srun"]),
             (["--coordinator", "127.0.0.1:1"], {},
              ["--coordinator without --num-processes / --process-id needs a cluster",
               "pass --num-processes N --process-id I"])]
    for args, extra, want in cases:
        t0 = time.time()
        r = subprocess.run(base + args, env=_env(**extra), capture_output=True, text=True, timeout=60)
        assert r.returncode == 2, (args, r.returncode, r.stderr[-2000:])
        err = r.stderr.strip()
        assert err.startswith("jaxlens: error: ") and len(err.splitlines()) == 1 and "Traceback" not in err, err
        assert all(w in err for w in want), (want, err)
        assert time.time() - t0 < 30                                              # before any model work
    assert not (tmp_path / "o" / "demo").exists()
