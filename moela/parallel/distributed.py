"""Multi-process start-up: ``initialize()`` calls ``jax.distributed.initialize`` when the
environment says this process is one of several, and must run before any other JAX call.

The environment says so when

* ``MOELA_COORDINATOR`` (host:port of process 0), ``MOELA_NUM_PROCESSES`` and
  ``MOELA_PROCESS_ID`` are set: any launcher, e.g. two local CPU processes;
* ``MOELA_DISTRIBUTED=1``, or JAX's own ``JAX_COORDINATOR_ADDRESS``, or a multi-process
  cluster JAX detects by itself (SLURM or Open MPI with more than one task, a multi-host
  Cloud TPU slice): then ``jax.distributed.initialize()`` runs with no arguments and JAX
  finds the coordinator, process count and id (on Cloud TPU from the metadata server).

A single process does nothing. After it, ``jax.devices()`` lists every process's devices
and ``jax.process_index()`` says which one this is.
"""

from __future__ import annotations

import os

COORDINATOR, NUM_PROCESSES, PROCESS_ID = "MOELA_COORDINATOR", "MOELA_NUM_PROCESSES", "MOELA_PROCESS_ID"


class DistributedConfigError(ValueError):
    pass


def _int(environ, name: str) -> int:
    value = environ.get(name)
    try:
        return int(value)
    except (TypeError, ValueError):
        raise DistributedConfigError(
            f"{COORDINATOR} is set, so {name} must be an integer too (got {value!r}); "
            f"set {NUM_PROCESSES} and {PROCESS_ID} for every process"
        ) from None


def distributed_args(environ=None) -> dict | None:
    """Keyword arguments for ``jax.distributed.initialize``, or None for a single process."""
    environ = os.environ if environ is None else environ
    if environ.get(COORDINATOR):
        n, i = _int(environ, NUM_PROCESSES), _int(environ, PROCESS_ID)
        if n < 1 or not 0 <= i < n:
            raise DistributedConfigError(f"{PROCESS_ID}={i} must be in [0, {NUM_PROCESSES}={n})")
        return {"coordinator_address": environ[COORDINATOR], "num_processes": n, "process_id": i}
    many = lambda name: int(environ.get(name, "1") or "1") > 1  # noqa: E731
    tpu_hosts = [h for h in environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]
    if (
        environ.get("MOELA_DISTRIBUTED") == "1"
        or environ.get("JAX_COORDINATOR_ADDRESS")
        or many("SLURM_NTASKS")
        or many("OMPI_COMM_WORLD_SIZE")
        or len(tpu_hosts) > 1
    ):
        return {}
    return None


def initialize(environ=None) -> bool:
    """Join the other processes if the environment says there are any; True if it did."""
    args = distributed_args(environ)
    if args is None:
        return False
    import jax

    jax.distributed.initialize(**args)
    return True
