"""Published Hugging Face config.json fixtures (tests/data/configs): each file parses with plain `json` and says
what its model is known to be. Nothing from jaxlens is imported here; the values below were checked by hand
against the files and the models' published sizes (see tests/data/configs/README.md for provenance)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

CONFIGS = Path(__file__).parent / "data" / "configs"

# file -> (byte size, sha256) as listed in tests/data/configs/README.md: the fixtures must stay byte-exact
# (no re-indenting, no added or removed final newline)
BYTES = {
    "openai-community__gpt2.json": (665, "0daed7749b4f02b8f76240d5444551d7b08712dab4d0adb8239c56ba823bb7b4"),
    "EleutherAI__pythia-160m.json": (569, "76eb275107220e450d31258f792a2efcbee109d8b62ae0088260057dec06362f"),
    "meta-llama__Llama-3.2-1B.json": (843, "bfb5d39c327ee5c3a65e3574596ff30b052a445cfc59a25bdf3b4c0c5a44f4d2"),
    "HuggingFaceTB__SmolLM2-135M.json": (704, "1d556eab73b69c7f11f64c557a2f9c6f440bd4c6b89bb2584a6b498c92603843"),
    "mistralai__Mistral-7B-v0.1.json": (571, "cf25cdf4719f181d1d1d371973285d9afe9afde0d0c6a6fd48de857555ce1e0d"),
    "Qwen__Qwen2-0.5B.json": (661, "b2388df676bbbe4f6aae6b617bdfa6e7c471c7a5b23862baae3dfbf85a5fe9ef"),
    "Qwen__Qwen2.5-0.5B.json": (681, "479dcf0c5286339e41ad3992cd08ae88a467c4187587936248e2b7c96283484b"),
    "Qwen__Qwen3-0.6B.json": (726, "660db3b73d788119c04535e48cf9be5f55bc3100841a718637ae695b442f27dd"),
    "Qwen__Qwen3-14B.json": (728, "e73c3664ca09b10a673fef0c22e8a6b456201d49bd4713c9691f775720e8857a"),
    "Qwen__Qwen3-30B-A3B.json": (963, "2850ddb3bf7aecad20b611e2d44f3077fc8193f4827c93beddd4c02ad63c2297"),
}

# file -> facts as published (key names as the file spells them; gpt2 keeps its legacy n_* names)
FACTS = {
    "openai-community__gpt2.json": {
        "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_layer": 12, "n_embd": 768, "n_head": 12,
        "n_positions": 1024, "vocab_size": 50257, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-05,
    },
    "EleutherAI__pythia-160m.json": {
        "model_type": "gpt_neox", "architectures": ["GPTNeoXForCausalLM"], "num_hidden_layers": 12,
        "hidden_size": 768, "num_attention_heads": 12, "intermediate_size": 3072, "vocab_size": 50304,
        "rotary_pct": 0.25, "rotary_emb_base": 10000, "use_parallel_residual": True, "tie_word_embeddings": False,
    },
    "meta-llama__Llama-3.2-1B.json": {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "num_hidden_layers": 16, "hidden_size": 2048,
        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64, "intermediate_size": 8192,
        "vocab_size": 128256, "rope_theta": 500000.0, "tie_word_embeddings": True,
        "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    },
    "HuggingFaceTB__SmolLM2-135M.json": {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "num_hidden_layers": 30, "hidden_size": 576,
        "num_attention_heads": 9, "num_key_value_heads": 3, "intermediate_size": 1536, "vocab_size": 49152,
        "rope_theta": 100000, "max_position_embeddings": 8192, "tie_word_embeddings": True,
    },
    "mistralai__Mistral-7B-v0.1.json": {
        "model_type": "mistral", "architectures": ["MistralForCausalLM"], "num_hidden_layers": 32,
        "hidden_size": 4096, "num_attention_heads": 32, "num_key_value_heads": 8, "intermediate_size": 14336,
        "vocab_size": 32000, "sliding_window": 4096, "rope_theta": 10000.0, "tie_word_embeddings": False,
    },
    "Qwen__Qwen2-0.5B.json": {
        "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "num_hidden_layers": 24, "hidden_size": 896,
        "num_attention_heads": 14, "num_key_value_heads": 2, "intermediate_size": 4864, "vocab_size": 151936,
        "max_position_embeddings": 131072, "sliding_window": 131072, "max_window_layers": 24,
        "use_sliding_window": False, "tie_word_embeddings": True,
    },
    "Qwen__Qwen2.5-0.5B.json": {
        "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "num_hidden_layers": 24, "hidden_size": 896,
        "num_attention_heads": 14, "num_key_value_heads": 2, "intermediate_size": 4864, "vocab_size": 151936,
        "max_position_embeddings": 32768, "sliding_window": 32768, "max_window_layers": 24,
        "use_sliding_window": False, "use_mrope": False, "tie_word_embeddings": True,
    },
    "Qwen__Qwen3-0.6B.json": {
        "model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"], "num_hidden_layers": 28, "hidden_size": 1024,
        "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 3072,
        "vocab_size": 151936, "rope_theta": 1000000, "rope_scaling": None, "tie_word_embeddings": True,
    },
    "Qwen__Qwen3-14B.json": {
        "model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"], "num_hidden_layers": 40, "hidden_size": 5120,
        "num_attention_heads": 40, "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 17408,
        "vocab_size": 151936, "rope_theta": 1000000, "tie_word_embeddings": False,
    },
    "Qwen__Qwen3-30B-A3B.json": {
        "model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"], "num_hidden_layers": 48,
        "hidden_size": 2048, "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128,
        "intermediate_size": 6144, "moe_intermediate_size": 768, "num_experts": 128, "num_experts_per_tok": 8,
        "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [], "vocab_size": 151936,
        "rope_theta": 1000000.0, "tie_word_embeddings": False,
    },
}


def test_every_fixture_is_listed():
    # gguf__*.json are not published files: transformers wrote them from the two GGUF models (README there)
    published = [p.name for p in CONFIGS.glob("*.json") if not p.name.startswith("gguf__")]
    assert sorted(published) == sorted(FACTS) == sorted(BYTES)


@pytest.mark.parametrize("name", sorted(BYTES))
def test_fixture_bytes_unchanged(name):
    raw = (CONFIGS / name).read_bytes()
    assert (len(raw), hashlib.sha256(raw).hexdigest()) == BYTES[name]


@pytest.mark.parametrize("name", sorted(FACTS))
def test_published_facts(name):
    with open(CONFIGS / name, encoding="utf-8") as f:
        cfg = json.load(f)
    assert isinstance(cfg, dict)
    for key, want in FACTS[name].items():
        assert key in cfg, f"{name}: no {key!r}"
        got = cfg[key]
        assert got == want and type(got) is type(want), f"{name}: {key} = {got!r}, want {want!r}"
