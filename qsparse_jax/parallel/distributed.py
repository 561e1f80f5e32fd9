"""Joining a multi-process JAX job: TPU pods, several GPU hosts (SLURM or explicit), or processes on one machine.

Every process runs the same command; `initialize` connects it to the others before any device is touched. The
cluster comes from, in order:
  1. JAX_COORDINATOR_ADDRESS (host:port of process 0), JAX_NUM_PROCESSES and JAX_PROCESS_ID in the environment
     (what scripts/launch_gpu_hosts.sh exports);
  2. JAX's own detection: a Cloud TPU pod slice, a SLURM allocation, Open MPI, Kubernetes.
CPU processes exchange collectives through gloo.
"""

from __future__ import annotations

import os
from typing import Mapping

import jax

ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID = "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"


def cluster_from_env(environ: Mapping[str, str] = os.environ) -> dict | None:
  """{coordinator_address, num_processes, process_id} when the environment names them all, None when it names none
  (leave it to JAX's detection); a partial or malformed setting raises ValueError naming what is wrong."""
  names = (ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID)
  given = {name: environ[name] for name in names if environ.get(name)}
  if not given:
    return None
  if len(given) < len(names):
    missing = ", ".join(name for name in names if name not in given)
    raise ValueError(f"a multi-process run needs {', '.join(names)} together; {missing} is not set")
  try:
    num_processes, process_id = int(given[ENV_NUM_PROCESSES]), int(given[ENV_PROCESS_ID])
  except ValueError:
    raise ValueError(f"{ENV_NUM_PROCESSES} and {ENV_PROCESS_ID} must be integers, got "
                     f"{given[ENV_NUM_PROCESSES]!r} and {given[ENV_PROCESS_ID]!r}") from None
  if not 0 <= process_id < num_processes:
    raise ValueError(f"{ENV_PROCESS_ID}={process_id} must be in [0, {ENV_NUM_PROCESSES}={num_processes})")
  host, sep, port = given[ENV_COORDINATOR].rpartition(":")
  if not (host and sep and port.isdigit()):
    raise ValueError(f"{ENV_COORDINATOR} must be host:port, got {given[ENV_COORDINATOR]!r}")
  return {"coordinator_address": given[ENV_COORDINATOR], "num_processes": num_processes, "process_id": process_id}


def initialize(environ: Mapping[str, str] = os.environ) -> None:
  """Connect this process to the job (no-op when already connected). Call before any other JAX use."""
  if jax.distributed.is_initialized():
    return
  jax.config.update("jax_cpu_collectives_implementation", "gloo")  # only CPU devices use it
  cluster = cluster_from_env(environ)
  jax.distributed.initialize(**(cluster or {}))
