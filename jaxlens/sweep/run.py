"""``jaxlens.sweep(...)`` / ``jaxlens sweep``: prompts x models x lenses -> Parquet tables, resumable.

Per model: load (sharded over ``mesh`` when given), resolve the lenses, open the store (refusing a resume
whose inputs changed), then a three-stage pipeline over the windows not yet done:

    producer thread   tokenise + align a window's prompts, plan its batches (length buckets)
    main thread       dispatch each batch's jitted step (asynchronous), commit finished windows
    writer thread     fetch a batch's outputs, build its rows with the probe's metric functions, write the
                      window's Parquet shards

so tokenising and writing overlap device work and at most two batches are in flight (memory does not
grow with the number of prompts). Under ``jax.distributed`` every process runs the same plan, feeds its
rows of each global batch, writes its own shards, and process 0 records them in ``manifest.json``.
"""
from __future__ import annotations

import copy
import dataclasses
import gc
import hashlib
import os
import queue
import shutil
import sys
import tempfile
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Optional, Sequence

import numpy as np

from jaxlens.errors import JaxlensError

BUILTIN = ("norm", "logit", "raw")
LENSES = BUILTIN + ("tuned", "prism")
DEFAULT_LENSES = ("norm", "logit")
WEIGHT_EXT = (".safetensors", ".bin", ".msgpack", ".gguf", ".json", ".model", ".txt")
FULL_HASH_LIMIT = 2 << 30


@dataclasses.dataclass
class SweepResult:
    """What :func:`run_sweep` returns: per model its directory, manifest and tables (pyarrow)."""

    out_dir: Optional[str]
    models: dict                  # name -> {"dir", "manifest", "layers", "prompts", ["positions"]}
    summary: list                 # cross-model summary rows (dicts)

    def table(self, name: Optional[str] = None, table: str = "layers"):
        if name is None:
            if len(self.models) != 1:
                raise JaxlensError(f"the sweep has {len(self.models)} models; name one of {', '.join(self.models)}")
            name = next(iter(self.models))
        return self.models[name].get(table)

    def to_pandas(self, name: Optional[str] = None, table: str = "layers"):
        t = self.table(name, table)
        return None if t is None else t.to_pandas()

    def summary_table(self) -> str:
        return format_summary(self.summary)


# --------------------------------------------------------------------------------------------------
# identities (what a resume must match)


def _hash_file(path: str, full: bool) -> str:
    h = hashlib.sha256()
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        if full or size <= (8 << 20):
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        else:
            h.update(f"partial:{size}:".encode())
            h.update(f.read(4 << 20))
            f.seek(size - (4 << 20))
            h.update(f.read(4 << 20))
    return h.hexdigest()


def model_identity(model) -> dict:
    """Source, name, architecture, the HF revision when the path is a hub snapshot, and a hash of the
    checkpoint files (full sha256 up to 2 GiB of files; beyond that sha256 of each file's size, first
    and last 4 MiB)."""
    path = model.path
    files = []
    if path and os.path.isfile(path):
        files = [path]
    elif path and os.path.isdir(path):
        files = sorted(os.path.join(path, f) for f in os.listdir(path)
                       if f.endswith(WEIGHT_EXT) and os.path.isfile(os.path.join(path, f)))
    total = sum(os.path.getsize(f) for f in files)
    full = total <= FULL_HASH_LIMIT
    h = hashlib.sha256()
    for f in files:
        h.update(os.path.basename(f).encode() + b"\0" + _hash_file(f, full).encode() + b"\n")
    rev = None
    if path and "/snapshots/" in path:
        rev = path.rstrip("/").split("/snapshots/")[-1].split("/")[0]
    spec = model.spec
    return {"source": str(model.source), "name": model.name, "arch": spec.arch, "n_layers": int(spec.n_layers),
            "d_model": int(spec.d_model), "vocab_size": int(spec.vocab_size), "revision": rev,
            "files_sha256": h.hexdigest(), "hash": "sha256" if full else "sha256 of size + first/last 4 MiB per file"}


