"""The ``jaxlens`` command line. Bad input gets one line on stderr and a non-zero exit, no traceback."""
from __future__ import annotations

import argparse
import sys
import time


def _cmd_forward(args) -> int:
    import numpy as np

    from .loader import load_model

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
    from .loader import load_model
    from .metrics import ReferenceQuirks
    from .probe import run_probe
    from .suite import load_suite

    def say(msg):
        if not args.quiet:
            print(f"[jaxlens] {msg}", file=sys.stderr, flush=True)

    suite = load_suite(args.suite)
    if args.tuned:
        from .errors import JaxlensError

        raise JaxlensError("--tuned needs the tuned-lens support, which is not in this version of jaxlens")
    say(f"loading {args.model} ({args.dtype})")
    model = load_model(args.model, dtype=args.dtype)
    quirks = ReferenceQuirks.reference() if args.reference_quirks else None
    result = run_probe(model, suite=suite, out_dir=args.out, quirks=quirks, progress=say)
    print(result.milestones_table())
    t = result.timings
    print(f"\n{len(result.pure_rows)} pure rows, {len(result.records)} records; forward {t['forward_s']:.2f} s, "
          f"lens decode {t['lens_s']:.2f} s, total {t['total_s']:.2f} s (incl. compile)")
    for path in result.paths:
        print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jaxlens", description="Layer-by-layer lenses for HF causal LMs in JAX.")
    sub = p.add_subparsers(dest="command", required=True)
    pr = sub.add_parser("probe", help="run the reference probe (spec/probe.md) and write its files")
    pr.add_argument("--model", default="demo", help="'demo' (default), a local HF directory, or a hub id")
    pr.add_argument("--out", default="runs/latest", help="output directory (default runs/latest)")
    pr.add_argument("--suite", default="reference", help="prompt suite: 'reference' or a TOML file")
    pr.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    pr.add_argument("--tuned", default=None, metavar="LENS_DIR", help="a trained tuned lens to decode too")
    pr.add_argument("--reference-quirks", action="store_true",
                    help="reproduce the reference's known bugs (Q1, N1) instead of fixing them")
    pr.add_argument("--quiet", action="store_true", help="no progress messages")
    pr.set_defaults(func=_cmd_probe)
    f = sub.add_parser("forward", help="load a checkpoint and run one forward pass (a smoke test)")
    f.add_argument("--model", default="demo", help="'demo', a local HF directory, or a hub id")
    f.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    f.add_argument("--text", default="Give the city name only, plain text. The capital of Germany is called simply")
    f.set_defaults(func=_cmd_forward)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from .errors import JaxlensError

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
