"""Training / evaluation text: documents -> tokens -> fixed-length packed sequences, in a seeded order.

Sources (:func:`open_source`):

* a plain-text file: documents are paragraphs separated by blank lines;
* a ``.jsonl`` file: one JSON object per line, text in ``text_field`` (default ``text``);
* ``hf:NAME[:CONFIG][@SPLIT]``: a Hugging Face ``datasets`` streaming dataset (needs ``pip install datasets``
  and network access), consumed in its own order.

Packing (as the tuned-lens package's ``chunk_and_tokenize``): documents are tokenised without special tokens
and concatenated, each preceded by the EOS token when ``join_eos`` (so the stream starts with EOS), then cut
into sequences of ``seq_len`` tokens; the last partial sequence is dropped. The reference recipe
concatenates without separators (``join_eos = false``).

Order: for a file source, sequence ``p`` (the p-th consumed, counting from 0 over the whole run) is
``chunks[perm_e[p mod N]]`` with epoch ``e = p // N`` and ``perm_e`` a permutation drawn from
``numpy.random.default_rng([seed, e])`` (``shuffle = false``: the file order). The data position saved in a
checkpoint is that count ``p``; resuming re-tokenises the file (checked against its SHA-256) and continues at
``p``. A content hash chains SHA-256 over the token bytes of every consumed batch:
``h_k = sha256(h_{k-1} || batch_k.tobytes())`` with ``h_0 = sha256(b"")``.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from typing import Iterable, Iterator

import numpy as np

from jaxlens.models.checkpoint import file_sha256  # noqa: F401 - re-exported (data sources hash their files)
from jaxlens.errors import JaxlensError

EMPTY_HASH = hashlib.sha256(b"").hexdigest()


def chain_hash(prev: str, batch: np.ndarray) -> str:
    """The next content hash after consuming ``batch`` (int32 token ids)."""
    return hashlib.sha256(prev.encode("ascii") + np.ascontiguousarray(batch, np.int32).tobytes()).hexdigest()




def read_documents(path: str, text_field: str = "text") -> list[str]:
    """Documents of a text or JSONL file (see module docstring)."""
    if not os.path.exists(path):
        raise JaxlensError(f"data file {path} does not exist")
    if os.path.isdir(path):
        raise JaxlensError(f"data path {path} is a directory; pass a text or .jsonl file")
    try:
        with open(path, encoding="utf-8") as f:
            raw = f.read()
    except UnicodeDecodeError as e:
        raise JaxlensError(f"{path} is not UTF-8 text (byte {e.start})")
    if path.endswith((".jsonl", ".jsonl.txt")):
        docs = []
        for i, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise JaxlensError(f"{path} line {i} is not valid JSON ({e.msg})")
            if not isinstance(obj, dict) or text_field not in obj:
                raise JaxlensError(f"{path} line {i} has no {text_field!r} field")
            if not isinstance(obj[text_field], str):
                raise JaxlensError(f"{path} line {i}: field {text_field!r} is not a string")
            docs.append(obj[text_field])
    else:
        docs = [p.strip("\n") for p in raw.replace("\r\n", "\n").split("\n\n")]
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise JaxlensError(f"{path} contains no text")
    return docs


def tokenize_stream(tokenizer, docs: Iterable[str], join_eos: bool, batch: int = 1024) -> Iterator[tuple[list[int], int]]:
    """Yield (token ids, UTF-8 bytes) per document, ids preceded by EOS when ``join_eos``."""
    eos = tokenizer.eos_token_id if join_eos else None
    if join_eos and eos is None:
        raise JaxlensError("the recipe joins documents with EOS but the tokenizer has no eos_token")
    buf: list[str] = []

    def flush():
        enc = tokenizer(buf, add_special_tokens=False)["input_ids"]
        for text, ids in zip(buf, enc):
            yield ([eos] if eos is not None else []) + list(ids), len(text.encode("utf-8"))

    for d in docs:
        buf.append(d)
        if len(buf) >= batch:
            yield from flush()
            buf = []
    if buf:
        yield from flush()


class FileData:
    """All packed sequences of a text / JSONL file, served in a seeded order (see module docstring)."""

    kind = "file"

    def __init__(self, path: str, tokenizer, seq_len: int, *, join_eos: bool = True, seed: int = 0,
                 shuffle: bool = True, text_field: str = "text", vocab_size: int | None = None):
        self.path = os.path.abspath(path)
        self.seq_len = int(seq_len)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.join_eos = bool(join_eos)
        docs = read_documents(path, text_field)
        self.n_docs = len(docs)
        self.sha256 = file_sha256(path)
        ids: list[int] = []
        n_bytes = 0
        for toks, nb in tokenize_stream(tokenizer, docs, join_eos):
            ids.extend(toks)
            n_bytes += nb
        self.n_tokens_total = len(ids)
        self.n_bytes = n_bytes
        n = len(ids) // self.seq_len
        if n == 0:
            raise JaxlensError(f"{path} has {len(ids)} tokens, fewer than one sequence of {self.seq_len}")
        self.chunks = np.asarray(ids[: n * self.seq_len], np.int32).reshape(n, self.seq_len)
        if vocab_size is not None and self.chunks.max() >= vocab_size:
            raise JaxlensError(f"the tokenizer produced id {int(self.chunks.max())}, outside the model's vocabulary "
                               f"({vocab_size})")
        self._perms: dict[int, np.ndarray] = {}

    @property
    def n_sequences(self) -> int:
        return int(self.chunks.shape[0])

    @property
    def nats_to_bpb(self) -> float:
        """(tokens / UTF-8 bytes) / ln 2: multiply nats per token by this for bits per byte (tuned-lens units)."""
        return (self.n_tokens_total / max(1, self.n_bytes)) / math.log(2)

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            n = self.n_sequences
            self._perms = {epoch: (np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle
                                   else np.arange(n))}
        return self._perms[epoch]

    def batch(self, position: int, count: int) -> np.ndarray:
        """Sequences position .. position + count - 1 of the run's order, int32 [count, seq_len]."""
        n = self.n_sequences
        out = np.empty((count, self.seq_len), np.int32)
        for j in range(count):
            p = position + j
            out[j] = self.chunks[self._perm(p // n)[p % n]]
        return out

    def describe(self) -> dict:
        return {"kind": "file", "path": self.path, "sha256": self.sha256, "documents": self.n_docs,
                "tokens": self.n_tokens_total, "utf8_bytes": self.n_bytes, "sequences": self.n_sequences,
                "seq_len": self.seq_len, "join_eos": self.join_eos, "shuffle": self.shuffle,
                "shuffle_seed": self.seed, "order": "numpy default_rng([seed, epoch]).permutation per epoch"}


class HFStreamData:
    """A Hugging Face ``datasets`` streaming source ``hf:NAME[:CONFIG][@SPLIT]``, packed in stream order.

    Packing is the file sources': given the same documents in the same order, the sequences equal a
    ``.jsonl`` file's with ``shuffle = false`` (whitespace-only documents are skipped, an example without a
    string ``text_field`` is an error, as there). Resuming re-streams the dataset and skips the consumed
    sequences (deterministic as long as the dataset revision is fixed); running out of data is an error.
    Needs ``datasets`` and network access; the test suite exercises it offline with a stand-in
    ``datasets.load_dataset`` (tests/test_tuned_data.py).
    """

    kind = "hf"

    def __init__(self, spec: str, tokenizer, seq_len: int, *, join_eos: bool = True, text_field: str = "text",
                 revision: str | None = None, vocab_size: int | None = None):
        try:
            import datasets  # noqa: F401
        except ImportError:
            raise JaxlensError(f"--data {spec} needs the Hugging Face datasets package: pip install datasets")
        body = spec[3:]
        split = "train"
        if "@" in body:
            body, split = body.rsplit("@", 1)
        name, _, config = body.partition(":")
        self.spec, self.name, self.config, self.split, self.revision = spec, name, config or None, split, revision
        self.tokenizer, self.seq_len, self.join_eos, self.text_field = tokenizer, int(seq_len), join_eos, text_field
        self.vocab_size = vocab_size
        self.sha256 = hashlib.sha256(f"{name}|{config}|{split}|{revision}".encode()).hexdigest()
        self.n_bytes = 0
        self.n_tokens_total = 0
        self._it = None
        self._pos = 0

    def _iterator(self):
        import datasets

        try:
            ds = datasets.load_dataset(self.name, self.config, split=self.split, streaming=True,
                                       revision=self.revision)
        except Exception as e:  # noqa: BLE001
            raise JaxlensError(f"could not open dataset {self.spec} ({e.__class__.__name__}: {str(e)[:200]})")
        self.n_bytes = self.n_tokens_total = 0          # counted afresh on each (re-)stream

        def docs():
            for i, ex in enumerate(ds):
                if not isinstance(ex, dict) or self.text_field not in ex:
                    fields = ", ".join(map(str, ex)) if isinstance(ex, dict) else type(ex).__name__
                    raise JaxlensError(f"dataset {self.spec} example {i} has no {self.text_field!r} field "
                                       f"(it has: {fields}); pass --text-field")
                text = ex[self.text_field]
                if not isinstance(text, str):
                    raise JaxlensError(f"dataset {self.spec} example {i}: field {self.text_field!r} "
                                       "is not a string")
                if text.strip():                         # as the file sources: blank documents are skipped
                    yield text

        buf: list[int] = []
        for toks, nb in tokenize_stream(self.tokenizer, docs(), self.join_eos, batch=64):
            buf.extend(toks)
            self.n_bytes += nb
            self.n_tokens_total += len(toks)
            while len(buf) >= self.seq_len:
                chunk = np.asarray(buf[: self.seq_len], np.int32)
                del buf[: self.seq_len]
                yield chunk

    def batch(self, position: int, count: int) -> np.ndarray:
        if self._it is None or position < self._pos:
            self._it, self._pos = self._iterator(), 0
        rows = []
        while self._pos < position + count:
            try:
                chunk = next(self._it)
            except StopIteration:
                self._it = None
                raise JaxlensError(f"dataset {self.spec} ran out after {self._pos} sequences of {self.seq_len} "
                                   f"tokens (needed {position + count})") from None
            except BaseException:
                self._it = None                          # a dead generator: the next call re-streams
                raise
            if self._pos >= position:
                rows.append(chunk)
            self._pos += 1
        out = np.stack(rows)
        if self.vocab_size is not None and out.max() >= self.vocab_size:
            raise JaxlensError(f"the tokenizer produced id {int(out.max())}, outside the model's vocabulary")
        return out

    @property
    def nats_to_bpb(self) -> float:
        return (self.n_tokens_total / max(1, self.n_bytes)) / math.log(2)

    def describe(self) -> dict:
        return {"kind": "hf", "dataset": self.name, "config": self.config, "split": self.split,
                "revision": self.revision, "sha256": self.sha256, "seq_len": self.seq_len,
                "join_eos": self.join_eos, "order": "stream order"}


def open_source(spec: str, tokenizer, seq_len: int, *, join_eos: bool = True, seed: int = 0, shuffle: bool = True,
                text_field: str = "text", vocab_size: int | None = None):
    """A data source for ``--data``: a file path or ``hf:NAME[:CONFIG][@SPLIT]``."""
    if spec.startswith("hf:"):
        return HFStreamData(spec, tokenizer, seq_len, join_eos=join_eos, text_field=text_field,
                            vocab_size=vocab_size)
    return FileData(spec, tokenizer, seq_len, join_eos=join_eos, seed=seed, shuffle=shuffle,
                    text_field=text_field, vocab_size=vocab_size)
