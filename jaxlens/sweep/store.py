"""The sweep's on-disk store: atomic Parquet shards, ``manifest.json``, resume.

Layout of ``OUT/<name>/``::

    manifest.json                      the sweep's identity, options, every committed shard (rows, sha256)
    layers/w00000-p0.parquet           per-layer rows of window 0 written by process 0
    prompts/w00000-p0.parquet          per-prompt rows
    positions/w00000-p0.parquet        (--positions all)
    residuals/w00000-p0.npy            (--save-residuals) float32 [rows, n+1, d], np.load(mmap_mode="r")
    residuals/w00000-p0.index.npy      int64 [rows]: the prompt_index of each residual row
    parts/w00000-p1.json               a process's account of its files for window 0 (read by process 0)

A window is a fixed run of consecutive prompts (``window`` prompts, numbered from the start of the prompt
set), so the plan is the same in every run. Every file is written to a temporary name, fsync'ed and
renamed; a window counts as done once process 0 has listed all its files in ``manifest.json`` (itself
replaced atomically). After ``kill -9`` at any moment, ``--resume`` verifies the listed files (sha256),
recomputes every window that is not listed (or whose files no longer verify) and deletes stray files, so
the finished directory equals an uninterrupted run's. Resuming with another prompt set, model, dtype,
lens or output option is refused with a sentence saying what changed.

Readers need nothing of jaxlens: ``pandas.read_parquet("OUT/demo/layers")``, ``polars.read_parquet(
"OUT/demo/layers/*.parquet")``, DuckDB ``SELECT * FROM 'OUT/demo/layers/*.parquet'``.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Optional

from jaxlens.errors import JaxlensError
from jaxlens.writers import _fsync_dir, dumps_json

FORMAT = "jaxlens-sweep"
VERSION = 1
TABLES = ("layers", "prompts", "positions")
MANIFEST = "manifest.json"


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_writable(out_dir: str) -> None:
    """Create ``out_dir`` and prove a file can be written there (one clear error otherwise)."""
    p = Path(os.path.expanduser(str(out_dir)))
    try:
        p.mkdir(parents=True, exist_ok=True)
        probe = p / f".write-test-{os.getpid()}"
        with open(probe, "wb") as f:
            f.write(b"ok")
        os.unlink(probe)
    except OSError as e:
        raise JaxlensError(f"cannot write to the output directory {out_dir} ({e.strerror or e.__class__.__name__})")


def _atomic_write(path: Path, fill) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            fill(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)


def write_json_atomic(path: Path, obj) -> None:
    text = dumps_json(obj).encode("utf-8")
    _atomic_write(path, lambda f: f.write(text))


def _describe_change(key: str, old, new) -> str:
    if key == "prompts":
        return (f"the prompt set changed ({old.get('rows')} rows, sha256 {str(old.get('sha256'))[:12]}... -> "
                f"{new.get('rows')} rows, sha256 {str(new.get('sha256'))[:12]}...)")
    if key == "model":
        diffs = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
        k = diffs[0] if diffs else "identity"
        return f"the model changed ({k}: {old.get(k)!r} -> {new.get(k)!r})"
    if key == "dtype":
        return f"the dtype changed ({old} -> {new})"
    if key == "lenses":
        on = [x.get("name") for x in old]
        nn = [x.get("name") for x in new]
        if on != nn:
            return f"the lenses changed ({','.join(on)} -> {','.join(nn)})"
        for a, b in zip(old, new):
            if a != b:
                return f"the {a.get('name')} lens changed (sha256 {str(a.get('sha256'))[:12]}... -> " \
                       f"{str(b.get('sha256'))[:12]}...)"
        return "the lenses changed"
    if key == "options":
        diffs = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
        k = diffs[0]
        return f"the option {k} changed ({old.get(k)!r} -> {new.get(k)!r})"
    return f"{key} changed"


class Store:
    """One model's sweep directory. ``identity`` = everything a resume must match."""

    def __init__(self, root: str, identity: dict, *, resume: bool, process_index: int = 0, process_count: int = 1):
        self.root = Path(os.path.expanduser(str(root)))
        self.identity = identity
        self.pi = int(process_index)
        self.pc = int(process_count)
        self.manifest_path = self.root / MANIFEST
        self.done: dict = {}                    # window -> list of shard entries
        self.resumed_windows = 0
        self.redo: list = []                    # windows listed but failing verification
        old = self._read_manifest()
        if old is not None and not resume:
            raise JaxlensError(f"{self.root} already holds a sweep (manifest.json); pass --resume to continue it, "
                               "or choose another --out")
        if old is None and resume and self._has_files():
            pass                                 # files without a manifest: nothing was committed; start over
        if old is not None:
            for key in ("prompts", "model", "dtype", "lenses", "options"):
                if old.get("identity", {}).get(key) != identity.get(key):
                    what = _describe_change(key, old["identity"].get(key), identity.get(key))
                    raise JaxlensError(f"cannot resume {self.root}: {what}; use a new --out for a different sweep")
            for w in old.get("windows_done", []):
                entries = [s for s in old.get("shards", []) if s["window"] == w]
                if self._verify(entries):
                    self.done[int(w)] = entries
                else:
                    self.redo.append(int(w))
            self.resumed_windows = len(self.done)
        self.created = (old or {}).get("created") or time.strftime("%Y-%m-%dT%H:%M:%S%z")
        self.stats: dict = dict((old or {}).get("stats") or {})

    # -- reading ----------------------------------------------------------------------------------
    def _read_manifest(self) -> Optional[dict]:
        if not self.manifest_path.exists():
            return None
        try:
            with open(self.manifest_path, encoding="utf-8") as f:
                m = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise JaxlensError(f"{self.manifest_path} is unreadable ({e.__class__.__name__}); remove the directory "
                               "to start over")
        if m.get("format") != FORMAT:
            raise JaxlensError(f"{self.manifest_path} is not a jaxlens sweep manifest")
        return m

    def _has_files(self) -> bool:
        return any((self.root / t).exists() for t in TABLES)

    def _verify(self, entries: list) -> bool:
        for s in entries:
            p = self.root / s["file"]
            if not p.exists() or p.stat().st_size != s.get("bytes", p.stat().st_size) or sha256_file(p) != s["sha256"]:
                return False
        return True

    # -- writing ----------------------------------------------------------------------------------
    def part_name(self, table: str, window: int, ext: str = "parquet") -> str:
        return f"{table}/w{window:05d}-p{self.pi}.{ext}"

    def write_table(self, table: str, window: int, arrow_table) -> dict:
        import pyarrow.parquet as pq

        rel = self.part_name(table, window)
        path = self.root / rel
        _atomic_write(path, lambda f: pq.write_table(arrow_table, f, compression="zstd"))
        return {"window": window, "process": self.pi, "table": table, "file": rel, "rows": arrow_table.num_rows,
                "bytes": path.stat().st_size, "sha256": sha256_file(path)}

    def write_array(self, table: str, window: int, array, suffix: str = "") -> dict:
        import numpy as np

        rel = f"{table}/w{window:05d}-p{self.pi}{suffix}.npy"
        path = self.root / rel
        _atomic_write(path, lambda f: np.save(f, array, allow_pickle=False))
        return {"window": window, "process": self.pi, "table": table + suffix, "file": rel,
                "rows": int(array.shape[0]), "bytes": path.stat().st_size, "sha256": sha256_file(path)}

    def write_part(self, window: int, entries: list) -> None:
        """This process's account of its window files (process 0 reads every process's)."""
        write_json_atomic(self.root / f"parts/w{window:05d}-p{self.pi}.json", {"window": window, "process": self.pi,
                                                                              "shards": entries})

    def collect(self, window: int) -> list:
        """Every process's entries for a window (process 0, after a barrier)."""
        out = []
        for p in range(self.pc):
            path = self.root / f"parts/w{window:05d}-p{p}.json"
            try:
                with open(path, encoding="utf-8") as f:
                    out.extend(json.load(f)["shards"])
            except (OSError, json.JSONDecodeError, KeyError) as e:
                raise JaxlensError(f"process {p}'s record of window {window} ({path}) is missing or unreadable "
                                   f"({e.__class__.__name__}); is {self.root} on storage every process shares?")
        return out

    def commit(self, window: int, entries: list, extra: Optional[dict] = None) -> None:
        """Record a finished window in the manifest (process 0 only)."""
        self.done[int(window)] = entries
        if extra:
            self.stats.update(extra)
        self.write_manifest(status="running")

    def manifest(self, status: str) -> dict:
        shards = [s for w in sorted(self.done) for s in sorted(self.done[w], key=lambda s: (s["table"], s["process"]))]
        totals: dict = {}
        for s in shards:
            totals[s["table"]] = totals.get(s["table"], 0) + int(s["rows"])
        return {"format": FORMAT, "version": VERSION, "status": status, "created": self.created,
                "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "identity": self.identity,
                "processes": self.pc, "windows_done": sorted(self.done), "rows": totals, "stats": self.stats,
                "shards": shards}

    def write_manifest(self, status: str) -> None:
        if self.pi == 0:
            write_json_atomic(self.manifest_path, self.manifest(status))

    def cleanup(self) -> None:
        """Delete files no committed window lists (stray parts of interrupted runs, temporaries)."""
        if self.pi != 0:
            return
        keep = {s["file"] for w in self.done.values() for s in w}
        for t in TABLES + ("residuals", "parts"):
            d = self.root / t
            if not d.is_dir():
                continue
            for f in d.iterdir():
                rel = f"{t}/{f.name}"
                if t == "parts" or rel not in keep:
                    try:
                        f.unlink()
                    except OSError:
                        pass
            try:
                d.rmdir()                        # only when empty
            except OSError:
                pass


