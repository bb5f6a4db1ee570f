"""The ``hf:NAME[:CONFIG][@SPLIT]`` streaming source of ``train_tuned.data``, offline.

There is no network here and ``datasets`` need not be installed: each test puts a stand-in ``datasets``
module into ``sys.modules`` (pytest's monkeypatch). Its ``load_dataset`` has the real function's leading
parameters, records how it was called and streams a list of example dicts. Oracles are independent of
``HFStreamData``: documents tokenised one at a time and packed by hand, the ``.jsonl`` file source fed the
same documents, and the content hash written out with hashlib.

* the arguments reaching ``load_dataset`` (path, config as ``name``, split, ``streaming=True``, revision);
* packed sequences and content hash equal the hand-packed ones and the ``.jsonl`` source's (``shuffle = false``);
* streaming is lazy; a later position resumes by re-streaming and skipping; rewinding re-streams;
* ``--text-field``; clear errors without ``datasets``, for a missing / non-string field, a failing
  ``load_dataset``, an exhausted stream and ids outside the vocabulary;
* ``jaxlens train-lens --data hf:...`` (reference recipe, stream order) trains exactly the lens the same
  documents give as a ``.jsonl`` file, and ``--stop-at`` + ``--resume`` on the stream is exact.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import os
import sys
import types

import numpy as np
import pytest

import hf_factory as F

SEQ = 32


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny Qwen3 checkpoint (its tokenizer has an EOS) and documents from the demo corpus generator."""
    import jaxlens
    from jaxlens.demo.corpus import generate

    root = tmp_path_factory.mktemp("tuned-data")
    ckpt = str(root / "qwen3")
    F.build_checkpoint("qwen3", ckpt, seed=21)
    model = jaxlens.load_model(ckpt)
    docs = list(generate(seed=4, n_docs=400))
    # edge cases the file sources handle: non-ASCII text, blank documents (skipped), inner newlines
    docs[3:3] = ["Zürich — naïve café, 東京.", "   ", "", "line one\nline two\n\nafter a blank line"]
    return dict(root=root, ckpt=ckpt, model=model, tok=model.tokenizer, docs=docs)


class FakeDatasets:
    """What ``datasets`` offers ``HFStreamData``: ``load_dataset(..., streaming=True)`` -> iterable of dicts."""

    def __init__(self, examples, fail=None):
        self.examples, self.fail = examples, fail
        self.calls = []              # the bound arguments of every load_dataset call
        self.pulled = 0              # examples handed out, over all streams

    def load_dataset(self, path, name=None, data_dir=None, data_files=None, split=None, cache_dir=None,
                     features=None, download_config=None, download_mode=None, verification_mode=None,
                     keep_in_memory=None, save_infos=False, revision=None, token=None, streaming=False,
                     **config_kwargs):
        # the leading parameters of datasets.load_dataset (3.x / 4.x): a positional config lands in `name`
        bound = inspect.signature(self.load_dataset).bind(path, name, data_dir, data_files, split, cache_dir,
                                                           features, download_config, download_mode,
                                                           verification_mode, keep_in_memory, save_infos,
                                                           revision, token, streaming, **config_kwargs)
        self.calls.append(dict(bound.arguments))
        if self.fail is not None:
            raise self.fail
        fake = self

        class Stream:                # an IterableDataset: each iteration streams from the start
            def __iter__(self):
                for ex in fake.examples:
                    fake.pulled += 1
                    yield dict(ex)

        return Stream()

    def install(self, monkeypatch):
        mod = types.ModuleType("datasets")
        mod.load_dataset = self.load_dataset
        monkeypatch.setitem(sys.modules, "datasets", mod)
        return self


def _examples(docs, field="text"):
    """Example dicts with the text field and extra fields (an id and nested metadata) beside it."""
    return [{"id": i, field: d, "meta": {"source": "generated", "chars": len(d)}} for i, d in enumerate(docs)]


