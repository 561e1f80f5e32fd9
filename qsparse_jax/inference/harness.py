"""The `qsparse` model of lm-evaluation-harness: zero- and few-shot accuracy of a run or a Hugging Face checkpoint,
as the paper measures its continued-training and fine-tuning results (ARC-Challenge, HellaSwag, MMLU, WinoGrande,
TruthfulQA; method.md §7, "quality").

    lm = QSparseLM(load_model("runs/tiny"))                 # or "hf:DIR" with overrides=["model.sparsity=0.6"]
    results = evaluate(lm, parse_tasks("arc_challenge,hellaswag"), task_manager=task_manager(None, [...]))

Every score comes from the model as trained (method.md §1-§5): the loglikelihood requests run the model's own
forward pass (Transformer.__call__: top-K at every site, int8 activations and ternary weights when the config says
so), batched and sorted by length, each batch right-padded to a power-of-two bucket (decode.bucket) so that a
handful of shapes compile; a context longer than the model's window loses its oldest tokens. generate_until runs the
KV-cache sparse decode of `qsparse generate` (decode.generate) with the request's stop strings and max_gen_toks.
Parameters are split over a mesh as training splits them and batches over its (data, fsdp) axes, so a model too
large for one device evaluates on a single host's slice.

This module imports lm_eval (the `eval` extra); nothing else in the package does.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import pathlib
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from lm_eval import evaluator, utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.tasks import TaskManager

from qsparse_jax import hf
from qsparse_jax.config import Config, apply_overrides
from qsparse_jax.data import tokenizers
from qsparse_jax.data.config import DataConfig
from qsparse_jax.inference import decode
from qsparse_jax.inference.loading import LoadedModel, load, with_model
from qsparse_jax.nn.model import ModelConfig, Transformer
from qsparse_jax.parallel import sharding
from qsparse_jax.parallel.sharding import MeshConfig


@dataclasses.dataclass(frozen=True)
class TaskSpec:
  """A task (or group) to evaluate, its shot count (None: the task's own default) and the metric a summary reads."""

  name: str
  num_fewshot: int | None = None
  metric: str | None = None  # the headline metric (None: every metric is shown, none averaged)


# The paper's set (its Tables 1 and 4: ARC-C, HellaSwag, MMLU, WinoGrande, TruthfulQA and their average; method.md §7).
# method.md does not give shot counts; these are the Open LLM Leaderboard's for the same five tasks (25, 10, 5, 5, 0),
# each read with the leaderboard's metric.
PAPER_TASKS = (TaskSpec("arc_challenge", 25, "acc_norm"), TaskSpec("hellaswag", 10, "acc_norm"),
               TaskSpec("mmlu", 5, "acc"), TaskSpec("winogrande", 5, "acc"), TaskSpec("truthfulqa_mc2", 0, "acc"))


def parse_tasks(text: str, num_fewshot: int | None = None) -> list[TaskSpec]:
  """"paper" or comma-separated task names; num_fewshot, when given, replaces every task's shot count."""
  names = [n.strip() for n in text.split(",") if n.strip()]
  if not names:
    raise ValueError("--tasks names no task: give e.g. arc_challenge,hellaswag or paper")
  if num_fewshot is not None and num_fewshot < 0:
    raise ValueError(f"--num-fewshot must be >= 0, got {num_fewshot}")
  specs = []
  for name in names:
    specs += list(PAPER_TASKS) if name == "paper" else [TaskSpec(name)]
  return [dataclasses.replace(s, num_fewshot=num_fewshot) if num_fewshot is not None else s for s in specs]


def task_manager(include_path: str | None, names: Sequence[str]) -> TaskManager:
  """A TaskManager that knows `names`: the tasks under include_path alone when they are all there (indexing the
  harness's thousands of built-in tasks takes seconds), else those and the built-in ones. ValueError naming a task
  neither knows."""
  if include_path is not None:
    if not pathlib.Path(include_path).is_dir():
      raise FileNotFoundError(f"--include-path {include_path!r} is not a folder of task YAMLs")
    local = TaskManager(include_path=include_path, include_defaults=False)
    if all(n in local.all_tasks for n in names):
      return local
  manager = TaskManager(include_path=include_path)
  unknown = [n for n in names if n not in manager.all_tasks]
  if unknown:
    where = f" or under {include_path}" if include_path else " (add local ones with --include-path DIR)"
    raise ValueError(f"unknown task {unknown[0]!r}: not a task, group or tag of lm-evaluation-harness{where}")
  return manager


# ------------------------------------------------------------------------------------------------ loading a model


def _split_overrides(overrides: Sequence[str]) -> tuple[list[str], list[str]]:
  model, mesh = [], []
  for item in overrides:
    key = item.partition("=")[0].strip()
    if key.startswith("model."):
      model.append(item)
    elif key.startswith("mesh."):
      mesh.append(item)
    else:
      raise ValueError(f"lm-eval takes model.* overrides (the Q-Sparse settings, e.g. model.sparsity=0.6) and mesh.* "
                       f"overrides (e.g. mesh.data=1 mesh.fsdp=-1), got {item!r}")
  return model, mesh


def make_eval_mesh(overrides: Sequence[str] = ()) -> Mesh:
  """The mesh to evaluate on: data-parallel over every device (MeshConfig()), or as mesh.* overrides say (a model
  too large for one device: mesh.data=1 mesh.fsdp=-1)."""
  _, mesh_overrides = _split_overrides(overrides)
  return sharding.make_mesh(apply_overrides(Config(), mesh_overrides).mesh)


def _hf_tokenizer_spec(directory: pathlib.Path) -> str:
  for name, kind in (("tokenizer.json", "hf"), ("tokenizer.model", "sentencepiece")):
    if (directory / name).is_file():
      return f"{kind}:{directory / name}"
  raise FileNotFoundError(f"{directory} has neither tokenizer.json nor tokenizer.model: the harness scores text, so "
                          "the checkpoint needs its tokenizer")


def load_model(checkpoint: str, *, overrides: Sequence[str] = (), step: int | None = None,
               mesh: Mesh | None = None) -> LoadedModel:
  """The model to evaluate: a run directory of `qsparse train` (its newest checkpoint, or `step`) or "hf:DIR" (a
  Hugging Face checkpoint with its tokenizer.json or tokenizer.model), its parameters sharded over mesh (default:
  make_eval_mesh(overrides)).

  overrides: model.* fields that leave the weights alone (the Q-Sparse settings: model.sparsity=S for every site,
  model.sparsity_down, model.act_bits, ...), as `qsparse eval` and hf.load_pretrained take them; mesh.* fields.
  """
  model_overrides, _ = _split_overrides(overrides)
  mesh = make_eval_mesh(overrides) if mesh is None else mesh
  if not checkpoint.startswith("hf:"):
    loaded = load(checkpoint, step=step, pack=False, mesh=mesh)  # the forward pass it was trained with
    model = apply_overrides(loaded.config, model_overrides).model
    return loaded if model == loaded.config.model else with_model(loaded, model)
  if step is not None:
    raise ValueError("--step applies to run directories; a Hugging Face checkpoint has one set of weights")
  directory = pathlib.Path(checkpoint[len("hf:"):]).expanduser()
  tokenizer_spec = _hf_tokenizer_spec(directory)
  stored = hf.from_hf(hf.read_config(directory))
  data = DataConfig(tokenizer=tokenizer_spec, seq_len=min(DataConfig.seq_len, stored.max_seq_len))
  model = apply_overrides(Config(model=stored, data=data), model_overrides).model
  changed = {f.name: getattr(model, f.name) for f in dataclasses.fields(ModelConfig)
             if getattr(model, f.name) != getattr(stored, f.name)}
  cfg, params = hf.load_pretrained(directory, mesh=mesh, **changed)
  tok = tokenizers.make_tokenizer(tokenizer_spec)
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
  return LoadedModel(config=Config(model=cfg, data=data), graphdef=graphdef, params=params, tokenizer=tok, step=0)


def dense_model(cfg: ModelConfig) -> ModelConfig:
  """The same model with every sparsity set to 0 (no top-K, no n:m block, no ReLU sparsifier); quantization of
  activations and weights is left as it is."""
  return dataclasses.replace(cfg.with_sparsity(0.0), block=None, sparsifier="topk")


# --------------------------------------------------------------------------------------------------- the LM model


def _sequence_logprobs(graphdef, params, tokens_bt, targets_bt):
  """(log p(target) [B, T] float32, target is the argmax [B, T]) of the model's forward pass over tokens [B, T]."""
  logits_btv = nnx.merge(graphdef, params)(tokens_bt).astype(jnp.float32)
  logp_btv = jax.nn.log_softmax(logits_btv, axis=-1)
  target_logp_bt = jnp.take_along_axis(logp_btv, targets_bt[..., None], axis=-1)[..., 0]
  return target_logp_bt, jnp.argmax(logits_btv, axis=-1) == targets_bt


def _cut_at_stop(text: str, until: Sequence[str]) -> str:
  """text up to the first occurrence of any stop string."""
  hits = [i for i in (text.find(s) for s in until if s) if i >= 0]
  return text[: min(hits)] if hits else text


def _gen_settings(gen_kwargs: dict, default_max_gen_toks: int) -> tuple[list[str], int, float, int, float]:
  """(until, max_gen_toks, temperature, top_k, top_p) of a generate_until request's gen_kwargs (greedy unless
  do_sample)."""
  kwargs = dict(gen_kwargs)
  until = kwargs.pop("until", None)
  until = [until] if isinstance(until, str) else list(until or [])
  max_gen = next((int(kwargs[k]) for k in ("max_gen_toks", "max_new_tokens", "max_tokens") if k in kwargs),
                 default_max_gen_toks)
  temperature = float(kwargs.get("temperature", 1.0 if kwargs.get("do_sample") else 0.0))
  if not kwargs.get("do_sample", temperature > 0):
    temperature = 0.0
  return until, max_gen, temperature, int(kwargs.get("top_k") or 0), float(kwargs.get("top_p") or 1.0)


@register_model("qsparse")
class QSparseLM(TemplateLM):
  """lm-evaluation-harness's view of a Q-Sparse model (a LoadedModel, or a checkpoint: a run directory or "hf:DIR").

  Registered as "qsparse" when this module is imported: `lm_eval.simple_evaluate(model="qsparse",
  model_args="checkpoint=runs/tiny,sparsity=0.5", ...)`; keyword arguments other than batch_size, max_gen_toks, step
  and seed set model.* fields (the Q-Sparse settings).
  batch_size: sequences per model call, rounded up to a multiple of the mesh's data x fsdp devices.
  """

  def __init__(self, checkpoint: str | LoadedModel, *, batch_size: int | str = 16, mesh: Mesh | None = None,
               max_gen_toks: int = 256, step: int | None = None, seed: int = 0, device: Any = None,
               max_batch_size: Any = None, **model_fields):
    super().__init__()
    del device, max_batch_size  # lm_eval passes these to every model; the mesh decides placement here
    if batch_size in ("auto", None):
      batch_size = 16
    if int(batch_size) < 1:
      raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    self.mesh = mesh if mesh is not None else sharding.make_mesh(MeshConfig())
    if isinstance(checkpoint, str):
      checkpoint = load_model(checkpoint, overrides=[f"model.{k}={v}" for k, v in model_fields.items()], step=step,
                              mesh=self.mesh)
    elif model_fields:
      raise ValueError(f"model settings {sorted(model_fields)} apply when loading a checkpoint by name; for a "
                       "LoadedModel use inference.with_model")
    self.model = checkpoint
    self.cfg = checkpoint.config.model
    self.tok = checkpoint.tokenizer
    rows = math.prod(self.mesh.shape[a] for a in ("data", "fsdp"))
    self.batch_size = -(-int(batch_size) // rows) * rows
    self.max_gen_toks = int(max_gen_toks)
    self.seed = int(seed)
    self._param_shardings = sharding.param_shardings(checkpoint.params, self.mesh)
    self.params = jax.device_put(checkpoint.params, self._param_shardings)
    batch = sharding.batch_sharding(self.mesh)
    graphdef = checkpoint.graphdef
    self._forward = sharding.jit_on_mesh(
        lambda params, tokens_bt, targets_bt: _sequence_logprobs(graphdef, params, tokens_bt, targets_bt),
        self.mesh, in_shardings=(self._param_shardings, batch, batch), out_shardings=(batch, batch))

  def with_model(self, cfg: ModelConfig) -> "QSparseLM":
    """The same weights, already on the mesh, run as cfg (another sparsity; inference.with_model's rules)."""
    return QSparseLM(with_model(dataclasses.replace(self.model, params=self.params), cfg), batch_size=self.batch_size,
                     mesh=self.mesh, max_gen_toks=self.max_gen_toks, seed=self.seed)

  def dense(self) -> "QSparseLM":
    """The same weights with every sparsity set to 0 (--compare-dense)."""
    return self.with_model(dense_model(self.cfg))

  # ------------------------------------------------------------------------------------------- tokens and sizes

  @property
  def eot_token_id(self) -> int:
    return self.tok.eos_id

  @property
  def max_length(self) -> int:
    return self.cfg.max_seq_len

  @property
  def tokenizer_name(self) -> str:
    return self.tok.name

  def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
    del add_special_tokens, kwargs  # our tokenizers add none
    return list(self.tok.encode(string))

  def get_model_info(self) -> dict:
    return {"qsparse_model": dataclasses.asdict(self.cfg), "qsparse_step": self.model.step,
            "qsparse_tokenizer": self.tok.name}

  # ----------------------------------------------------------------------------------------------- loglikelihood

  def score_tokens(self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]]) -> list[tuple[float, bool]]:
    """(sum of log p(continuation | context), whether every continuation token is the argmax) of each (context
    tokens, continuation tokens) pair, in order.

    The model reads context + continuation minus its last token, cut from the left to max_seq_len tokens; pairs
    are sorted by length (longest first) and cut into batches of batch_size rows, each padded on the right to a
    power-of-two bucket (a causal model's logits do not depend on the positions after them).
    """
    max_len = self.cfg.max_seq_len
    rows = []
    for context, continuation in pairs:
      if len(continuation) > max_len:
        raise ValueError(f"a continuation of {len(continuation)} tokens is longer than the model's context of "
                         f"{max_len} tokens")
      whole = (list(context) + list(continuation))[-(max_len + 1):]
      rows.append((whole[:-1], whole[1:], len(continuation)))
    results: list[tuple[float, bool]] = [(0.0, True)] * len(rows)
    order = sorted((i for i, r in enumerate(rows) if r[2] > 0), key=lambda i: -len(rows[i][0]))
    for start in range(0, len(order), self.batch_size):
      chunk = order[start:start + self.batch_size]
      t = decode.bucket(len(rows[chunk[0]][0]), max_len)
      tokens_bt = np.zeros((self.batch_size, t), np.int32)
      targets_bt = np.zeros((self.batch_size, t), np.int32)
      for r, i in enumerate(chunk):
        inputs, targets, _ = rows[i]
        tokens_bt[r, :len(inputs)], targets_bt[r, :len(targets)] = inputs, targets
      logp_bt, greedy_bt = self._forward(self.params, jnp.asarray(tokens_bt), jnp.asarray(targets_bt))
      logp_bt, greedy_bt = np.asarray(logp_bt), np.asarray(greedy_bt)
      for r, i in enumerate(chunk):
        n, c = len(rows[i][0]), rows[i][2]
        results[i] = (float(logp_bt[r, n - c:n].astype(np.float64).sum()), bool(greedy_bt[r, n - c:n].all()))
    return results

  def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
    """requests: ((context, continuation), context tokens, continuation tokens), from TemplateLM.loglikelihood."""
    del disable_tqdm, kwargs
    results = self.score_tokens([(context, continuation) for _, context, continuation in requests])
    for (key, _, _), result in zip(requests, results):
      self.cache_hook.add_partial("loglikelihood", key, result)
    return results

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    """The log-likelihood of each whole text: its tokens in windows of the model's context (each token predicted
    once, with as much context as fits; the first from the end-of-text token), the windows batched together."""
    del disable_tqdm
    pairs, owner = [], []
    for i, request in enumerate(requests):
      windows = utils.get_rolling_token_windows(token_list=self.tok_encode(request.args[0]),
                                                prefix_token=self.eot_token_id, max_seq_len=self.max_length,
                                                context_len=1)
      for window in map(utils.make_disjoint_window, windows):
        pairs.append(window)
        owner.append(i)
    totals = [0.0] * len(requests)
    for i, (logprob, _) in zip(owner, self.score_tokens(pairs)):
      totals[i] += logprob
    for request, total in zip(requests, totals):
      self.cache_hook.add_partial("loglikelihood_rolling", (request.args[0],), total)
    return totals

  # ---------------------------------------------------------------------------------------------------- generate

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    """Each context continued by decode.generate (KV cache, sparse decode steps; greedy unless the request samples)
    until one of its stop strings (`until`, cut off the returned text), the end-of-text token or max_gen_toks
    tokens. Requests with the same settings are decoded batch_size at a time, longest first; a context longer than
    max_seq_len − max_gen_toks loses its oldest tokens."""
    del disable_tqdm
    out: list[str | None] = [None] * len(requests)
    groups = collections.defaultdict(list)
    for i, request in enumerate(requests):
      context, gen_kwargs = request.args[0], (request.args[1] if len(request.args) > 1 else {})
      groups[json.dumps(_gen_settings(gen_kwargs, self.max_gen_toks))].append((i, context))
    for key, items in groups.items():
      until, max_gen, temperature, top_k, top_p = json.loads(key)
      room = self.max_length - max_gen
      if room < 1:
        raise ValueError(f"max_gen_toks={max_gen} leaves no room for a context in the model's {self.max_length} "
                         "tokens")
      sampling = decode.SamplingConfig(max_new_tokens=max_gen, temperature=temperature, top_k=top_k, top_p=top_p,
                                       seed=self.seed, stop=tuple(s for s in until if s),
                                       stop_ids=(self.eot_token_id,))
      prompts = {i: self.tok_encode(context)[-room:] or [self.eot_token_id] for i, context in items}
      order = sorted(prompts, key=lambda i: -len(prompts[i]))
      for start in range(0, len(order), self.batch_size):
        chunk = order[start:start + self.batch_size]
        batch = [prompts[i] for i in chunk]
        batch += [batch[-1]] * (self.batch_size - len(batch))  # one batch shape: repeat the last row
        with jax.set_mesh(self.mesh):
          generation = decode.generate(self.model.graphdef, self.params, self.cfg, batch, sampling,
                                       decode_text=self.tok.decode, sparse=True)
        for i, new in zip(chunk, generation.tokens):
          new = [t for t in new if t != self.eot_token_id]
          out[i] = _cut_at_stop(self.tok.decode(new), until)
          self.cache_hook.add_partial("generate_until", requests[i].args, out[i])
    return out


