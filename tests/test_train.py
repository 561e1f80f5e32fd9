"""The training loop: schedule, resume after interruption on the same loss curve, checkpoint compatibility."""

import dataclasses
import json

import jax
import numpy as np
import pytest

from qsparse_jax.training.checkpoint import CheckpointMismatchError
from qsparse_jax.config import Config, DataConfig, TrainConfig
from qsparse_jax.nn.model import ModelConfig
from qsparse_jax.parallel.sharding import MeshConfig
from qsparse_jax.training.loop import train
from qsparse_jax.training.optimizer import make_schedule


def small_config(tmp_path, out="run", **train_kwargs) -> Config:
  corpus = tmp_path / "corpus.txt"
  if not corpus.exists():
    rng = np.random.default_rng(0)
    corpus.write_text("\n".join(" ".join(rng.choice(["to", "be", "or", "not", "that", "is"], 8))
                                for _ in range(600)))
  kwargs = dict(steps=6, batch_size=4, learning_rate=1e-2, end_learning_rate=1e-3, warmup_steps=2, eval_every=3,
                eval_batches=2, log_every=1, checkpoint_every=3, out_dir=str(tmp_path / out), sample_tokens=0,
                progress=False)
  kwargs.update(train_kwargs)
  return Config(
      model=ModelConfig(vocab_size=257, d_model=32, num_layers=1, num_heads=2, d_ff=64, max_seq_len=32)
      .with_sparsity(0.3),
      data=DataConfig(source="files", paths=(str(corpus),), data_dir=str(tmp_path / "tfds"), seq_len=32),
      train=TrainConfig(**kwargs),
      mesh=MeshConfig(data=2, fsdp=2, tensor=2))  # the loop runs sharded over conftest's 8 CPU devices


def losses(run_dir):
  return {m["step"]: m["loss"] for m in map(json.loads, open(run_dir / "metrics.jsonl")) if "loss" in m}


def test_schedule_warms_up_then_decays():
  tc = TrainConfig(steps=100, learning_rate=1.0, end_learning_rate=0.1, warmup_steps=10, decay="polynomial")
  lr = make_schedule(tc)
  np.testing.assert_allclose([lr(0), lr(5), lr(10), lr(55), lr(100)], [0.0, 0.5, 1.0, 0.55, 0.1], rtol=1e-6)
  cos = make_schedule(dataclasses.replace(tc, decay="cosine"))
  np.testing.assert_allclose([cos(10), cos(55), cos(100)], [1.0, 0.55, 0.1], rtol=1e-6)


def test_interrupted_run_resumes_on_the_same_loss_curve(tmp_path):
  whole = small_config(tmp_path, "whole")
  train(whole, log=lambda _: None)
  parts = small_config(tmp_path, "parts")
  first = train(parts, log=lambda _: None, stop_after=3)  # preempted right after the step-3 checkpoint
  assert first["step"] == 3
  messages = []
  final = train(parts, log=messages.append)
  assert any("resumed from" in m and "step 3" in m for m in messages)
  # Same batches (data-iterator state restored), same parameters and optimizer moments: identical float32 losses.
  assert losses(tmp_path / "parts") == losses(tmp_path / "whole")
  assert final["val_loss"] == json.loads((tmp_path / "whole" / "final_metrics.json").read_text())["val_loss"]
  assert sorted(p.name for p in (tmp_path / "parts" / "checkpoints").iterdir() if p.name.isdigit()) == ["3", "6"]
  events = list((tmp_path / "parts" / "tensorboard").glob("events.out.tfevents.*"))
  assert events and all(e.stat().st_size > 0 for e in events)


def test_resume_with_another_model_config_is_refused(tmp_path):
  cfg = small_config(tmp_path, steps=3)
  train(cfg, log=lambda _: None)
  other = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, d_model=48),
                              train=dataclasses.replace(cfg.train, steps=6))
  with pytest.raises(CheckpointMismatchError, match="written with model.d_model=32, this config has 48"):
    train(other, log=lambda _: None)
  assert (tmp_path / "run" / "checkpoints" / "3").is_dir()  # nothing already saved is lost


def test_sequence_longer_than_the_corpus(tmp_path):
  cfg = small_config(tmp_path)
  cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, seq_len=100_000),
                            model=dataclasses.replace(cfg.model, max_seq_len=100_000))
  with pytest.raises(ValueError, match="data.seq_len=100000 is longer than the whole train split"):
    train(cfg, log=lambda _: None)