def _hand_packed(tok, docs, join_eos, seq_len=SEQ):
    """Documents tokenised one at a time without special tokens, EOS-joined or not, cut into sequences."""
    ids = []
    for d in docs:
        if not d.strip():
            continue
        if join_eos:
            ids.append(tok.eos_token_id)
        ids.extend(tok.encode(d, add_special_tokens=False))
    n = len(ids) // seq_len
    return np.asarray(ids[: n * seq_len], np.int32).reshape(n, seq_len)


def _hash_chain(batches):
    h = hashlib.sha256(b"").hexdigest()
    for b in batches:
        h = hashlib.sha256(h.encode("ascii") + np.asarray(b, "<i4").tobytes()).hexdigest()
    return h


def _write_jsonl(path, docs, field="text"):
    with open(path, "w", encoding="utf-8") as f:
        for ex in _examples(docs, field):
            f.write(json.dumps(ex, ensure_ascii=False) + "\n")
    return str(path)


# ------------------------------------------------------------------------------------------------
# the source on its own


@pytest.mark.parametrize("spec,name,config,split", [
    ("hf:org/corpus:sample-10BT@validation", "org/corpus", "sample-10BT", "validation"),
    ("hf:wikitext:wikitext-2-raw-v1", "wikitext", "wikitext-2-raw-v1", "train"),
    ("hf:org/corpus@test", "org/corpus", None, "test"),
    ("hf:corpus", "corpus", None, "train"),
])
@pytest.mark.parametrize("join_eos", [True, False])
def test_hf_source_arguments_packing_and_hash_match_jsonl(setup, tmp_path, monkeypatch, spec, name, config,
                                                          split, join_eos):
    from train_tuned import data as D

    tok, docs = setup["tok"], setup["docs"]
    fake = FakeDatasets(_examples(docs)).install(monkeypatch)
    src = D.open_source(spec, tok, SEQ, join_eos=join_eos, seed=3, shuffle=True,     # stream order all the same
                        vocab_size=setup["model"].spec.vocab_size)
    assert isinstance(src, D.HFStreamData) and fake.calls == []          # nothing is opened before the first batch
    want = _hand_packed(tok, docs, join_eos)
    jl = D.FileData(_write_jsonl(tmp_path / "docs.jsonl", docs), tok, SEQ, join_eos=join_eos, shuffle=False)
    assert np.array_equal(jl.chunks, want)                                # the two oracles agree
    assert (want[0, 0] == tok.eos_token_id) == join_eos

    sizes = [3, 5, 1, 8]                                                  # batches as train_lens draws them
    got, pos, h = [], 0, D.EMPTY_HASH
    for n in sizes:
        b = src.batch(pos, n)
        assert b.dtype == np.int32 and b.shape == (n, SEQ)
        got.append(b)
        h = D.chain_hash(h, b)
        pos += n
    assert np.array_equal(np.concatenate(got), want[:pos])
    assert np.array_equal(np.concatenate(got), jl.batch(0, pos))
    assert h == _hash_chain(np.split(want[:pos], np.cumsum(sizes)[:-1]))
    assert h == D.chain_hash(D.chain_hash(D.chain_hash(D.chain_hash(D.EMPTY_HASH, jl.batch(0, 3)), jl.batch(3, 5)),
                                          jl.batch(8, 1)), jl.batch(9, 8))

    assert len(fake.calls) == 1
    call = fake.calls[0]
    assert (call["path"], call["name"], call["split"]) == (name, config, split)
    assert call["streaming"] is True and call["revision"] is None
    assert fake.pulled < len(docs) // 2                                   # streamed, not read whole
    d = src.describe()
    assert (d["kind"], d["dataset"], d["config"], d["split"], d["revision"]) == ("hf", name, config, split, None)
    assert d["seq_len"] == SEQ and d["join_eos"] is join_eos and d["order"] == "stream order"
    assert src.nats_to_bpb == pytest.approx(src.n_tokens_total / src.n_bytes / np.log(2))


