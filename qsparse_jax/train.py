"""Training: the jitted Q-Sparse language-model step and the loop around it.

The step is a pure function of a train state {"step", "params", "opt_state"} and a batch of tokens: next-token
cross-entropy (for supervised fine-tuning, on response tokens only: response_loss), AdamW (β = 0.9, 0.95) with warm-up then cosine or polynomial decay, weight decay on matrices only,
global-norm clipping (method.md §7). The loop adds periodic evaluation on the held-out split, a progress line
(step, loss, tokens/s, ETA), metrics as JSONL and TensorBoard events, asynchronous Orbax checkpoints with the data
iterator's state (so a killed run resumes on the same loss curve), and a text sample at the end.
"""

from __future__ import annotations

import json
import pathlib
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from qsparse_jax import chat
from qsparse_jax import data as data_lib
from qsparse_jax import init_from as init_lib
from qsparse_jax import sharding
from qsparse_jax.checkpoint import Checkpointer, CheckpointMismatchError, meta_json
from qsparse_jax.config import Config, TrainConfig
from qsparse_jax.inputs import make_inputs
from qsparse_jax.model import ModelConfig, Transformer, activated_params_per_token, count_params

# ---------------------------------------------------------------------------------------------- pure functions


def make_schedule(tc: TrainConfig) -> optax.Schedule:
  """Linear warm-up to learning_rate, then cosine or polynomial (power 1) decay to end_learning_rate."""
  warmup_steps = min(tc.warmup_steps, tc.steps)  # a short run of a preset keeps its shape
  decay_steps = max(1, tc.steps - warmup_steps)
  if tc.decay == "cosine":
    decay = optax.cosine_decay_schedule(tc.learning_rate, decay_steps, alpha=tc.end_learning_rate / tc.learning_rate)
  elif tc.decay == "polynomial":
    decay = optax.polynomial_schedule(tc.learning_rate, tc.end_learning_rate, power=1.0, transition_steps=decay_steps)
  else:
    raise ValueError(f"train.decay must be 'cosine' or 'polynomial', got {tc.decay!r}")
  warmup = optax.linear_schedule(0.0, tc.learning_rate, max(1, warmup_steps))
  return optax.join_schedules([warmup, decay], [warmup_steps])


def make_optimizer(tc: TrainConfig) -> optax.GradientTransformation:
  """Clip by global norm, then AdamW; weight decay applies to matrices (ndim >= 2), not to norm scales."""
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)  # noqa: E731
  return optax.chain(
      optax.clip_by_global_norm(tc.clip_norm),
      optax.adamw(make_schedule(tc), b1=tc.b1, b2=tc.b2, weight_decay=tc.weight_decay, mask=decay_mask),
  )


def init_model(cfg: ModelConfig, seed: int):
  """(graphdef, params) of a freshly initialised Transformer."""
  return nnx.split(Transformer(cfg, rngs=nnx.Rngs(seed)))


def init_train_state(cfg: ModelConfig, tx: optax.GradientTransformation, seed: int, mesh: Mesh | None = None):
  """(graphdef, state) with state = {"step", "params", "opt_state"}.

  With a mesh, every array is created already sharded (one jitted initialisation with out_shardings): no host
  ever holds the whole model.
  """
  def init():
    _, params = init_model(cfg, seed)
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}

  graphdef, _ = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(seed))))
  if mesh is None:
    return graphdef, init()
  shardings = sharding.train_state_shardings(jax.eval_shape(init), tx, mesh)
  return graphdef, jax.jit(init, out_shardings=shardings)()


def lm_loss(graphdef, params, tokens_bt: jax.Array) -> jax.Array:
  """Mean next-token cross-entropy (nats/token) of tokens [B, T+1]: inputs [:, :-1], targets [:, 1:]."""
  logits_btv = nnx.merge(graphdef, params)(tokens_bt[:, :-1])
  return optax.softmax_cross_entropy_with_integer_labels(logits_btv, tokens_bt[:, 1:]).mean()


def response_loss(graphdef, params, batch: dict[str, jax.Array]) -> jax.Array:
  """Mean next-token cross-entropy over response tokens only, of packed instruction rows (sft_data.sft_batches:
  "tokens", "loss_mask", "segment_ids", "positions", each [B, T+1]).

  Each conversation of a row sees only itself (segment ids in the attention mask, positions restarting at 0); a
  target counts when its loss mask is 1 and it belongs to the same conversation as its input token.
  """
  tokens_bt, segments_bt = batch["tokens"], batch["segment_ids"]
  logits_btv = nnx.merge(graphdef, params)(tokens_bt[:, :-1], batch["positions"][:, :-1], segments_bt[:, :-1])
  nll_bt = optax.softmax_cross_entropy_with_integer_labels(logits_btv, tokens_bt[:, 1:])
  counted_bt = (batch["loss_mask"][:, 1:] > 0) & (segments_bt[:, 1:] == segments_bt[:, :-1]) & (segments_bt[:, 1:] > 0)
  return jnp.sum(jnp.where(counted_bt, nll_bt, 0.0)) / jnp.maximum(jnp.sum(counted_bt), 1)


