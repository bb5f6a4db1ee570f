"""Tokenisation and gold-answer alignment of the probe (spec/probe.md §1.3 and §2.21).

* Model inputs follow the tokenizer's own BOS policy (:func:`model_input_ids`): BOS is prepended
  when the tokenizer adds it with ``add_special_tokens=True`` (Llama-3, Mistral, Gemma), not otherwise
  (Qwen). A trailing EOS that some tokenizers append is never part of a prompt.
* ``ctx_ids`` (copy detectors, prompt vocabulary) are the prompt **without** special tokens.
* Gold alignment (:func:`align_gold`): ``ctx = enc(P)``, ``ws = enc(P + " " + A)``, ``ns = enc(P + A)``
  (no special tokens). If ``len(ws) > len(ctx)`` the variant is ``"with_space"`` and the answer ids are
  ``ws[len(ctx):]``; else if ``len(ns) > len(ctx)`` it is ``"no_space"``; else the alignment is
  unresolved. ``pieces = convert_ids_to_tokens(answer_ids[:4])``. An answer that cannot be aligned
  (or a tokenizer that fails) gives a :class:`GoldAlignment` with ``ok == False`` - never an exception.
* Token strings: :func:`decode_token` (``decode([id])``, then ``convert_ids_to_tokens``, then
  ``str(id)``); prompt position strings: :func:`position_strings` (each id decoded on its own,
  as TransformerLens ``to_str_tokens`` does).

The tokenizer is any Hugging Face tokenizer (``PreTrainedTokenizerFast`` / ``TokenizersBackend``);
only ``encode``/``__call__``, ``decode``, ``convert_ids_to_tokens``, ``bos_token_id`` and
``eos_token_id`` are used.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence

from jaxlens.errors import JaxlensError

__all__ = [
    "GoldAlignment",
    "encode_plain",
    "tokenizer_prepends_bos",
    "model_input_ids",
    "ctx_ids",
    "align_gold",
    "gold_alignment_rate",
    "decode_token",
    "token_decoder",
    "position_strings",
]


# ----------------------------------------------------------------------------------------------
# Encoding
# ----------------------------------------------------------------------------------------------

def _as_int_list(x) -> list:
    if hasattr(x, "tolist"):
        x = x.tolist()
    if isinstance(x, dict) or (hasattr(x, "keys") and "input_ids" in x):
        x = x["input_ids"]
        if hasattr(x, "tolist"):
            x = x.tolist()
    if x and isinstance(x[0], (list, tuple)):
        if len(x) != 1:
            raise ValueError("expected one sequence")
        x = x[0]
    return [int(i) for i in x]


def encode_plain(tokenizer, text: str) -> list:
    """Token ids of ``text`` without special tokens (``encode(text, add_special_tokens=False)``,
    falling back to ``tokenizer(text, add_special_tokens=False)["input_ids"]``)."""
    try:
        return _as_int_list(tokenizer.encode(text, add_special_tokens=False))
    except Exception:  # noqa: BLE001 - fall back like the reference does
        return _as_int_list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _encode_special(tokenizer, text: str) -> list:
    try:
        return _as_int_list(tokenizer(text, add_special_tokens=True)["input_ids"])
    except Exception:  # noqa: BLE001
        return _as_int_list(tokenizer.encode(text, add_special_tokens=True))


def tokenizer_prepends_bos(tokenizer, probe: str = "a") -> bool:
    """Whether the tokenizer's default encoding (``add_special_tokens=True``) starts with its BOS id
    where the plain encoding does not (Llama-3 / Mistral / Gemma: True; Qwen: False)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    with_sp = _encode_special(tokenizer, probe)
    plain = encode_plain(tokenizer, probe)
    return bool(with_sp) and with_sp[0] == bos and (not plain or plain[0] != bos)


def model_input_ids(tokenizer, prompt: str, prepend_bos: Optional[bool] = None) -> list:
    """The probe's model input for ``prompt`` (spec §1.3).

    ``prepend_bos=None`` follows the tokenizer: ``[BOS] + ctx_ids`` when
    :func:`tokenizer_prepends_bos`, else ``ctx_ids``. ``True`` / ``False`` force the policy (e.g. for a
    tokenizer whose config disagrees with how the model was trained). No EOS is ever appended.
    """
    plain = encode_plain(tokenizer, prompt)
    if prepend_bos is None:
        prepend_bos = tokenizer_prepends_bos(tokenizer)
    if not prepend_bos:
        return plain
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        raise JaxlensError("the tokenizer has no BOS token, so prepend_bos=True cannot be honoured.")
    return [int(bos)] + plain


def ctx_ids(tokenizer, prompt: str) -> list:
    """Prompt ids without special tokens: the ``ctx_ids`` of the copy detectors (§1.3, §2.3)."""
    return encode_plain(tokenizer, prompt)