def test_hf_source_identity_revision_resume_and_rewind(setup, monkeypatch):
    from train_tuned import data as D

    tok, docs = setup["tok"], setup["docs"]
    fake = FakeDatasets(_examples(docs)).install(monkeypatch)
    want = _hand_packed(tok, docs, True)
    spec = "hf:org/corpus:cfg@train"

    # the source's sha256 names the dataset (name, config, split, revision), not its content
    def sha(s, **kw):
        return D.HFStreamData(s, tok, SEQ, **kw).sha256

    assert sha(spec) == sha(spec) != sha("hf:org/corpus:cfg@test") != sha("hf:org/corpus@train")
    assert sha(spec) != sha(spec, revision="0123abc")

    pinned = D.HFStreamData(spec, tok, SEQ, revision="0123abc")
    assert np.array_equal(pinned.batch(0, 2), want[:2])
    assert fake.calls[-1]["revision"] == "0123abc" and fake.calls[-1]["name"] == "cfg"
    assert pinned.describe()["revision"] == "0123abc"

    # resume: a fresh source asked for position p (the data position a checkpoint saves) streams once and
    # skips p sequences
    fake.calls.clear()
    resumed = D.HFStreamData(spec, tok, SEQ)
    assert np.array_equal(resumed.batch(11, 4), want[11:15])
    assert np.array_equal(resumed.batch(15, 2), want[15:17])              # continues the same stream
    assert np.array_equal(resumed.batch(20, 1), want[20:21])              # skips forward
    assert len(fake.calls) == 1
    # rewinding re-streams from the start; the token / byte counters restart with the stream
    tokens_after_first = resumed.n_tokens_total
    assert np.array_equal(resumed.batch(2, 3), want[2:5])
    assert len(fake.calls) == 2 and resumed.n_tokens_total <= tokens_after_first
    assert np.array_equal(resumed.batch(0, 21), want[:21])
    assert len(fake.calls) == 3 and resumed.n_tokens_total == tokens_after_first


def test_hf_source_text_field(setup, tmp_path, monkeypatch):
    from jaxlens import JaxlensError
    from train_tuned import data as D

    tok, docs = setup["tok"], setup["docs"][:60]
    FakeDatasets(_examples(docs, field="content")).install(monkeypatch)
    src = D.open_source("hf:corpus", tok, SEQ, text_field="content")
    jl = D.FileData(_write_jsonl(tmp_path / "c.jsonl", docs, "content"), tok, SEQ, shuffle=False,
                    text_field="content")
    n = jl.n_sequences
    assert n >= 4 and np.array_equal(src.batch(0, n), jl.chunks)
    assert np.array_equal(jl.chunks, _hand_packed(tok, docs, True))
    with pytest.raises(JaxlensError, match=r"example 0 has no 'text' field \(it has: id, content, meta\)"):
        D.open_source("hf:corpus", tok, SEQ).batch(0, 1)                 # the default field is absent
    with pytest.raises(JaxlensError, match="has no 'text' field"):       # the .jsonl source says the same
        D.FileData(str(tmp_path / "c.jsonl"), tok, SEQ)

    # a later example without the field, or with a non-string one, is an error too (not silently skipped)
    bad = _examples(docs)
    del bad[7]["text"]
    FakeDatasets(bad).install(monkeypatch)
    with pytest.raises(JaxlensError, match="example 7 has no 'text' field"):
        D.open_source("hf:corpus", tok, SEQ).batch(0, n - 1)
    bad = _examples(docs)
    bad[5]["text"] = None
    FakeDatasets(bad).install(monkeypatch)
    with pytest.raises(JaxlensError, match="example 5: field 'text' is not a string"):
        D.open_source("hf:corpus", tok, SEQ).batch(0, n - 1)