def make_train_step(graphdef, tx: optax.GradientTransformation, mesh: Mesh | None = None,
                    state_shardings=None, loss_fn: Callable = lm_loss) -> Callable:
  """train_step(state, batch) -> (state, metrics), jitted with the state donated; batch is what loss_fn takes
  (lm_loss: tokens [B, T+1]; response_loss: a dict of [B, T+1] arrays).

  With a mesh (and the state's shardings), the step is compiled for it: state in and out keep their shardings,
  the batch is split over (data, fsdp), metrics are replicated.
  """

  def train_step(state, batch):
    loss, grads = jax.value_and_grad(lambda p: loss_fn(graphdef, p, batch))(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads)}
    return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, metrics

  if mesh is None:
    return jax.jit(train_step, donate_argnums=0)
  return sharding.jit_on_mesh(train_step, mesh, in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
                              out_shardings=(state_shardings, sharding.replicated(mesh)), donate_argnums=0)


def make_eval_step(graphdef, mesh: Mesh | None = None, param_shardings=None, loss_fn: Callable = lm_loss
                   ) -> Callable:
  """eval_step(params, batch) -> mean loss (loss_fn: lm_loss or response_loss)."""
  loss = lambda params, batch: loss_fn(graphdef, params, batch)  # noqa: E731
  if mesh is None:
    return jax.jit(loss)
  return sharding.jit_on_mesh(loss, mesh, in_shardings=(param_shardings, sharding.batch_sharding(mesh)),
                              out_shardings=sharding.replicated(mesh))


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


