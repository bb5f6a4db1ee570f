"""Launching a jax.distributed job in tests: N processes on 127.0.0.1, each with its own fake CPU devices (gloo).

``launch(argv, n=2)`` starts ``python *argv --process-id I`` (or, with ``process_arg=False``, the argv of
``argv_for(i)``) for I = 0..n-1 with the environment every such test needs; ``finish(procs)`` waits, kills
stragglers and asserts each exited 0, returning their (stdout, stderr). ``free_port()`` is a port for the
coordinator.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# a child must not believe it runs inside a cluster (jax.distributed's auto-detection reads these)
CLUSTER_VARS = ("SLURM_", "OMPI_", "PMI_", "KUBERNETES_", "TPU_WORKER", "MEGASCALE_", "JAX_COORDINATOR")


def env(devices: int = 4, **extra) -> dict:
    """This process's environment for a child with ``devices`` fake CPU devices, offline, no compile cache,
    no cluster variables (``extra`` may set some)."""
    out = {k: v for k, v in os.environ.items() if not k.startswith(CLUSTER_VARS)}
    out.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAXLENS_COMPILE_CACHE="off",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    out.update({k: str(v) for k, v in extra.items()})
    return out


def launch(argv_for, n: int = 2, devices: int = 4, **env_extra) -> list:
    """Start n children: ``argv_for(i)`` (a callable) or a list to which ``--process-id i`` is appended."""
    make = argv_for if callable(argv_for) else (lambda i: list(argv_for) + ["--process-id", str(i)])
    e = env(devices, **env_extra)
    return [subprocess.Popen([sys.executable, *make(i)], env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True) for i in range(n)]


def finish(procs, timeout: float = 300) -> list:
    """Wait for every child (killing any left after ``timeout``); assert each exited 0; their (out, err)."""
    try:
        res = [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (_, err) in zip(procs, res):
        assert p.returncode == 0, err[-4000:]
    return res