def lens_identity(name: str, path: Optional[str]) -> dict:
    if path is None:
        return {"name": name}
    h = hashlib.sha256()
    p = os.path.expanduser(path)
    for f in sorted(os.listdir(p)):
        fp = os.path.join(p, f)
        if os.path.isfile(fp):
            h.update(f.encode() + b"\0" + _hash_file(fp, True).encode() + b"\n")
    return {"name": name, "path": os.path.abspath(p), "sha256": h.hexdigest()}


def thresholds_hash(th) -> str:
    from jaxlens.writers import to_jsonable

    import json

    return hashlib.sha256(json.dumps(to_jsonable(dataclasses.asdict(th)), sort_keys=True, default=str)
                          .encode()).hexdigest()


# --------------------------------------------------------------------------------------------------
# lenses


def parse_lenses(lenses) -> list:
    if lenses is None:
        return list(DEFAULT_LENSES)
    if isinstance(lenses, str):
        lenses = [x.strip() for x in lenses.split(",")]
    out = []
    for x in lenses:
        if not x:
            continue
        if x not in LENSES:
            raise JaxlensError(f"unknown lens {x!r} (choose from {', '.join(LENSES)})")
        if x not in out:
            out.append(x)
    if not out:
        raise JaxlensError("--lens names no lens")
    return out


def _per_model(value, n_models: int, what: str) -> list:
    if value is None or isinstance(value, (str, os.PathLike)) or not isinstance(value, (list, tuple)):
        return [value] * n_models
    if len(value) == 1:
        return list(value) * n_models
    if len(value) != n_models:
        raise JaxlensError(f"{what} is given {len(value)} times for {n_models} models "
                           "(give it once, or once per model)")
    return list(value)


def resolve_lenses(model, names: Sequence[str], tuned, prism, say) -> list:
    """[(name, lens object, identity)] in sweep order."""
    out = []
    for name in names:
        if name in BUILTIN:
            out.append((name, name, lens_identity(name, None)))
        elif name == "tuned" and tuned is not None and not isinstance(tuned, (str, os.PathLike)):
            out.append((name, tuned, {"name": name, "object": type(tuned).__name__,
                                      "sha256": _arrays_hash(tuned)}))        # a lens object (load_lens)
        elif name == "prism" and prism is not None and not isinstance(prism, (str, os.PathLike)):
            out.append((name, prism, {"name": name, "object": type(prism).__name__, "sha256": _arrays_hash(prism)}))
        elif name == "tuned":
            from jaxlens.lens.tuned import load_lens
            from jaxlens.probe import tuned as PT

            path = tuned
            if path in (None, "auto"):
                found = [p for p in PT.default_locations(model) if os.path.isdir(p)]
                if not found:
                    raise JaxlensError(f"lens tuned: no tuned lens for {model.name} (looked in "
                                       f"{', '.join(PT.default_locations(model))}); pass --tuned LENS_DIR")
                path = found[0]
            path = os.path.expanduser(str(path))
            if not os.path.isdir(path):
                raise JaxlensError(f"--tuned {path}: no such lens directory")
            out.append((name, load_lens(path, model=model), lens_identity(name, path)))
            say(f"tuned lens {path}")
        elif name == "prism":
            if prism is None:
                raise JaxlensError("lens prism needs --prism DIR (a Prism directory from jaxlens fit-prism)")
            try:
                from jaxlens.lens.prism import load_prism
            except ImportError:
                raise JaxlensError("--prism needs jaxlens.lens.prism (Prism support), which this installation lacks")
            path = os.path.expanduser(str(prism))
            if not os.path.isdir(path):
                raise JaxlensError(f"--prism {path}: no such Prism directory")
            out.append((name, load_prism(path, model=model), lens_identity(name, path)))
            say(f"prism {path}")
    return out


def _arrays_hash(lens) -> str:
    h = hashlib.sha256(type(lens).__name__.encode())
    if dataclasses.is_dataclass(lens):
        for f in dataclasses.fields(lens):
            v = getattr(lens, f.name)
            vals = v.values() if isinstance(v, dict) else [v]
            for a in vals:
                if hasattr(a, "shape") and hasattr(a, "dtype"):
                    arr = np.asarray(a)
                    h.update(f.name.encode() + str(arr.shape).encode() + str(arr.dtype).encode())
                    h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()


