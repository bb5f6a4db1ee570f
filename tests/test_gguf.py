"""GGUF loading (jaxlens.models.gguf) on tiny files of every supported GGUF family, against transformers' own
GGUF loader in PyTorch, plus the bad inputs a user can hand it."""
from __future__ import annotations

import os
import subprocess
import sys
import zlib

import numpy as np
import pytest

import gguf_factory as G
import hf_factory as F

FAMILIES = ["llama", "qwen2", "qwen3", "gemma2", "gemma3_text"]
# transformers' GGUF loader takes the config class's default for what llama.cpp's metadata cannot say
# (llama biases: transformers drops them, llama.cpp applies them; Gemma-2 softcaps: transformers keeps its
# defaults 50 / 30, jaxlens reads the file's; Qwen3's head width: transformers ignores attention.key_length and
# keeps its default 128, as every published Qwen3 has), so the oracle files avoid those features
OVERRIDES = {"llama": dict(attention_bias=False, mlp_bias=False), "qwen3": dict(head_dim=128),
             "gemma2": dict(attn_logit_softcapping=50.0, final_logit_softcapping=30.0)}
RESID_RTOL, LOGIT_RTOL, KL_BITS_TOL = 1e-4, 1e-4, 1e-6


def _tiny_gguf(family: str, root) -> tuple:
    hf_dir = str(root / "hf")
    F.build_checkpoint(family, hf_dir, seed=zlib.crc32(family.encode()) % 1000,
                       config_overrides=OVERRIDES.get(family))
    gdir = root / "gguf"
    gdir.mkdir()
    path = G.write_gguf(hf_dir, str(gdir / f"tiny-{family}.gguf"), name=f"tiny {family} test model")
    return hf_dir, path


@pytest.fixture(scope="module", params=FAMILIES)
def case(request, tmp_path_factory):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import jaxlens

    hf_dir, path = _tiny_gguf(request.param, tmp_path_factory.mktemp(f"gguf-{request.param}"))
    model = jaxlens.load_model(path)
    d, name = os.path.dirname(path), os.path.basename(path)
    tm = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32, attn_implementation="eager")
    tm.eval()
    hf_tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
    seqs = F.encode_prompts(hf_tok, (17, 9), F.PROMPTS[:2])
    ids, mask = F.right_pad(seqs)
    fw = model.forward(ids, mask)
    return dict(family=request.param, path=path, model=model, tm=tm, hf_tok=hf_tok, seqs=seqs, fw=fw,
                refs=[F.torch_reference(tm, np.asarray(s)[None]) for s in seqs],
                lens=np.asarray(jaxlens.lens_logits(model, fw, lens="norm")))


def test_gguf_config_matches_transformers(case):
    spec, cfg = case["model"].spec, case["tm"].config
    assert spec.arch == cfg.model_type == case["family"]
    assert (spec.n_layers, spec.d_model, spec.vocab_size) == (cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size)
    assert (spec.n_heads, spec.n_kv_heads) == (cfg.num_attention_heads, cfg.num_key_value_heads)


def test_gguf_tokenizer_matches_transformers(case):
    for text in F.PROMPTS:
        assert case["model"].tokenizer(text)["input_ids"] == case["hf_tok"](text)["input_ids"]


def test_gguf_forward_matches_transformers(case):
    for b, (seq, ref) in enumerate(zip(case["seqs"], case["refs"])):
        T = len(seq)
        got = np.asarray(case["fw"].residuals)[:, b, :T]
        want = ref["residuals"][:, 0, :T]
        for layer in range(want.shape[0]):
            assert float(np.abs(got[layer] - want[layer]).max()) <= RESID_RTOL * float(np.abs(want[layer]).max())
        lg, wl = np.asarray(case["fw"].logits)[b, :T], ref["logits"][0, :T]
        assert float(np.abs(lg - wl).max()) <= LOGIT_RTOL * max(1.0, float(np.abs(wl).max()))
        kl = F.kl_bits(ref["norm_lens_logits"][:, 0, :T], case["lens"][:, b, :T])
        assert float(kl.max()) <= KL_BITS_TOL, kl.max(axis=1)


def test_gguf_directory_source(case, tmp_path):
    """A directory holding one .gguf and no config.json is a GGUF source; two .gguf files are ambiguous."""
    import jaxlens

    d = os.path.dirname(case["path"])
    m = jaxlens.load_model(d)
    assert np.array_equal(np.asarray(m.params["embed"]), np.asarray(case["model"].params["embed"]))
    os.symlink(case["path"], tmp_path / "a.gguf")
    os.symlink(case["path"], tmp_path / "b.gguf")
    with pytest.raises(jaxlens.JaxlensError, match="2 .gguf files"):
        jaxlens.load_model(str(tmp_path))


