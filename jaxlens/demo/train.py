"""Recipe for the bundled demo model: ``python -m jaxlens.demo.train [--out DIR] [--steps N]``.

One seeded command regenerates everything in ``jaxlens/demo/``:

1. the geography corpus (:mod:`jaxlens.demo.corpus`, deterministic from the seed);
2. a byte-level BPE tokenizer trained on it with ``tokenizers`` (no BOS, Qwen style; the capitals are
   single tokens with a leading space), saved as a ``PreTrainedTokenizerFast``;
3. a small Qwen3-architecture causal LM trained from scratch with the jaxlens decoder, optax AdamW and a
   warmup + cosine schedule, in float32 on CPU, with a fixed data order;
4. the Hugging Face directory: ``config.json``, ``model.safetensors`` (float32), tokenizer files, and
   ``card.json`` / ``RECIPE.md`` recording the recipe, losses, the probe answers and the weights' sha256.

Shape and hyper-parameters live in ``configs/demo_model.toml`` (``--config`` to use another file).
Re-running the recipe on CPU reproduces ``model.safetensors`` bit for bit (same jax/XLA version).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
import tomllib

import numpy as np

from jaxlens.demo import corpus as demo_corpus
from jaxlens.models.checkpoint import file_sha256
from jaxlens.models.loader import pad_batch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_CONFIG = os.path.join(REPO_ROOT, "configs", "demo_model.toml")
DEFAULT_OUT = os.path.dirname(os.path.abspath(__file__))   # jaxlens/demo/
EOS = "<|endoftext|>"


def read_recipe(path: str) -> dict:
    if not os.path.exists(path):
        raise SystemExit(f"demo_train: recipe config {path} not found (run from a source checkout, "
                         "or pass --config)")
    with open(path, "rb") as f:
        return tomllib.load(f)


# --------------------------------------------------------------------------------------------------
# Tokenizer


def train_tokenizer(docs: list[str], cfg: dict):
    """Byte-level BPE on the corpus -> transformers PreTrainedTokenizerFast (no BOS, EOS = pad)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=int(cfg["vocab_size"]), min_frequency=int(cfg["min_frequency"]),
                                  special_tokens=list(cfg["special_tokens"]), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(docs, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS)


def save_tokenizer(hf_tok, out: str, model_max_length: int) -> None:
    hf_tok.model_max_length = model_max_length
    hf_tok.save_pretrained(out)
    # transformers 5 writes its own backend class name; the generic fast class loads under 4.x and 5.x.
    path = os.path.join(out, "tokenizer_config.json")
    with open(path) as f:
        tc = json.load(f)
    tc["tokenizer_class"] = "PreTrainedTokenizerFast"
    tc.pop("backend", None)
    with open(path, "w") as f:
        json.dump(tc, f, indent=2, sort_keys=True)
        f.write("\n")


def check_tokenizer(hf_tok) -> dict:
    """The probe's answers must be single tokens with a leading space; report the whole capital table."""
    bad = [k for _, k in demo_corpus.PROBE_FACTS if len(hf_tok.encode(" " + k, add_special_tokens=False)) != 1]
    if bad:
        raise SystemExit(f"demo_train: tokenizer splits probe answers {bad}; raise [tokenizer] vocab_size")
    first_single = sum(len(hf_tok.encode(" " + k.split()[0], add_special_tokens=False)) == 1
                       for _, k, _ in demo_corpus.COUNTRIES)
    n_tok = len(hf_tok.encode(demo_corpus.PROBE_ORIG.format(country="Germany"), add_special_tokens=False))
    return {"vocab_size": len(hf_tok), "capitals_first_word_single_token": first_single,
            "countries": len(demo_corpus.COUNTRIES), "probe_prompt_tokens": n_tok}


# --------------------------------------------------------------------------------------------------
# Model config