def test_hf_source_errors(setup, monkeypatch):
    from jaxlens import JaxlensError
    from train_tuned import data as D

    tok, docs = setup["tok"], setup["docs"][:40]
    monkeypatch.setitem(sys.modules, "datasets", None)                   # `import datasets` fails
    with pytest.raises(JaxlensError, match="needs the Hugging Face datasets package: pip install datasets"):
        D.open_source("hf:corpus", tok, SEQ)

    fake = FakeDatasets(_examples(docs), fail=ConnectionError("offline")).install(monkeypatch)
    with pytest.raises(JaxlensError, match=r"could not open dataset hf:nope@x \(ConnectionError: offline\)"):
        D.open_source("hf:nope@x", tok, SEQ).batch(0, 1)
    assert fake.calls[0]["path"] == "nope" and fake.calls[0]["split"] == "x"

    FakeDatasets(_examples(docs)).install(monkeypatch)
    n = len(_hand_packed(tok, docs, True))
    src = D.open_source("hf:corpus", tok, SEQ)
    assert src.batch(0, n).shape == (n, SEQ)                             # every full sequence of the stream
    with pytest.raises(JaxlensError, match=f"ran out after {n} sequences of {SEQ} tokens \\(needed {n + 2}\\)"):
        src.batch(n, 2)
    with pytest.raises(JaxlensError, match="outside the model's vocabulary"):
        D.open_source("hf:corpus", tok, SEQ, vocab_size=50).batch(0, 2)


# ------------------------------------------------------------------------------------------------
# training from the stream


def test_train_lens_from_hf_stream_equals_jsonl_and_resumes_exactly(setup, tmp_path, monkeypatch):
    """The reference recipe reads in stream order (``shuffle = false``, no EOS), so the stream and a .jsonl
    file of the same documents feed identical batches: same content hash, losses and lens. Runs through the
    CLI, with ``--text-field``."""
    from safetensors.numpy import load_file

    from jaxlens.cli import main

    docs = setup["docs"]
    fake = FakeDatasets(_examples(docs, field="body")).install(monkeypatch)
    jl = _write_jsonl(tmp_path / "docs.jsonl", docs, "body")
    common = ["--model", setup["ckpt"], "--recipe", "reference", "--steps", "3", "--seq-len", str(SEQ),
              "--tokens-per-step", "256", "--checkpoint-every", "1", "--text-field", "body", "--quiet"]
    runs = {"jsonl": ["--data", jl], "hf": ["--data", "hf:org/corpus:en@train"]}
    for key, data in runs.items():
        assert main(["train-lens", *common, *data, "--out", str(tmp_path / key)]) == 0
    cut = str(tmp_path / "hf-cut")
    assert main(["train-lens", *common, *runs["hf"], "--out", cut, "--stop-at", "2"]) == 0
    n_calls = len(fake.calls)
    assert main(["train-lens", *common, *runs["hf"], "--out", cut, "--resume"]) == 0
    assert len(fake.calls) == n_calls + 1                                # the resumed run re-streams once
    assert all((c["path"], c["name"], c["split"], c["streaming"]) == ("org/corpus", "en", "train", True)
               for c in fake.calls)

    cards = {k: json.load(open(os.path.join(tmp_path, k, "lens_card.json"))) for k in ("jsonl", "hf", "hf-cut")}
    lenses = {k: load_file(os.path.join(tmp_path, k, "lens.safetensors")) for k in cards}
    assert cards["hf"]["data"]["kind"] == "hf" and cards["jsonl"]["data"]["kind"] == "file"
    assert cards["hf"]["data"]["dataset"] == "org/corpus" and cards["hf"]["data"]["sequences_consumed"] == 3 * 8
    # the batches, by hand: 8 sequences per step in stream order, no EOS between documents
    want = _hand_packed(setup["tok"], docs, join_eos=False)
    assert cards["hf"]["data"]["content_hash"] == _hash_chain(want[:24].reshape(3, 8, SEQ))
    for k in ("jsonl", "hf-cut"):
        assert cards[k]["data"]["content_hash"] == cards["hf"]["data"]["content_hash"], k
        assert cards[k]["loss_curve"] == cards["hf"]["loss_curve"], k
        assert lenses[k].keys() == lenses["hf"].keys()
        assert all(np.array_equal(lenses[k][a], lenses["hf"][a]) for a in lenses["hf"]), k