def test_gguf_weights_equal_transformers_dequantised(case):
    """Embedding (quantised) and final norm (F32; Gemma's stored 1 + w undone) equal transformers' copies."""
    model, tm = case["model"], case["tm"]
    sd = {k: v.detach().numpy() for k, v in tm.state_dict().items()}
    assert np.array_equal(np.asarray(model.params["embed"]), sd["model.embed_tokens.weight"])
    assert np.array_equal(np.asarray(model.params["final_norm"]["scale"]), sd["model.norm.weight"])


# --------------------------------------------------------------------------------------------------
# bad inputs: one sentence, exit 2, no traceback


def _cli(path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jaxlens", "--no-compile-cache", "forward", "--model", str(path)],
                          capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, XLA_FLAGS="", JAXLENS_COMPILE_CACHE="off"))


def _one_line_error(r, *needles):
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and "WARNING" not in ln and "warn" not in ln.lower()]
    assert len(lines) == 1 and lines[0].startswith("jaxlens: error: "), r.stderr
    assert "Traceback" not in r.stderr
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.fixture(scope="module")
def tiny_llama_gguf(tmp_path_factory):
    return _tiny_gguf("llama", tmp_path_factory.mktemp("gguf-bad"))


def test_bad_gguf_not_a_gguf(tmp_path):
    p = tmp_path / "model.gguf"
    p.write_bytes(b"PK\x03\x04 this is a zip, not a gguf" * 10)
    _one_line_error(_cli(p), "model.gguf is not a GGUF file")


def test_bad_gguf_truncated(tiny_llama_gguf, tmp_path):
    _, path = tiny_llama_gguf
    data = open(path, "rb").read()
    for cut in (len(data) // 2, 40):
        p = tmp_path / f"cut{cut}.gguf"
        p.write_bytes(data[:cut])
        _one_line_error(_cli(p), f"cut{cut}.gguf is truncated")


def test_bad_gguf_unknown_architecture(tiny_llama_gguf, tmp_path):
    hf_dir, _ = tiny_llama_gguf
    p = G.write_gguf(hf_dir, str(tmp_path / "mamba.gguf"), arch_override="mamba")
    _one_line_error(_cli(p), "GGUF architecture 'mamba' is not supported")


def test_bad_gguf_unsupported_tensor_type(tiny_llama_gguf, tmp_path):
    """A tensor type gguf-py cannot dequantise (Q8_1, an intermediate llama.cpp type) is named."""
    import gguf

    hf_dir, _ = tiny_llama_gguf
    good = str(tmp_path / "good.gguf")
    G.write_gguf(hf_dir, good)
    r = gguf.GGUFReader(good)
    w = gguf.GGUFWriter(str(tmp_path / "q81.gguf"), "llama")
    for key, field in r.fields.items():
        if key.startswith(("GGUF.", "general.architecture")):
            continue
        vt = field.types[0]
        val = field.contents()
        if vt == gguf.GGUFValueType.ARRAY:
            w.add_array(key, val)
        else:
            w.add_key_value(key, val, vt)
    q81 = gguf.GGMLQuantizationType.Q8_1
    for t in r.tensors:
        if t.name == "blk.0.ffn_up.weight":
            shape = [int(x) for x in reversed(t.shape)]
            block, nbytes = gguf.GGML_QUANT_SIZES[q81]
            raw = np.zeros((shape[0], shape[1] // block * nbytes), np.uint8)     # [rows, bytes per row]
            w.add_tensor(t.name, raw, raw_dtype=q81)
        else:
            w.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    _one_line_error(_cli(tmp_path / "q81.gguf"), "blk.0.ffn_up.weight", "Q8_1")


def test_gguf_missing_file_and_package_message(tmp_path, monkeypatch):
    import jaxlens
    from jaxlens.models import gguf as gmod

    with pytest.raises(jaxlens.JaxlensError, match="GGUF file .*nope.gguf does not exist"):
        jaxlens.load_model(str(tmp_path / "nope.gguf"))
    monkeypatch.setitem(sys.modules, "gguf", None)
    with pytest.raises(jaxlens.JaxlensError, match=r'pip install "jaxlens\[gguf\]"'):
        gmod._gguf_module()
