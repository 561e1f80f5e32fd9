"""Two real processes joined by jax.distributed on 127.0.0.1 (gloo collectives) train like one process on one mesh.

Each process runs `qsparse train --distributed` (through scripts/launch_gpu_hosts.py) with 4 CPU devices of its own and reads its own rows of every batch;
together they form the (data 2, fsdp 2, tensor 2) mesh. The reference runs here, on conftest's 8 devices in one
process, on the same mesh and the same global batches (process 0's rows, then process 1's).
"""

import dataclasses
import json
import os
import pathlib
import socket
import subprocess
import sys
import textwrap

import jax
import numpy as np

from qsparse_jax.data.text import lm_batches, text_source
from qsparse_jax.data.tokenizers import make_tokenizer
from qsparse_jax.parallel import distributed, sharding
from qsparse_jax.training.checkpoint import Checkpointer
from qsparse_jax.config import load_preset
from qsparse_jax.training.loop import train
from qsparse_jax.training.optimizer import make_optimizer
from qsparse_jax.training.step import init_train_state, make_train_step

STEPS = 4
LAUNCHER = pathlib.Path(__file__).parents[1] / "scripts" / "launch_gpu_hosts.py"


def write_preset(tmp_path):
  corpus = tmp_path / "corpus"  # several files: each process reads its own documents
  corpus.mkdir()
  rng = np.random.default_rng(2)
  for i in range(6):
    (corpus / f"part{i}.txt").write_text("\n".join(
        " ".join(rng.choice(["now", "is", "the", "winter", "of", "our", "discontent"], 9)) for _ in range(100)))
  preset = tmp_path / "two_hosts.py"
  preset.write_text(textwrap.dedent(f"""
      from qsparse_jax.config import Config, DataConfig, TrainConfig
      from qsparse_jax.nn.model import ModelConfig
      from qsparse_jax.parallel.sharding import MeshConfig
      config = Config(
          model=ModelConfig(vocab_size=257, d_model=32, num_layers=2, num_heads=2, d_ff=64).with_sparsity(0.3),
          data=DataConfig(source="files", paths=({str(corpus)!r},), data_dir={str(tmp_path / "tfds")!r},
                          seq_len=32),
          train=TrainConfig(steps={STEPS}, batch_size=8, learning_rate=1e-2, warmup_steps=1, log_every=1,
                            eval_every={STEPS}, eval_batches=1, checkpoint_every={STEPS},
                            out_dir={str(tmp_path / "run")!r}, sample_tokens=8, progress=False),
          mesh=MeshConfig(data=2, fsdp=2, tensor=2))
      """))
  return preset


def reference_run(config):
  """Losses and final state of the same run in this one process (8 devices, the same mesh and global batches)."""
  mc, dc, tc = config.model, config.data, config.train
  mesh = sharding.make_mesh(config.mesh)
  source = text_source(dc, "train")  # also builds the TFDS dataset the two processes will read
  tokenizer = make_tokenizer(dc.tokenizer)
  shards = [iter(lm_batches(source, tokenizer, seq_len=dc.seq_len, batch_size=tc.batch_size // 2,
                                     seed=dc.shuffle_seed, process_index=i, process_count=2)) for i in range(2)]
  tx = make_optimizer(tc)
  graphdef, state = init_train_state(mc, tx, tc.seed, mesh)
  step = make_train_step(graphdef, tx, mesh, jax.tree.map(lambda x: x.sharding, state))
  losses = []
  for _ in range(tc.steps):
    batch = np.concatenate([next(shard)["tokens"] for shard in shards])
    state, metrics = step(state, jax.device_put(batch, sharding.batch_sharding(mesh)))
    losses.append(float(metrics["loss"]))
  return losses, state


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_train_like_one(tmp_path):
  preset = write_preset(tmp_path)
  config = load_preset(preset)
  ref_losses, ref_state = reference_run(config)

  # Started as a user starts each host's process, through the multi-host launcher.
  coordinator = f"127.0.0.1:{free_port()}"
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": "4"}
  procs = [subprocess.Popen([sys.executable, str(LAUNCHER), "--coordinator", coordinator, "--num-processes", "2",
                             "--process-id", str(process_id), "--config", str(preset)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for process_id in range(2)]
  outputs = [proc.communicate(timeout=600) for proc in procs]
  for proc, (out, err) in zip(procs, outputs):
    assert proc.returncode == 0, err[-3000:]
  assert "mesh: data 2 x fsdp 2 x tensor 2 over 8 cpu devices in 2 process(es)" in outputs[0][0]
  # Only process 0 logs: none of its lines appear in process 1's output. (Both also carry gloo's connection notices,
  # which its threads print concurrently and may split mid-line, so process 1's output need not be empty.)
  logged_by_0 = [line for line in outputs[0][0].splitlines() if line.startswith(("model:", "data:", "mesh:", "final:"))]
  assert logged_by_0 and not [line for line in logged_by_0 if line in outputs[1][0]]

  run_dir = tmp_path / "run"
  logged = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
  losses = [m["loss"] for m in logged if "loss" in m]
  # float32: gloo and the in-process collectives may sum the data-parallel gradients in another order, a few ulps
  # (measured: losses within 1e-7 relative, weights within 1.2e-7 after 4 steps); the bounds leave 10x room for
  # Adam, which moves a weight by ~lr whatever its gradient's size.
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-6)

  # The checkpoint the two processes wrote together restores in this one process, with both data positions.
  checkpointer = Checkpointer(run_dir / "checkpoints")
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), ref_state)
  restored, meta = checkpointer.restore(abstract)
  checkpointer.close()
  assert int(restored["step"]) == STEPS and meta["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}
  assert sorted(p.name for p in (run_dir / "checkpoints" / str(STEPS) / "data").glob("process_*")) == [
      "process_0-of-2.json", "process_1-of-2.json"]
  for got, want in zip(jax.tree.leaves(restored["params"]), jax.tree.leaves(ref_state["params"])):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)

  # One process continues the two-process run: the weights carry over, the data position cannot (and it says so).
  longer = dataclasses.replace(config, train=dataclasses.replace(config.train, steps=STEPS + 1, sample_tokens=0))
  said = []
  assert train(longer, log=said.append)["step"] == STEPS + 1
  assert f"resumed from {run_dir / 'checkpoints'} at step {STEPS}" in said
  assert ("the data stream restarts from its beginning: the checkpoint holds data positions "
          "['process_0-of-2.json', 'process_1-of-2.json'], this run needs process_0-of-1.json") in said


def test_cluster_settings_from_the_environment():
  assert distributed.cluster_from_env({}) is None  # left to JAX's detection (TPU pod, SLURM, ...)
  env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
  assert distributed.cluster_from_env(env) == {"coordinator_address": "10.0.0.1:1234", "num_processes": 4,
                                               "process_id": 3}
  for broken, message in [({"JAX_PROCESS_ID": None}, "JAX_PROCESS_ID is not set"),
                          ({"JAX_PROCESS_ID": "4"}, r"JAX_PROCESS_ID=4 must be in \[0, JAX_NUM_PROCESSES=4\)"),
                          ({"JAX_NUM_PROCESSES": "four"}, "must be integers"),
                          ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1"}, "must be host:port")]:
    changed = {k: v for k, v in {**env, **broken}.items() if v is not None}
    try:
      distributed.cluster_from_env(changed)
    except ValueError as err:
      import re

      assert re.search(message, str(err)), str(err)
    else:
      raise AssertionError(f"{broken} was accepted")
