"""The `qsparse` command as a user runs it: one error line for bad input, and a failed save loses nothing."""

import dataclasses
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np

from qsparse_jax.checkpoint import Checkpointer
from qsparse_jax.config import load_preset
from qsparse_jax.sharding import MeshConfig
from qsparse_jax.train import init_train_state, make_optimizer, train


def write_preset(tmp_path, steps=6):
  corpus = tmp_path / "corpus.txt"
  rng = np.random.default_rng(1)
  corpus.write_text("\n".join(" ".join(rng.choice(["all", "the", "world", "is", "a", "stage"], 7))
                              for _ in range(500)))
  preset = tmp_path / "small.py"
  preset.write_text(textwrap.dedent(f"""
      from qsparse_jax.config import Config, DataConfig, TrainConfig
      from qsparse_jax.model import ModelConfig
      config = Config(
          model=ModelConfig(vocab_size=257, d_model=32, num_layers=1, num_heads=2, d_ff=64).with_sparsity(0.3),
          data=DataConfig(source="files", paths=({str(corpus)!r},), data_dir={str(tmp_path / "tfds")!r},
                          seq_len=32),
          train=TrainConfig(steps={steps}, batch_size=4, warmup_steps=1, eval_every=3, eval_batches=1,
                            checkpoint_every=3, out_dir={str(tmp_path / "run")!r}, sample_tokens=0,
                            progress=False))
      """))
  return preset


def run_cli(*args, max_file_bytes=None):
  """Run `python -m qsparse_jax.cli ARGS` in a fresh process, optionally with files capped at max_file_bytes (as a
  full disk would: writes past the cap fail with EFBIG, SIGXFSZ being ignored)."""
  command = [sys.executable, "-m", "qsparse_jax.cli", *args]
  if max_file_bytes is not None:
    command = ["prlimit", f"--fsize={max_file_bytes}", sys.executable, "-c",
               "import signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
               "from qsparse_jax.cli import main; sys.exit(main())", *args]
  return subprocess.run(command, capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"},
                        timeout=600)


def test_unknown_field_is_one_error_line(tmp_path):
  result = run_cli("train", "--config", str(write_preset(tmp_path)), "train.stepz=3")
  assert result.returncode == 2
  assert result.stderr.strip().splitlines() == [
      "qsparse train: error: unknown config field 'train.stepz'; did you mean train.steps?"]


def test_missing_config_file_is_one_error_line(tmp_path):
  result = run_cli("train", "--config", str(tmp_path / "nope.py"))
  assert result.returncode == 2
  assert len(result.stderr.strip().splitlines()) == 1 and "does not exist" in result.stderr


def test_failed_save_keeps_the_previous_checkpoint(tmp_path):
  preset = write_preset(tmp_path)
  config = load_preset(preset)
  # A good checkpoint at step 3, written here on a (4, 1, 2) mesh of conftest's 8 devices; the CLI below resumes it
  # on one device.
  train(dataclasses.replace(config, mesh=MeshConfig(data=4, tensor=2)), log=lambda _: None, stop_after=3)
  # Resume with files capped at 32 KiB (as a full disk would): the step-6 save cannot be written.
  result = run_cli("train", "--config", str(preset), max_file_bytes=32 * 1024)
  assert result.returncode == 1, result.stderr
  # The error is the last line, and the only one of ours. TensorStore's own threads may still print "Event loop is
  # closed" traces before it while the failed save is torn down (timing-dependent; left open, see the closing note).
  lines = result.stderr.strip().splitlines()
  assert lines[-1] == (f"qsparse train: error: saving a checkpoint under {tmp_path / 'run' / 'checkpoints'} "
                       "failed (File too large [os_error_code='27']); the checkpoint of step 3 is intact")
  assert sum(line.startswith("qsparse") for line in lines) == 1
  checkpointer = Checkpointer(tmp_path / "run" / "checkpoints")
  assert checkpointer.latest_step() == 3
  tx = make_optimizer(config.train)
  _, state = init_train_state(config.model, tx, seed=0)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
  restored, meta = checkpointer.restore(abstract)
  assert int(restored["step"]) == 3 and (checkpointer.directory / "3" / "data" / "process_0-of-1.json").exists() and meta["model"]["d_model"] == 32
  checkpointer.close()
