"""The multi-host launchers in dry-run mode: what each would run, for SLURM, explicit hosts and a TPU pod."""

import os
import pathlib
import shlex
import subprocess
import sys

SCRIPTS = pathlib.Path(__file__).parents[1] / "scripts"


def run(script, *args, **env):
  clean = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
  return subprocess.run([sys.executable, str(SCRIPTS / script), *args], capture_output=True, text=True,
                        env={**clean, **env}, timeout=60)


def test_gpu_launcher_under_slurm():
  result = run("launch_gpu_hosts.py", "--dry-run", "--config", "configs/paper_1p3b.py", "mesh.tensor=8",
               SLURM_JOB_NODELIST="gpu[03-05,09],login1", SLURM_NTASKS="4", SLURM_PROCID="2")
  assert result.returncode == 0, result.stderr
  words = shlex.split(result.stdout)
  assert words[:3] == ["JAX_COORDINATOR_ADDRESS=gpu03:12355", "JAX_NUM_PROCESSES=4", "JAX_PROCESS_ID=2"]
  assert words[4:] == ["-m", "qsparse_jax.cli", "train", "--distributed", "--config", "configs/paper_1p3b.py",
                       "mesh.tensor=8"]


def test_gpu_launcher_with_explicit_hosts_and_errors():
  result = run("launch_gpu_hosts.py", "--dry-run", "--coordinator", "10.1.2.3:9999", "--num-processes", "2",
               "--process-id", "1", "--config", "c.py", "--port", "1")
  assert shlex.split(result.stdout)[:3] == ["JAX_COORDINATOR_ADDRESS=10.1.2.3:9999", "JAX_NUM_PROCESSES=2",
                                            "JAX_PROCESS_ID=1"]
  missing = run("launch_gpu_hosts.py", "--dry-run", "--config", "c.py")
  assert missing.returncode == 2 and missing.stderr.strip().splitlines() == [
      "launch_gpu_hosts: error: no cluster found: run inside a SLURM allocation (srun) or give --coordinator "
      "HOST:PORT --num-processes N --process-id I"]
  partial = run("launch_gpu_hosts.py", "--dry-run", "--coordinator", "h:1", "--config", "c.py")
  assert partial.returncode == 2 and "together" in partial.stderr


def test_tpu_pod_launcher_runs_one_command_on_every_worker():
  result = run("launch_tpu_pod.py", "--dry-run", "--tpu", "pod-256", "--zone", "us-east5-a", "--project", "p1",
               "--config", "configs/paper_7b.py", "train.out_dir=/mnt/shared/runs/7b")
  assert result.returncode == 0, result.stderr
  words = shlex.split(result.stdout)
  assert words[:8] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod-256", "--project=p1", "--zone=us-east5-a"]
  assert words[8] == "--worker=all"
  remote = words[9].removeprefix("--command=")
  assert shlex.split(remote) == ["cd", "qsparse-jax", "&&", ".", ".venv/bin/activate", "&&", "qsparse", "train",
                                 "--distributed", "--config", "configs/paper_7b.py",
                                 "train.out_dir=/mnt/shared/runs/7b"]
  no_config = run("launch_tpu_pod.py", "--dry-run", "--tpu", "x", "--zone", "z")
  assert no_config.returncode == 2 and "pass the training config" in no_config.stderr