def _plans(model, resolved) -> list:
    from jaxlens.sweep.tables import LensPlan

    n = model.spec.n_layers
    plans = []
    for name, lens, _ in resolved:
        layers = np.arange(1, n + 1) if name == "tuned" else np.arange(n + 1)
        plans.append(LensPlan(name=name, lens=lens, layers=layers, tag=name))
    return plans


# --------------------------------------------------------------------------------------------------
# tokenising a window


def _tokenizer_copy(tok):
    try:
        return copy.deepcopy(tok)
    except Exception:  # noqa: BLE001 - then share it (the producer is the only encoder)
        return tok


def prepare_window(tok, rows, *, bos: bool, max_len: int, vocab: int, decode, th) -> tuple:
    """(jobs, status rows): the prompts of one window tokenised and aligned; rows that cannot run get a status."""
    from jaxlens.probe import gold as G
    from jaxlens.probe import metrics as M
    from jaxlens.sweep.engine import Job

    jobs, skipped = [], []
    k = th.gold.pieces_k
    for r in rows:
        if r.status not in ("ok", "bad_answer"):
            skipped.append((r, r.status, r.detail, None))
            continue
        ids = G.model_input_ids(tok, r.prompt, prepend_bos=bos)
        if not ids:
            skipped.append((r, "empty_tokens", "the prompt tokenises to nothing", 0))
            continue
        if len(ids) > max_len:
            skipped.append((r, "too_long", f"{len(ids)} tokens; the model's context is {max_len}", len(ids)))
            continue
        if max(ids) >= vocab:
            skipped.append((r, "token_out_of_vocab", f"token id {max(ids)} is outside the model's vocabulary ({vocab})",
                            len(ids)))
            continue
        ctx = G.ctx_ids(tok, r.prompt)
        gold = G.align_gold(tok, r.prompt, r.answer, pieces_k=k) if r.answer is not None else None
        ctl = G.align_gold(tok, r.prompt, r.control_answer, pieces_k=k) if r.control_answer is not None else None
        status, detail = r.status, r.detail
        if gold is not None and not gold.ok and status == "ok":
            status = "answer_unaligned"
            detail = f"the answer could not be aligned ({gold.reason}); answer columns are blank"
        elif ctl is not None and not ctl.ok and status == "ok":
            status, detail = "control_unaligned", f"the control answer could not be aligned ({ctl.reason})"
        jobs.append((Job(row=r, ids=list(ids), ctx_ids=list(ctx), gold=gold, control=ctl,
                         prompt_vocab=M.prompt_vocab(ctx, decode)), status, detail))
    return jobs, skipped


# --------------------------------------------------------------------------------------------------
# summaries across models


def summarize_prompts(name: str, prompts_table, lens_names: Sequence[str]) -> list:
    from jaxlens.probe.metrics import percentile

    if prompts_table is None:
        return []
    cols = prompts_table.to_pydict()
    out = []
    for lens in lens_names:
        idx = [i for i, ln in enumerate(cols["lens"]) if ln == lens]
        ok = [i for i in idx if cols["status"][i] in ("ok", "answer_unaligned", "control_unaligned", "bad_answer")]
        with_ans = [i for i in ok if cols["answer_ids"][i] is not None]
        frac = [cols["L_semantic_frac"][i] for i in with_ans if cols["L_semantic_frac"][i] is not None]
        reach = [i for i in with_ans if cols["first_rank_le_1"][i] is not None]
        kl = [cols["first_kl_below_1.0"][i] for i in ok if cols["first_kl_below_1.0"][i] is not None]
        out.append({"model": name, "lens": lens, "prompts": len(idx), "computed": len(ok), "with_answer": len(with_ans),
                    "L_semantic_frac_median": percentile(frac, 0.5), "L_semantic_frac_p25": percentile(frac, 0.25),
                    "L_semantic_frac_p75": percentile(frac, 0.75),
                    "share_rank1": (len(reach) / len(with_ans)) if with_ans else None,
                    "first_kl_below_1.0_median": percentile(kl, 0.5)})
    return out