def test_continued_training_starts_from_another_runs_weights(tmp_path):
  from qsparse_jax import inference
  from qsparse_jax.training.init_from import load_initial_params
  from qsparse_jax.parallel.sharding import make_mesh

  from qsparse_jax.training.checkpoint import Checkpointer, meta_json
  from qsparse_jax.training.optimizer import make_optimizer
  from qsparse_jax.training.step import init_train_state

  base = small_config(tmp_path, out="dense", steps=4)
  dense = dataclasses.replace(base, model=base.model.with_sparsity(0.0))  # a dense run's checkpoint, written here
  _, state = init_train_state(dense.model, make_optimizer(dense.train), seed=5)
  checkpointer = Checkpointer(tmp_path / "dense" / "checkpoints", async_save=False)
  checkpointer.save(4, state, meta=meta_json(dense), force=True)
  checkpointer.close()
  sparse_model = dense.model.with_sparsity(0.3)
  mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
  params = load_initial_params(str(tmp_path / "dense"), sparse_model, mesh, tokenizer="byte")
  dense_params = inference.load(tmp_path / "dense").params
  for (path, a), (_, b) in zip(jax.tree_util.tree_leaves_with_path(dense_params),
                               jax.tree_util.tree_leaves_with_path(params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=str(path))
  # Through the loop: the first loss is the dense run's weights under top-K, on the first batch (computed here).
  logs = []
  cont = small_config(tmp_path, out="cont", steps=1, init_from=str(tmp_path / "dense"))
  train(cont, log=logs.append)
  assert f"parameters from {tmp_path / 'dense'} (the optimizer starts fresh)" in logs
  from flax import nnx

  from qsparse_jax.data.text import lm_batches, text_source
  from qsparse_jax.data.tokenizers import make_tokenizer
  from qsparse_jax.nn.model import Transformer
  from qsparse_jax.training.step import lm_loss

  dc = cont.data
  first = next(iter(lm_batches(text_source(dc, "train"), make_tokenizer("byte"),
                                        seq_len=dc.seq_len, batch_size=4, seed=dc.shuffle_seed)))["tokens"]
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: Transformer(cont.model, rngs=nnx.Rngs(0))))
  want = float(jax.jit(lm_loss, static_argnums=0)(graphdef, dense_params, first))
  assert losses(tmp_path / "cont")[1] == pytest.approx(want, rel=1e-5)
  # Before the first step, the validation loss of the pretrained weights under this config's top-K.
  validation = lm_batches(text_source(dc, "validation"), make_tokenizer("byte"), seq_len=dc.seq_len, batch_size=4,
                          seed=0, shuffle=False)
  batches = [b["tokens"] for _, b in zip(range(cont.train.eval_batches), iter(validation))]
  at_start = np.mean([float(jax.jit(lm_loss, static_argnums=0)(graphdef, dense_params, b)) for b in batches])
  first_line = json.loads((tmp_path / "cont" / "metrics.jsonl").read_text().splitlines()[0])
  assert first_line["step"] == 0 and first_line["val_loss"] == pytest.approx(at_start, rel=1e-5)
  assert any(line.startswith("step 0: validation loss ") for line in logs)
  wider = dataclasses.replace(sparse_model, d_ff=96)
  with pytest.raises(ValueError, match=r"its model has d_ff=64, this config d_ff=96; only the Q-Sparse settings"):
    load_initial_params(str(tmp_path / "dense"), wider, mesh)
  with pytest.raises(ValueError, match=r"was trained with data.tokenizer='byte', this config uses 'hf:/t.json'"):
    load_initial_params(str(tmp_path / "dense"), sparse_model, mesh, tokenizer="hf:/t.json")


def test_the_sample_prompt_defaults_to_the_start_of_a_validation_document(tmp_path):
  from qsparse_jax.data.text import split_text

  cfg = small_config(tmp_path, steps=1, sample_tokens=3, sample_prompt="")
  result = train(cfg, log=lambda _: None)
  validation = split_text((tmp_path / "corpus.txt").read_text(), cfg.data.validation_fraction)[1]
  opening = validation.split("\n")[0]  # the first line of the validation text (shorter than the 40-character cap)
  assert 0 < len(opening) <= 40 and result["sample"].startswith(opening) and len(result["sample"]) > len(opening)