def read_manifest(model_dir: str) -> dict:
    p = Path(os.path.expanduser(str(model_dir))) / MANIFEST
    if not p.exists():
        raise JaxlensError(f"{model_dir} holds no sweep (no manifest.json)")
    with open(p, encoding="utf-8") as f:
        return json.load(f)


def read_table(model_dir: str, table: str = "layers", *, sort: bool = True):
    """One table of a sweep as a pyarrow Table: its committed shards, rows in prompt / lens / layer order."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    m = read_manifest(model_dir)
    root = Path(os.path.expanduser(str(model_dir)))
    files = [s["file"] for s in m["shards"] if s["table"] == table]
    if not files:
        return None
    t = pa.concat_tables([pq.read_table(root / f) for f in files])
    if sort and t.num_rows:
        lens_order = [x["name"] for x in m["identity"]["lenses"]]
        rank = {n: i for i, n in enumerate(lens_order)}
        import numpy as np

        li = np.asarray([rank.get(x, len(rank)) for x in t.column("lens").to_pylist()], np.int64)
        keys = [np.asarray(t.column("prompt_index").to_numpy(), np.int64), li]
        for c in ("layer", "pos"):
            if c in t.column_names and table != "prompts":
                keys.append(np.asarray(t.column(c).to_numpy(zero_copy_only=False), np.int64))
        order = np.lexsort(tuple(reversed(keys)))
        t = t.take(pa.array(order))
    return t
