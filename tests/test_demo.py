"""The bundled demo model (jaxlens/demo/): loads, answers the probe's facts, matches transformers-PyTorch;
its bundled tuned lens (jaxlens/demo/tuned_lens/) beats the logit lens on held-out text.

It is produced by ``python -m jaxlens.demo.train`` from ``configs/demo_model.toml``; see jaxlens/demo/RECIPE.md.
"""
import hashlib
import json
import os

import numpy as np
import pytest

import hf_factory as F
import jaxlens
from jaxlens.demo import corpus as demo_corpus
from jaxlens.models.loader import DEMO_DIR, DEMO_TUNED_LENS_DIR

FACTS = demo_corpus.PROBE_FACTS


@pytest.fixture(scope="module")
def model():
    return jaxlens.load_model("demo")


def _encode(tok, prompts):
    enc = [tok.encode(p, add_special_tokens=False) for p in prompts]
    ids, mask = F.right_pad(enc, pad_id=0)
    return enc, ids, mask


def test_demo_files_and_shape(model):
    files = set(os.listdir(DEMO_DIR))
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "card.json",
            "RECIPE.md"} <= files
    total = sum(os.path.getsize(os.path.join(DEMO_DIR, f)) for f in files
                if os.path.isfile(os.path.join(DEMO_DIR, f)))
    assert total <= 25 * 2**20
    s = model.spec
    assert s.arch == "qwen3" and s.n_layers >= 8 and s.qk_norm == "head"
    cfg = json.load(open(os.path.join(DEMO_DIR, "config.json")))
    assert cfg["architectures"] == ["Qwen3ForCausalLM"] and cfg["dtype"] == "float32"
    card = json.load(open(os.path.join(DEMO_DIR, "card.json")))
    h = hashlib.sha256(open(os.path.join(DEMO_DIR, "model.safetensors"), "rb").read()).hexdigest()
    assert card["model_sha256"] == h, "model.safetensors changed without re-running jaxlens.demo.train"


def test_tokenizer_qwen_style(model):
    tok = model.tokenizer
    ids = tok.encode(demo_corpus.PROBE_ORIG.format(country="Germany"))
    assert tok.decode(ids[:1]) == "Give"            # no BOS prepended, position 0 is "Give"
    assert len(ids) == 16                            # like Qwen3-14B's 16-token original prompt
    for _, cap in FACTS:
        assert len(tok.encode(" " + cap, add_special_tokens=False)) == 1, cap


@pytest.mark.parametrize("template", [demo_corpus.PROBE_ORIG, demo_corpus.PROBE_NO_FILLER],
                         ids=["orig", "no_filler"])
def test_probe_facts_top1(model, template):
    tok = model.tokenizer
    enc, ids, mask = _encode(tok, [template.format(country=c) for c, _ in FACTS])
    logits = np.asarray(model.forward(ids, mask).logits)
    for i, (country, cap) in enumerate(FACTS):
        top = int(np.argmax(logits[i, len(enc[i]) - 1]))
        assert top == tok.encode(" " + cap, add_special_tokens=False)[0], \
            f"{country}: got {tok.decode([top])!r}, want ' {cap}'"


def test_semantic_layer_below_top(model):
    """Under the norm lens, ' Berlin' is rank 1 at some layer < n_layers for the primary prompt."""
    tok = model.tokenizer
    ids = np.asarray([tok.encode(demo_corpus.PROBE_ORIG.format(country="Germany"))], np.int32)
    fw = model.forward(ids)
    z = np.asarray(jaxlens.lens_logits(model, fw, "norm"))[:, 0, -1]      # [n+1, V]
    gold = tok.encode(" Berlin", add_special_tokens=False)[0]
    rank1 = [int(np.argmax(z[layer])) == gold for layer in range(z.shape[0])]
    assert rank1[-1]
    assert any(rank1[:-1]), "no semantic layer below the top layer"


