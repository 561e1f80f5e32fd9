#!/usr/bin/env python3
"""Start this host's process of a multi-host GPU training job: `qsparse train --distributed ...`.

Run it once on every host (one process per host drives all of that host's GPUs). It finds the cluster from, in order:
  --coordinator HOST:PORT --num-processes N --process-id I   (explicit flags), or
  a SLURM allocation: coordinator = first node of SLURM_JOB_NODELIST, N = SLURM_NTASKS, I = SLURM_PROCID;
exports JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID, and runs the training command. Everything
after the options goes to `qsparse train`.

    # SLURM, 4 nodes:
    srun --nodes=4 --ntasks-per-node=1 python scripts/launch_gpu_hosts.py --config configs/paper_1p3b.py
    # by hand, on host i of 4:
    python scripts/launch_gpu_hosts.py --coordinator host0:12355 --num-processes 4 --process-id i \\
        --config configs/paper_1p3b.py mesh.tensor=8

--dry-run prints the environment and the command instead of running them.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys


def first_slurm_host(nodelist: str) -> str:
  """The first host of a SLURM node list: "gpu[03-05,09],cpu1" -> "gpu03", "a100-7" -> "a100-7"."""
  match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
  if not match:
    raise ValueError(f"cannot read SLURM_JOB_NODELIST={nodelist!r}")
  prefix, ranges = match.groups()
  return prefix + (ranges.split(",")[0].split("-")[0] if ranges else "")


def cluster(args, environ) -> dict[str, str]:
  if args.coordinator or args.num_processes is not None or args.process_id is not None:
    if not (args.coordinator and args.num_processes is not None and args.process_id is not None):
      raise ValueError("give --coordinator, --num-processes and --process-id together")
    address, count, index = args.coordinator, args.num_processes, args.process_id
  elif environ.get("SLURM_JOB_NODELIST") and environ.get("SLURM_NTASKS") and environ.get("SLURM_PROCID"):
    address = f"{first_slurm_host(environ['SLURM_JOB_NODELIST'])}:{args.port}"
    count, index = int(environ["SLURM_NTASKS"]), int(environ["SLURM_PROCID"])
  else:
    raise ValueError("no cluster found: run inside a SLURM allocation (srun) or give --coordinator HOST:PORT "
                     "--num-processes N --process-id I")
  return {"JAX_COORDINATOR_ADDRESS": address, "JAX_NUM_PROCESSES": str(count), "JAX_PROCESS_ID": str(index)}


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--coordinator", help="HOST:PORT of process 0")
  parser.add_argument("--num-processes", type=int)
  parser.add_argument("--process-id", type=int)
  parser.add_argument("--port", type=int, default=12355, help="coordinator port under SLURM (default 12355)")
  parser.add_argument("--dry-run", action="store_true", help="print what would run, run nothing")
  args, train_args = parser.parse_known_args(argv)
  try:
    env = cluster(args, os.environ)
  except ValueError as err:
    print(f"launch_gpu_hosts: error: {err}", file=sys.stderr)
    return 2
  command = [sys.executable, "-m", "qsparse_jax.cli", "train", "--distributed", *train_args]
  if args.dry_run:
    print(" ".join(f"{k}={v}" for k, v in env.items()), shlex.join(command))
    return 0
  os.execve(sys.executable, command, {**os.environ, **env})


if __name__ == "__main__":
  sys.exit(main())
