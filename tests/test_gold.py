"""jaxlens.probe.gold: tokenisation and gold alignment (spec §1.3, §2.21) on tiny tokenizers built here.

Real tokenizers: a byte-level BPE trained in-process with ``tokenizers`` and wrapped in
``PreTrainedTokenizerFast`` (one without and one with a BOS-prepending post-processor, like Qwen vs
Llama-3), and a whitespace word-level tokenizer whose normaliser deletes "!" (to get an answer that
cannot extend the prompt). Small stub classes cover the branches no real tokenizer reaches easily
(no-space fallback, failing encode / decode). Nothing is downloaded.
"""
from __future__ import annotations

import pytest

from jaxlens.probe import gold as G
from jaxlens.errors import JaxlensError
from jaxlens.probe.suite import load_suite

PROMPT = "Give the city name only, plain text. The capital of Germany is called simply"
CORPUS = [
    "Give the city name only, plain text. The capital of Germany is called simply Berlin.",
    "Give the city name only, plain text. The capital of France is called simply Paris.",
    "The capital of Italy is called simply Rome. The capital of Japan is called Tokyo.",
    "The capital of Canada is called simply Ottawa. Berlin is the capital of Germany.",
] * 10


@pytest.fixture(scope="module")
def toks():
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<bos>", "<eos>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(CORPUS, trainer)
    plain = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<bos>", eos_token="<eos>")

    with_bos = Tokenizer.from_str(bpe.to_str())
    with_bos.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", bpe.token_to_id("<bos>"))])
    bos = PreTrainedTokenizerFast(tokenizer_object=with_bos, bos_token="<bos>", eos_token="<eos>")

    words = sorted({w for line in CORPUS for w in line.replace(".", " . ").replace(",", " , ").split()})
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}}
    wl = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    wl.normalizer = normalizers.Replace("!", "")
    wl.pre_tokenizer = pre_tokenizers.Whitespace()
    word = PreTrainedTokenizerFast(tokenizer_object=wl, unk_token="[UNK]")
    return {"plain": plain, "bos": bos, "word": word}


# ---------------------------------------------------------------------------------------------
# model inputs, ctx ids, BOS policy (§1.3)
# ---------------------------------------------------------------------------------------------

def test_bos_policy_follows_the_tokenizer(toks):
    plain, bos = toks["plain"], toks["bos"]
    ids = plain.encode(PROMPT, add_special_tokens=False)
    assert bos.encode(PROMPT, add_special_tokens=False) == ids      # same vocabulary / merges
    assert not G.tokenizer_prepends_bos(plain)
    assert G.tokenizer_prepends_bos(bos)
    assert G.ctx_ids(plain, PROMPT) == ids and G.ctx_ids(bos, PROMPT) == ids   # never specials
    assert G.model_input_ids(plain, PROMPT) == ids                              # Qwen-like: no BOS
    assert G.model_input_ids(bos, PROMPT) == [bos.bos_token_id] + ids           # Llama-like: BOS + ctx
    assert G.model_input_ids(bos, PROMPT) == bos(PROMPT)["input_ids"]
    assert G.model_input_ids(plain, PROMPT, prepend_bos=True) == [plain.bos_token_id] + ids
    assert G.model_input_ids(bos, PROMPT, prepend_bos=False) == ids
    with pytest.raises(JaxlensError, match="no BOS token"):
        G.model_input_ids(toks["word"], "The capital", prepend_bos=True)


def test_position_strings_and_decoding(toks):
    tok = toks["plain"]
    ids = G.model_input_ids(tok, PROMPT)
    strs = G.position_strings(tok, ids)
    assert len(strs) == len(ids) and "".join(strs) == PROMPT      # byte-level: lossless per token
    assert strs[0] == "Give"
    dec = G.token_decoder(tok)
    assert [dec(i) for i in ids] == [tok.decode([i]) for i in ids]
    assert dec(ids[-1]) is dec(ids[-1])                           # memoised


# ---------------------------------------------------------------------------------------------
# gold alignment (§2.21)
# ---------------------------------------------------------------------------------------------

def test_align_with_space(toks):
    for name in ("plain", "bos"):
        tok = toks[name]
        g = G.align_gold(tok, PROMPT, "Berlin")
        ctx = tok.encode(PROMPT, add_special_tokens=False)
        ws = tok.encode(PROMPT + " Berlin", add_special_tokens=False)
        assert g.ok and g.status == "ok" and g.variant == "with_space" and g.reason is None
        assert g.ctx_ids == tuple(ctx) and g.ctx_prefix_match
        assert g.answer_ids == tuple(ws[len(ctx):]) and g.first_id == ws[len(ctx)]
        assert tok.decode(list(g.answer_ids)) == " Berlin"         # the answer ids spell " Berlin"
        assert list(g.pieces) == tok.convert_ids_to_tokens(list(g.answer_ids))[:4]
        assert "".join(g.pieces) == "\u0120Berlin"                 # byte-level pieces carry the Ġ space
        assert g.first_id not in (tok.bos_token_id, tok.eos_token_id)


