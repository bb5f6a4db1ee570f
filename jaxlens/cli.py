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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jaxlens", description="Layer-by-layer lenses for HF causal LMs in JAX.")
    sub = p.add_subparsers(dest="command", required=True)
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
