"""The CLI's persistent XLA compilation cache (jaxlens.compile_cache): a warm run compiles nothing new and
writes byte-identical outputs; --no-compile-cache and JAXLENS_COMPILE_CACHE=off leave the cache alone."""
import os
import subprocess
import sys
from pathlib import Path

from jaxlens.compile_cache import default_cache_dir


def _run(args, cache, tmp_path):
    env = dict(os.environ, JAXLENS_COMPILE_CACHE=str(cache), XLA_FLAGS="", HF_HUB_OFFLINE="1")
    r = subprocess.run([sys.executable, "-m", "jaxlens", *args], capture_output=True, text=True, env=env,
                       cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return r


def _entries(cache: Path) -> set:
    return {p.relative_to(cache) for p in cache.rglob("*") if p.is_file()} if cache.exists() else set()


def test_default_location(monkeypatch, tmp_path):
    monkeypatch.delenv("JAXLENS_COMPILE_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == str(tmp_path / "xdg" / "jaxlens" / "xla")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == str(tmp_path / "home" / ".cache" / "jaxlens" / "xla")
    monkeypatch.setenv("JAXLENS_COMPILE_CACHE", str(tmp_path / "mine"))
    assert default_cache_dir() == str(tmp_path / "mine")
    monkeypatch.setenv("JAXLENS_COMPILE_CACHE", "off")
    assert default_cache_dir() is None


def test_warm_probe_hits_the_cache_and_writes_identical_files(tmp_path):
    cache = tmp_path / "cache"
    _run(["probe", "--quiet", "--out", "cold"], cache, tmp_path)
    cold_entries = _entries(cache)
    assert len(cold_entries) >= 5, cold_entries          # the forward and every decode were cached
    _run(["probe", "--quiet", "--out", "warm"], cache, tmp_path)
    assert _entries(cache) == cold_entries                 # the warm run compiled nothing new
    cold = sorted(p.name for p in (tmp_path / "cold").iterdir())
    warm = sorted(p.name for p in (tmp_path / "warm").iterdir())
    assert cold == warm and len(cold) >= 7
    for name in cold:
        assert (tmp_path / "cold" / name).read_bytes() == (tmp_path / "warm" / name).read_bytes(), name


def test_no_compile_cache_writes_nothing(tmp_path):
    cache = tmp_path / "cache"
    _run(["--no-compile-cache", "forward"], cache, tmp_path)
    assert not cache.exists()
    _run(["forward"], "off", tmp_path)
    assert not (tmp_path / "off").exists()