def hf_config(m: dict, vocab_size: int, eos_id: int) -> dict:
    """config.json as transformers 5 writes it for Qwen3ForCausalLM (keys sorted like save_pretrained)."""
    import transformers

    n = int(m["num_hidden_layers"])
    cfg = {
        "architectures": ["Qwen3ForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": None,
        "dtype": "float32",
        "eos_token_id": eos_id,
        "head_dim": int(m["head_dim"]),
        "hidden_act": "silu",
        "hidden_size": int(m["hidden_size"]),
        "initializer_range": float(m["init_std"]),
        "intermediate_size": int(m["intermediate_size"]),
        "layer_types": ["full_attention"] * n,
        "max_position_embeddings": int(m["max_position_embeddings"]),
        "max_window_layers": n,
        "model_type": "qwen3",
        "num_attention_heads": int(m["num_attention_heads"]),
        "num_hidden_layers": n,
        "num_key_value_heads": int(m["num_key_value_heads"]),
        "pad_token_id": eos_id,
        "rms_norm_eps": float(m["rms_norm_eps"]),
        "rope_parameters": {"rope_theta": float(m["rope_theta"]), "rope_type": "default"},
        "sliding_window": None,
        "tie_word_embeddings": bool(m["tie_word_embeddings"]),
        "transformers_version": transformers.__version__,
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": int(vocab_size),
    }
    return cfg


# --------------------------------------------------------------------------------------------------
# Data


def make_batches(ids_list: list[list[int]], t: dict, seed: int, epoch: int, pad_id: int):
    """One epoch of batches [(ids int32 [B, T], mask int32 [B, T])], in a seeded, platform-free order.

    Each document (+ end of text) is right-padded to the smallest bucket that holds it; longer ones are
    dropped. Batch size per bucket = tokens_per_batch // bucket, so every step sees a similar token count.
    """
    buckets = sorted(int(b) for b in t["buckets"])
    rng = np.random.Generator(np.random.PCG64([seed, epoch]))
    by_b: dict[int, list[int]] = {b: [] for b in buckets}
    for i, ids in enumerate(ids_list):
        n = len(ids)
        for b in buckets:
            if n <= b:
                by_b[b].append(i)
                break
    batches = []
    for b in buckets:
        idx = np.asarray(by_b[b], np.int64)
        idx = idx[rng.permutation(len(idx))]
        bs = int(t["tokens_per_batch"]) // b
        for s in range(0, len(idx) - bs + 1, bs):
            arr = np.full((bs, b), pad_id, np.int32)
            mask = np.zeros((bs, b), np.int32)
            for r, j in enumerate(idx[s:s + bs]):
                arr[r, :len(ids_list[j])] = ids_list[j]
                mask[r, :len(ids_list[j])] = 1
            batches.append((arr, mask))
    order = rng.permutation(len(batches))
    return [batches[i] for i in order]


def batch_stream(ids_list, t, seed, pad_id):
    epoch = 0
    while True:
        for b in make_batches(ids_list, t, seed, epoch, pad_id):
            yield b
        epoch += 1


# --------------------------------------------------------------------------------------------------
# Training


def build_step(spec, t: dict):
    import jax
    import jax.numpy as jnp
    import optax

    from jaxlens.models import decoder

    steps = int(t["steps"])
    warm = min(int(t["warmup_steps"]), max(steps - 1, 1))
    sched = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=float(t["lr"]), warmup_steps=warm, decay_steps=max(steps, warm + 1),
        end_value=float(t["lr"]) * float(t["final_lr_fraction"]))

    def decay_mask(p):  # no weight decay on norm gains
        return jax.tree_util.tree_map_with_path(
            lambda path, _: "scale" not in jax.tree_util.keystr(path), p)

    opt = optax.chain(optax.clip_by_global_norm(float(t["grad_clip"])),
                      optax.adamw(sched, b1=float(t["b1"]), b2=float(t["b2"]),
                                  weight_decay=float(t["weight_decay"]), mask=decay_mask))
    aux_layer, aux_w = int(t["aux_layer"]), float(t["aux_weight"])

    def xent(logits, ids, mask):
        lp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
        nll = -jnp.take_along_axis(lp, ids[:, 1:, None], axis=-1)[..., 0]
        m = mask[:, 1:].astype(jnp.float32)
        return (nll * m).sum() / m.sum()

    def loss_fn(params, ids, mask):
        fw = decoder.apply(spec, params, ids, mask)
        main = xent(fw.logits, ids, mask)
        if aux_w > 0:
            ln = jax.tree.map(lambda a: a[aux_layer], params["blocks"]["ln1"])
            h = decoder.apply_norm(spec, ln, fw.residuals[aux_layer])
            aux = xent(decoder.head(spec, params, h), ids, mask)
        else:
            aux = jnp.zeros((), jnp.float32)
        return main + aux_w * aux, (main, aux)

    @jax.jit
    def step(params, opt_state, ids, mask):
        (_, (main, aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, ids, mask)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, main, aux

    return opt, step


def train(spec, ids_list, recipe: dict, pad_id: int, log=print):
    import jax

    from jaxlens.models import decoder

    t, m, seed = recipe["train"], recipe["model"], int(recipe["seed"])
    params = decoder.init_params(spec, jax.random.PRNGKey(seed), "float32", std=float(m["init_std"]))
    opt, step = build_step(spec, t)
    opt_state = opt.init(params)
    stream = batch_stream(ids_list, t, seed, pad_id)
    history, ema, t0 = [], None, time.time()
    steps, every = int(t["steps"]), int(t["log_every"])
    window = []
    for i in range(1, steps + 1):
        ids, mask = next(stream)
        params, opt_state, main, aux = step(params, opt_state, ids, mask)
        if i % every == 0 or i == steps or i == 1:
            main, aux = float(main), float(aux)
            window.append(main)
            history.append({"step": i, "loss": round(main, 5), "aux_loss": round(aux, 5),
                            "elapsed_s": round(time.time() - t0, 1)})
            log(f"step {i:5d}/{steps}  loss {main:.4f}  aux {aux:.4f}  {time.time() - t0:6.1f}s")
    params = jax.tree.map(lambda a: np.asarray(a), params)
    return params, history, time.time() - t0


# --------------------------------------------------------------------------------------------------
# Evaluation (recorded in card.json)


def evaluate(out: str) -> dict:
    import jax
    import jax.numpy as jnp

    import jaxlens
    from jaxlens.lens.stats import normalise

    from jaxlens.models import decoder

    model = jaxlens.load_model(out)
    tok = model.tokenizer
    n = model.spec.n_layers

    def last(prompt):
        ids = np.asarray([tok.encode(prompt, add_special_tokens=False)], np.int32)
        fw = model.forward(ids)
        return fw, ids

    def norm_lens_ranks(fw, gold):
        rows = normalise(model, fw.residuals[:, :, -1:], "norm")            # [n+1, 1, 1, d]
        z = decoder.head(model.spec, model.params, rows)[:, 0, 0]           # [n+1, V]
        g = z[:, gold]
        return [int(r) for r in (1 + (z > g[:, None]).sum(-1))]

    facts = []
    for variant, prompt, gold in demo_corpus.probe_prompts():
        gid = tok.encode(" " + gold, add_special_tokens=False)[0]
        fw, _ = last(prompt)
        p = jax.nn.softmax(fw.logits[0, -1])
        top = int(jnp.argmax(p))
        ranks = norm_lens_ranks(fw, gid)
        first = next((l for l, r in enumerate(ranks) if r == 1), None)
        facts.append({"variant": variant, "prompt": prompt, "gold": gold, "top1": tok.decode([top]),
                      "correct": top == gid, "p_gold": round(float(p[gid]), 4),
                      "norm_lens_gold_rank": ranks, "first_rank1_layer": first})
    tests = []
    for prompt, gold in demo_corpus.TEST_PROMPTS:
        gid = tok.encode(" " + gold, add_special_tokens=False)[0]
        fw, _ = last(prompt)
        p = jax.nn.softmax(fw.logits[0, -1])
        top = int(jnp.argmax(p))
        tests.append({"prompt": prompt, "gold": gold, "top1": tok.decode([top]), "correct": top == gid,
                      "p_gold": round(float(p[gid]), 4)})
    # every country, probe template: is the first token of the capital the top-1?
    prompts = [demo_corpus.PROBE_ORIG.format(country=c) for c, _, _ in demo_corpus.COUNTRIES]
    enc = [tok.encode(p, add_special_tokens=False) for p in prompts]
    ids, mask = pad_batch(enc)
    logits = np.asarray(model.forward(ids, mask).logits)
    ok = 0
    wrong = []
    for i, (c, k, _) in enumerate(demo_corpus.COUNTRIES):
        gid = tok.encode(" " + k, add_special_tokens=False)[0]
        top = int(np.argmax(logits[i, len(enc[i]) - 1]))
        ok += top == gid
        if top != gid:
            wrong.append(f"{c}: {tok.decode([top]).strip()} (gold {k})")
    return {"probe_facts": facts, "test_prompts": tests,
            "all_countries_orig_top1": {"correct": ok, "total": len(prompts), "wrong": wrong},
            "n_layers": n}


# --------------------------------------------------------------------------------------------------




def write_recipe_md(out: str, card: dict) -> None:
    f = card["facts_summary"]
    firsts = [r["first_rank1_layer"] for r in card["eval"]["probe_facts"] if r["variant"] == "orig"]
    lines = [
        "# jaxlens demo model",
        "",
        "A small Qwen3-architecture causal LM trained from scratch on a generated geography corpus, so that",
        "`jaxlens probe` and the tests have a real, bundled model that answers the reference probe's five",
        "facts. It is **not** a general language model: it knows ~190 country/capital pairs, continents,",
        "a few largest cities and a handful of filler sentences.",
        "",
        "## Reproduce",
        "",
        "```",
        "python -m jaxlens.demo.train            # writes jaxlens/demo/ (this directory)",
        "python -m jaxlens.demo.train --out /tmp/demo --steps 20   # a quick smoke run elsewhere",
        "```",
        "",
        "Everything is read from `configs/demo_model.toml` (copied into `card.json`, key `recipe`) and is",
        "deterministic from its `seed`: corpus (`jaxlens/demo/corpus.py`) -> byte-level BPE (`tokenizers`) ->",
        "training with the jaxlens decoder (`jaxlens.models.decoder.apply`), optax AdamW, warmup + cosine schedule,",
        "float32 on CPU, fixed data order (length buckets, seeded permutations) -> `model.safetensors`.",
        "On the same jax/jaxlib version and CPU the weights are bit-for-bit identical; compare",
        f"`sha256(model.safetensors)` = `{card['model_sha256']}`.",
        "",
        "## Model",
        "",
        f"* {card['model']['num_hidden_layers']} layers, d_model {card['model']['hidden_size']}, "
        f"{card['model']['num_attention_heads']} heads / {card['model']['num_key_value_heads']} KV heads, "
        f"head_dim {card['model']['head_dim']}, d_ff {card['model']['intermediate_size']}, "
        f"vocab {card['tokenizer']['vocab_size']}, tied embeddings; {card['n_params']:,} parameters, "
        f"{card['model_bytes'] / 1e6:.1f} MB float32.",
        "* Tokenizer: byte-level BPE trained on the corpus, no BOS (like Qwen); `<|endoftext|>` is EOS and",
        "  padding. The probe prompt is "
        f"{card['tokenizer']['probe_prompt_tokens']} tokens; \" Berlin\", \" Paris\", \" Rome\", \" Tokyo\", "
        "\" Ottawa\" are single tokens.",
        "",
        "## Training",
        "",
        f"* {card['train']['steps']} steps, ~{card['train']['tokens_per_batch']} tokens per step, "
        f"lr {card['train']['lr']}, seed {card['seed']}; wall time {card['train_seconds']:.0f} s on "
        f"{card['machine']} (a machine shared with other jobs: the wall time depends on its load).",
        f"* Final training loss (next-token cross-entropy, nats): {card['final_loss']:.4f}.",
    ]
    if float(card["train"]["aux_weight"]) > 0:
        lines += [
            f"* **Auxiliary norm-lens loss (a deliberate recipe knob):** the cross-entropy of the norm-lens "
            f"logits at layer {card['train']['aux_layer']} (the residual after block "
            f"{int(card['train']['aux_layer']) - 1}, through block {card['train']['aux_layer']}'s input "
            f"RMSNorm and the tied unembedding) is added with weight {card['train']['aux_weight']}. It "
            "encourages the answer to become readable below the top layer, so the demo shows a semantic "
            "layer L_semantic < n_layers. Real models do this on their own; this tiny one is nudged.",
        ]
    else:
        lines += ["* No auxiliary loss: plain next-token cross-entropy."]
    lines += [
        "",
        "## Probe facts (final top-1, greedy, first token of the capital)",
        "",
        "| prompt variant | fact | top-1 | p(gold) | norm-lens first rank-1 layer |",
        "|---|---|---|---|---|",
    ]
    for r in card["eval"]["probe_facts"]:
        lines.append(f"| {r['variant']} | {r['gold']} | {r['top1'].strip()} | {r['p_gold']:.4f} | "
                     f"{r['first_rank1_layer']} / {card['model']['num_hidden_layers']} |")
    a = card["eval"]["all_countries_orig_top1"]
    tp = card["eval"]["test_prompts"]
    lines += [
        "",
        f"All {a['total']} countries under the probe's `orig` template: {a['correct']} correct.",
        f"Probe test prompts (spec §1.2): {sum(r['correct'] for r in tp)} / {len(tp)} correct.",
        f"Summary: {f}",
        "",
        "## Notes",
        "",
        f"* Norm lens, `orig` prompts: first rank-1 layer of the capital = {firsts} (of "
        f"{card['model']['num_hidden_layers']}); per-layer gold ranks are in `card.json` ->",
        "  `eval.probe_facts[*].norm_lens_gold_rank`. How deep the lookup happens is a property of this",
        "  checkpoint (seed, corpus weights, steps), not of the architecture: a tiny model may already",
        "  resolve country -> capital in its first block's attention and only sharpen it later.",
        "* Bit-for-bit reproducibility was checked by training twice (30 steps, two processes at once) and",
        "  comparing sha256 of `model.safetensors`; the tokenizer.json of those runs matches this one.",
        "",
    ]
    with open(os.path.join(out, "RECIPE.md"), "w") as fh:
        fh.write("\n".join(lines))


def _tuned_lens_records(out: str) -> dict:
    """What a regeneration keeps: ``card.json["tuned_lens"]``, the RECIPE.md section "## Tuned lens" (to the
    next level-2 heading), and the old weights' sha256 (to tell whether the lens still fits)."""
    kept = {"card": None, "recipe": "", "sha256": None}
    try:
        with open(os.path.join(out, "card.json")) as f:
            old = json.load(f)
        kept["card"] = old.get("tuned_lens")
        kept["sha256"] = old.get("model_sha256")
    except (OSError, ValueError):
        pass
    try:
        with open(os.path.join(out, "RECIPE.md")) as f:
            text = f.read()
    except OSError:
        return kept
    i = text.find("\n## Tuned lens")
    if i >= 0:
        j = text.find("\n## ", i + 1)
        kept["recipe"] = text[i + 1:] if j < 0 else text[i + 1:j + 1]
    return kept


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jaxlens.demo.train", description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=DEFAULT_OUT, help="output directory (default: jaxlens/demo/)")
    ap.add_argument("--steps", type=int, default=None, help="override [train] steps")
    ap.add_argument("--config", default=DEFAULT_CONFIG, help="recipe TOML (default: configs/demo_model.toml)")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    log = (lambda *a, **k: None) if args.quiet else functools.partial(print, flush=True)

    recipe = read_recipe(args.config)
    if args.steps is not None:
        recipe["train"]["steps"] = int(args.steps)
    seed = int(recipe["seed"])

    import jax

    jax.config.update("jax_platforms", "cpu")
    from safetensors.numpy import save_file

    from jaxlens.models.convert import export_state_dict
    from jaxlens.models.spec import spec_from_config

    t_all = time.time()
    docs = demo_corpus.generate(seed, int(recipe["corpus"]["n_docs"]))
    corpus_sha = demo_corpus.text_sha256(docs)
    log(f"corpus: {len(docs)} documents, sha256 {corpus_sha[:16]}...")
    hf_tok = train_tokenizer(docs, recipe["tokenizer"])
    tok_info = check_tokenizer(hf_tok)
    log(f"tokenizer: {tok_info}")
    eos_id = hf_tok.convert_tokens_to_ids(EOS)
    enc = hf_tok(docs, add_special_tokens=False)["input_ids"]
    ids_list = [e + [eos_id] for e in enc]
    cfg = hf_config(recipe["model"], len(hf_tok), eos_id)
    spec = spec_from_config(cfg)

    params, history, train_s = train(spec, ids_list, recipe, eos_id, log)
    state = export_state_dict(spec, params)
    state = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in state.items()}

    os.makedirs(args.out, exist_ok=True)
    kept = _tuned_lens_records(args.out)          # the bundled tuned lens's card entry and RECIPE section
    for stale in ("model.safetensors", "card.json", "RECIPE.md", "special_tokens_map.json"):
        p = os.path.join(args.out, stale)
        if os.path.exists(p):
            os.remove(p)
    with open(os.path.join(args.out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")
    save_tokenizer(hf_tok, args.out, int(recipe["model"]["max_position_embeddings"]))
    wpath = os.path.join(args.out, "model.safetensors")
    save_file(state, wpath, metadata={"format": "pt"})
    os.chmod(wpath, 0o644)  # safetensors writes 0600
    sha = file_sha256(wpath)
    log(f"wrote {wpath} ({os.path.getsize(wpath) / 1e6:.2f} MB), sha256 {sha}")

    ev = evaluate(args.out)
    facts = ev["probe_facts"]
    summary = {
        "orig_correct": sum(r["correct"] for r in facts if r["variant"] == "orig"),
        "no_filler_correct": sum(r["correct"] for r in facts if r["variant"] == "no_filler"),
        "orig_semantic_below_top": sum(r["first_rank1_layer"] is not None
                                       and r["first_rank1_layer"] < ev["n_layers"]
                                       for r in facts if r["variant"] == "orig"),
    }
    import platform

    card = {
        "name": "jaxlens-demo",
        "seed": seed,
        "recipe": recipe,
        "model": recipe["model"],
        "train": recipe["train"],
        "tokenizer": tok_info,
        "corpus": {"n_docs": len(docs), "sha256": corpus_sha, "countries": len(demo_corpus.COUNTRIES),
                   "docs_trained_per_epoch_fraction": None},
        "n_params": int(sum(v.size for v in state.values())),
        "model_bytes": os.path.getsize(wpath),
        "model_sha256": sha,
        "final_loss": history[-1]["loss"],
        "loss_history": history,
        "train_seconds": round(train_s, 1),
        "total_seconds": round(time.time() - t_all, 1),
        "machine": f"{platform.machine()} CPU x{os.cpu_count()}",
        "versions": {"jax": jax.__version__, "numpy": np.__version__, "python": sys.version.split()[0]},
        "facts_summary": summary,
        "eval": ev,
    }
    card["corpus"].pop("docs_trained_per_epoch_fraction")
    if kept["card"] is not None:
        card["tuned_lens"] = kept["card"]
    with open(os.path.join(args.out, "card.json"), "w") as f:
        json.dump(card, f, indent=1)
        f.write("\n")
    write_recipe_md(args.out, card)
    if kept["recipe"]:
        with open(os.path.join(args.out, "RECIPE.md"), "a") as fh:
            fh.write("\n" + kept["recipe"])
    if kept["sha256"] is not None and kept["sha256"] != card.get("model_sha256"):
        log("warning: the weights changed, so the bundled tuned lens (tuned_lens/) no longer fits them: retrain "
            "it with the commands in RECIPE.md, section 'Tuned lens'")
    for r in facts:
        log(f"{r['variant']:9s} {r['gold']:7s} top1={r['top1']!r:10s} p={r['p_gold']:.3f} "
            f"first_rank1={r['first_rank1_layer']} ranks={r['norm_lens_gold_rank']}")
    log(f"all countries (orig): {ev['all_countries_orig_top1']['correct']}/{ev['all_countries_orig_top1']['total']}"
        f"; test prompts {sum(r['correct'] for r in ev['test_prompts'])}/{len(ev['test_prompts'])}")
    log(f"done in {time.time() - t_all:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
