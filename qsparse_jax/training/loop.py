"""The training loop around the step: periodic evaluation on the held-out split, a progress line (step, loss,
tokens/s, ETA), metrics as JSONL and TensorBoard events, asynchronous Orbax checkpoints with the data iterator's
state (so a killed run resumes on the same loss curve), and a text sample at the end.
"""

from __future__ import annotations

import json
import pathlib
import sys
import time
import warnings
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from tensorboardX import SummaryWriter

from qsparse_jax.config import Config
from qsparse_jax.data import chat, tokenizers
from qsparse_jax.data.inputs import make_inputs
from qsparse_jax.nn.model import EXECUTION_FIELDS, activated_params_per_token, count_params
from qsparse_jax.parallel import sharding
from qsparse_jax.training import init_from
from qsparse_jax.training.checkpoint import Checkpointer, CheckpointMismatchError, meta_json
from qsparse_jax.training.optimizer import make_optimizer, make_schedule
from qsparse_jax.training.step import init_train_state, lm_loss, make_eval_step, make_train_step, response_loss


def generate(graphdef, params, prompt_ids: list[int], num_tokens: int, *, max_len: int, temperature: float = 0.8,
             seed: int = 0) -> list[int]:
  """Sample num_tokens after prompt_ids by re-running the model on a fixed [1, max_len] window (no KV cache).

  Params may be sharded over a mesh spanning processes; every process then runs this and gets the same tokens.
  """
  mesh = next((leaf.sharding.mesh for leaf in jax.tree.leaves(params)
               if isinstance(leaf.sharding, NamedSharding)), None)
  if mesh is None:
    forward, place = jax.jit(lambda p, toks: nnx.merge(graphdef, p)(toks)), jnp.asarray
  else:
    every = sharding.replicated(mesh)
    forward = jax.jit(lambda p, toks: nnx.merge(graphdef, p)(toks), out_shardings=every)
    place = lambda toks: jax.make_array_from_callback(toks.shape, every, lambda index: toks[index])  # noqa: E731
  ids = list(prompt_ids) or [0]
  key = jax.random.key(seed)
  for _ in range(num_tokens):
    window = ids[-max_len:]
    tokens = np.zeros((1, max_len), np.int32)
    tokens[0, : len(window)] = window
    logits = np.asarray(forward(params, place(tokens)))[0, len(window) - 1]
    key, sub = jax.random.split(key)
    ids.append(int(jax.random.categorical(sub, logits / temperature)))
  return ids[len(prompt_ids):]


class _Progress:
  """One updating terminal line: step, loss, tokens/s, ETA."""

  def __init__(self, total: int, enabled: bool):
    self.total, self.enabled = total, enabled and sys.stderr.isatty()
    self.plain = enabled and not self.enabled

  def update(self, step: int, loss: float, tokens_per_s: float, eta_s: float):
    bar = "#" * int(30 * step / self.total)
    line = (f"step {step:>6}/{self.total} [{bar:<30}] loss {loss:7.4f}  {tokens_per_s:9.0f} tok/s  "
            f"ETA {int(eta_s) // 60:d}:{int(eta_s) % 60:02d}")
    if self.enabled:
      print("\r" + line, end="", file=sys.stderr, flush=True)
    elif self.plain:
      print(line, file=sys.stderr, flush=True)

  def close(self):
    if self.enabled:
      print(file=sys.stderr)


class _Metrics:
  """Metrics as JSON lines (metrics.jsonl) and TensorBoard event files, both under the run directory.

  On resume, lines logged after the restored step (by the interrupted run) are dropped, so the file holds one curve.
  Disabled (every call a no-op) in all processes but the first.
  """

  def __init__(self, run_dir: pathlib.Path, resumed_step: int, enabled: bool = True):
    self.enabled = enabled
    if not enabled:
      return
    path = run_dir / "metrics.jsonl"
    if path.exists():
      kept = [json.dumps(record) for record in _records(path) if record["step"] <= resumed_step]
      path.write_text("".join(line + "\n" for line in kept))
    self._jsonl = open(path, "a", encoding="utf-8")
    self._tb = SummaryWriter(str(run_dir / "tensorboard"))

  def write(self, step: int, values: dict[str, float]):
    if not self.enabled:
      return
    self._jsonl.write(json.dumps({"step": step, **values}) + "\n")
    self._jsonl.flush()
    for name, value in values.items():
      self._tb.add_scalar(name, value, step)

  def close(self):
    if not self.enabled:
      return
    self._jsonl.close()
    self._tb.close()