def test_pieces_are_capped_at_four(toks):
    tok = toks["plain"]
    ans = "Xqzvw Kjhg Plmn"            # unseen letters: one piece per byte-level character or pair
    g = G.align_gold(tok, PROMPT, ans)
    ctx = tok.encode(PROMPT, add_special_tokens=False)
    ws = tok.encode(PROMPT + " " + ans, add_special_tokens=False)
    assert g.answer_ids == tuple(ws[len(ctx):]) and len(g.answer_ids) > 4
    assert list(g.pieces) == tok.convert_ids_to_tokens(list(g.answer_ids[:4]))
    assert G.align_gold(tok, PROMPT, ans, pieces_k=2).pieces == g.pieces[:2]


def test_unresolved_is_a_result_not_a_crash(toks):
    # the word-level tokenizer drops spaces and deletes "!", so neither P + " !!!" nor P + "!!!"
    # adds a token: unresolved, with the reference's variant "unknown"
    g = G.align_gold(toks["word"], "The capital of Germany is called simply", "!!!")
    assert not g.ok and g.status == "unresolved" and g.variant == "unknown"
    assert g.first_id is None and g.answer_ids == () and g.pieces == ()
    assert g.reason == "no_variant_extended_context" and len(g.ctx_ids) == 7
    assert g.alignment() == {"ok": False, "status": "unresolved", "variant": "unknown", "first_id": None,
                             "answer_ids": [], "pieces": []}
    for bad in ("", "   "):
        g = G.align_gold(toks["plain"], PROMPT, bad)
        assert not g.ok and g.reason == "empty_answer"
    assert G.align_gold(None, PROMPT, "Berlin").reason == "no_tokenizer"


class _Stub:
    """Maps exact strings to ids; everything else raises."""

    def __init__(self, table, fail_decode=False):
        self.table, self.fail_decode = table, fail_decode
        self.bos_token_id = None

    def encode(self, text, add_special_tokens=False):
        return list(self.table[text])

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": list(self.table[text])}

    def convert_ids_to_tokens(self, ids):
        if self.fail_decode:
            raise RuntimeError("no vocab")
        return [f"<{i}>" for i in ids]

    def decode(self, ids, **kw):
        raise RuntimeError("no decoder")


def test_no_space_fallback_and_tokenizer_errors():
    P = "Hauptstadt:"
    stub = _Stub({P: [1, 2], P + " Berlin": [1, 2], P + "Berlin": [1, 2, 7, 8]})
    g = G.align_gold(stub, P, "Berlin")
    assert g.ok and g.variant == "no_space" and g.answer_ids == (7, 8) and g.first_id == 7
    assert g.pieces == ("<7>", "<8>")
    # with_space wins whenever it extends the context, even if no_space would too
    stub.table[P + " Berlin"] = [1, 2, 9]
    assert G.align_gold(stub, P, "Berlin").variant == "with_space"
    # the reference slices at len(ctx) even if the encoding re-merged the prompt's last token
    stub.table[P + " Berlin"] = [1, 5, 9]
    g = G.align_gold(stub, P, "Berlin")
    assert g.answer_ids == (9,) and g.ctx_prefix_match is False
    # a failing tokenizer: unresolved with the error class, no exception
    g = G.align_gold(stub, P, "Paris")
    assert not g.ok and g.reason == "tokenizer_error: KeyError"
    # piece fallback: convert_ids_to_tokens fails, decode fails -> str(id)
    stub2 = _Stub({P: [1], P + " Rom": [1, 4], P + "Rom": [1, 6]}, fail_decode=True)
    assert G.align_gold(stub2, P, "Rom").pieces == ("4",)
    assert G.decode_token(stub2, 4) == "4"
    assert G.decode_token(_Stub({}), 4) == "<4>"


def test_dict_views_and_rate(toks):
    g = G.align_gold(toks["plain"], PROMPT, "Berlin")
    assert list(g.gold_answer()) == ["string", "pieces", "first_id", "answer_ids", "variant"]
    assert g.gold_answer()["string"] == "Berlin" and g.gold_answer()["first_id"] == g.first_id
    assert list(g.alignment()) == ["ok", "status", "variant", "first_id", "answer_ids", "pieces"]
    e = g.prompt_entry("pos", "orig", "Germany\u2192Berlin", 0)
    assert list(e) == ["prompt_id", "prompt_variant", "ok", "status", "variant", "first_id", "answer_ids", "pieces",
                       "string", "fact_key", "fact_index"]
    assert e["fact_key"] == "Germany\u2192Berlin" and e["ok"] is True
    bad = G.align_gold(toks["word"], "The capital", "!")
    assert G.gold_alignment_rate([g, g, bad, g]) == 0.75
    assert G.gold_alignment_rate([e, bad.prompt_entry("ctl", "orig")]) == 0.5
    assert G.gold_alignment_rate([]) is None


def test_reference_suite_aligns_every_pass(toks):
    suite = load_suite("reference")
    tok = toks["bos"]
    entries = []
    for p in suite.gold_alignment_order():
        g = G.align_gold(tok, p.text, p.answer, pieces_k=suite.thresholds.gold.pieces_k)
        assert g.ok and g.variant == "with_space", p
        assert tok.decode(list(g.answer_ids)) == " " + p.answer
        entries.append(g.prompt_entry(p.prompt_id, p.variant, p.fact_key, p.fact_index))
    assert len(entries) == 11 and G.gold_alignment_rate(entries) == 1.0
    assert [(e["prompt_id"], e["prompt_variant"], e["fact_index"]) for e in entries[:3]] == [
        ("pos", "orig", 0), ("ctl", "orig", None), ("pos", "no_filler", 0)]
