"""``jaxlens sweep`` on JAX's multi-controller runtime: two processes on 127.0.0.1, 4 fake CPU devices each, gloo
CPU collectives, the demo model's parameters sharded across both processes (mesh data=1, fsdp=2, tensor=4: the
fsdp axis spans the processes). Each process feeds its half of every global batch and writes its own shards;
process 0 writes the manifest. The tables equal a single-process run's up to fp32 rounding (the sharded
contractions sum in another order).
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

pa = pytest.importorskip("pyarrow")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BT = 256
WORDS = "the capital of France is Paris and Germany Berlin one two three plus is called simply a city".split()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one(tmp_path):
    import jaxlens
    from jaxlens.sweep import read_manifest, read_table

    rng = np.random.default_rng(11)
    rows = [{"id": f"q{i}", "prompt": " ".join(rng.choice(WORDS, int(rng.integers(2, 20)))),
             "answer": str(rng.choice(["Paris", "Berlin", "two"]))} for i in range(20)]
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "two"
    port = _free_port()
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAXLENS_COMPILE_CACHE="off",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "jaxlens.cli", "sweep", "--model", "demo", "--prompts", str(prompts),
           "--out", str(out), "--lens", "norm,raw", "--batch-tokens", str(BT), "--window", "8", "--buckets", "32",
           "--mesh", "data=1,fsdp=2,tensor=4", "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--quiet"]
    procs = [subprocess.Popen(cmd + ["--process-id", str(i)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for i in range(2)]
    try:
        res = [p.communicate(timeout=240) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (o, e) in zip(procs, res):
        assert p.returncode == 0, e[-4000:]
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