# The data fields that fix the stream of batches; a resume with any of them changed restarts the stream.
DATA_STREAM_FIELDS = ("format", "source", "paths", "tfds_name", "tfds_text_key", "validation_fraction", "seq_len",
                      "shuffle_seed", "chat_template", "tokenizer")


def _check_resumable(meta: dict, config: Config, run_dir: pathlib.Path) -> bool:
  """Raise CheckpointMismatchError when a stored run is not this config's model (or tokenizer); return whether its
  data position still means something (False, with a warning, when the data changed since)."""
  stored_model, stored_tok = meta.get("model", {}), meta.get("data", {}).get("tokenizer")
  current = meta_json(config)
  for field, value in current["model"].items():
    if field in stored_model and stored_model[field] != value and field not in EXECUTION_FIELDS:
      raise CheckpointMismatchError(
          f"checkpoint in {run_dir} was written with model.{field}={stored_model[field]!r}, this config has "
          f"{value!r}: use another train.out_dir, or the same model config to resume")
  if stored_tok is not None and stored_tok != config.data.tokenizer:
    raise CheckpointMismatchError(f"checkpoint in {run_dir} was written with data.tokenizer={stored_tok!r}, this "
                                  f"config has {config.data.tokenizer!r}")
  stored_data = meta.get("data", {})
  changed = [f for f in DATA_STREAM_FIELDS if f in stored_data and stored_data[f] != current["data"][f]]
  if changed:
    warnings.warn(f"the data changed since the checkpoint in {run_dir} (data.{changed[0]} was "
                  f"{stored_data[changed[0]]!r}, now {current['data'][changed[0]]!r}): the data stream starts from "
                  "its beginning", DataChangeWarning, stacklevel=3)
  return not changed


class DataChangeWarning(UserWarning):
  """A run resumed on other data than its checkpoint was written with."""


class SiteWarning(UserWarning):
  """A sparsity that keeps no entry of a site's input (K = 0)."""


def _warn_empty_sites(mc) -> None:
  if mc.block is not None or mc.sparsifier != "topk":
    return
  for site, (width, keep) in mc.site_keep_counts().items():
    if keep == 0:
      warnings.warn(f"model.sparsity_{site}={getattr(mc, f'sparsity_{site}')} keeps K = 0 of the {width} entries at "
                    f"the {site} site: its projections see only zeros", SiteWarning, stacklevel=3)


def _finished(run_dir: pathlib.Path, config: Config) -> dict | None:
  """The final metrics of a run already trained to config.train.steps (or beyond), else None."""
  path = run_dir / "final_metrics.json"
  if not path.is_file():
    return None
  try:
    final = json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError):
    return None  # unreadable: the run is resumed from its checkpoints and the file written again at the end
  if not isinstance(final, dict) or not isinstance(final.get("step"), int) or final["step"] < config.train.steps:
    return None
  checkpoints = run_dir / "checkpoints"
  if checkpoints.is_dir():  # a finished run of another model is refused, as a resume would be
    reader = Checkpointer(checkpoints, read_only=True)
    try:
      _check_resumable(reader.read_meta(), config, run_dir)
    finally:
      reader.close()
  return final


def _logged(run_dir: pathlib.Path, step: int) -> dict[str, Any]:
  """The last loss, gradient norm and validation loss that metrics.jsonl holds up to step (a resumed run's start)."""
  last: dict[str, Any] = {"step": step}
  path = run_dir / "metrics.jsonl"
  for record in _records(path) if path.is_file() else ():
    if record["step"] <= step:
      last.update({k: v for k, v in record.items() if k != "step"})
  return last


