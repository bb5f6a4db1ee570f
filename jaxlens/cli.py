"""The ``jaxlens`` command line. Bad input gets one line on stderr and a non-zero exit, no traceback."""
from __future__ import annotations

import argparse
import os
import sys
import time


def _cmd_forward(args) -> int:
    import numpy as np

    from jaxlens.models.loader import load_model

    t0 = time.perf_counter()
    model = load_model(args.model, dtype=args.dtype)
    t1 = time.perf_counter()
    text = args.text
    try:
        ids = model.tokenizer(text, return_tensors="np")["input_ids"]
    except Exception:  # noqa: BLE001 - a checkpoint without tokenizer still runs on a token id
        ids = np.zeros((1, 1), np.int64)
    fw = model.forward(ids)
    fw.logits.block_until_ready()
    t2 = time.perf_counter()
    top = np.asarray(fw.logits[0, -1]).argsort()[::-1][:5]
    toks = []
    for i in top:
        try:
            s = model.tokenizer.decode([int(i)])
        except Exception:  # noqa: BLE001 - no tokenizer: show ids
            s = ""
        toks.append(repr(s) if s else f"<id {int(i)}>")
    print(f"{model!r}")
    print(f"loaded in {t1 - t0:.2f} s; forward of {ids.shape[1]} tokens (incl. compile) in {t2 - t1:.2f} s")
    print(f"residuals {tuple(fw.residuals.shape)} {fw.residuals.dtype}, logits {tuple(fw.logits.shape)}")
    print("next-token top-5:", ", ".join(toks))
    return 0


def _cmd_probe(args) -> int:
    from jaxlens.models.loader import load_model
    from jaxlens.probe.metrics import ReferenceQuirks
    from jaxlens.probe.pipeline import run_probe
    from jaxlens.probe.suite import load_suite

    def say(msg):
        if not args.quiet:
            print(f"[jaxlens] {msg}", file=sys.stderr, flush=True)

    if args.report:
        from jaxlens.report.cli import preflight

        preflight()
    suite = load_suite(args.suite)
    tuned = args.tuned
    if tuned not in ("auto", "off", "require") and not os.path.isdir(os.path.expanduser(tuned)):
        from jaxlens.errors import JaxlensError

        raise JaxlensError(f"--tuned {tuned}: no such lens directory (or use auto, off, require)")
    prism = args.prism
    if prism not in ("auto", "on", "off") and not os.path.isdir(os.path.expanduser(prism)):
        from jaxlens.errors import JaxlensError

        raise JaxlensError(f"--prism {prism}: no such Prism directory (or use auto, on, off)")
    say(f"loading {args.model} ({args.dtype})")
    model = load_model(args.model, dtype=args.dtype)
    quirks = ReferenceQuirks.reference() if args.reference_quirks else None
    result = run_probe(model, suite=suite, out_dir=args.out, quirks=quirks, progress=say, tuned=tuned, prism=prism)
    print(result.milestones_table())
    t = result.timings
    print(f"\n{len(result.pure_rows)} pure rows, {len(result.records)} records; forward {t['forward_s']:.2f} s, "
          f"lens decode {t['lens_s']:.2f} s, total {t['total_s']:.2f} s (incl. compile)")
    for path in result.paths:
        print(path)
    if args.report:
        from jaxlens.report.cli import report_after_probe

        for path in report_after_probe(args.out):
            print(path)
    return 0


def _cmd_fit_prism(args) -> int:
    from jaxlens import distributed as DI

    info = DI.init_from_args(args)                 # before anything touches a JAX backend
    from train_tuned.prism import fit_prism

    res = fit_prism(args.model, args.out, data=args.data, k=args.k, layers=args.layers, tokens=args.tokens,
                    reservoir=args.reservoir, reference_quirks=args.reference_quirks, seq_len=args.seq_len,
                    batch_seqs=args.batch, mesh=args.mesh, dtype=args.dtype, text_field=args.text_field,
                    force=args.force, progress=not args.quiet, log=(lambda msg: None) if args.quiet else None)
    if not info.is_coordinator:                    # every process fitted the same Prism; process 0 wrote it
        return 0
    p, t = res.provenance, res.timings
    rate = f"{t['rows_per_s']:,.0f} rows/s" if t.get("rows_per_s") else "-"
    print(f"Prism ({p['jaxlens']['recipe']} recipe): k {p['k']}, layers {p['layers']}, {p['tokens_seen']} rows, "
          f"reservoir {p['reservoir']}, orthogonality error {p['orthogonality_error']:.2e}; "
          f"rows {t['stream_s']:.2f} s ({rate}), bases + Procrustes {t['linalg_s']:.2f} s")
    print(res.out)
    return 0