def format_summary(rows: list) -> str:
    head = ["model", "lens", "prompts", "L_sem/n median [IQR]", "reach rank 1", "first KL<=1 median"]

    def f(x, d=3):
        return "-" if x is None else f"{x:.{d}f}"
    lines = []
    for r in rows:
        iqr = "-" if r["L_semantic_frac_median"] is None else \
            f"{f(r['L_semantic_frac_median'])} [{f(r['L_semantic_frac_p25'])}, {f(r['L_semantic_frac_p75'])}]"
        share = "-" if r["share_rank1"] is None else f"{100 * r['share_rank1']:.1f}% of {r['with_answer']}"
        lines.append([r["model"], r["lens"], f"{r['computed']}/{r['prompts']}", iqr, share,
                      f(r["first_kl_below_1.0_median"], 1)])
    widths = [max(len(x[i]) for x in [head] + lines) for i in range(len(head))]
    fmt = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths))  # noqa: E731
    return "\n".join([fmt(head), fmt(["-" * w for w in widths])] + [fmt(r) for r in lines])


# --------------------------------------------------------------------------------------------------
# the sweep of one model


class _Progress:
    def __init__(self, total: int, initial: int, enabled: bool, name: str):
        self.t0 = time.perf_counter()
        self.tokens = 0
        self.done = 0
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="prompt", desc=name, file=sys.stderr,
                            dynamic_ncols=True, smoothing=0.1)

    def update(self, prompts: int, tokens: int) -> None:
        self.done += prompts
        self.tokens += tokens
        if self.bar is not None:
            el = max(1e-9, time.perf_counter() - self.t0)
            self.bar.set_postfix_str(f"{self.tokens / el:,.0f} tok/s", refresh=False)
            self.bar.update(prompts)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def _sweep_model(model, prompt_set, root: str, *, plans, identity, resume, mesh, th, quirks, top_k, positions_all,
                 save_residuals, batch_tokens, max_batch, buckets, window, max_len, progress, say) -> dict:
    import jax

    from jaxlens import distributed as DI
    from jaxlens.probe import gold as G
    from jaxlens.sweep import engine as E
    from jaxlens.sweep import tables as TB
    from jaxlens.sweep.store import Store

    pi, pc = jax.process_index(), jax.process_count()
    store = Store(root, identity, resume=resume, process_index=pi, process_count=pc)
    # every process must plan the same windows (a resume may run with another process count or mesh: windows
    # do not depend on either); processes that read different manifests would otherwise wait on each other
    DI.agree(",".join(str(w) for w in sorted(store.done)), f"the windows of {root} already done (its manifest.json; "
             "is the output directory on storage every process shares?)")
    if store.resumed_windows:
        say(f"resuming: {store.resumed_windows} window(s) already done" +
            (f", {len(store.redo)} to redo (files missing or changed)" if store.redo else ""))
    spec = model.spec
    n, V = spec.n_layers, spec.vocab_size
    dp = 1
    if mesh is not None:
        dp = int(mesh.shape["data"]) * int(mesh.shape["fsdp"])
    lengths = E.bucket_lengths(max_len, buckets, batch_tokens)
    batch_of = {L: E.batch_size_for(L, batch_tokens, max_batch, dp) for L in lengths}
    k_dec = min(64, max(int(top_k), int(th.surface.topk_prompt_k)))
    engine = E.Engine(model, [p.lens for p in plans], top_k=k_dec, positions_all=positions_all, positions_k=top_k,
                      residuals=save_residuals, mesh=mesh)
    tok = model.tokenizer
    decode = G.token_decoder(tok)
    bos = G.tokenizer_prepends_bos(tok)
    ptok = _tokenizer_copy(tok)
    pdecode = G.token_decoder(ptok)
    names_map, extra_types = TB.carried_types(prompt_set, [f for f in TB.schemas(th, top_k, {}, positions_all,
                                                                                  save_residuals)["prompts"].names])
    schemas = TB.schemas(th, top_k, extra_types, positions_all, save_residuals)
    copy_cols = TB.copy_columns(th)
    rows = prompt_set.rows
    n_windows = -(-len(rows) // window)
    todo = [w for w in range(n_windows) if w not in store.done]
    done_prompts = sum(min(window, len(rows) - w * window) for w in store.done)
    bar = _Progress(len(rows), done_prompts, progress and pi == 0, model.name)
    stop = threading.Event()

    # ---- producer: tokenise and plan -----------------------------------------------------------
    pq_: queue.Queue = queue.Queue(maxsize=2)

    def produce():
        try:
            for w in todo:
                if stop.is_set():
                    return
                wrows = rows[w * window:(w + 1) * window]
                jobs, skipped = prepare_window(ptok, wrows, bos=bos, max_len=max_len, vocab=V, decode=pdecode, th=th)
                status = {j.row.index: (st, dt) for j, st, dt in jobs}
                batches = E.plan_window(w, [j for j, _, _ in jobs], lengths, batch_of)
                pput((w, skipped, status, batches))
            pput(None)
        except BaseException as e:  # noqa: BLE001 - handed to the main thread
            pput(e)

    def pput(item):
        while not stop.is_set():
            try:
                pq_.put(item, timeout=0.5)
                return
            except queue.Full:
                pass

    # ---- writer: rows and shards ---------------------------------------------------------------
    wq: queue.Queue = queue.Queue(maxsize=2)
    futures: dict = {}
    stats = {"batches": 0, "real_tokens": 0, "padded_tokens": 0, "prompts_computed": 0}

    state: dict = {"err": None}

    def write():
        cur = None
        try:
            while True:
                item = wq.get()
                if item is None:
                    return
                kind = item[0]
                if kind == "start":
                    _, w, skipped, status = item
                    cur = {"w": w, "status": status, "b": {t: TB.TableBuilder(s) for t, s in schemas.items()},
                           "res": [], "res_idx": []}
                    if pi == 0:
                        for r, st, dt, nt in skipped:
                            carried = {names_map[c]: TB._carried_value(r.extra.get(c), extra_types[names_map[c]])
                                       for c in prompt_set.extra_columns}
                            for lp in plans:
                                cur["b"]["prompts"].add(TB.prompt_row(r, lp.name, None, n_layers=n, th=th, status=st,
                                                                      detail=dt, carried=carried, n_tokens=nt))
                    bar.update(len(skipped), 0)
                elif kind == "batch":
                    _, batch, out = item
                    _, (olo, ohi) = engine.rows_of(batch.size)
                    host = engine.fetch(out, olo, ohi)
                    for i, job in enumerate(batch.jobs):
                        if not olo <= i < ohi:
                            continue
                        b = i - olo
                        st, dt = cur["status"][job.row.index]
                        res = TB.prompt_metrics(host, b, job, plans, n=n, V=V, decode=decode, th=th, quirks=quirks,
                                                top_k=top_k)
                        conf = TB.confirmed_for(res, th)
                        carried = {names_map[c]: TB._carried_value(job.row.extra.get(c), extra_types[names_map[c]])
                                   for c in prompt_set.extra_columns}
                        resid = None
                        if save_residuals:
                            resid = (store.part_name("residuals", cur["w"], "npy"), len(cur["res"]))
                            cur["res"].append(np.asarray(host["residuals"][b], np.float32))
                            cur["res_idx"].append(job.row.index)
                        token_strs = G.position_strings(tok, job.ids) if positions_all else None
                        for j, (lp, cols, summary) in enumerate(res):
                            for row in TB.layer_rows(cols, job, lp.name, decode, top_k, copy_cols):
                                cur["b"]["layers"].add(row)
                            cur["b"]["prompts"].add(TB.prompt_row(
                                job, lp.name, summary, n_layers=n, th=th, status=st, detail=dt, carried=carried,
                                confirmed=conf if lp.name == "norm" else None, n_tokens=len(job.ids),
                                residual=resid))
                            if positions_all:
                                for row in TB.position_rows(host, b, j, n, lp, job, token_strs, decode, top_k):
                                    cur["b"]["positions"].add(row)
                    for t in cur["b"].values():
                        t.flush()
                    real = sum(len(j.ids) for j in batch.jobs)
                    stats["batches"] += 1
                    stats["real_tokens"] += real
                    stats["padded_tokens"] += batch.size * batch.length
                    stats["prompts_computed"] += len(batch.jobs)
                    bar.update(len(batch.jobs), real)
                elif kind == "end":
                    _, w = item
                    entries = [store.write_table(t, w, b.table()) for t, b in cur["b"].items()]
                    if save_residuals:
                        d = (n + 1, spec.d_model)
                        arr = np.stack(cur["res"]) if cur["res"] else np.zeros((0,) + d, np.float32)
                        entries.append(store.write_array("residuals", w, arr))
                        entries.append(store.write_array("residuals", w, np.asarray(cur["res_idx"], np.int64),
                                                         suffix=".index"))
                    if pc > 1:
                        store.write_part(w, entries)
                    futures[w].set_result(entries)
                    cur = None
        except BaseException as e:  # noqa: BLE001 - handed to the main thread
            state["err"] = e
            stop.set()
            while wq.get() is not None:        # keep draining so the main thread never blocks on a full queue
                pass

    def check():
        if state["err"] is not None:
            raise state["err"]

    def put(item):
        while True:
            check()
            try:
                wq.put(item, timeout=0.5)
                return
            except queue.Full:
                pass

    def commit(w):
        while True:
            check()
            try:
                entries = futures[w].result(timeout=0.5)
                break
            except FutureTimeout:
                pass
        DI.barrier(f"jaxlens-sweep-{model.name}-w{w}")
        if pi == 0:
            all_entries = store.collect(w) if pc > 1 else entries
            store.commit(w, all_entries, extra={"compiles": engine.compiles})

    t0 = time.perf_counter()
    prod = threading.Thread(target=produce, name="sweep-tokenise", daemon=True)
    wr = threading.Thread(target=write, name="sweep-write", daemon=True)
    prod.start()
    wr.start()
    pending = None
    try:
        while True:
            while True:
                check()
                try:
                    item = pq_.get(timeout=0.5)
                    break
                except queue.Empty:
                    pass
            if item is None:
                break
            if isinstance(item, BaseException):
                raise item
            w, skipped, status, batches = item
            futures[w] = Future()
            put(("start", w, skipped, status))
            for i, batch in enumerate(batches):
                out = engine.run(batch)
                put(("batch", batch, out))
                if i == 0 and pending is not None:
                    commit(pending)
                    pending = None
            put(("end", w))
            if pending is not None:
                commit(pending)
            pending = w
        if pending is not None:
            commit(pending)
    except BaseException:
        stop.set()
        raise
    finally:
        try:
            wq.put(None, timeout=5)
        except queue.Full:
            pass
        wr.join(timeout=30)
        bar.close()
    wall = time.perf_counter() - t0
    stats.update(compiles=engine.compiles, buckets={str(L): batch_of[L] for L in lengths}, wall_s=round(wall, 3),
                 windows_resumed=store.resumed_windows,
                 prompts_per_s=(stats["prompts_computed"] / wall) if wall > 0 else None,
                 tokens_per_s=(stats["real_tokens"] / wall) if wall > 0 else None,
                 padding_efficiency=(stats["real_tokens"] / stats["padded_tokens"]) if stats["padded_tokens"] else None,
                 processes=pc, global_devices=jax.device_count(),
                 params_fully_addressable=all(getattr(x, "is_fully_addressable", True)
                                              for x in jax.tree_util.tree_leaves(model.params)))
    DI.barrier(f"jaxlens-sweep-{model.name}-done")
    store.stats.update(stats)
    store.write_manifest(status="complete")
    store.cleanup()
    return {"store": store, "stats": stats, "engine": engine}


# --------------------------------------------------------------------------------------------------
# the public entry point


def run_sweep(models, prompts, out: Optional[str] = None, *, lenses=None, tuned=None, prism=None, resume: bool = False,
              mesh=None, dtype: str = "float32", top_k: int = 5, positions: str = "last", save_residuals: bool = False,
              batch_tokens: Optional[int] = None, max_batch: Optional[int] = None, buckets=None,
              max_tokens: Optional[int] = None,
              window: int = 2048, fields: Optional[dict] = None, suite=None, reference_quirks: bool = False,
              coordinator: Optional[str] = None, num_processes: Optional[int] = None,
              process_id: Optional[int] = None, distributed_auto: bool = False, stable_kernels: bool = False,
              progress: bool = True, log=None, return_tables: bool = True) -> SweepResult:
    """Sweep ``prompts`` over every model in ``models`` (one source or a list) and every lens in ``lenses``.

    See docs/sweep.md. ``out``: the output directory (``OUT/<model name>/`` per model); None keeps the tables
    in memory only. ``lenses``: "norm,logit" (default) or a list from norm, logit, raw, tuned, prism;
    ``tuned`` / ``prism``: a lens directory (or one per model; ``tuned="auto"`` looks where the probe looks).
    ``mesh``: "data=N,fsdp=N,tensor=N" (or a dict / Mesh). ``coordinator`` + ``num_processes`` +
    ``process_id`` (or ``distributed_auto``): join a ``jax.distributed`` job first. ``stable_kernels``: XLA:CPU
    matrix kernels whose rounding does not depend on the batch shape (slower; before JAX starts). Returns a
    :class:`SweepResult` with the tables as pyarrow Tables (``.to_pandas()``).
    """
    from jaxlens import distributed as DI

    if stable_kernels:
        from jaxlens.sweep.engine import use_stable_kernels

        use_stable_kernels()
    DI.initialize(coordinator, num_processes, process_id, auto=distributed_auto)   # before any backend use
    import jax

    pi = jax.process_index()
    quiet_log = log if log is not None else ((lambda m: print(f"[jaxlens] {m}", file=sys.stderr, flush=True))
                                             if progress else (lambda m: None))

    def say(msg):
        if pi == 0:
            quiet_log(msg)

    from jaxlens.models.loader import DTYPES, load_model
    from jaxlens.probe.metrics import ReferenceQuirks
    from jaxlens.probe.suite import load_suite
    from jaxlens.sweep import inputs as I

    I._pyarrow()
    sources = [models] if (isinstance(models, (str, os.PathLike)) or hasattr(models, "spec")) else list(models)
    if not sources:
        raise JaxlensError("no --model given")
    names = parse_lenses(lenses)
    if tuned is not None and "tuned" not in names:
        names.append("tuned")
    if prism is not None and "prism" not in names:
        names.append("prism")
    if positions not in ("last", "all"):
        raise JaxlensError(f"--positions must be last or all; got {positions!r}")
    if not 1 <= int(top_k) <= 64:
        raise JaxlensError(f"--top-k must lie in 1..64; got {top_k}")
    if dtype not in DTYPES:
        raise JaxlensError(f"dtype {dtype!r} is not supported (use float32, bfloat16 or float16)")
    if int(window) < 1 or (max_batch is not None and int(max_batch) < 1):
        raise JaxlensError("--window and --max-batch must be positive")
    tuned_l = _per_model(tuned, len(sources), "--tuned")
    prism_l = _per_model(prism, len(sources), "--prism")
    prompt_set = I.read_prompts(prompts, fields=fields)                      # malformed input: fails here
    if suite is not None:
        th = load_suite(suite).thresholds
    elif prompt_set.thresholds is not None:
        th = prompt_set.thresholds
    else:
        th = load_suite("reference").thresholds
    quirks = ReferenceQuirks.reference() if reference_quirks else ReferenceQuirks()
    DI.agree(prompt_set.sha256, "the prompt set")
    tmp_out = None
    if out is None:
        tmp_out = out = tempfile.mkdtemp(prefix="jaxlens-sweep-")
    from jaxlens.sweep.store import check_writable, read_manifest, read_table

    check_writable(out)
    if mesh is not None and not hasattr(mesh, "shape"):
        mesh = DI.mesh_from_spec(mesh)
    if batch_tokens is None:
        batch_tokens = 3072 if jax.default_backend() == "cpu" else 49152
    say(f"{len(prompt_set)} prompts from {prompts} ({prompt_set.describe()['input_statuses']}); "
        f"lenses {','.join(names)}; "
        f"{jax.process_count()} process(es), {jax.device_count()} device(s)")
    results, summary, used = {}, [], {}
    try:
        for mi, src in enumerate(sources):
            if hasattr(src, "spec") and hasattr(src, "params"):          # an already loaded jaxlens Model
                model = src
                if mesh is not None and getattr(model, "mesh", None) is None:
                    raise JaxlensError("a loaded model given with a mesh must have been loaded with that mesh "
                                       "(load_model(..., mesh=...)); or pass its source instead")
            else:
                say(f"loading {src} ({dtype})" + (f" on mesh {dict(mesh.shape)}" if mesh is not None else ""))
                model = load_model(str(src), dtype=dtype, mesh=mesh)
            name = model.name
            if name in used:
                used[name] += 1
                name = f"{name}-{used[name]}"
            else:
                used[name] = 1
            resolved = resolve_lenses(model, names, tuned_l[mi], prism_l[mi], say)
            plans = _plans(model, resolved)
            max_len = int(model.spec.max_positions)
            if max_tokens is not None:
                max_len = min(max_len, int(max_tokens))
            identity = {
                "model": model_identity(model), "dtype": _dtype_name(model), "lenses": [x[2] for x in resolved],
                "prompts": {"source": str(prompts), "rows": len(prompt_set), "sha256": prompt_set.sha256},
                "options": {"top_k": int(top_k), "positions": positions, "save_residuals": bool(save_residuals),
                            "window": int(window), "max_len": max_len, "buckets": list(buckets) if buckets else None,
                            "batch_tokens": int(batch_tokens),
                            "max_batch": None if max_batch is None else int(max_batch),
                            "thresholds_sha256": thresholds_hash(th), "reference_quirks": bool(reference_quirks),
                            "stable_kernels": _stable_kernels_on()},
                "versions": _versions(), "mesh": None if mesh is None else {k: int(v) for k, v in mesh.shape.items()},
            }
            identity["options"] = {k: v for k, v in identity["options"].items()}
            root = os.path.join(out, name)
            say(f"{model!r} -> {root}")
            r = _sweep_model(model, prompt_set, root, plans=plans, identity=identity, resume=resume, mesh=mesh, th=th,
                             quirks=quirks, top_k=int(top_k), positions_all=positions == "all",
                             save_residuals=bool(save_residuals), batch_tokens=int(batch_tokens),
                             max_batch=max_batch, buckets=buckets, window=int(window), max_len=max_len,
                             progress=progress, say=say)
            st = r["stats"]
            say(f"{name}: {st['prompts_computed']} prompts in {st['wall_s']:.1f} s "
                f"({st['prompts_per_s'] or 0:.1f} prompts/s, {st['tokens_per_s'] or 0:,.0f} tokens/s), "
                f"{st['compiles']} compile(s), padding efficiency {100 * (st['padding_efficiency'] or 0):.0f}%")
            entry = {"dir": root, "manifest": read_manifest(root) if pi == 0 else None}
            if pi == 0:
                entry["prompts"] = read_table(root, "prompts")
                summary += summarize_prompts(name, entry["prompts"], [p.name for p in plans])
                if return_tables:
                    entry["layers"] = read_table(root, "layers")
                    if positions == "all":
                        entry["positions"] = read_table(root, "positions")
            results[name] = entry
            del model, r, resolved, plans
            gc.collect()
        if pi == 0:
            from jaxlens.sweep.store import write_json_atomic
            from pathlib import Path

            if tmp_out is None:
                write_json_atomic(Path(out) / "summary.json", {"models": list(results), "summary": summary})
            if progress:
                print(format_summary(summary), flush=True)
    finally:
        if tmp_out is not None:
            shutil.rmtree(tmp_out, ignore_errors=True)
    return SweepResult(out_dir=None if tmp_out is not None else out, models=results, summary=summary)


def _dtype_name(model) -> str:
    import jax.numpy as jnp

    return jnp.dtype(model.dtype).name


def _stable_kernels_on() -> bool:
    from jaxlens.sweep.engine import STABLE_KERNELS_FLAG

    return STABLE_KERNELS_FLAG in os.environ.get("XLA_FLAGS", "").split()


def _versions() -> dict:
    import platform

    import jax

    from jaxlens import __version__

    try:
        import pyarrow

        pav = pyarrow.__version__
    except ImportError:  # pragma: no cover
        pav = None
    try:
        import jaxlib

        jlv = jaxlib.__version__
    except Exception:  # noqa: BLE001
        jlv = None
    return {"jaxlens": __version__, "jax": jax.__version__, "jaxlib": jlv, "pyarrow": pav,
            "python": platform.python_version()}
