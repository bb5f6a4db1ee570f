"""Configs as real tools write them (jaxlens.models.spec): every published config of tests/data/configs loads,
the two written by transformers' GGUF loader too (with their `_model_name_or_path`), a mixture-of-experts config
is refused with a sentence saying so, and math-changing keys stay refused by name."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from jaxlens.errors import JaxlensError
from jaxlens.models.spec import spec_from_config

CONFIGS = Path(__file__).parent / "data" / "configs"

# file -> (arch, layers, d_model, heads, kv heads, head_dim, vocab, first window, rope type), from the files
EXPECTED = {
    "openai-community__gpt2.json": ("gpt2", 12, 768, 12, 12, 64, 50257, 0, None),
    "EleutherAI__pythia-160m.json": ("gpt_neox", 12, 768, 12, 12, 64, 50304, 0, "default"),
    "meta-llama__Llama-3.2-1B.json": ("llama", 16, 2048, 32, 8, 64, 128256, 0, "llama3"),
    "HuggingFaceTB__SmolLM2-135M.json": ("llama", 30, 576, 9, 3, 64, 49152, 0, "default"),
    "mistralai__Mistral-7B-v0.1.json": ("mistral", 32, 4096, 32, 8, 128, 32000, 4096, "default"),
    "Qwen__Qwen2-0.5B.json": ("qwen2", 24, 896, 14, 2, 64, 151936, 0, "default"),
    "Qwen__Qwen2.5-0.5B.json": ("qwen2", 24, 896, 14, 2, 64, 151936, 0, "default"),
    "Qwen__Qwen3-0.6B.json": ("qwen3", 28, 1024, 16, 8, 128, 151936, 0, "default"),
    "Qwen__Qwen3-14B.json": ("qwen3", 40, 5120, 40, 8, 128, 151936, 0, "default"),
    "gguf__SmolLM2-135M-Instruct.Q4_1.json": ("llama", 30, 576, 9, 3, 64, 49152, 0, "default"),
    "gguf__gemma-3-270m-q4_k_m.json": ("gemma3_text", 18, 640, 4, 1, 256, 262144, 512, "default"),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_published_config_loads(name):
    cfg = json.loads((CONFIGS / name).read_text())
    s = spec_from_config(cfg)
    arch, n, d, h, k, hd, V, w0, rope = EXPECTED[name]
    assert (s.arch, s.n_layers, s.d_model, s.n_heads, s.n_kv_heads, s.head_dim, s.vocab_size) == (arch, n, d, h, k, hd, V)
    assert s.windows[0] == w0
    assert (dict(s.rope[0])["rope_type"] if s.rope[0] else None) == rope


def test_every_fixture_is_covered():
    files = {p.name for p in CONFIGS.glob("*.json")}
    assert files == set(EXPECTED) | {"Qwen__Qwen3-30B-A3B.json"}


def test_gemma3_gguf_config_layer_pattern():
    """Gemma-3-270M from its GGUF: 5 sliding layers (window 512, rope 1e4) then a global one (rope 1e6)."""
    s = spec_from_config(json.loads((CONFIGS / "gguf__gemma-3-270m-q4_k_m.json").read_text()))
    assert s.windows == tuple(0 if (i + 1) % 6 == 0 else 512 for i in range(18))
    assert [dict(r)["theta"] for r in s.rope[:6]] == [1e4] * 5 + [1e6]
    assert s.query_scale == pytest.approx(256 ** -0.5)


def test_moe_config_is_refused_by_name():
    cfg = json.loads((CONFIGS / "Qwen__Qwen3-30B-A3B.json").read_text())
    with pytest.raises(JaxlensError, match="mixture-of-experts.*MoE is not supported"):
        spec_from_config(cfg)
    dense = json.loads((CONFIGS / "Qwen__Qwen3-0.6B.json").read_text())
    with pytest.raises(JaxlensError, match="mixture-of-experts"):
        spec_from_config(dict(dense, num_experts=8))


def test_loader_metadata_accepted_math_refused():
    base = json.loads((CONFIGS / "Qwen__Qwen2.5-0.5B.json").read_text())
    ok = dict(base, _model_name_or_path="/somewhere/model.gguf", _commit_hash="abc", _anything_private=1)
    assert spec_from_config(ok).n_layers == 24
    with pytest.raises(JaxlensError, match="use_mrope=True changes the model"):
        spec_from_config(dict(base, use_mrope=True))
    with pytest.raises(JaxlensError, match="rope_interleaved=True changes the model"):
        spec_from_config(dict(base, rope_interleaved=True))
    with pytest.raises(JaxlensError, match="attribute 'new_math_knob' is not handled"):
        spec_from_config(dict(base, new_math_knob=3))
    with pytest.raises(JaxlensError, match=r"^model\.gguf \(its model config\): attribute 'new_math_knob'"):
        spec_from_config(dict(base, new_math_knob=3), where="model.gguf")