def _cmd_train_lens(args) -> int:
    from jaxlens.errors import JaxlensError

    if args.plan_only:
        return _train_lens_plan(args)
    missing = [f for f, v in (("--data", args.data), ("--out", args.out)) if not v]
    if missing:
        raise JaxlensError(f"train-lens needs {' and '.join(missing)} (or --plan-only)")
    from train_tuned.train import train_lens

    res = train_lens(args.model, args.data, args.out, steps=args.steps, recipe=args.recipe, stop_at=args.stop_at,
                     resume=args.resume, tokens_per_step=args.tokens_per_step, seq_len=args.seq_len,
                     micro_batch=args.micro_batch, devices=args.devices, mesh=args.mesh,
                     coordinator=args.coordinator, num_processes=args.num_processes, process_id=args.process_id,
                     distributed_auto=args.distributed == "auto", checkpoint_every=args.checkpoint_every,
                     seed=args.seed, dtype=args.dtype, text_field=args.text_field, lens_matmul=args.lens_matmul,
                     layer_groups=args.layer_groups, progress=not args.quiet,
                     log=None if not args.quiet else (lambda msg: None))
    import jax

    if jax.process_index() != 0:
        return 0
    fl = res.card["final_losses"]
    kl = fl.get("kl_nats_mean_last") or []
    layers = fl.get("layers") or []
    shown = ", ".join(f"{l}: {v:.4f}" for l, v in zip(layers, kl) if v is not None)
    state = "complete" if res.complete else f"stopped after step {res.step} (resume with --resume)"
    print(f"{res.card['recipe']['name']} lens, {res.step}/{res.card['training']['steps']} steps, {state}")
    print(f"KL(final || lens) nats/token, mean of the last {fl['mean_last_steps']} steps, by layer: {shown}")
    print(res.out)
    return 0


def _train_lens_plan(args) -> int:
    """--plan-only: per-device memory of the step on the mesh (abstract parameters; nothing allocated)."""
    import json as _json

    from jaxlens.distributed import parse_mesh
    from jaxlens.errors import JaxlensError

    sizes = parse_mesh(args.mesh)
    if args.fake_devices:
        if sizes is None or -1 in sizes.values():
            raise JaxlensError("--fake-devices needs a --mesh with explicit sizes (no -1)")
        n = sizes["data"] * sizes["fsdp"] * sizes["tensor"]
        os.environ["JAX_PLATFORMS"] = "cpu"
        flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "host_platform_device_count" not in f]
        os.environ["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={n}"])
        import jax

        jax.config.update("jax_platforms", "cpu")
    import jax

    if sizes is not None and -1 not in sizes.values():
        need = sizes["data"] * sizes["fsdp"] * sizes["tensor"]
        if need != len(jax.devices()):
            raise JaxlensError(f"--mesh needs {need} devices and this machine has {len(jax.devices())} "
                               f"{jax.default_backend()} device(s); add --fake-devices to plan on {need} fake CPU "
                               "devices")
    from train_tuned.memory import format_plan, plan_memory

    r = plan_memory(args.model, recipe=args.recipe, mesh=args.mesh, devices=args.devices, dtype=args.dtype,
                    steps=args.steps, tokens_per_step=args.tokens_per_step, seq_len=args.seq_len,
                    micro_batch=args.micro_batch, lens_matmul=args.lens_matmul, layer_groups=args.layer_groups)
    print(format_plan(r))
    if args.out:
        from jaxlens.writers import write_json

        path = args.out if args.out.endswith(".json") else os.path.join(args.out, "plan.json")
        write_json(path, r)
        print(path)
    elif args.json:
        print(_json.dumps(r, indent=2))
    return 0