def test_torch_parity(model):
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(DEMO_DIR)
    hf = AutoModelForCausalLM.from_pretrained(DEMO_DIR, dtype=torch.float32, attn_implementation="eager").eval()
    prompts = [demo_corpus.PROBE_ORIG.format(country="Germany"), "Berlin is the capital of"]
    enc, ids, mask = _encode(tok, prompts)
    n = model.spec.n_layers

    captured = {}

    def hook(_mod, _inp, out):
        captured["last"] = out[0] if isinstance(out, tuple) else out

    h = hf.model.layers[n - 1].register_forward_hook(hook)
    try:
        with torch.no_grad():
            out = hf(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                     output_hidden_states=True)
            hs = [t.numpy() for t in out.hidden_states[:n]] + [captured["last"].numpy()]
            res_t = torch.stack([torch.as_tensor(x) for x in hs])
            normed = [hf.model.layers[layer].input_layernorm(res_t[layer]) for layer in range(n)]
            normed.append(hf.model.norm(res_t[n]))
            lens_t = torch.stack([hf.lm_head(x) for x in normed]).numpy().astype(np.float64)
            logits_t = out.logits.numpy()
    finally:
        h.remove()

    fw = model.forward(ids, mask)
    res_j = np.asarray(fw.residuals)
    lens_j = np.asarray(jaxlens.lens_logits(model, fw, "norm")).astype(np.float64)
    m = mask.astype(bool)
    for layer in range(n + 1):
        np.testing.assert_allclose(res_j[layer][m], hs[layer][m], atol=1e-4, rtol=1e-4,
                                   err_msg=f"residual stream {layer}")
    assert np.abs(np.asarray(fw.logits)[m] - logits_t[m]).max() <= 1e-4

    def logsoftmax(z):
        z = z - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))

    lp_j, lp_t = logsoftmax(lens_j), logsoftmax(lens_t)          # [n+1, B, T, V]
    kl_bits = (np.exp(lp_j) * (lp_j - lp_t)).sum(-1) / np.log(2)  # [n+1, B, T]
    worst = kl_bits[:, m].max(axis=1)
    assert (worst <= 1e-6).all(), f"norm-lens KL per layer (bits): {worst}"
    # the last lens layer is the model's own head
    np.testing.assert_allclose(lens_j[n][m], logits_t[m], atol=1e-4)


def test_corpus_deterministic():
    a = demo_corpus.generate(seed=0, n_docs=3000)
    b = demo_corpus.generate(seed=0, n_docs=3000)
    c = demo_corpus.generate(seed=1, n_docs=3000)
    assert demo_corpus.text_sha256(a) == demo_corpus.text_sha256(b)
    assert demo_corpus.text_sha256(a) != demo_corpus.text_sha256(c)
    text = "\n".join(a)
    assert "Give the city name only, plain text. The capital of" in text
    assert len({c for c, _, _ in demo_corpus.COUNTRIES}) >= 150
    card = json.load(open(os.path.join(DEMO_DIR, "card.json")))
    full = demo_corpus.generate(card["seed"], card["corpus"]["n_docs"])
    assert demo_corpus.text_sha256(full) == card["corpus"]["sha256"]


def test_bundled_tuned_lens(model, tmp_path):
    """jaxlens/demo/tuned_lens/ (RECIPE.md, "Tuned lens"): a tuned-lens-family lens for this model whose
    KL(final || lens) on held-out text (a seed neither the model nor the lens trained on) is below the logit
    lens's at every layer but the last (where both are the model's own output)."""
    from train_tuned.evaluate import evaluate_lens

    files = sorted(os.listdir(DEMO_TUNED_LENS_DIR))
    assert files == ["lens.safetensors", "lens_card.json"]
    assert sum(os.path.getsize(os.path.join(DEMO_TUNED_LENS_DIR, f)) for f in files) <= 2**20
    card = json.load(open(os.path.join(DEMO_TUNED_LENS_DIR, "lens_card.json")))
    assert card["format"] == "jaxlens-tuned-lens" and card["family"] == "tuned-lens"
    assert card["n_layers"] == 8 and card["d_model"] == 128
    assert card["model"]["id"] == "demo" and card["training"]["complete"]
    assert card["recipe"]["name"] == "tuned-lens" and card["data"]["sha256"]
    assert not any(os.path.isabs(str(p)) for p in (card["recipe"]["path"], card["data"]["path"]))
    demo_card = json.load(open(os.path.join(DEMO_DIR, "card.json")))["tuned_lens"]
    h = hashlib.sha256(open(os.path.join(DEMO_TUNED_LENS_DIR, "lens.safetensors"), "rb").read()).hexdigest()
    assert demo_card["lens_sha256"] == h, "tuned_lens/lens.safetensors changed without updating card.json"
    assert demo_card["steps"] == card["training"]["steps"]

    lens = jaxlens.load_lens(DEMO_TUNED_LENS_DIR, model=model)
    n, d = model.spec.n_layers, model.spec.d_model
    assert (lens.family, lens.n_layers, lens.d_model) == ("tuned-lens", 8, 128) == ("tuned-lens", n, d)
    assert tuple(lens.W.shape) == (n, d, d) and tuple(lens.b.shape) == (n, d)

    held = tmp_path / "heldout.txt"
    held.write_text("\n\n".join(demo_corpus.generate(seed=3, n_docs=200)))
    res = evaluate_lens(model, lens, str(held), max_tokens=16 * 128, batch_seqs=8, progress=False)
    assert res["data"]["tokens_evaluated"] == 16 * 128
    logit, tuned = np.asarray(res["logit"]["kl_nats"]), np.asarray(res["tuned"]["kl_nats"])
    assert (tuned[:n] < logit[:n]).all(), f"held-out KL nats, logit {logit.round(4)} vs tuned {tuned.round(4)}"
    assert tuned[1] < 0.5 * logit[1]
    assert abs(tuned[n]) < 1e-5 and abs(logit[n]) < 1e-5
