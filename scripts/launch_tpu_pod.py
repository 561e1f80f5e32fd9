#!/usr/bin/env python3
"""Run `qsparse train --distributed ...` on every worker of a Cloud TPU pod slice at once.

Every worker runs the same command; jax.distributed finds the pod from the TPU metadata, so no addresses are
needed. The project must already be installed on the workers in --remote-dir (with a .venv there), e.g. by
`gcloud compute tpus tpu-vm ssh NAME --worker=all --command "git clone ... && cd qsparse-jax && python3 -m venv .venv
&& .venv/bin/pip install -e ."`. Everything after the options goes to `qsparse train`.

    python scripts/launch_tpu_pod.py --tpu my-v5p-256 --zone us-east5-a --config configs/paper_7b.py \\
        train.out_dir=/mnt/shared/runs/7b   # a folder every worker sees (NFS, a gcsfuse mount)

--dry-run prints the gcloud command instead of running it.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys


def pod_command(args, train_args: list[str]) -> list[str]:
  remote = (f"cd {shlex.quote(args.remote_dir)} && . .venv/bin/activate && "
            + shlex.join(["qsparse", "train", "--distributed", *train_args]))
  command = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", args.tpu, f"--zone={args.zone}", "--worker=all",
             f"--command={remote}"]
  if args.project:
    command.insert(6, f"--project={args.project}")
  return command


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--tpu", required=True, help="TPU VM name")
  parser.add_argument("--zone", required=True)
  parser.add_argument("--project", default=os.environ.get("CLOUDSDK_CORE_PROJECT"))
  parser.add_argument("--remote-dir", default="qsparse-jax", help="project folder on the workers (default: "
                      "~/qsparse-jax)")
  parser.add_argument("--dry-run", action="store_true", help="print the command, run nothing")
  args, train_args = parser.parse_known_args(argv)
  if not any(a == "--config" or a.startswith("--config=") for a in train_args):
    parser.error("pass the training config, e.g. --config configs/paper_7b.py")
  command = pod_command(args, train_args)
  if args.dry_run:
    print(shlex.join(command))
    return 0
  return subprocess.call(command)


if __name__ == "__main__":
  sys.exit(main())
