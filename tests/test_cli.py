"""The `qsparse` command as a user runs it: one error line for bad input, and a failed save loses nothing."""

import dataclasses
import json
import os
import re
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from qsparse_jax.training.checkpoint import Checkpointer
from qsparse_jax.config import load_preset
from qsparse_jax.parallel.sharding import MeshConfig
from qsparse_jax.training.loop import train
from qsparse_jax.training.optimizer import make_optimizer
from qsparse_jax.training.step import init_train_state


def write_preset(tmp_path, steps=6):
  corpus = tmp_path / "corpus.txt"
  rng = np.random.default_rng(1)
  corpus.write_text("\n".join(" ".join(rng.choice(["all", "the", "world", "is", "a", "stage"], 7))
                              for _ in range(500)))
  preset = tmp_path / "small.py"
  preset.write_text(textwrap.dedent(f"""
      from qsparse_jax.config import Config, DataConfig, TrainConfig
      from qsparse_jax.nn.model import ModelConfig
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
  # One error line of ours, written in one piece as the process's last word. TensorStore's threads may print "Event
  # loop is closed" traces before it while the failed save is torn down, and a trace printed a piece at a time may
  # leave a line unfinished when ours arrives (timing-dependent, on a loaded machine): ours is found wherever it starts.
  assert re.findall(r"qsparse .*", result.stderr) == [
      f"qsparse train: error: saving a checkpoint under {tmp_path / 'run' / 'checkpoints'} "
      "failed (File too large [os_error_code='27']); the checkpoint of step 3 is intact"], result.stderr
  checkpointer = Checkpointer(tmp_path / "run" / "checkpoints")
  assert checkpointer.latest_step() == 3
  tx = make_optimizer(config.train)
  _, state = init_train_state(config.model, tx, seed=0)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
  restored, meta = checkpointer.restore(abstract)
  assert int(restored["step"]) == 3 and (checkpointer.directory / "3" / "data" / "process_0-of-1.json").exists() and meta["model"]["d_model"] == 32
  checkpointer.close()


def test_last_error_line_is_not_followed_by_other_threads_output():
  # A thread printing tracebacks a piece at a time, as a failed save's teardown does, while the CLI says its last line.
  script = textwrap.dedent("""
      import os, sys, threading, time
      from qsparse_jax.cli import _say_last
      def teardown():
        while True:
          sys.stderr.write("Traceback (most recent call last):"); sys.stderr.write("\\n")
          sys.stderr.write("RuntimeError"); sys.stderr.write(": Event loop is closed\\n")
      threading.Thread(target=teardown, daemon=True).start()
      time.sleep(0.2)
      _say_last("qsparse train: error: the one line")
      time.sleep(0.2)
      os._exit(1)
      """)
  result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
  assert result.returncode == 1
  assert "Event loop is closed" in result.stderr  # the thread did write before
  assert result.stderr.endswith("qsparse train: error: the one line\n")  # and nothing after, in the 0.2 s it had


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
  """A 3-step run of the small preset (on a (4, 1, 2) mesh of conftest's devices) to generate from."""
  tmp_path = tmp_path_factory.mktemp("trained")
  preset = write_preset(tmp_path)
  train(dataclasses.replace(load_preset(preset), mesh=MeshConfig(data=4, tensor=2)), log=lambda _: None,
        stop_after=3)
  return tmp_path / "run"


def test_generate_streams_and_matches_the_library(trained_run):
  from qsparse_jax import inference
  from qsparse_jax.inference import decode

  run_dir = trained_run
  result = run_cli("generate", "--checkpoint", str(run_dir), "--prompt", "all the", "--max-new-tokens", "6",
                   "--temperature", "0")
  assert result.returncode == 0, result.stderr
  loaded = inference.load(run_dir)
  tok = loaded.tokenizer
  want = decode.generate(loaded.graphdef, loaded.params, loaded.config.model, [tok.encode("all the")],
                         decode.SamplingConfig(max_new_tokens=6))
  text = tok.decode(want.tokens[0])
  assert result.stdout == "all the" + text + ("" if text.endswith("\n") else "\n")  # one final newline
  assert loaded.step == 3
  assert re.fullmatch(r"6 tokens, decoding at [0-9.]+ tokens/s \(sparse decode, batch 1, checkpoint step 3\)",
                      result.stderr.strip().splitlines()[-1])


def test_generate_bad_input_is_one_error_line(trained_run, tmp_path):
  run_dir = trained_run
  cases = [
      (["--checkpoint", str(run_dir), "--prompt", ""], "the prompt is empty: give some text to continue"),
      (["--checkpoint", str(run_dir), "--prompt", "x" * 250, "--max-new-tokens", "10"],
       "a prompt of 250 tokens plus 10 new ones exceeds the model's context of 256 tokens; shorten the prompt or "
       "ask for fewer tokens"),
      (["--checkpoint", str(tmp_path / "nowhere"), "--prompt", "a"],
       f"checkpoint directory {str(tmp_path / 'nowhere')!r} does not exist"),
      (["--checkpoint", str(run_dir), "--prompt", "a", "--tokenizer", "sentencepiece:/m.model"],
       "the checkpoint was trained with tokenizer 'byte', not 'sentencepiece:/m.model'; leave the tokenizer out to "
       "use the checkpoint's"),
      (["--checkpoint", str(run_dir), "--prompt", "a", "--chat"],
       "--chat: this checkpoint was not fine-tuned on instructions (its data.format is 'text'); leave --chat out to "
       "continue plain text"),
  ]
  for args, message in cases:
    result = run_cli("generate", *args)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [f"qsparse generate: error: {message}"]


def test_eval_prints_table_2_and_json_equal_to_the_library(trained_run, tmp_path):
  from qsparse_jax import inference
  from qsparse_jax.inference import evaluation

  out = tmp_path / "eval.json"
  result = run_cli("eval", "--checkpoint", str(trained_run), "--batches", "2", "--batch-size", "2", "--json",
                   str(out))
  assert result.returncode == 0, result.stderr
  figures = json.loads(out.read_text())
  loaded = inference.load(trained_run)
  want = evaluation.evaluate(loaded.graphdef, loaded.params, loaded.config.model, evaluation.validation_batches(
      loaded.config, loaded.tokenizer, num_batches=2, batch_size=2), step=3)
  assert figures["loss"] == pytest.approx(want.loss, rel=1e-6) and figures["step"] == 3
  assert figures["sparsity"] == pytest.approx(want.sparsity, abs=1e-9)
  assert figures["activated_params"] == pytest.approx(want.activated_params, rel=1e-9)
  lines = result.stdout.splitlines()
  assert lines[0].startswith(f"step 3: validation loss {want.loss:.4f} nats/byte")
  assert lines[1].split() == ["q/k/v", "out", "up", "gate", "down", "overall", "activated"]
  assert lines[2].split()[1:6] == [f"{want.sparsity[t]:.1%}" for t in evaluation.PROJECTION_TYPES]
  bad = [  # (a missing checkpoint directory goes through the same inference.load as generate's, tested there)
      (["--checkpoint", str(trained_run), "train.steps=3"],
       "eval takes data.* overrides (the text to measure on) and model.* sparsity overrides (e.g. model.sparsity=0 "
       "for the dense loss), got 'train.steps=3'"),
      (["--checkpoint", str(trained_run), "model.d_ff=128"],
       "model.d_ff=128 differs from the checkpoint's 64: that field fixes the weights; only the Q-Sparse settings "
       "(model.sparsity*, gradient, block, act_bits, ternary_weights, kernels) can change"),
  ]
  for args, message in bad:
    failed = run_cli("eval", *args)
    assert failed.returncode == 2 and failed.stderr.strip().splitlines() == [f"qsparse eval: error: {message}"]


def test_eval_at_another_sparsity_measures_the_same_weights_dense(trained_run, tmp_path):
  """`model.sparsity=0`: the checkpoint's weights with top-K off at every site, as a dense Transformer built here
  computes them."""
  from flax import nnx

  from qsparse_jax import inference
  from qsparse_jax.inference import evaluation
  from qsparse_jax.nn.model import Transformer

  out = tmp_path / "dense.json"
  result = run_cli("eval", "--checkpoint", str(trained_run), "--batches", "2", "--batch-size", "2", "--json",
                   str(out), "model.sparsity=0")
  assert result.returncode == 0, result.stderr
  loaded = inference.load(trained_run)
  dense_cfg = dataclasses.replace(loaded.config.model, sparsity_qkv=0.0, sparsity_out=0.0, sparsity_up=0.0,
                                  sparsity_down=0.0)
  graphdef, _ = nnx.split(Transformer(dense_cfg, rngs=nnx.Rngs(0)))
  batches = evaluation.validation_batches(loaded.config, loaded.tokenizer, num_batches=2, batch_size=2)
  want = evaluation.evaluate(graphdef, loaded.params, dense_cfg, batches, step=3)
  sparse = evaluation.evaluate(loaded.graphdef, loaded.params, loaded.config.model, batches, step=3)
  figures = json.loads(out.read_text())
  assert figures["loss"] == pytest.approx(want.loss, rel=1e-6) and figures["loss"] != pytest.approx(sparse.loss)
  assert figures["configured"] == {"q/k/v": 0.0, "out": 0.0, "up": 0.0, "gate": 0.0, "down": 0.0}