def _cmd_eval_lens(args) -> int:
    from jaxlens import distributed as DI

    info = DI.init_from_args(args)                 # before anything touches a JAX backend
    from train_tuned.evaluate import default_out, evaluate_lens, format_table

    from jaxlens.models.loader import load_model
    from jaxlens.lens.tuned import load_lens
    from jaxlens.writers import write_json

    mesh = DI.mesh_from_spec(args.mesh) if args.mesh else None
    model = load_model(args.model, dtype=args.dtype, mesh=mesh)
    lens = load_lens(args.lens, model=model)
    res = evaluate_lens(model, lens, args.data, seq_len=args.seq_len, max_tokens=args.tokens,
                        batch_seqs=args.batch, text_field=args.text_field, progress=not args.quiet, mesh=mesh)
    out = args.out or default_out(args.lens, args.data)
    if info.is_coordinator:                        # every process has the same result; one writes it
        write_json(out, res)
        print(format_table(res))
        print(out)
    DI.barrier("eval-lens done")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jaxlens", description="Layer-by-layer lenses for HF causal LMs in JAX.")
    p.add_argument("--no-compile-cache", action="store_true",
                   help="do not use the on-disk XLA compilation cache ($JAXLENS_COMPILE_CACHE, default "
                        "$XDG_CACHE_HOME/jaxlens/xla or ~/.cache/jaxlens/xla; JAXLENS_COMPILE_CACHE=off also disables it)")
    sub = p.add_subparsers(dest="command", required=True)
    pr = sub.add_parser("probe", help="run the reference probe (spec/probe.md) and write its files")
    pr.add_argument("--model", default="demo", help="'demo' (default), a local HF directory, or a hub id")
    pr.add_argument("--out", default="runs/latest", help="output directory (default runs/latest)")
    pr.add_argument("--suite", default="reference", help="prompt suite: 'reference' or a TOML file")
    pr.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    pr.add_argument("--tuned", default=os.environ.get("LOGOS_TUNED", "auto"), metavar="LENS_DIR|MODE",
                    help="a tuned lens directory (jaxlens, tuned-lens or reference format) to decode too, or a mode: "
                    "auto (default; env LOGOS_TUNED): use tuned_lenses/<name>/ or the model's tuned_lens/ if present; "
                    "require: the same, but fail without one; off")
    pr.add_argument("--prism", default=os.environ.get("LOGOS_PRISM", "auto"), metavar="DIR|MODE",
                    help="a Prism directory (fit-prism / reference format) to decode too, or a mode: auto (default; "
                    "env LOGOS_PRISM): use prisms/<name>/ or the model's prism/ if present; on: the same, but fail "
                    "without one; off")
    pr.add_argument("--reference-quirks", action="store_true",
                    help="reproduce the reference's known bugs (Q1, N1, Q3, Q5, Q13, N2; docs/reference_bugs.md) "
                         "instead of fixing them")
    pr.add_argument("--quiet", action="store_true", help="no progress messages")
    pr.add_argument("--report", action="store_true", help="then write the evaluation report and figures to OUT/report "
                    "(jaxlens report; PNGs need matplotlib: pip install 'jaxlens[plot]')")
    pr.set_defaults(func=_cmd_probe)
    f = sub.add_parser("forward", help="load a checkpoint and run one forward pass (a smoke test)")
    f.add_argument("--model", default="demo", help="'demo', a local HF directory, or a hub id")
    f.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    f.add_argument("--text", default="Give the city name only, plain text. The capital of Germany is called simply")
    f.set_defaults(func=_cmd_forward)
    t = sub.add_parser("train-lens", help="train a tuned lens with optax (orbax checkpoints, exact resume)")
    t.add_argument("--model", default="demo", help="'demo' (default), a local HF directory, or a hub id")
    t.add_argument("--data", default=None, help="a text file (paragraphs = documents), a .jsonl file, "
                   "or hf:NAME[:CONFIG][@SPLIT] (required unless --plan-only)")
    t.add_argument("--out", default=None, metavar="LENS_DIR", help="lens + checkpoint directory (required unless "
                   "--plan-only; with it, where to write plan.json)")
    t.add_argument("--recipe", default="tuned-lens", help="'tuned-lens' (default), 'reference', or a recipe .toml")
    t.add_argument("--steps", type=int, default=None, help="optimizer steps of the whole schedule (default: recipe)")
    t.add_argument("--stop-at", type=int, default=None, metavar="K", help="stop cleanly after step K")
    t.add_argument("--resume", action="store_true", help="continue from the last checkpoint in LENS_DIR")
    t.add_argument("--tokens-per-step", type=int, default=None,
                   help="tokens per optimizer step (default: the recipe's, scaled to the model on a CPU)")
    t.add_argument("--seq-len", type=int, default=None, help="sequence length (default: recipe, capped by the model)")
    t.add_argument("--micro-batch", type=int, default=None, help="sequences per device per micro-batch")
    t.add_argument("--layer-groups", type=int, default=None, metavar="G",
                   help="score the trained layers in G groups per micro-batch (divides the layers per step; less "
                        "memory, the same gradient up to rounding; default: the recipe's objective.layer_groups, else the "
                        "fewest groups of at most 16 layers)")
    t.add_argument("--devices", type=int, default=1, help="data-parallel devices (0 = all) when no --mesh is given")
    from jaxlens.distributed import add_cli_flags

    add_cli_flags(t, mesh_help="shard the run: the frozen model by the logical-axis rules, the lens and optimizer "
                               "state over fsdp, sequences over data x fsdp, the vocabulary over tensor (-1 = the rest)")
    t.add_argument("--plan-only", action="store_true",
                   help="print the per-device memory of one training step on --mesh (compiled on abstract parameters; "
                        "nothing allocated; --model may be a config.json) and exit")
    t.add_argument("--fake-devices", action="store_true",
                   help="with --plan-only: plan on as many fake CPU devices as the mesh has (size a slice on a laptop)")
    t.add_argument("--json", action="store_true", help="with --plan-only: also print the plan as JSON")
    t.add_argument("--checkpoint-every", type=int, default=None, help="checkpoint interval in steps")
    t.add_argument("--seed", type=int, default=None, help="data order / sampling seed (default: recipe)")
    t.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="model dtype (lens parameters are always float32)")
    t.add_argument("--lens-matmul", default=None, choices=["model", "float32", "bfloat16", "float16"],
                   help="operand dtype of the lens's vocabulary GEMMs (fp32 accumulation; default: the recipe's)")
    t.add_argument("--text-field", default="text", help="JSONL / dataset text field (default: text)")
    t.add_argument("--quiet", action="store_true", help="no progress output")
    t.set_defaults(func=_cmd_train_lens)
    e = sub.add_parser("eval-lens", help="per-layer CE / entropy / KL of the logit lens and a tuned lens")
    e.add_argument("--model", default="demo", help="'demo' (default), a local HF directory, or a hub id")
    e.add_argument("--lens", required=True, metavar="LENS_DIR", help="a jaxlens, tuned-lens or reference lens")
    e.add_argument("--data", required=True, help="a text or .jsonl file")
    e.add_argument("--out", default=None, help="result JSON (default LENS_DIR/eval-<data name>.json)")
    e.add_argument("--tokens", type=int, default=None, help="evaluate at most this many tokens")
    e.add_argument("--seq-len", type=int, default=None, help="sequence length (default: the lens's training one)")
    e.add_argument("--batch", type=int, default=8, help="sequences per forward pass")
    e.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    e.add_argument("--text-field", default="text", help="JSONL text field (default: text)")
    e.add_argument("--quiet", action="store_true", help="no progress bar")
    from jaxlens.distributed import add_cli_flags

    add_cli_flags(e, mesh_help="shard the model as loaded (fsdp / tensor) and each batch over data x fsdp; "
                               "-1 = the remaining devices")
    e.set_defaults(func=_cmd_eval_lens)
    from jaxlens.report.cli import add_parser as add_report_parser

    add_report_parser(sub)
    fp = sub.add_parser("fit-prism", help="fit a Prism (shared whitening + Procrustes decoder, spec §4.1)")
    fp.add_argument("--model", default="demo", help="'demo' (default), a local HF directory, or a hub id")
    fp.add_argument("--out", required=True, metavar="DIR", help="Prism directory (reference + jaxlens formats)")
    fp.add_argument("--data", default=None, help="rows' text: a text file (paragraphs = documents), a .jsonl file "
                    "or hf:NAME[:CONFIG][@SPLIT] (default for the demo model: its generated corpus); with "
                    "--reference-quirks a prompt file, one per line (default: the reference's 10 prompts)")
    fp.add_argument("--k", type=int, default=None, help="basis size (default min(512, d_model))")
    fp.add_argument("--layers", default=None, help="jaxlens layers to sample, e.g. 0,10,20,30 ('embed' = 0; "
                    "default: the embeddings and about 25/50/75%% depth)")
    fp.add_argument("--tokens", type=int, default=None, help="rows to accumulate, one per (token position, "
                    "sampled layer), the reference's 'tokens' (default by model size: 100,000 up to 14B)")
    fp.add_argument("--reservoir", type=int, default=None, help="reservoir rows for the PCA (default by model "
                    "size: 20,000 up to 14B)")
    fp.add_argument("--reference-quirks", action="store_true", help="the reference's recipe (Q6): raw-residual "
                    "statistics, Q in its transposed orientation, the last position of 10 prompts cycled")
    fp.add_argument("--seq-len", type=int, default=None, help="packed sequence length (default min(512, model))")
    fp.add_argument("--batch", type=int, default=None, help="sequences per forward (default ~4096 tokens)")
    fp.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    fp.add_argument("--text-field", default="text", help="JSONL / dataset text field (default: text)")
    fp.add_argument("--force", action="store_true", help="replace a Prism already in DIR")
    fp.add_argument("--quiet", action="store_true", help="no progress output")
    add_cli_flags(fp, mesh_help="shard the model as loaded (fsdp / tensor) and the rows' sequences over "
                                "data x fsdp; -1 = the remaining devices")
    fp.set_defaults(func=_cmd_fit_prism)
    from jaxlens.bench import add_parser as add_bench_parser

    add_bench_parser(sub)
    from jaxlens.sweep.cli import add_parser as add_sweep_parser

    add_sweep_parser(sub)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from jaxlens.errors import JaxlensError

    if not args.no_compile_cache:
        from jaxlens.compile_cache import enable_compile_cache

        enable_compile_cache()

    try:
        return args.func(args)
    except JaxlensError as e:
        print(f"jaxlens: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("jaxlens: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