# ------------------------------------------------------------------------------------------------------ the loop


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
      kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= resumed_step]
      path.write_text("".join(line + "\n" for line in kept))
    self._jsonl = open(path, "a", encoding="utf-8")
    try:
      from tensorboardX import SummaryWriter

      self._tb = SummaryWriter(str(run_dir / "tensorboard"))
    except ImportError:  # pragma: no cover - tensorboardX is a dependency; this only guards odd installs
      self._tb = None

  def write(self, step: int, values: dict[str, float]):
    if not self.enabled:
      return
    self._jsonl.write(json.dumps({"step": step, **values}) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      for name, value in values.items():
        self._tb.add_scalar(name, value, step)

  def close(self):
    if not self.enabled:
      return
    self._jsonl.close()
    if self._tb is not None:
      self._tb.close()


def _check_resumable(meta: dict, config: Config, run_dir: pathlib.Path) -> None:
  stored_model, stored_tok = meta.get("model", {}), meta.get("data", {}).get("tokenizer")
  current = meta_json(config)
  for field, value in current["model"].items():
    if field in stored_model and stored_model[field] != value and field != "kernels":  # kernels: not the weights
      raise CheckpointMismatchError(
          f"checkpoint in {run_dir} was written with model.{field}={stored_model[field]!r}, this config has "
          f"{value!r}: use another train.out_dir, or the same model config to resume")
  if stored_tok is not None and stored_tok != config.data.tokenizer:
    raise CheckpointMismatchError(f"checkpoint in {run_dir} was written with data.tokenizer={stored_tok!r}, this "
                                  f"config has {config.data.tokenizer!r}")


def train(config: Config, *, log: Callable[[str], None] = print, stop_after: int | None = None) -> dict[str, Any]:
  """Train (or resume) the run described by config; returns the final metrics.

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
  run_dir.mkdir(parents=True, exist_ok=True)
  tokenizer = data_lib.make_tokenizer(dc.tokenizer)
  if tokenizer.vocab_size > mc.vocab_size:
    raise ValueError(f"model.vocab_size={mc.vocab_size} is smaller than the tokenizer's vocabulary "
                     f"({tokenizer.name}: {tokenizer.vocab_size})")

  mesh = sharding.make_mesh(config.mesh)
  shard_index, shard_count = sharding.process_batch_rows(mesh, tc.batch_size)
  local_batch = tc.batch_size // shard_count  # the rows this process reads; the mesh assembles the global batch

  tx, schedule = make_optimizer(tc), make_schedule(tc)
  graphdef, state = init_train_state(mc, tx, tc.seed, mesh)
  state_shardings = jax.tree.map(lambda x: x.sharding, state)
  loss_fn = response_loss if dc.format == "instructions" else lm_loss
  train_step = make_train_step(graphdef, tx, mesh, state_shardings, loss_fn)
  eval_step = make_eval_step(graphdef, mesh, state_shardings["params"], loss_fn)
  inputs = make_inputs(dc, tokenizer, batch_size=local_batch, eval_batches=tc.eval_batches, seed=dc.shuffle_seed,
                       process_index=shard_index, process_count=shard_count)
  train_iter = iter(inputs.train)

  checkpointer = Checkpointer(run_dir / "checkpoints", keep=tc.keep_checkpoints, save_every=tc.checkpoint_every)
  meta = meta_json(config)
  if checkpointer.latest_step() is not None:
    _check_resumable(checkpointer.read_meta(), config, run_dir)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    state, _ = checkpointer.restore(abstract)
    log(f"resumed from {checkpointer.directory} at step {int(state['step'])}")
    if (why := checkpointer.restore_data_iterator(train_iter)) is not None:
      log(f"the data stream restarts from its beginning: {why}")
  elif tc.init_from:
    params = init_lib.load_initial_params(tc.init_from, mc, mesh, tokenizer=dc.tokenizer)
    state = {**state, "params": jax.device_put(params, state_shardings["params"])}
    log(f"parameters from {tc.init_from} (the optimizer starts fresh)")

  counts = count_params(mc)
  log(f"model: {counts['total'] / 1e6:.2f}M parameters ({counts['non_embedding'] / 1e6:.2f}M non-embedding), "
      f"{activated_params_per_token(mc) / 1e6:.2f}M activated per token; sparsity q/k/v {mc.sparsity_qkv}, "
      f"out {mc.sparsity_out}, up {mc.sparsity_up}, down {mc.sparsity_down}")
  log(f"data: {inputs.summary}, "
      f"tokenizer {tokenizer.name}, {tc.batch_size} x {dc.seq_len} tokens per step; run directory {run_dir}")
  log(f"mesh: data {mesh.shape['data']} x fsdp {mesh.shape['fsdp']} x tensor {mesh.shape['tensor']} over "
      f"{mesh.size} {jax.devices()[0].platform} devices in {jax.process_count()} process(es)")

  metrics_out = _Metrics(run_dir, int(state["step"]), enabled=main_process)
  progress = _Progress(tc.steps, tc.progress and main_process)
  step = int(state["step"])
  tokens_per_step = tc.batch_size * dc.seq_len
  last = {"step": step}
  window_start, window_steps = time.perf_counter(), 0

  def global_batch(local):
    return jax.tree.map(lambda rows: sharding.make_global_batch(rows, mesh, tc.batch_size), local)

  def evaluate(params):
    return float(np.mean([float(eval_step(params, global_batch(b))) for b in inputs.validation]))

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
        last = {"step": step, "loss": loss, "grad_norm": float(metrics["grad_norm"]), "tokens_per_s": tokens_per_s,
                "learning_rate": float(schedule(step))}
        metrics_out.write(step, {k: v for k, v in last.items() if k != "step"})
        window_start, window_steps = time.perf_counter(), 0
      if step % tc.eval_every == 0 or step == tc.steps:
        last["val_loss"] = evaluate(state["params"])
        metrics_out.write(step, {"val_loss": last["val_loss"]})
        progress.close()
        log(f"step {step}: validation loss {last['val_loss']:.4f} nats/token")
        window_start = time.perf_counter()
      if step % tc.checkpoint_every == 0 or step == tc.steps:
        checkpointer.save(step, state, data_iterator=train_iter, meta=meta, force=step == tc.steps)
  finally:
    progress.close()
    checkpointer.close()
    metrics_out.close()

  if step < tc.steps:
    log(f"stopped at step {step} of {tc.steps}; run again to resume")
    return last
  if tc.sample_tokens > 0:
    prompt = tc.sample_prompt
    if dc.format == "instructions":  # ask as the fine-tuning data asks
      prompt = chat.generation_prompt(prompt, chat.get_template(dc.chat_template))
    sample = generate(graphdef, state["params"], tokenizer.encode(prompt), tc.sample_tokens, max_len=dc.seq_len,
                      seed=tc.seed)
    last["sample"] = prompt + tokenizer.decode(sample)
    log("sample:\n" + last["sample"])
  if main_process:
    (run_dir / "final_metrics.json").write_text(json.dumps(last, indent=2))
  return last