def _records(path: pathlib.Path) -> list[dict]:
  """The records of a metrics.jsonl, less a last line cut short by a kill mid-write."""
  records = []
  for line in path.read_text(errors="replace").splitlines():
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      continue
    if isinstance(record, dict) and isinstance(record.get("step"), int):
      records.append(record)
  return records


def train(config: Config, *, log: Callable[[str], None] = print, stop_after: int | None = None) -> dict[str, Any]:
  """Train (or resume) the run described by config; returns the final metrics.

  A run already trained to train.steps is not touched: its final metrics are returned as they are. A run trained
  to fewer steps than train.steps continues from its newest checkpoint that restores (the learning-rate schedule is
  the one of the new train.steps).
  stop_after: end this invocation after that many steps of its own (checkpointing as usual), as a preempted job
  would; calling train again resumes from the latest checkpoint.

  Multi-host: every process calls this with the same config (after jax.distributed.initialize); each reads its own
  rows of every batch, and only process 0 logs and writes metrics.
  """
  mc, dc, tc = config.model, config.data, config.train
  main_process = jax.process_index() == 0
  if not main_process:
    log = lambda _: None  # noqa: E731
  run_dir = pathlib.Path(tc.out_dir).expanduser()
  if (final := _finished(run_dir, config)) is not None:
    unit = f"nats/{tokenizers.unit_of(dc.tokenizer)}"
    log(f"{run_dir} is complete: step {final['step']}, train loss {final.get('loss', float('nan')):.4f}, "
        f"validation loss {final.get('val_loss', float('nan')):.4f} {unit}; raise train.steps to train it further")
    return final
  _warn_empty_sites(mc)
  tokenizer = tokenizers.make_tokenizer(dc.tokenizer)
  if tokenizer.vocab_size > mc.vocab_size:
    raise ValueError(f"model.vocab_size={mc.vocab_size} is smaller than the tokenizer's vocabulary "
                     f"({tokenizer.name}: {tokenizer.vocab_size})")
  unit = f"nats/{tokenizer.unit}"

  mesh = sharding.make_mesh(config.mesh)
  shard_index, shard_count = sharding.process_batch_rows(mesh, tc.batch_size)
  local_batch = tc.batch_size // shard_count  # the rows this process reads; the mesh assembles the global batch

  tx, schedule = make_optimizer(tc), make_schedule(tc)
  graphdef, state = init_train_state(mc, tx, tc.seed, mesh)
  state_shardings = jax.tree.map(lambda x: x.sharding, state)
  loss_fn = response_loss if dc.format == "instructions" else lm_loss
  train_step = make_train_step(graphdef, tx, mesh, state_shardings, loss_fn, microbatches=tc.microbatches)
  eval_step = make_eval_step(graphdef, mesh, state_shardings["params"], loss_fn)
  inputs = make_inputs(dc, tokenizer, batch_size=local_batch, eval_batches=tc.eval_batches, seed=dc.shuffle_seed,
                       process_index=shard_index, process_count=shard_count)
  train_iter = iter(inputs.train)

  def global_batch(local):
    return jax.tree.map(lambda rows: sharding.make_global_batch(rows, mesh, tc.batch_size), local)

  def evaluate(params):
    return float(np.mean([float(eval_step(params, global_batch(b))) for b in inputs.validation]))

  run_dir.mkdir(parents=True, exist_ok=True)
  checkpointer = Checkpointer(run_dir / "checkpoints", keep=tc.keep_checkpoints, save_every=tc.checkpoint_every)
  meta = meta_json(config)
  initial_eval = False
  if checkpointer.all_steps():
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    restored = checkpointer.restore_newest(abstract, check_meta=lambda m: _check_resumable(m, config, run_dir),
                                           data_iterator=train_iter, move_damaged=True)
    state = restored.state
    log(f"resumed from {checkpointer.directory} at step {restored.step}")
    if restored.data_note is not None:
      log(f"the data stream restarts from its beginning: {restored.data_note}")
  elif tc.init_from:
    params = init_from.load_initial_params(tc.init_from, mc, mesh, tokenizer=dc.tokenizer)
    state = {**state, "params": jax.device_put(params, state_shardings["params"])}
    log(f"parameters from {tc.init_from} (the optimizer starts fresh)")
    initial_eval = True

  counts = count_params(mc)
  log(f"model: {counts['total'] / 1e6:.2f}M parameters ({counts['non_embedding'] / 1e6:.2f}M non-embedding), "
      f"{activated_params_per_token(mc) / 1e6:.2f}M activated per token; sparsity q/k/v {mc.sparsity_qkv}, "
      f"out {mc.sparsity_out}, up {mc.sparsity_up}, down {mc.sparsity_down}")
  log(f"data: {inputs.summary}, "
      f"tokenizer {tokenizer.name}, {tc.batch_size} x {dc.seq_len} tokens per step; run directory {run_dir}")
  log(f"mesh: data {mesh.shape['data']} x fsdp {mesh.shape['fsdp']} x tensor {mesh.shape['tensor']} over "
      f"{mesh.size} {jax.devices()[0].platform} devices in {jax.process_count()} process(es)")

  step = int(state["step"])
  last = _logged(run_dir, step) if main_process else {"step": step}
  metrics_out = _Metrics(run_dir, step, enabled=main_process)
  progress = _Progress(tc.steps, tc.progress and main_process)
  tokens_per_step = tc.batch_size * dc.seq_len
  if initial_eval:  # what switching on this config's sparsity costs the pretrained weights, before any update
    last["val_loss"] = evaluate(state["params"])
    metrics_out.write(0, {"val_loss": last["val_loss"]})
    log(f"step 0: validation loss {last['val_loss']:.4f} {unit} (the weights of {tc.init_from} with this config's "
        "sparsity)")
  window_start, window_steps = time.perf_counter(), 0

  stop_at = tc.steps if stop_after is None else min(tc.steps, step + stop_after)
  try:
    while step < stop_at:
      batch = global_batch(inputs.select(next(train_iter)))
      state, metrics = train_step(state, batch)
      step += 1
      window_steps += 1
      if step % tc.log_every == 0 or step == tc.steps:
        loss = float(metrics["loss"])
        elapsed = time.perf_counter() - window_start
        tokens_per_s = window_steps * tokens_per_step / max(elapsed, 1e-9)
        progress.update(step, loss, tokens_per_s, (tc.steps - step) * elapsed / window_steps)
        last = {**last, "step": step, "loss": loss, "grad_norm": float(metrics["grad_norm"]),
                "tokens_per_s": tokens_per_s, "learning_rate": float(schedule(step))}
        metrics_out.write(step, {k: v for k, v in last.items() if k not in ("step", "val_loss")})
        window_start, window_steps = time.perf_counter(), 0
      if step % tc.eval_every == 0 or step == tc.steps:
        last["val_loss"] = evaluate(state["params"])
        metrics_out.write(step, {"val_loss": last["val_loss"]})
        progress.close()
        log(f"step {step}: validation loss {last['val_loss']:.4f} {unit}")
        window_start = time.perf_counter()
      if step % tc.checkpoint_every == 0 or step == tc.steps:
        checkpointer.save(step, state, data_iterator=train_iter, meta=meta, force=step == tc.steps)
  finally:
    progress.close()
    checkpointer.close()
    metrics_out.close()

  last["step"] = step
  if step < tc.steps:
    log(f"stopped at step {step} of {tc.steps}; run again to resume")
    return last
  if tc.sample_tokens > 0:
    prompt = tc.sample_prompt or inputs.sample_prompt
    if dc.format == "instructions":  # ask as the fine-tuning data asks
      prompt = chat.generation_prompt(prompt, chat.get_template(dc.chat_template))
    sample = generate(graphdef, state["params"], tokenizer.encode(prompt), tc.sample_tokens, max_len=dc.seq_len,
                      seed=tc.seed)
    last["sample"] = prompt + tokenizer.decode(sample)
    log("sample:\n" + last["sample"])
  if main_process:
    (run_dir / "final_metrics.json").write_text(json.dumps(last, indent=2))
  log(f"final: step {step}, train loss {last.get('loss', float('nan')):.4f}, validation loss "
      f"{last.get('val_loss', float('nan')):.4f} {unit}")
  return last
