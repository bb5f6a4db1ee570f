"""The ``jaxlens sweep`` subcommand (registered by :func:`jaxlens.cli.build_parser` through :func:`add_parser`)."""
from __future__ import annotations


def _fields(pairs) -> dict:
    from jaxlens.errors import JaxlensError

    out = {}
    for p in pairs or []:
        k, eq, v = p.partition("=")
        if not eq or not k.strip() or not v.strip():
            raise JaxlensError(f"--field {p!r}: expected NAME=COLUMN, e.g. --field prompt=question")
        out[k.strip()] = v.strip()
    return out


def _buckets(text):
    from jaxlens.errors import JaxlensError

    if text is None:
        return None
    try:
        return [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise JaxlensError(f"--buckets {text!r}: expected comma-separated lengths, e.g. 32,64,128")


def cmd_sweep(args) -> int:
    from jaxlens.sweep.run import run_sweep

    res = run_sweep(
        args.model, args.prompts, args.out, lenses=args.lens, tuned=args.tuned, prism=args.prism,
        resume=args.resume, mesh=args.mesh, dtype=args.dtype, top_k=args.top_k, positions=args.positions,
        save_residuals=args.save_residuals, batch_tokens=args.batch_tokens, max_batch=args.max_batch,
        buckets=_buckets(args.buckets), max_tokens=args.max_tokens, window=args.window, fields=_fields(args.field),
        suite=args.suite, reference_quirks=args.reference_quirks, coordinator=args.coordinator,
        num_processes=args.num_processes, process_id=args.process_id, distributed_auto=args.distributed == "auto",
        stable_kernels=args.stable_kernels, progress=not args.quiet, return_tables=False)
    if args.quiet and res.summary:          # without --quiet the sweep printed it already (process 0 only)
        print(res.summary_table())
    return 0


def add_parser(subparsers):
    s = subparsers.add_parser(
        "sweep", help="the lenses over a prompt set x several models, batched / sharded / resumable, to Parquet",
        description="Sweep a prompt set (JSONL / CSV / Parquet with a 'prompt' column, optional 'answer' and 'id'; "
                    "hf:NAME[:CONFIG][@SPLIT]; or a probe TOML suite) over one or more models and lenses. Writes "
                    "OUT/<name>/{layers,prompts}/*.parquet and manifest.json per model (docs/sweep.md).")
    s.add_argument("--model", action="append", required=True, metavar="SOURCE",
                   help="'demo', a local HF directory, a .gguf file or a hub id; repeat for several models")
    s.add_argument("--prompts", required=True, metavar="FILE",
                   help="a .jsonl / .csv / .parquet file, hf:NAME[:CONFIG][@SPLIT], or a probe suite .toml")
    s.add_argument("--out", required=True, metavar="DIR", help="output directory (one subdirectory per model)")
    s.add_argument("--lens", default="norm,logit", help="comma-separated: norm, logit, raw, tuned, prism "
                   "(default norm,logit; --tuned / --prism add theirs)")
    s.add_argument("--tuned", action="append", default=None, metavar="LENS_DIR|auto",
                   help="a tuned lens (any format load_lens reads), or auto; once, or once per --model")
    s.add_argument("--prism", action="append", default=None, metavar="DIR",
                   help="a Prism directory (jaxlens fit-prism); once, or once per --model")
    s.add_argument("--resume", action="store_true",
                   help="continue an interrupted sweep in OUT (refused if the prompts, model, dtype, lenses or "
                        "options changed)")
    from jaxlens.distributed import add_cli_flags

    add_cli_flags(s)
    s.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    s.add_argument("--top-k", type=int, default=5,
                   help="top tokens written per layer (1..64; default 5, the pure CSV's)")
    s.add_argument("--positions", choices=["last", "all"], default="last",
                   help="all: also a records-style table of every layer at every position")
    s.add_argument("--save-residuals", action="store_true",
                   help="also write the raw residuals at the last position (float32 .npy, memory-mappable)")
    s.add_argument("--batch-tokens", type=int, default=None,
                   help="padded tokens per batch (default 3072 on CPU, 49152 on accelerators)")
    s.add_argument("--max-batch", type=int, default=None, help="at most this many prompts per batch")
    s.add_argument("--buckets", default=None, metavar="L1,L2,...",
                   help="padded lengths (default 16, 24, 32, 48, 64, ... up to the model's context)")
    s.add_argument("--max-tokens", type=int, default=None,
                   help="prompts longer than this (or the model's context) get status too_long")
    s.add_argument("--window", type=int, default=2048,
                   help="prompts per shard / resume unit (default 2048)")
    s.add_argument("--field", action="append", default=None, metavar="NAME=COLUMN",
                   help="read prompt / answer / id / control_answer from another column, e.g. prompt=question")
    s.add_argument("--suite", default=None, metavar="TOML",
                   help="take the metric thresholds from this probe suite (default: the prompt suite's, "
                        "else the reference suite's)")
    s.add_argument("--reference-quirks", action="store_true",
                   help="reproduce the reference probe's known metric bugs (docs/reference_bugs.md)")
    s.add_argument("--stable-kernels", action="store_true",
                   help="CPU: matrix kernels whose rounding does not depend on the batch shape (about 2x slower): "
                        "rows then equal jaxlens probe's bit for bit and do not depend on --batch-tokens")
    s.add_argument("--quiet", action="store_true", help="no progress bar or messages")
    s.set_defaults(func=cmd_sweep)
    return s