# ------------------------------------------------------------------------------------------- running and reporting


@dataclasses.dataclass(frozen=True)
class Score:
  task: str
  metric: str  # "acc", "acc_norm", "exact_match (strict-match)", ...
  value: float
  stderr: float | None
  samples: int | None  # documents evaluated (None for a group's aggregate)


def _scores(results: dict, name: str) -> list[Score]:
  """The metrics lm_eval reported for task or group `name` (keys "metric,filter" beside "metric_stderr,filter")."""
  entry = results["results"].get(name) or results.get("groups", {}).get(name, {})
  samples = (results.get("n-samples", {}).get(name) or {}).get("effective")
  scores = []
  for key, value in entry.items():
    metric, sep, filter_name = key.partition(",")
    if not sep or metric.endswith("_stderr") or not isinstance(value, (int, float)):
      continue
    stderr = entry.get(f"{metric}_stderr,{filter_name}")
    label = metric if filter_name == "none" else f"{metric} ({filter_name})"
    scores.append(Score(name, label, float(value), float(stderr) if isinstance(stderr, (int, float)) else None,
                        samples))
  return scores


def evaluate(lm: QSparseLM, specs: Sequence[TaskSpec], *, task_manager: TaskManager, limit: int | float | None = None,
             bootstrap_iters: int = 1000) -> list[Score]:
  """Every metric of every task, through lm_eval.simple_evaluate (one call per shot count). A task whose dataset
  cannot be downloaded raises the ConnectionError of `datasets`, naming it."""
  by_shots = collections.defaultdict(list)
  for spec in specs:
    by_shots[spec.num_fewshot].append(spec.name)
  scores = []
  for shots, names in by_shots.items():
    results = evaluator.simple_evaluate(model=lm, tasks=list(names), num_fewshot=shots, limit=limit,
                                        task_manager=task_manager, log_samples=False,
                                        bootstrap_iters=bootstrap_iters)
    for name in names:
      scores += _scores(results, name)
  return scores