# ----------------------------------------------------------------------------------------------
# Gold alignment
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class GoldAlignment:
    """The gold answer of one prompt, aligned to token ids (§2.21).

    ``status`` is ``"ok"`` or ``"unresolved"``; ``variant`` is ``"with_space"``, ``"no_space"`` or
    ``"unknown"`` (unresolved, as the reference writes it); ``reason`` says why an alignment failed.
    ``ctx_prefix_match`` (not a reference field) tells whether the chosen ``P + answer`` encoding really
    starts with ``ctx_ids``; the reference slices at ``len(ctx)`` regardless.
    """

    string: str
    prompt: str
    status: str
    variant: str
    first_id: Optional[int]
    answer_ids: tuple
    pieces: tuple
    ctx_ids: tuple
    reason: Optional[str] = None
    ctx_prefix_match: Optional[bool] = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def gold_answer(self) -> dict:
        """``gold_answer`` / ``control_prompt.gold_answer`` of the JSON."""
        return {"string": self.string, "pieces": list(self.pieces), "first_id": self.first_id,
                "answer_ids": list(self.answer_ids), "variant": self.variant}

    def alignment(self) -> dict:
        """``diagnostics.gold_alignment`` / ``control_prompt.gold_alignment`` of the JSON."""
        return {"ok": self.ok, "status": self.status, "variant": self.variant, "first_id": self.first_id,
                "answer_ids": list(self.answer_ids), "pieces": list(self.pieces)}

    def prompt_entry(self, prompt_id: str, prompt_variant: str, fact_key: Optional[str] = None,
                     fact_index: Optional[int] = None) -> dict:
        """One element of ``diagnostics.gold_alignment_prompts``."""
        return {"prompt_id": prompt_id, "prompt_variant": prompt_variant, "ok": self.ok,
                "status": self.status, "variant": self.variant, "first_id": self.first_id,
                "answer_ids": list(self.answer_ids), "pieces": list(self.pieces), "string": self.string,
                "fact_key": fact_key, "fact_index": fact_index}


def _pieces(tokenizer, ids: Sequence[int]) -> tuple:
    if not ids:
        return ()
    try:
        return tuple(str(p) for p in tokenizer.convert_ids_to_tokens(list(ids)))
    except Exception:  # noqa: BLE001
        try:
            return tuple(decode_token(tokenizer, i) for i in ids)
        except Exception:  # noqa: BLE001
            return ()


def _unresolved(answer, prompt, ctx, reason) -> GoldAlignment:
    return GoldAlignment(string=answer, prompt=prompt, status="unresolved", variant="unknown", first_id=None,
                         answer_ids=(), pieces=(), ctx_ids=tuple(ctx), reason=reason)


def align_gold(tokenizer, prompt: str, answer: str, *, pieces_k: int = 4) -> GoldAlignment:
    """Align ``answer`` after ``prompt`` (spec §2.21); never raises for a bad answer or tokenizer."""
    if tokenizer is None:
        return _unresolved(answer, prompt, (), "no_tokenizer")
    if not isinstance(answer, str) or not answer.strip():
        return _unresolved(answer if isinstance(answer, str) else str(answer), prompt, (), "empty_answer")
    try:
        ctx = encode_plain(tokenizer, prompt)
        ws = encode_plain(tokenizer, prompt + " " + answer)
        ns = encode_plain(tokenizer, prompt + answer)
    except Exception as e:  # noqa: BLE001 - report, do not crash
        return _unresolved(answer, prompt, (), f"tokenizer_error: {type(e).__name__}")
    for seq, variant in ((ws, "with_space"), (ns, "no_space")):
        if len(seq) > len(ctx):
            ids = tuple(int(i) for i in seq[len(ctx):])
            return GoldAlignment(string=answer, prompt=prompt, status="ok", variant=variant, first_id=ids[0],
                                 answer_ids=ids, pieces=_pieces(tokenizer, ids[:max(0, int(pieces_k))]),
                                 ctx_ids=tuple(ctx), reason=None, ctx_prefix_match=list(seq[:len(ctx)]) == ctx)
    return _unresolved(answer, prompt, ctx, "no_variant_extended_context")


def gold_alignment_rate(entries: Iterable) -> Optional[float]:
    """Fraction of alignments that are ok (``GoldAlignment`` objects or prompt-entry dicts); None if empty.
    A rate below 1.0 raises the ``gold_alignment_partial`` flag."""
    items = list(entries)
    if not items:
        return None
    ok = sum(1 for e in items if (e.get("ok") if isinstance(e, dict) else e.ok))
    return ok / float(len(items))


# ----------------------------------------------------------------------------------------------
# Token strings
# ----------------------------------------------------------------------------------------------

def decode_token(tokenizer, token_id: int) -> str:
    """String of one token id: ``decode([id])``, else ``convert_ids_to_tokens([id])[0]``, else ``str(id)``."""
    tid = int(token_id)
    try:
        s = tokenizer.decode([tid])
        if isinstance(s, str):
            return s
    except Exception:  # noqa: BLE001
        pass
    try:
        toks = tokenizer.convert_ids_to_tokens([tid])
        if toks and toks[0] is not None:
            return str(toks[0])
    except Exception:  # noqa: BLE001
        pass
    return str(tid)


def token_decoder(tokenizer) -> Callable[[int], str]:
    """A memoised ``decode(id) -> str`` built on :func:`decode_token` (the ``decode`` callable that
    :mod:`jaxlens.probe.metrics` takes)."""
    cache: dict = {}

    def decode(token_id: int) -> str:
        tid = int(token_id)
        s = cache.get(tid)
        if s is None:
            s = cache[tid] = decode_token(tokenizer, tid)
        return s

    return decode


def position_strings(tokenizer, ids: Sequence[int]) -> list:
    """The ``token`` column of the records CSV: every input id decoded on its own, without the
    tokenizer's clean-up of spaces (TransformerLens ``to_str_tokens``)."""
    out = []
    for i in ids:
        try:
            out.append(tokenizer.decode([int(i)], clean_up_tokenization_spaces=False))
        except TypeError:
            out.append(decode_token(tokenizer, i))
        except Exception:  # noqa: BLE001
            out.append(decode_token(tokenizer, i))
    return out
