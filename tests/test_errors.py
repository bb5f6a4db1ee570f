"""Bad checkpoints give one clear sentence, not a traceback.

Each broken directory is tried twice: through ``jaxlens.load_model`` (must raise ``JaxlensError`` whose
message names the file / field / tensor at fault) and through the CLI
``python -m jaxlens.cli forward --model PATH`` (non-zero exit, stderr is exactly one line, no traceback,
same naming requirement). The CLI runs are started together, a few at a time, to keep the suite fast.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

import hf_factory as F

REPO = Path(__file__).resolve().parents[1]

MISSING_TENSOR = "model.layers.1.mlp.down_proj.weight"
BAD_SHAPE_TENSOR = "model.layers.2.self_attn.k_proj.weight"


def _edit_config(d: Path, fn) -> None:
    cfg = json.loads((d / "config.json").read_text())
    fn(cfg)
    (d / "config.json").write_text(json.dumps(cfg, indent=2))


def _rewrite_safetensors(d: Path, fn) -> None:
    from safetensors.numpy import load_file, save_file

    path = d / "model.safetensors"
    tensors = load_file(str(path))
    fn(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def _missing_dir(good: Path, d: Path) -> Path:
    return d.parent / "no-such-checkpoint-dir"


def _no_weights(good: Path, d: Path) -> Path:
    (d / "model.safetensors").unlink()
    return d


def _no_config(good: Path, d: Path) -> Path:
    (d / "config.json").unlink()
    return d


def _bad_json_config(good: Path, d: Path) -> Path:
    (d / "config.json").write_text('{"model_type": "llama", "hidden_size": 64,')
    return d


def _truncated(good: Path, d: Path) -> Path:
    path = d / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return d


def _garbage_header(good: Path, d: Path) -> Path:
    (d / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    return d


def _unknown_model_type(good: Path, d: Path) -> Path:
    def fn(cfg):
        cfg["model_type"] = "frobnicator"
        cfg["architectures"] = ["FrobnicatorForCausalLM"]
    _edit_config(d, fn)
    return d


def _rope_foo(good: Path, d: Path) -> Path:
    def fn(cfg):
        cfg["rope_parameters"] = {"rope_type": "foo", "rope_theta": 10000.0, "factor": 2.0}
    _edit_config(d, fn)
    return d


def _rope_foo_legacy(good: Path, d: Path) -> Path:
    """Older spelling: top-level rope_theta + rope_scaling {"type": ...}."""
    def fn(cfg):
        cfg.pop("rope_parameters", None)
        cfg["rope_theta"] = 10000.0
        cfg["rope_scaling"] = {"type": "foo", "factor": 2.0}
    _edit_config(d, fn)
    return d


def _missing_tensor(good: Path, d: Path) -> Path:
    _rewrite_safetensors(d, lambda t: t.pop(MISSING_TENSOR))
    return d


def _wrong_shape(good: Path, d: Path) -> Path:
    def fn(t):
        t[BAD_SHAPE_TENSOR] = np.ascontiguousarray(t[BAD_SHAPE_TENSOR][:-1])
    _rewrite_safetensors(d, fn)
    return d


def _missing_shard(good: Path, d: Path) -> Path:
    (d / "model-00002-of-00002.safetensors").unlink()
    return d


# name -> (source checkpoint, breaker, substrings of which at least one must appear in the message)
CASES = {
    "missing_dir": ("single", _missing_dir, ["no-such-checkpoint-dir"]),
    "no_weights": ("single", _no_weights, ["model.safetensors", "pytorch_model.bin", "flax_model.msgpack",
                                            "weight"]),
    "no_config": ("single", _no_config, ["config.json"]),
    "bad_json_config": ("single", _bad_json_config, ["config.json"]),
    "truncated_safetensors": ("single", _truncated, ["model.safetensors"]),
    "garbage_safetensors": ("single", _garbage_header, ["model.safetensors"]),
    "unknown_model_type": ("single", _unknown_model_type, ["frobnicator"]),
    "rope_type_foo": ("single", _rope_foo, ["foo"]),
    "rope_type_foo_legacy": ("single", _rope_foo_legacy, ["foo"]),
    "missing_tensor": ("single", _missing_tensor, ["layers.1.mlp.down_proj"]),
    "wrong_shape": ("single", _wrong_shape, ["layers.2.self_attn.k_proj"]),
    "missing_shard": ("sharded", _missing_shard, ["model-00002-of-00002.safetensors"]),
}


@pytest.fixture(scope="module")
def broken(tmp_path_factory):
    """name -> path of a broken checkpoint (plus "good" -> an intact one)."""
    root = tmp_path_factory.mktemp("errors")
    sources = {"single": root / "good", "sharded": root / "good-sharded"}
    F.build_checkpoint("llama", str(sources["single"]), seed=5)
    F.build_checkpoint("llama", str(sources["sharded"]), seed=5, fmt="sharded")
    paths = {"good": sources["single"]}
    for name, (src, breaker, _) in CASES.items():
        d = root / name
        shutil.copytree(sources[src], d)
        paths[name] = breaker(sources[src], d)
    if paths["missing_dir"].exists():
        shutil.rmtree(paths["missing_dir"])
    return paths


def _cli_env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("JAX_PLATFORMS", "cpu")
    env.pop("XLA_FLAGS", None)  # one CPU device is plenty here
    return env


def _run_cli(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "jaxlens.cli", "forward", "--model", str(path)],
        capture_output=True, text=True, timeout=300, cwd=str(REPO), env=_cli_env(),
    )


@pytest.fixture(scope="module")
def cli_results(broken):
    names = ["good"] + list(CASES)
    with ThreadPoolExecutor(max_workers=3) as pool:
        results = dict(zip(names, pool.map(lambda n: _run_cli(broken[n]), names)))
    return results


def test_cli_forward_succeeds_on_good_checkpoint(cli_results):
    res = cli_results["good"]
    assert res.returncode == 0, f"exit {res.returncode}\nstdout:\n{res.stdout}\nstderr:\n{res.stderr}"
    assert res.stdout.strip(), "forward printed no summary"


@pytest.mark.parametrize("name", list(CASES))
def test_cli_reports_one_line(name, cli_results):
    res = cli_results[name]
    detail = f"\nstdout:\n{res.stdout}\nstderr:\n{res.stderr}"
    assert res.returncode != 0, f"{name}: CLI exited 0" + detail
    assert "Traceback" not in res.stderr and "Traceback" not in res.stdout, f"{name}: traceback" + detail
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, f"{name}: stderr has {len(lines)} lines, want exactly one" + detail
    needles = CASES[name][2]
    assert any(s.lower() in lines[0].lower() for s in needles), \
        f"{name}: message does not name any of {needles}: {lines[0]!r}"


@pytest.mark.parametrize("name", list(CASES))
def test_load_model_raises_jaxlens_error(name, broken):
    import jaxlens
    from jaxlens.errors import JaxlensError

    with pytest.raises(JaxlensError) as excinfo:
        jaxlens.load_model(str(broken[name]))
    msg = str(excinfo.value)
    assert msg.strip() and "\n" not in msg.strip(), f"{name}: message is not one line: {msg!r}"
    needles = CASES[name][2]
    assert any(s.lower() in msg.lower() for s in needles), f"{name}: message does not name any of {needles}: {msg!r}"


def test_good_checkpoint_loads(broken):
    import jaxlens

    model = jaxlens.load_model(str(broken["good"]))
    assert model.spec.arch == "llama"