def headline(scores: Sequence[Score], specs: Sequence[TaskSpec]) -> list[Score]:
  """The headline metric of each spec that names one, then their average (the paper's "Avg" column) when there are
  several."""
  picked = [s for spec in specs for s in scores if spec.metric and s.task == spec.name and s.metric == spec.metric]
  if len(picked) > 1:
    picked.append(Score("average", "", float(np.mean([s.value for s in picked])), None, None))
  return picked


def table(scores: Sequence[Score], dense: Sequence[Score] | None = None, *, label: str = "model",
          specs: Sequence[TaskSpec] = ()) -> str:
  """Each task's metrics with their standard errors; with dense, the dense column beside and the difference."""
  def cell(s: Score | None) -> str:
    if s is None:
      return f"{'':>17}"
    return f"{s.value:8.4f} ± {s.stderr:.4f}" if s.stderr is not None else f"{s.value:8.4f}{'':>9}"

  rows = list(scores)
  summary = headline(scores, specs)
  dense_by = {(s.task, s.metric): s for s in (list(dense) + headline(dense, specs) if dense is not None else [])}
  width = max([len(s.task) for s in rows + summary] + [4])
  mwidth = max([len(s.metric) for s in rows] + [6])
  head = f"{'task':<{width}}  {'metric':<{mwidth}}  {'n':>6}  {label:>17}"
  if dense is not None:
    head += f"  {'dense':>17}  {'difference':>10}"
  lines = [head]
  for s in rows + ([None] if summary else []) + summary:
    if s is None:
      lines.append("")
      continue
    line = f"{s.task:<{width}}  {s.metric:<{mwidth}}  {s.samples if s.samples is not None else '':>6}  {cell(s)}"
    if dense is not None:
      d = dense_by.get((s.task, s.metric))
      line += f"  {cell(d)}  {s.value - d.value:>+10.4f}" if d is not None else ""
    lines.append(line)
  return "\n".join(lines)


def scores_json(scores: Sequence[Score], dense: Sequence[Score] | None = None) -> dict:
  return {"scores": [dataclasses.asdict(s) for s in scores],
          "dense": None if dense is None else [dataclasses.asdict(s) for s in dense]}


def sparsity_label(cfg: ModelConfig) -> str:
  """"Q-Sparse" for a model with any sparse site, else "dense"."""
  sparse = any(s.sparsity > 0 or s.block is not None for s in cfg.sites().values()) or cfg.sparsifier == "relu"
  return "Q-Sparse" if sparse else "dense"
