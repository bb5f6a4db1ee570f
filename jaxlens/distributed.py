"""JAX's multi-controller runtime for jaxlens jobs: bootstrap, mesh, and process-local batches.

Shared by every job that runs SPMD over several hosts (``jaxlens sweep``; tuned-lens training at scale).
Top level because it belongs to no single stage: it knows meshes and processes, nothing about lenses.

* :func:`initialize` — ``jax.distributed.initialize`` with explicit ``coordinator`` / ``num_processes`` /
  ``process_id``, or the platform's auto-detection (Cloud TPU, SLURM, Open MPI) with ``auto=True``; CPU
  collectives go through gloo (so two processes on one CPU machine, each with fake devices, form one mesh).
  A single process (no arguments) is a no-op. Must run before anything touches a JAX backend.
* :func:`parse_mesh` / :func:`mesh_from_spec` — ``"data=2,fsdp=1,tensor=4"`` (``-1`` = the remaining
  devices) -> a (data, fsdp, tensor) :class:`jax.sharding.Mesh` over all global devices
  (:func:`jaxlens.models.sharding.make_mesh`, Auto axis types).
* :func:`batch_sharding`, :func:`local_rows`, :func:`global_batch`, :func:`host_rows` — the batch axis
  over (data, fsdp): which rows of a global batch this process feeds, building the global array from
  them (``jax.make_array_from_process_local_data``), and reading this process's rows of a result back.
  :func:`owned_rows` de-duplicates rows held by several processes (a batch replicated across hosts), so
  every row is written by exactly one process.
* :func:`barrier`, :func:`allgather_bytes`, :func:`agree` — synchronisation and a check that every process
  sees the same inputs (a sentence naming what differs, on every process, instead of a hang).

Device order: ``jax.devices()`` lists process 0's devices first, so in a mesh built here the ``data``
axis (outermost) splits across hosts first — the layout maxtext recommends (data parallelism over the
slow inter-host links, ``fsdp`` / ``tensor`` inside a host); ``data=1,fsdp=2,...`` on two hosts shards
the parameters across hosts instead.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Optional

import numpy as np

from jaxlens.errors import JaxlensError

__all__ = ["DistInfo", "initialize", "info", "parse_mesh", "mesh_from_spec", "batch_sharding", "local_rows",
           "owned_rows", "global_batch", "host_rows", "barrier", "allgather_bytes", "agree", "add_cli_flags",
           "init_from_args"]


@dataclasses.dataclass(frozen=True)
class DistInfo:
    process_index: int
    process_count: int
    local_devices: int
    global_devices: int
    coordinator: Optional[str] = None

    @property
    def is_coordinator(self) -> bool:
        return self.process_index == 0

    def describe(self) -> dict:
        return dataclasses.asdict(self)


_STATE: dict = {"initialized": False, "coordinator": None}


def initialize(coordinator: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None, *, auto: bool = False, cpu_collectives: str = "gloo",
               timeout_s: int = 300) -> DistInfo:
    """Join (or start) a multi-process JAX job; returns this process's :class:`DistInfo`.

    ``coordinator`` is ``HOST:PORT`` of process 0 (every process passes the same); ``num_processes`` /
    ``process_id`` are required with it unless the platform detects them. ``auto=True`` with no arguments
    lets JAX auto-detect the cluster (TPU pod slices, SLURM, Open MPI, Kubernetes); where JAX's detectors
    find none, one JaxlensError says what they looked for (instead of JAX's "coordinator_address should be
    defined"). With neither, the process runs alone.
    Calling it again with the same arguments is a no-op.
    """
    import jax

    explicit = coordinator is not None or (num_processes not in (None, 1)) or process_id not in (None, 0)
    if _STATE["initialized"] or not (explicit or auto):
        return info()
    if coordinator is not None and (num_processes is None) != (process_id is None):
        raise JaxlensError("pass both --num-processes and --process-id with --coordinator (or neither, "
                           "to let the platform detect them)")
    if num_processes is not None and process_id is not None and not 0 <= int(process_id) < int(num_processes):
        raise JaxlensError(f"--process-id {process_id} must lie in 0..{int(num_processes) - 1}")
    if explicit and coordinator is None:
        raise JaxlensError("--num-processes / --process-id need --coordinator HOST:PORT (process 0's address)")
    slurm_vars = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")

    def detect_cluster() -> tuple:
        """(the cluster environments JAX's auto-detection finds here, what it looks for): JAX's own detectors
        (jax._src.clusters, the ones jax.distributed.initialize tries; mpi4py is opt-in there and skipped
        here too), or, if that private module moved, the SLURM / Open MPI variables checked directly."""
        looked = ["a Cloud TPU VM (GCE metadata agent-worker-number, or GKE's TPU_WORKER_HOSTNAMES)",
                  "SLURM (all of " + ", ".join(slurm_vars) + ")", "Open MPI (OMPI_MCA_orte_hnp_uri)",
                  "Kubernetes (KUBERNETES_SERVICE_HOST and the kubernetes package)"]
        try:
            from jax._src import clusters as JC

            found = []
            for env in JC.ClusterEnv._cluster_types:
                if getattr(env, "opt_in_only_method", False):
                    continue
                try:
                    if env.is_env_present():
                        found.append(env.__name__)
                except Exception:  # noqa: BLE001 - a detector that fails detects nothing (as in JAX)
                    pass
            return found, looked
        except Exception:  # noqa: BLE001 - another JAX layout: the environment variables themselves
            found = [name for name, ok in (("SlurmCluster", all(v in os.environ for v in slurm_vars)),
                                           ("OmpiCluster", "OMPI_MCA_orte_hnp_uri" in os.environ)) if ok]
            return found, looked

    coord_known = coordinator is not None or bool(os.environ.get("JAX_COORDINATOR_ADDRESS"))
    if not (coord_known and num_processes is not None and process_id is not None):
        found, looked = detect_cluster()     # what JAX would detect; without a cluster it could only fail
        if not found:
            partial = [v for v in slurm_vars if v in os.environ]
            hint = ""
            if partial and len(partial) < len(slurm_vars):
                hint = (f" ({', '.join(partial)} set but not {', '.join(v for v in slurm_vars if v not in partial)}: "
                        "inside a SLURM allocation, start every process with srun)")
            looks = f"JAX's auto-detection looks for {', '.join(looked[:-1])} or {looked[-1]} and found none{hint}"
            if auto:
                raise JaxlensError(f"--distributed auto found no cluster to join: {looks}; pass --coordinator "
                                   "HOST:PORT --num-processes N --process-id I on every process instead, or leave "
                                   "out --distributed auto to run a single process")
            raise JaxlensError(f"--coordinator without --num-processes / --process-id needs a cluster that provides "
                               f"them: {looks}; pass --num-processes N --process-id I as well")
    # gloo: CPU collectives between processes (no-op for GPU / TPU computations); set before the backend starts
    try:
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    except Exception:  # noqa: BLE001 - older / newer JAX without the option: the platform default is used
        pass
    kw = {}
    if coordinator is not None:
        kw["coordinator_address"] = coordinator
    if num_processes is not None:
        kw["num_processes"] = int(num_processes)
    if process_id is not None:
        kw["process_id"] = int(process_id)
    try:
        jax.distributed.initialize(initialization_timeout=int(timeout_s), **kw)
    except Exception as e:  # noqa: BLE001 - RuntimeError / ValueError / XlaRuntimeError
        msg = str(e).splitlines()[0] if str(e) else e.__class__.__name__
        where = f"coordinator {coordinator}" if coordinator else "the platform's auto-detected cluster"
        raise JaxlensError(f"jax.distributed could not start with {where}: {msg}")
    _STATE.update(initialized=True, coordinator=coordinator)
    return info()


def info() -> DistInfo:
    import jax

    return DistInfo(process_index=jax.process_index(), process_count=jax.process_count(),
                    local_devices=jax.local_device_count(), global_devices=jax.device_count(),
                    coordinator=_STATE["coordinator"])


# --------------------------------------------------------------------------------------------------
# meshes


_AXES = ("data", "fsdp", "tensor")


def parse_mesh(text: Optional[str]) -> Optional[dict]:
    """``"data=2,fsdp=1,tensor=4"`` -> {"data": 2, "fsdp": 1, "tensor": 4}; missing axes are 1, one axis may
    be -1 (all remaining devices). None / "" -> None (no mesh)."""
    if text is None or not str(text).strip():
        return None
    out = {a: 1 for a in _AXES}
    seen = set()
    for part in str(text).split(","):
        name, eq, val = part.strip().partition("=")
        name = name.strip()
        if not eq or name not in _AXES:
            raise JaxlensError(f"--mesh {text!r}: expected data=N,fsdp=N,tensor=N (got {part.strip()!r})")
        if name in seen:
            raise JaxlensError(f"--mesh {text!r}: axis {name} given twice")
        seen.add(name)
        try:
            v = int(val)
        except ValueError:
            raise JaxlensError(f"--mesh {text!r}: {name}={val!r} is not an integer")
        if v == 0 or v < -1:
            raise JaxlensError(f"--mesh {text!r}: {name} must be a positive size or -1")
        out[name] = v
    if sum(1 for v in out.values() if v == -1) > 1:
        raise JaxlensError(f"--mesh {text!r}: at most one axis may be -1")
    return out


def mesh_from_spec(spec, devices=None):
    """A (data, fsdp, tensor) mesh from :func:`parse_mesh`'s dict (or its text) over all global devices."""
    import jax

    from jaxlens.models.sharding import make_mesh

    if isinstance(spec, str) or spec is None:
        spec = parse_mesh(spec)
    if spec is None:
        return None
    devices = list(devices if devices is not None else jax.devices())
    sizes = dict(spec)
    if -1 in sizes.values():
        known = int(np.prod([v for v in sizes.values() if v != -1]))
        if len(devices) % known:
            raise JaxlensError(f"--mesh: {len(devices)} devices do not divide into {spec}")
        sizes = {k: (len(devices) // known if v == -1 else v) for k, v in sizes.items()}
    n = sizes["data"] * sizes["fsdp"] * sizes["tensor"]
    if n != len(devices):
        raise JaxlensError(f"--mesh data={sizes['data']},fsdp={sizes['fsdp']},tensor={sizes['tensor']} covers {n} "
                           f"devices but the job has {len(devices)} ({jax.process_count()} process(es)); the mesh "
                           "must use every device")
    return make_mesh(sizes["data"], sizes["fsdp"], sizes["tensor"], devices=devices)


# --------------------------------------------------------------------------------------------------
# process-local batches


def batch_sharding(mesh, global_batch_size: int, ndim: int):
    """NamedSharding of a [B, ...] array with its batch axis over (data, fsdp) (replicated if B does not divide)."""
    from jaxlens.models.sharding import sharding_for

    return sharding_for((int(global_batch_size),) + (1,) * (ndim - 1), ("batch",) + (None,) * (ndim - 1), mesh)


def _rows_by_process(sharding, B: int) -> dict:
    """process index -> sorted set of the batch rows its devices hold."""
    out: dict = {}
    for dev, idx in sharding.devices_indices_map((B,)).items():
        sl = idx[0]
        rows = range(*sl.indices(B))
        out.setdefault(dev.process_index, set()).update(rows)
    return {p: sorted(r) for p, r in out.items()}


def local_rows(sharding, B: int, process_index: Optional[int] = None) -> tuple:
    """(lo, hi): the contiguous rows of a global batch of B that this process's devices hold (it feeds them)."""
    import jax

    p = jax.process_index() if process_index is None else process_index
    rows = _rows_by_process(sharding, B).get(p, [])
    if not rows:
        return 0, 0
    lo, hi = rows[0], rows[-1] + 1
    if hi - lo != len(rows):
        raise JaxlensError("this mesh gives a process a non-contiguous part of the batch; put the data axis "
                           "outermost (the default device order does)")
    return lo, hi


def owned_rows(sharding, B: int, process_index: Optional[int] = None) -> tuple:
    """(lo, hi) of the rows this process writes: those it holds that no lower-numbered process holds."""
    import jax

    p = jax.process_index() if process_index is None else process_index
    by = _rows_by_process(sharding, B)
    lower = set()
    for q, rows in by.items():
        if q < p:
            lower.update(rows)
    mine = [r for r in by.get(p, []) if r not in lower]
    if not mine:
        return 0, 0
    return mine[0], mine[-1] + 1


def global_batch(local: np.ndarray, sharding, global_shape: tuple):
    """The global array whose rows local_rows(...) are ``local`` on this process (single process: device_put)."""
    import jax

    if jax.process_count() == 1:
        return jax.device_put(np.asarray(local), sharding)
    return jax.make_array_from_process_local_data(sharding, np.asarray(local), tuple(global_shape))


def host_rows(x, lo: int, hi: int) -> np.ndarray:
    """Rows lo..hi-1 (along axis 0) of a global array, read from this process's addressable shards."""
    import jax

    if getattr(x, "is_fully_addressable", True) or jax.process_count() == 1:
        return np.asarray(x)[lo:hi]
    B = x.shape[0]
    out = None
    filled = np.zeros(hi - lo, bool)
    for sh in x.addressable_shards:
        sl = sh.index[0] if sh.index else slice(None)
        a, b, _ = sl.indices(B)
        s, e = max(a, lo), min(b, hi)
        if s >= e or filled[s - lo:e - lo].all():
            continue
        data = np.asarray(sh.data)
        if out is None:
            out = np.empty((hi - lo,) + data.shape[1:], data.dtype)
        out[s - lo:e - lo] = data[s - a:e - a]
        filled[s - lo:e - lo] = True
    if out is None or not filled.all():
        raise JaxlensError("this process does not hold the rows it was asked to read back (internal error)")
    return out


# --------------------------------------------------------------------------------------------------
# synchronisation


def barrier(name: str) -> None:
    """Every process waits here until all have arrived (no-op for one process)."""
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def allgather_bytes(data: bytes, size: int = 32) -> list:
    """Every process's ``data`` (at most ``size`` bytes), in process order."""
    import jax

    if jax.process_count() == 1:
        return [bytes(data)]
    from jax.experimental import multihost_utils

    buf = np.zeros(size + 1, np.uint8)
    b = bytes(data)[:size]
    buf[0] = len(b)
    buf[1:1 + len(b)] = np.frombuffer(b, np.uint8)
    got = np.asarray(multihost_utils.process_allgather(buf))
    return [bytes(row[1:1 + int(row[0])]) for row in got.reshape(-1, size + 1)]


def agree(value: str, what: str) -> None:
    """Raise on every process (never hang on some) unless all processes pass the same ``value``."""
    digest = hashlib.sha256(str(value).encode("utf-8")).digest()
    got = allgather_bytes(digest)
    bad = [i for i, d in enumerate(got) if d != got[0]]
    if bad:
        raise JaxlensError(f"the processes disagree about {what} (process {bad[0]} differs from process 0); "
                           "every process must see the same inputs")


# --------------------------------------------------------------------------------------------------
# the command-line flags every multi-host job shares


def add_cli_flags(parser, mesh_help: str | None = None) -> None:
    """``--mesh``, ``--coordinator``, ``--num-processes``, ``--process-id`` and ``--distributed`` on ``parser``
    (the same flags for ``sweep``, ``train-lens``, ``eval-lens`` and ``fit-prism``)."""
    parser.add_argument("--mesh", default=None, metavar="data=N,fsdp=N,tensor=N",
                        help=mesh_help or "shard the batch over data (x fsdp) and the parameters over fsdp / tensor; "
                                          "-1 = the remaining devices")
    parser.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                        help="jax.distributed: process 0's address (with --num-processes and --process-id)")
    parser.add_argument("--num-processes", type=int, default=None)
    parser.add_argument("--process-id", type=int, default=None)
    parser.add_argument("--distributed", choices=["off", "auto"], default="off",
                        help="auto: jax.distributed with the platform's detection (TPU pods, SLURM, Open MPI)")


def init_from_args(args) -> DistInfo:
    """:func:`initialize` from the flags of :func:`add_cli_flags` (before anything touches a JAX backend)."""
    return initialize(getattr(args, "coordinator", None), getattr(args, "num_processes", None),
                      getattr(args, "process_id", None), auto=getattr(args, "distributed", "off") == "auto")


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no", "off")
